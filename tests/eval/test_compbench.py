"""T2I-CompBench: BLIP-VQA question rules and scoring on a tiny BLIP, CLIP cosine against CLIPModel, naming,
unavailable categories, resume and failures."""

import json

import pytest
import torch

from egrpo.eval.compbench import (NOT_AVAILABLE, BlipVqaScorer, ClipCosineScorer, check_category, evaluate_compbench,
                                  generation_jobs, read_samples, sample_name, vqa_questions)
from egrpo.eval.io import EvalError
from tests.eval.conftest import write_corrupt_png, write_png


def chunker(prompt):
    return {"a red book and a blue (cup)": ["a red book", "the left", "a blue (cup)", "top"]}.get(prompt, [])


def test_questions_drop_position_chunks_and_punctuation():
    assert vqa_questions("a red book and a blue (cup)", chunker) == ["a red book?", "a blue cup?"]
    nine = lambda p: [f"Chunk {i}." for i in range(9)]        # noqa: E731
    assert vqa_questions("x", nine) == [f"chunk {i}?" for i in range(8)]   # at most 8, lower-cased, '.' removed


@pytest.mark.parametrize("category", sorted(NOT_AVAILABLE))
def test_unavailable_categories_are_refused_not_approximated(category):
    with pytest.raises(EvalError, match="not available"):
        check_category(category)
    with pytest.raises(EvalError, match="must be one of"):
        check_category("colour")


def test_names_follow_the_benchmark():
    assert sample_name("a red book", 12) == "a red book_000012.png"
    jobs = generation_jobs(["p0", "p1"], "/r", images_per_prompt=3)
    assert [p.rsplit("/", 1)[-1] for p in jobs[1][1]] == ["p1_000003.png", "p1_000004.png", "p1_000005.png"]


def test_blip_answers_product_and_enc_token(tiny_dirs):
    scorer = BlipVqaScorer(tiny_dirs["blip"], chunker=chunker, image_size=48)
    image = torch.rand(3, 40, 50)
    seen = []
    encoder = scorer.model.text_encoder
    original = encoder.forward
    encoder.forward = lambda *a, **k: seen.append(k["input_ids"].clone()) or original(*a, **k)
    score, answers = scorer(image, "a red book and a blue (cup)")
    encoder.forward = original
    assert list(answers) == ["a red book?", "a blue cup?"]
    assert all(0 < a < 1 for a in answers.values())
    assert score == pytest.approx(answers["a red book?"] * answers["a blue cup?"], rel=1e-6)
    assert (seen[0][:, 0] == scorer.dec_token_id + 1).all()         # [ENC] replaces the first token
    # A question's answer does not depend on the other questions asked about the image (no padding leaks in).
    alone = scorer.answer_yes(image, ["a blue cup?"])[0]
    assert alone == pytest.approx(answers["a blue cup?"], abs=1e-6)
    with pytest.raises(EvalError, match="no noun chunk"):
        scorer(image, "nothing here")


def test_blip_answer_is_yes_over_yes_plus_no(tiny_dirs):
    scorer = BlipVqaScorer(tiny_dirs["blip"], chunker=chunker, image_size=32)
    logits = torch.randn(1, 1, scorer.model.config.text_config.vocab_size)
    decoder = scorer.model.text_decoder
    original = decoder.forward
    decoder.forward = lambda *a, **k: type("Out", (), {"logits": logits})()
    got = scorer.answer_yes(torch.rand(3, 32, 32), ["a cat?"])[0]
    decoder.forward = original
    yes, no = logits[0, 0, scorer.yes_id].double(), logits[0, 0, scorer.no_id].double()
    assert got == pytest.approx(float(torch.sigmoid(yes - no)), rel=1e-5)


def test_clip_cosine_matches_clip_model(tiny_dirs):
    from transformers import AutoTokenizer, CLIPModel

    from egrpo.rewards.clip_score import clip_preprocess

    scorer = ClipCosineScorer(tiny_dirs["clip"])
    image = torch.rand(3, 36, 30)
    model = CLIPModel.from_pretrained(tiny_dirs["clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_dirs["clip"])(["a red cat"], return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, pixel_values=clip_preprocess(image[None], 28))
    assert scorer(image, "a red cat") == pytest.approx(float(out.logits_per_image[0, 0] / model.logit_scale.exp()),
                                                       rel=1e-5)


def test_end_to_end_with_failures_and_resume(tiny_dirs, tmp_path):
    samples = tmp_path / "imgs" / "samples"
    for k in range(3):
        write_png(samples / sample_name("a red cat", k), rgb=(10 * k, 0, 0))
    write_corrupt_png(samples / sample_name("a red cat", 3))
    scorer = ClipCosineScorer(tiny_dirs["clip"])
    summary = evaluate_compbench("non_spatial", str(tmp_path / "imgs"), str(tmp_path / "out"), scorer, False)
    assert summary["scored"] == 3 and summary["failed"] == 1 and summary["metric"] == "clip"
    with open(tmp_path / "out" / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["prompt"] for r in ok} == {"a red cat"}
    assert summary["score"] == pytest.approx(sum(r["score"] for r in ok) / 3)
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| spatial | not available:" in table and "| complex | not available:" in table
    calls = []
    counting = lambda image, prompt: calls.append(prompt) or 0.5      # noqa: E731
    evaluate_compbench("non_spatial", str(tmp_path / "imgs"), str(tmp_path / "out"), counting, False)
    assert len(calls) == 0                                            # the corrupt one fails before scoring


def test_folder_errors(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        read_samples(str(tmp_path / "nope"))
    (tmp_path / "samples").mkdir()
    with pytest.raises(EvalError, match="no .png images"):
        read_samples(str(tmp_path))
    write_png(tmp_path / "samples" / "no-index.png")
    with pytest.raises(EvalError, match="not named"):
        read_samples(str(tmp_path))
