"""Evaluator aggregation and rules that change reported numbers: GenEval colour counts and stale results, WISE
per-category means and completeness, the prefs metrics' scales, T2I-CompBench's per-image mean and file names.
Expected values are computed by hand or with the tiny models' own forward passes."""

import json

import pytest
import torch

from egrpo.eval.io import EvalError
from tests.eval.conftest import write_png


def det(label, score, box):
    from egrpo.rewards.detection import Detection

    return Detection(label, score, box)


# ------------------------------------------------------------------------------------------------------ GenEval

def test_geneval_colour_clause_needs_count_objects_of_that_colour():
    from egrpo.eval.geneval import evaluate_image

    meta = {"tag": "counting", "include": [{"class": "car", "count": 2, "color": "red"}]}
    objects = {"car": [det("car", 0.95, (0, 0, 10, 10)), det("car", 0.94, (20, 0, 30, 10))]}
    table = {0.95: "red", 0.94: "blue"}
    correct, reason = evaluate_image(meta, objects, lambda dets, name: [table[d.score] for d in dets])
    assert correct is False and reason == "expected red car>=2, found 1 red; and 1 blue"
    table[0.94] = "red"
    assert evaluate_image(meta, objects, lambda dets, name: [table[d.score] for d in dets]) == (True, "")


def test_geneval_summary_counts_only_the_images_now_in_the_folder(tmp_path):
    from egrpo.eval.geneval import evaluate_geneval, write_prompt_folder

    metas = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
              "prompt": "a photo of a dog and a cat"}]
    images = tmp_path / "images"
    for i, meta in enumerate(metas):
        write_prompt_folder(str(images), i, meta)
        write_png(images / f"{i:05d}" / "samples" / "0000.png")
    dog = lambda image: [det("dog", 0.9, (0, 0, 10, 10))]      # noqa: E731  one dog in every image
    first = evaluate_geneval(str(images), str(tmp_path / "out"), dog, None, show_progress=False)
    assert first["tasks"] == {"single_object": 1.0, "two_object": 0.0} and first["overall"] == 0.5
    # The two_object prompt folder is removed: its old record stays in results.jsonl but is not this folder's.
    (images / "00001" / "samples" / "0000.png").unlink()
    (images / "00001" / "samples").rmdir()
    again = evaluate_geneval(str(images), str(tmp_path / "out"), dog, None, show_progress=False)
    assert again["tasks"] == {"single_object": 1.0} and again["overall"] == 1.0 and again["scored"] == 1


# --------------------------------------------------------------------------------------------------------- WISE

def test_wise_category_score_is_the_mean_over_its_images():
    from egrpo.eval.wise import summarise

    firsts = {"Cultural": 1, "Time": 401, "Space": 568, "Biology": 701, "Physics": 801, "Chemistry": 901}
    records = [{"category": c, "wiscore": 1.0} for c in firsts]
    records += [{"category": "Cultural", "wiscore": 0.0}, {"category": "Cultural", "wiscore": 0.5}]
    summary = summarise(records)
    assert summary["categories"]["Cultural"] == pytest.approx(0.5)            # (1 + 0 + 0.5) / 3
    assert summary["images"]["Cultural"] == 3 and summary["scored"] == 8
    assert summary["overall"] == pytest.approx(0.4 * 0.5 + 0.167 + 0.133 + 0.3)
    assert summary["complete"] is True
    # every category scored but an image failed: the overall is given, the summary is not complete
    failed = summarise(records, failed=1)
    assert failed["overall"] == pytest.approx(summary["overall"]) and failed["complete"] is False


def test_wise_scores_outside_0_to_2_are_unreadable():
    from egrpo.eval.wise import parse_judgement

    with pytest.raises(EvalError, match="aesthetic quality"):
        parse_judgement("Consistency: 2\nRealism: 1\nAesthetic Quality: 10")
    with pytest.raises(EvalError, match="consistency"):
        parse_judgement("Consistency: 12\nRealism: 1\nAesthetic Quality: 1")


# ---------------------------------------------------------------------------------------------------- prefs

def test_pickscore_is_logit_scale_times_cosine(tiny_dirs):
    from transformers import AutoTokenizer, CLIPModel

    from egrpo.eval.prefs import build_scorer
    from egrpo.rewards.clip_score import clip_preprocess

    scorer = build_scorer("pickscore", {"pickscore": tiny_dirs["clip"]})
    images, prompts = torch.rand(2, 3, 28, 28), ["a red cat", "a blue dog"]
    model = CLIPModel.from_pretrained(tiny_dirs["clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_dirs["clip"])(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=clip_preprocess(images, 28)).logits_per_image.diagonal()
    assert float(model.logit_scale.detach().exp()) > 5      # the scale is not 1: a plain cosine would differ
    torch.testing.assert_close(scorer(images, prompts), logits, rtol=1e-4, atol=1e-4)


def test_hps_metric_is_100_times_the_reward_cosine(tiny_dirs, tmp_path):
    from transformers import AutoTokenizer

    from egrpo.eval.prefs import build_scorer
    from egrpo.rewards.hps import HPSReward
    from tests.rewards.test_clip_hps import tiny_open_clip_state

    tok = AutoTokenizer.from_pretrained(tiny_dirs["clip"])
    torch.save({"state_dict": tiny_open_clip_state(len(tok))}, str(tmp_path / "hps.pt"))
    images, prompts = torch.rand(2, 3, 30, 30), ["a red cat", "a blue dog"]
    metric = build_scorer("hps", {"hps": str(tmp_path / "hps.pt"), "hps_tokenizer": tiny_dirs["clip"]})
    cosine = HPSReward(str(tmp_path / "hps.pt"), tiny_dirs["clip"])(images, prompts)
    assert cosine.abs().max() > 1e-3
    torch.testing.assert_close(metric(images, prompts), 100 * cosine, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ T2I-CompBench

def test_compbench_score_is_the_mean_over_images_not_prompts(tmp_path):
    from egrpo.eval.compbench import evaluate_compbench, sample_name

    samples = tmp_path / "imgs" / "samples"
    for k in range(3):
        write_png(samples / sample_name("a red cat", k))
    write_png(samples / sample_name("a blue dog", 3))
    scores = {"a red cat": 1.0, "a blue dog": 0.0}
    summary = evaluate_compbench("color", str(tmp_path / "imgs"), str(tmp_path / "out"),
                                 lambda image, prompt: (scores[prompt], {}), False)
    assert summary["scored"] == 4 and summary["score"] == pytest.approx(3 / 4)     # per-prompt mean would be 1/2



def test_compbench_drops_position_chunks_before_keeping_eight():
    from egrpo.eval.compbench import vqa_questions

    chunks = ["the left", "top"] + [f"thing {i}" for i in range(9)]
    assert vqa_questions("x", lambda prompt: chunks) == [f"thing {i}?" for i in range(8)]


# -------------------------------------------------------------------------------------------------------- prefs

def test_prefs_nan_score_is_a_failed_record_not_part_of_the_mean(tmp_path):
    from egrpo.eval.prefs import evaluate_prefs

    root = tmp_path / "imgs"
    rows = []
    for i, value in enumerate([1.0, float("nan"), 3.0]):
        write_png(root / f"{i}.png", rgb=(10 * i, 0, 0))
        rows.append({"file": f"{i}.png", "prompt": str(value), "metadata": {}})
    (root / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scorer = lambda images, prompts: torch.tensor([float(prompts[0])])     # noqa: E731
    summary = evaluate_prefs(str(root), str(tmp_path / "out"), {"m": scorer}, show_progress=False)
    assert summary["metrics"]["m"] == pytest.approx(2.0) and summary["scored"]["m"] == 2
    assert summary["failed"]["m"] == 1 and summary["complete"] is False


def test_clip_score_scale_divides(tiny_dirs):
    from egrpo.rewards.clip_score import ClipScoreReward

    images, prompts = torch.rand(2, 3, 28, 28), ["a red cat", "a blue dog"]
    plain = ClipScoreReward(tiny_dirs["clip"], use_logit_scale=False)(images, prompts)
    scaled = ClipScoreReward(tiny_dirs["clip"], use_logit_scale=False, scale=4.0)(images, prompts)
    assert plain.abs().max() > 1e-3
    torch.testing.assert_close(scaled, plain / 4.0)


# ------------------------------------------------------------------------------------------------------ folders

def test_folder_without_index_reads_prompts_from_file_names(tmp_path):
    from egrpo.eval.prefs import folder_items

    write_png(tmp_path / "a_red_cat.png")
    write_png(tmp_path / "two_dogs.png")
    assert [(it["key"], it["prompt"]) for it in folder_items(str(tmp_path))] == [("a_red_cat.png", "a red cat"),
                                                                                ("two_dogs.png", "two dogs")]
    assert {it["prompt"] for it in folder_items(str(tmp_path), prompt="x_y")} == {"x_y"}


def test_geneval_layout_reads_only_numbered_samples(tmp_path):
    from egrpo.eval.geneval import read_layout, write_prompt_folder

    write_prompt_folder(str(tmp_path), 0, {"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                                           "prompt": "a photo of a dog"})
    samples = tmp_path / "00000" / "samples"
    for name in ("0000.png", "0001.png.partial.png", "grid.png"):   # an interrupted write, a contact sheet
        write_png(samples / name)
    assert [it["key"] for it in read_layout(str(tmp_path))] == ["00000/samples/0000.png"]
