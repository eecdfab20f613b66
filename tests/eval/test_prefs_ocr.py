"""Preference scores (aesthetic, CLIPScore, HPS v2.1 through the reward adapter) on tiny models against
independent computations, and STAGE's OCR accuracy with hand-computed values; folders, failures, resume."""

import json

import pytest
import torch

from egrpo.eval.io import EvalError
from egrpo.eval.ocr import evaluate_ocr, ocr_accuracy, ocr_target
from egrpo.eval.prefs import AestheticScorer, build_scorer, evaluate_prefs, folder_items
from egrpo.rewards.base import MissingDependencyError
from tests.eval.conftest import write_corrupt_png, write_png


def aesthetic_head(path, embed=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [embed, 12, 6, 4, 1]
    state = {}
    for n, (i, o) in zip((0, 2, 4, 6), zip(sizes, sizes[1:])):        # LAION's Sequential: Linear, Dropout, ...
        state[f"layers.{n}.weight"] = torch.randn(o, i, generator=g)
        state[f"layers.{n}.bias"] = torch.randn(o, generator=g)
    torch.save(state, str(path))
    return state


def test_aesthetic_is_linear_stack_on_normalised_embedding(tiny_dirs, tmp_path):
    from transformers import CLIPModel

    from egrpo.rewards.clip_score import clip_preprocess

    state = aesthetic_head(tmp_path / "head.pth")
    scorer = AestheticScorer(tiny_dirs["clip"], str(tmp_path / "head.pth"))
    images = torch.rand(2, 3, 30, 40)
    got = scorer(images, ["x", "y"])
    model = CLIPModel.from_pretrained(tiny_dirs["clip"]).eval()
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=clip_preprocess(images, 28)).pooler_output
        x = model.visual_projection(embeds).double()
    x = x / x.norm(dim=-1, keepdim=True)
    for n in (0, 2, 4, 6):
        x = x @ state[f"layers.{n}.weight"].double().T + state[f"layers.{n}.bias"].double()
    torch.testing.assert_close(got.double(), x[:, 0], rtol=1e-4, atol=1e-5)
    torch.save({"other": torch.zeros(3)}, str(tmp_path / "bad.pth"))
    with pytest.raises(EvalError, match="layers.N.weight"):
        AestheticScorer(tiny_dirs["clip"], str(tmp_path / "bad.pth"))


def test_clipscore_is_hessel_scaled_cosine(tiny_dirs):
    from transformers import AutoTokenizer, CLIPModel

    from egrpo.rewards.clip_score import clip_preprocess

    scorer = build_scorer("clipscore", {"clip": tiny_dirs["clip"]})
    images = torch.rand(3, 3, 28, 28)
    prompts = ["a red cat", "a blue dog", "a green car"]
    got = scorer(images, prompts)
    model = CLIPModel.from_pretrained(tiny_dirs["clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_dirs["clip"])(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cos = model(**tokens, pixel_values=clip_preprocess(images, 28)).logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(got, 2.5 * cos.clamp_min(0), rtol=1e-4, atol=1e-5)


def test_missing_weights_and_packages_are_clear():
    with pytest.raises(EvalError, match="--hps-tokenizer"):
        build_scorer("hps", {"hps": "/x.pt"})
    with pytest.raises(EvalError, match="unknown metric"):
        build_scorer("fid", {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_scorer("pickscore", {"pickscore": "/no/such/dir"})
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="image-reward"):
            build_scorer("imagereward", {"imagereward": "/x.pt", "imagereward_med_config": "/m.json"})


def generated_folder(root, n=3, corrupt=True):
    rows = []
    for i in range(n):
        write_png(root / f"{i:05d}_00.png", rgb=(40 * i, 90, 10))
        rows.append({"file": f"{i:05d}_00.png", "prompt": f'a sign that says "OPEN {i}"', "metadata": {}})
    if corrupt:
        write_corrupt_png(root / "bad.png")
        rows.append({"file": "bad.png", "prompt": 'a sign that says "BAD"', "metadata": {}})
    rows.append({"file": "missing.png", "prompt": 'a sign that says "GONE"', "metadata": {}})
    (root / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prefs_folder_end_to_end_with_hps(tiny_dirs, tmp_path):
    from tests.rewards.test_clip_hps import tiny_open_clip_state   # the HPS adapter's own tiny checkpoint

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["clip"])
    torch.save({"state_dict": tiny_open_clip_state(len(tok))}, str(tmp_path / "hps.pt"))
    generated_folder(tmp_path / "imgs")
    aesthetic_head(tmp_path / "head.pth")
    paths = {"hps": str(tmp_path / "hps.pt"), "hps_tokenizer": tiny_dirs["clip"], "clip": tiny_dirs["clip"],
             "aesthetic_head": str(tmp_path / "head.pth")}
    scorers = {m: build_scorer(m, paths) for m in ("hps", "aesthetic")}
    summary = evaluate_prefs(str(tmp_path / "imgs"), str(tmp_path / "out"), scorers, show_progress=False)
    assert summary["scored"] == {"hps": 3, "aesthetic": 3} and summary["failed"] == {"hps": 2, "aesthetic": 2}
    with open(tmp_path / "out" / "results.hps.jsonl") as f:
        records = [json.loads(line) for line in f]
    errors = sorted(r["error"] for r in records if r["status"] == "failed")
    assert "missing image" in errors[1] and "cannot read image" in errors[0]
    values = [r["hps"] for r in records if r["status"] == "ok"]
    assert all(-100 <= v <= 100 for v in values)
    assert summary["metrics"]["hps"] == pytest.approx(sum(values) / 3)
    # Resume: nothing already scored is scored again.
    calls = []
    summary = evaluate_prefs(str(tmp_path / "imgs"), str(tmp_path / "out"),
                             {"hps": lambda i, p: calls.append(p) or torch.zeros(1)}, show_progress=False)
    assert calls == [] and summary["scored"]["hps"] == 3


def test_prefs_empty_or_missing_folder(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        folder_items(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no images"):
        folder_items(str(tmp_path / "empty"))


@pytest.mark.parametrize("recognised, expected", [
    ("xx Hello World yy", 1.0),               # target is a substring: distance 0
    ("helo world", 0.9),                      # "heloworld" vs "helloworld": 1 edit of 10
    ("", 0.0),                                # 10 edits
    ("abcdefghijklmnopqrstuvw", 0.0),         # 23 edits, capped at len(target) = 10 (else negative)
    ("HELLO  WORLD", 1.0),                    # case and spaces ignored
])
def test_ocr_accuracy_by_hand(recognised, expected):
    assert ocr_accuracy(recognised, "Hello World") == pytest.approx(expected)


def test_ocr_target_is_first_quoted_text():
    assert ocr_target('a sign "OPEN" next to "CLOSED"') == "OPEN"
    with pytest.raises(EvalError, match="no text in double quotes"):
        ocr_target("a plain sign")


def test_ocr_end_to_end_with_fake_reader(tmp_path):
    generated_folder(tmp_path / "imgs")
    texts = iter(["open 0", "OPEN 9", "nothing"])
    summary = evaluate_ocr(str(tmp_path / "imgs"), str(tmp_path / "out"), reader=lambda image: next(texts),
                           show_progress=False)
    # "open0" -> 1; "open9" vs "open1": 1 edit of 5 -> 0.8; "nothing" vs "open2": 7 edits capped at 5 -> 0
    assert summary["scored"] == 3 and summary["failed"] == 2
    assert summary["accuracy"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)


def test_imagereward_goes_through_its_package_api(tmp_path, monkeypatch):
    """The optional package is not installed here: a stand-in module checks the calls the adapter makes."""
    import sys
    import types

    calls = []

    class Model:
        def score(self, prompt, image):
            calls.append((prompt, image.size))
            return 0.25 * len(prompt)

    fake = types.ModuleType("ImageReward")
    fake.load = lambda path, device, med_config: calls.append((path, device, med_config)) or Model()
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    (tmp_path / "ir.pt").write_bytes(b"x")
    (tmp_path / "med.json").write_text("{}")
    scorer = build_scorer("imagereward", {"imagereward": str(tmp_path / "ir.pt"),
                                          "imagereward_med_config": str(tmp_path / "med.json")})
    got = scorer(torch.rand(2, 3, 8, 6), ["ab", "abcd"])
    assert calls[0] == (str(tmp_path / "ir.pt"), "cpu", str(tmp_path / "med.json"))
    assert calls[1:] == [("ab", (6, 8)), ("abcd", (6, 8))]
    assert got.tolist() == [0.5, 1.0]
