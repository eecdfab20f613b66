"""GenEval end to end on tiny random Mask2Former / CLIP models: detector post-processing against hand-computed
values, colour classifier against CLIPModel's own forward, the layout, results schema, resume and failures."""

import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

from egrpo.eval.geneval import (BACKGROUND, COLOURS, COLOUR_TEMPLATES, ClipColourClassifier, MaskedDetection,
                                Mask2FormerDetector, evaluate_geneval, load_geneval_prompts, mask_box, read_layout,
                                sample_path, write_prompt_folder)
from egrpo.eval.io import EvalError
from tests.eval.conftest import write_corrupt_png, write_png

META = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]


def test_preprocess_keeps_ratio_and_pads(tiny_dirs):
    detector = Mask2FormerDetector(tiny_dirs["detector"])
    x, size = detector.preprocess(torch.rand(3, 384, 384))
    assert size == (800, 800) and x.shape == (3, 800, 800)
    x, size = detector.preprocess(torch.rand(3, 200, 300))          # scale min(1333/300, 800/200) = 4
    assert size == (800, 1200) and x.shape == (3, 800, 1216)       # width padded to a multiple of 32
    x, size = detector.preprocess(torch.rand(3, 100, 1000))         # scale min(1.333, 8) -> 133 x 1333
    assert size == (133, 1333) and x.shape == (3, 160, 1344)


def test_detector_scores_boxes_and_labels_by_hand(tiny_dirs):
    detector = Mask2FormerDetector(tiny_dirs["detector"], short_side=32, long_side=64)
    classes = torch.full((1, 2, 81), -1e4)
    classes[0, 0, 16], classes[0, 0, 80] = math.log(3.0), 0.0   # query 0: p(dog) = 3/4, p(no object) = 1/4
    classes[0, 1, 64] = 5.0                                       # query 1: "computer mouse" with certainty ...
    masks = torch.full((1, 2, 8, 8), -1.0)                        # ... but an empty mask (all logits < 0)
    masks[0, 0] = 2.0                                             # query 0: the whole image, sigmoid(2) inside
    detector.model = lambda pixel_values: SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks)
    dets = detector(torch.rand(3, 24, 40))
    assert len(dets) == 100                                        # top-100 (query, class) pairs
    best = max(dets, key=lambda d: d.score)
    assert best.label == "dog" and best.box == (0.0, 0.0, 40.0, 24.0) and best.mask.shape == (24, 40)
    assert best.score == pytest.approx(0.75 / (1 + math.exp(-2.0)), rel=1e-5)
    mouse = [d for d in dets if d.label == "computer mouse"]
    assert mouse and all(d.score == 0.0 and d.box == (0.0, 0.0, 0.0, 0.0) for d in mouse)


def test_detector_must_have_the_80_coco_classes(tmp_path):
    from tests.eval._tiny import save_tiny_mask2former

    with pytest.raises(ValueError, match="geneval --detector: .* predicts 133 classes"):
        Mask2FormerDetector(save_tiny_mask2former(tmp_path / "panoptic", num_labels=133))


def test_mask_box_is_tight_and_exclusive():
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == (3.0, 2.0, 9.0, 5.0)


def test_colour_crop_pastes_through_mask_on_grey(tiny_dirs):
    classifier = ClipColourClassifier(tiny_dirs["clip"])
    image = torch.zeros(3, 20, 30)
    image[0] = 1.0                                                # all red
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[5:15, 10:15] = True                                      # left half of the box below
    det = MaskedDetection("car", 0.9, (10.0, 5.0, 20.0, 15.0), mask=mask)
    crop = classifier.paste_and_crop(image, det)
    assert crop.shape == (3, 10, 10)
    assert torch.equal(crop[:, :, :5], image[:, 5:15, 10:15])
    assert torch.all(crop[:, :, 5:] == BACKGROUND) and BACKGROUND == pytest.approx(153 / 255)


def test_colour_classifier_matches_clip_forward(tiny_dirs):
    from transformers import AutoTokenizer, CLIPModel

    from egrpo.rewards.clip_score import clip_preprocess

    classifier = ClipColourClassifier(tiny_dirs["clip"])
    image = torch.rand(3, 30, 30)
    dets = [MaskedDetection("dog", 0.9, (0.0, 0.0, 30.0, 30.0), mask=None),
            MaskedDetection("dog", 0.8, (3.0, 4.0, 20.0, 25.0), mask=torch.rand(30, 30) > 0.5)]
    got = classifier(image, dets, "dog")
    model = CLIPModel.from_pretrained(tiny_dirs["clip"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["clip"])
    texts = [t.format(c=c, obj="dog") for c in COLOURS for t in COLOUR_TEMPLATES]
    crops = torch.stack([clip_preprocess(classifier.paste_and_crop(image, d)[None], 28)[0] for d in dets])
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=crops)
    text = out.text_embeds.double().reshape(len(COLOURS), len(COLOUR_TEMPLATES), -1).mean(1)
    text = text / text.norm(dim=-1, keepdim=True)
    expected = [COLOURS[i] for i in (out.image_embeds.double() @ text.T).argmax(-1).tolist()]
    assert got == expected
    assert classifier(image, [], "dog") == []


def make_layout(root, with_corrupt=True):
    for i, meta in enumerate(META):
        write_prompt_folder(str(root), i, meta)
        for j in range(2):
            write_png(root / f"{i:05d}" / "samples" / f"{j:04d}.png", rgb=(200, 30 * j, 10), size=(48, 40))
    if with_corrupt:
        write_corrupt_png(root / "00001" / "samples" / "0002.png")


def test_layout_is_what_the_official_evaluator_reads(tmp_path):
    make_layout(tmp_path, with_corrupt=False)
    assert sorted(os.listdir(tmp_path)) == ["00000", "00001"]
    with open(tmp_path / "00001" / "metadata.jsonl") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == META[1]
    assert all(re.fullmatch(r"\d+\.png", f) for f in os.listdir(tmp_path / "00000" / "samples"))
    assert sample_path(str(tmp_path), 7, 3).endswith(os.path.join("00007", "samples", "0003.png"))
    items = read_layout(str(tmp_path))
    assert [it["key"] for it in items] == ["00000/samples/0000.png", "00000/samples/0001.png",
                                           "00001/samples/0000.png", "00001/samples/0001.png"]


def test_end_to_end_resume_and_failures(tiny_dirs, tmp_path):
    images, out = tmp_path / "images", tmp_path / "scores"
    make_layout(images)
    detector = Mask2FormerDetector(tiny_dirs["detector"], short_side=32, long_side=64)
    calls = []
    counted = lambda image: calls.append(1) or detector(image)       # noqa: E731
    colours = ClipColourClassifier(tiny_dirs["clip"])
    summary = evaluate_geneval(str(images), str(out), counted, colours, show_progress=False)
    assert len(calls) == 4                                            # the corrupt PNG fails before detection
    assert summary["scored"] == 4 and summary["failed"] == 1 and summary["complete"] is False
    with open(out / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 5
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["key"] == "00001/samples/0002.png" and "cannot read image" in failed[0]["error"]
    ok = [r for r in records if r["status"] == "ok"]
    assert set(ok[0]) >= {"key", "status", "prompt", "tag", "correct", "reason", "detections"}
    per_task = {}
    for r in ok:
        per_task.setdefault(r["tag"], []).append(float(r["correct"]))
    expected = {t: sum(v) / len(v) for t, v in per_task.items()}
    assert summary["tasks"] == expected and summary["overall"] == pytest.approx(sum(expected.values()) / 2)
    with open(out / "summary.json") as f:
        assert json.load(f)["tasks"] == expected
    assert "| **overall** |" in (out / "summary.md").read_text()
    # Resume: only the failed image is tried again; after a fix it is scored and the summary is complete.
    write_png(images / "00001" / "samples" / "0002.png", size=(48, 40))
    calls.clear()
    summary = evaluate_geneval(str(images), str(out), counted, colours, show_progress=False)
    assert len(calls) == 1 and summary["scored"] == 5 and summary["failed"] == 0 and summary["complete"]


def test_folder_and_prompt_errors(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        read_layout(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no GenEval prompt folders"):
        read_layout(str(tmp_path / "empty"))
    write_prompt_folder(str(tmp_path / "nosamples"), 0, META[0])
    with pytest.raises(EvalError, match="no samples"):
        read_layout(str(tmp_path / "nosamples"))
    bad = tmp_path / "bad" / "00000"
    bad.mkdir(parents=True)
    (bad / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(EvalError, match="not readable GenEval metadata"):
        read_layout(str(tmp_path / "bad"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(META[0]) + "\n" + json.dumps({"tag": "colors", "include": []}) + "\n")
    with pytest.raises(EvalError, match="line 2"):
        load_geneval_prompts(str(prompts))


def test_colour_clause_goes_through_the_clip_classifier(tiny_dirs, tmp_path):
    images = tmp_path / "images"
    write_prompt_folder(str(images), 0, META[1])                      # "a photo of a red car"
    write_png(images / "00000" / "samples" / "0000.png", rgb=(220, 20, 20), size=(30, 30))
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[5:25, 5:25] = True
    car = MaskedDetection("car", 0.8, (5.0, 5.0, 25.0, 25.0), mask=mask)
    seen = []
    classifier = ClipColourClassifier(tiny_dirs["clip"])
    spy = lambda image, dets, name: seen.append((dets, name)) or classifier(image, dets, name)   # noqa: E731
    evaluate_geneval(str(images), str(tmp_path / "out"), lambda image: [car], spy, show_progress=False)
    with open(tmp_path / "out" / "results.jsonl") as f:
        record = json.loads(f.readline())
    assert seen == [([car], "car")]
    image = torch.zeros(3, 30, 30)
    image[0], image[1], image[2] = 220 / 255, 20 / 255, 20 / 255
    assert record["correct"] is (classifier(image, [car], "car") == ["red"])
