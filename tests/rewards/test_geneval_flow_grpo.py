"""The `geneval` training reward: Flow-GRPO's GenEval reward (the one STAGE trained with). Its rule against values
computed by hand from the released rule's text (module docstring of egrpo.rewards.geneval), the images it scores
(8 bits, truncated), the detection filter it shares with the GenEval benchmark, and the models loaded by path."""

import json

import pytest
import torch

from egrpo.rewards.detection import Detection
from egrpo.rewards.geneval import GenEvalReward, flow_grpo_score, quantised
from egrpo.rewards.geneval_models import filter_detections

LEFT, RIGHT, FAR_RIGHT = (0, 40, 20, 60), (60, 40, 80, 60), (90, 40, 100, 60)   # pixel boxes on one row


def objects(*pairs):
    """``{class: [Detection, ...]}`` from (class, box) pairs, in the order given (best first)."""
    out = {}
    for name, box in pairs:
        out.setdefault(name, []).append(Detection(name, 0.95, box))
    return out


def colours(*answers):
    """A colour classifier answering ``answers`` in order over its calls; it records each call's class and count."""
    calls, left = [], list(answers)

    def classify(found, name):
        calls.append((name, len(found)))
        return [left.pop(0) for _ in found]

    classify.calls = calls
    return classify


def one(name, count=1, **extra):
    return {"class": name, "count": count, **extra}


@pytest.mark.parametrize("meta, found, answers, values", [
    # single_object / two_object: 1 - |count - n| / count per clause; extra objects are penalised
    ({"tag": "single_object", "include": [one("dog")]}, [("dog", LEFT)], (), [1.0]),
    ({"tag": "single_object", "include": [one("dog")]}, [], (), [0.0]),
    ({"tag": "two_object", "include": [one("dog"), one("cat")]}, [("dog", LEFT), ("dog", RIGHT), ("cat", FAR_RIGHT)],
     (), [0.0, 1.0]),
    # counting: negative when more than twice the count; the exclude clause is not scored
    ({"tag": "counting", "include": [one("cat", 3)], "exclude": [one("cat", 4)]}, [("cat", LEFT)] * 5, (),
     [1 - 2 / 3]),
    ({"tag": "counting", "include": [one("cat", 2)], "exclude": [one("cat", 3)]}, [("cat", LEFT)] * 5, (), [-0.5]),
    # colors: a wrong count appends 0 for the colour without classifying; else 1 - |count - n_colour| / count
    ({"tag": "colors", "include": [one("car", color="red")]}, [("car", LEFT), ("car", RIGHT)], ("red", "red"),
     [0.0, 0.0]),
    ({"tag": "colors", "include": [one("car", color="red")]}, [("car", LEFT)], ("red",), [1.0, 1.0]),
    ({"tag": "colors", "include": [one("car", color="red")]}, [("car", LEFT)], ("blue",), [1.0, 0.0]),
    ({"tag": "color_attr", "include": [one("car", 2, color="red"), one("dog", color="blue")]},
     [("car", LEFT), ("car", RIGHT), ("dog", FAR_RIGHT)], ("red", "green", "blue"), [1.0, 0.5, 1.0, 1.0]),
    # position: a held relation appends 1; a failed one 0 and then 1 (as released); no target: 0 alone
    ({"tag": "position", "include": [one("cat"), one("dog", position=["left of", 0])]},
     [("dog", LEFT), ("cat", RIGHT)], (), [1.0, 1.0, 1.0]),
    ({"tag": "position", "include": [one("cat"), one("dog", position=["right of", 0])]},
     [("dog", LEFT), ("cat", RIGHT)], (), [1.0, 1.0, 0.0, 1.0]),
    ({"tag": "position", "include": [one("cat"), one("dog", position=["left of", 0])]}, [("dog", LEFT)], (),
     [0.0, 1.0, 0.0]),
    ({"tag": "position", "include": [one("cat"), one("dog", position=["left of", 0])]},
     [("dog", LEFT), ("dog", RIGHT), ("cat", FAR_RIGHT)], (), [1.0, 0.0, 0.0]),
    # a colour that fails skips the clause's position (nothing appended for it)
    ({"tag": "position", "include": [one("cat"), one("dog", color="red", position=["left of", 0])]},
     [("dog", LEFT), ("cat", RIGHT)], ("blue",), [1.0, 1.0, 0.0]),
    # every pair must hold: two dogs, one of them right of the cat
    ({"tag": "position", "include": [one("cat"), one("dog", 2, position=["left of", 0])]},
     [("dog", LEFT), ("dog", FAR_RIGHT), ("cat", RIGHT)], (), [1.0, 1.0, 0.0, 1.0]),
])
def test_rule_against_hand_computed_values(meta, found, answers, values):
    classify = colours(*answers)
    reward, strict, got = flow_grpo_score(meta, objects(*found), classify)
    assert got == pytest.approx(values)
    assert reward == pytest.approx(sum(values) / len(values))
    assert strict == all(v == 1.0 for v in values)
    # the colour classifier sees every kept object of the class, and only when their number is right
    coloured = [c for c in meta["include"] if "color" in c]
    counts = {name: sum(1 for n, _ in found if n == name) for name in {c["class"] for c in coloured}}
    assert classify.calls == [(c["class"], c["count"]) for c in coloured if counts[c["class"]] == c["count"]]


def test_exclude_clauses_are_not_scored_and_metadata_is_checked():
    meta = {"tag": "single_object", "include": [one("dog")], "exclude": [one("dog", 1)]}
    assert flow_grpo_score(meta, objects(("dog", LEFT)))[:2] == (1.0, True)
    with pytest.raises(ValueError, match="non-empty 'include'"):
        flow_grpo_score({"tag": "counting"}, {})
    with pytest.raises(ValueError, match="needs colours_of"):
        flow_grpo_score({"include": [one("car", color="red")]}, objects(("car", LEFT)))


def test_reward_scores_8_bit_images_after_genevals_filter():
    """The detector sees each image at 8 bits (truncated, as the released pipeline's uint8 conversion); its
    detections pass GenEval's filter (0.3, or 0.9 for counting; at most 16 per class) before the rule."""
    seen = []

    def detector(image):
        seen.append(image)
        return [Detection("cat", 0.95, LEFT), Detection("cat", 0.5, RIGHT), Detection("cat", 0.2, FAR_RIGHT)]

    reward = GenEvalReward(detector=detector, colour_classifier=lambda image, found, name: ["red"] * len(found))
    images = torch.full((3, 3, 8, 8), 0.5)
    images[1] = 1.7 / 255                                       # truncated to 1/255, not rounded to 2/255
    meta = [{"tag": "single_object", "include": [one("cat")]},      # 0.95 and 0.5 kept: two cats -> 0
            {"tag": "counting", "include": [one("cat")]},           # only 0.95 above 0.9 -> exactly one
            {"tag": "colors", "include": [one("cat", 2, color="red")]}]
    scores = reward(images, ["p"] * 3, meta)
    assert scores.tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(seen[0], torch.full((3, 8, 8), 127 / 255)) and torch.equal(seen[1], torch.full((3, 8, 8), 1 / 255))
    assert torch.equal(quantised(torch.tensor([-0.2, 0.0, 0.999, 1.0, 1.3])),
                       torch.tensor([0.0, 0.0, 254 / 255, 1.0, 1.0]))
    many = filter_detections([Detection("dog", 0.9 - i / 100, LEFT) for i in range(20)], "two_object")
    assert len(many["dog"]) == 16


def test_reward_from_paths_and_wrong_models_are_named(tmp_path):
    from tests.eval._tiny import save_tiny_clip, save_tiny_mask2former

    from egrpo.rewards.geneval_models import ClipColourClassifier, Mask2FormerDetector

    detector_dir = save_tiny_mask2former(tmp_path / "m2f")
    clip_dir = save_tiny_clip(tmp_path / "clip")
    reward = GenEvalReward(detector_path=detector_dir, clip_path=clip_dir, batch_size=2)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 48, 48)
    meta = [{"tag": "colors", "include": [one("person", color="red")]},
            {"tag": "counting", "include": [one("dog", 2)]},
            {"tag": "position", "include": [one("cat"), one("dog", position=["left of", 0])]}]
    detector, classifier = Mask2FormerDetector(detector_dir), ClipColourClassifier(clip_dir)
    want = []
    for image, m in zip(quantised(images), meta):
        found = filter_detections(detector(image), m["tag"], threshold=-1.0, counting_threshold=-1.0)
        assert sum(len(v) for v in found.values()) > 0       # (a random model: every detection kept below)
        want.append(flow_grpo_score(m, filter_detections(detector(image), m["tag"]),
                                    lambda f, n, image=image: classifier(image, f, n))[0])
    assert reward(images, ["p"] * 3, meta).tolist() == pytest.approx(want)
    assert [type(m).__name__ for m in reward.modules()] == ["Mask2FormerForUniversalSegmentation", "CLIPModel"]

    gdino = tmp_path / "gdino"
    gdino.mkdir()
    (gdino / "config.json").write_text(json.dumps({"model_type": "grounding-dino"}))
    with pytest.raises(ValueError, match=r"geneval: detector_path: .*gdino holds a 'grounding-dino' model; give a "
                                         r"COCO instance-segmentation Mask2Former \(GroundingDINO: the geneval_graded"):
        GenEvalReward(detector_path=str(gdino), clip_path=clip_dir)
    with pytest.raises(ValueError, match=r"geneval: clip_path: .*m2f holds a 'mask2former' model; give a CLIP"):
        GenEvalReward(detector_path=detector_dir, clip_path=detector_dir)
    with pytest.raises(ValueError, match="exactly one of clip_path"):
        GenEvalReward(detector_path=detector_dir)
    with pytest.raises(FileNotFoundError, match="geneval: detector_path: '/no/such' does not exist"):
        GenEvalReward(detector_path="/no/such", clip_path=clip_dir)


def test_the_earlier_rules_arguments_point_to_geneval_graded():
    from egrpo.rewards.registry import check_reward_arguments

    with pytest.raises(ValueError, match=r"rewards\[0\]: bad arguments: .*box_threshold.*is the geneval_graded reward"):
        check_reward_arguments(GenEvalReward, {"detector_path": "x", "box_threshold": 0.3}, "rewards[0]")
