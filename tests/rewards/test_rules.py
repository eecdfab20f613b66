"""Rule rewards on synthetic detections and images with known answers; the failure policy; lazy imports."""

import importlib
import sys

import pytest
import torch

from egrpo.rewards.detection import Detection, nms, relative_position
from egrpo.rewards.geneval import GradedGenEvalReward, box_colour, geneval_score
from egrpo.rewards.grounding_dino import detection_prompt, object_reward, position_score


def det(label, box, score=0.9):
    return Detection(label, score, box)


def test_relative_position_and_nms():
    left, right = det("a", (0.0, 0.4, 0.2, 0.6)), det("b", (0.7, 0.4, 0.9, 0.6))
    assert relative_position(left, right) == {"left of"} and relative_position(right, left) == {"right of"}
    top, bottom = det("a", (0.4, 0.0, 0.6, 0.2)), det("b", (0.4, 0.7, 0.6, 0.9))
    assert relative_position(top, bottom) == {"above"} and relative_position(bottom, top) == {"below"}
    assert relative_position(left, det("b", (0.02, 0.4, 0.22, 0.6))) == set()      # overlapping: no relation
    boxes = [det("cat", (0.1, 0.1, 0.5, 0.5), 0.9), det("cat", (0.12, 0.1, 0.5, 0.52), 0.8),
             det("dog", (0.1, 0.1, 0.5, 0.5), 0.7), det("cat", (0.6, 0.6, 0.9, 0.9), 0.6)]
    assert [(d.label, d.score) for d in nms(boxes)] == [("cat", 0.9), ("dog", 0.7), ("cat", 0.6)]


def test_geneval_counting_colour_position_known_answers():
    cats = [det("cat", (0.1 * i, 0.1, 0.1 * i + 0.08, 0.2)) for i in range(3)]
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    assert geneval_score(counting, cats[:2])[0] == 1.0
    assert geneval_score(counting, cats)[0] == pytest.approx(0.5)                   # 1 - |3 - 2| / 2
    assert geneval_score(counting, cats[:1])[0] == pytest.approx(0.5)
    assert geneval_score(counting, [])[0] == 0.0
    four = {"tag": "counting", "include": [{"class": "cat", "count": 4}]}
    assert geneval_score(four, cats)[0] == pytest.approx(0.75)
    colours = {"red": "red", "blue": "blue"}
    two = [det("car", (0.0, 0.0, 0.3, 0.3), 0.9), det("car", (0.6, 0.6, 0.9, 0.9), 0.8)]
    colour_of = lambda d: "red" if d.box[0] == 0.0 else "blue"
    red_cars = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "red"}]}
    assert geneval_score(red_cars, two, colour_of=colour_of)[0] == pytest.approx(0.5)  # one of two is red
    mixed = {"tag": "color_attr", "include": [{"class": "car", "color": "red"}, {"class": "ball", "color": "blue"}]}
    assert geneval_score(mixed, two[:1], colour_of=colour_of) == (pytest.approx(0.5), [1.0, 0.0])
    dog, car = det("dog", (0.0, 0.4, 0.2, 0.6)), det("car", (0.7, 0.4, 0.9, 0.6))
    position = {"tag": "position", "include": [{"class": "car"}, {"class": "dog", "position": ["left of", 0]}]}
    assert geneval_score(position, [dog, car]) == (1.0, [1.0, 1.0])
    wrong = {"tag": "position", "include": [{"class": "car"}, {"class": "dog", "position": ["right of", 0]}]}
    assert geneval_score(wrong, [dog, car]) == (0.5, [1.0, 0.0])
    assert geneval_score(position, [dog]) == (0.0, [0.0, 0.0])
    with pytest.raises(ValueError, match="include"):
        geneval_score({"tag": "counting"}, [])
    with pytest.raises(ValueError, match="relation"):
        geneval_score({"include": [{"class": "a"}, {"class": "b", "position": ["behind", 0]}]}, [])


def test_geneval_reward_reads_colours_from_pixels():
    image = torch.ones(2, 3, 40, 40)                                   # white background
    image[0, :, 5:20, 5:20] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]       # red square, top left
    image[0, :, 22:38, 22:38] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]     # blue square, bottom right
    image[1, :, 5:20, 5:20] = torch.tensor([0.0, 0.7, 0.1])[:, None, None]       # green square
    assert box_colour(image[0], (5 / 40, 5 / 40, 20 / 40, 20 / 40)) == "red"
    assert box_colour(image[0], (22 / 40, 22 / 40, 38 / 40, 38 / 40)) == "blue"
    assert box_colour(image[1], (5 / 40, 5 / 40, 20 / 40, 20 / 40)) == "green"
    boxes = [det("apple", (5 / 40, 5 / 40, 20 / 40, 20 / 40)), det("ball", (22 / 40, 22 / 40, 38 / 40, 38 / 40))]
    detector = lambda images, queries: [[d for d in boxes if d.label in q] for q in queries]
    reward = GradedGenEvalReward(detector=detector)
    meta = {"tag": "colors", "include": [{"class": "apple", "color": "red"}, {"class": "ball", "color": "blue"}]}
    got = reward(image, ["a red apple and a blue ball"] * 2, [meta, meta])
    assert got.tolist() == [1.0, 0.0]     # image 1: the apple box is green, the ball box is white


def test_grounding_dino_rules_known_answers():
    assert detection_prompt(["cat", " red car "]) == ("cat . red car .", [(0, 3), (6, 13)])
    cat, dog = det("cat", (0.0, 0.4, 0.2, 0.6), 0.9), det("dog", (0.7, 0.4, 0.9, 0.6), 0.8)
    objects = {"nouns": ["cat", "dog", "car"]}
    assert object_reward(objects, [cat, dog]) == pytest.approx(2 / 3)
    assert object_reward(objects, [cat, cat, cat]) == pytest.approx(1 / 3)
    assert object_reward(objects, [cat, cat, dog], strict=True) == pytest.approx(1 / 3 - 1 / 6 + 1 / 3)
    assert object_reward(objects, [cat] * 3, strict=True) == 0.0
    assert object_reward({"nouns": []}, []) == 1.0
    spatial = {"nouns": ["cat", "dog"], "task_type": "spatial",
               "spatial_info": {"obj1": "cat", "obj2": "dog", "locality": "on the left of"}}
    assert object_reward(spatial, [cat, dog]) == pytest.approx(0.9)               # 0.2 + 0.2 + 1 / 2
    assert object_reward(spatial, [cat]) == pytest.approx(0.2)
    flipped = dict(spatial, spatial_info={"obj1": "dog", "obj2": "cat", "locality": "on the left of"})
    assert object_reward(flipped, [cat, dog]) == pytest.approx(0.4)
    assert object_reward(spatial, [cat, cat, dog]) == pytest.approx(0.9)
    assert object_reward(spatial, [cat, cat, dog], strict=True) == pytest.approx(0.3)   # 0.1 + 0.2 < 0.4
    numeracy = {"nouns": ["cat"], "task_type": "numeracy", "numeracy_info": [{"num": 2, "obj_name": "cat"},
                                                                            {"num": 1, "obj_name": "dog"}]}
    second = det("cat", (0.5, 0.0, 0.6, 0.1), 0.5)
    duplicate = det("cat", (0.0, 0.41, 0.2, 0.61), 0.4)                          # removed by NMS
    assert object_reward(numeracy, [cat, second, duplicate, dog]) == pytest.approx(1.0)
    assert object_reward(numeracy, [cat, dog]) == pytest.approx((0.2 + 1.0) / 2)
    assert object_reward(numeracy, []) == 0.0
    above, below = (0.4, 0.0, 0.6, 0.2), (0.4, 0.7, 0.6, 0.9)
    assert position_score("on the top of", above, below) == 1.0
    assert position_score("above", above, below) == 1.0
    assert position_score("above", above, below, released_spatial=True) == 0.0
    assert position_score("below", below, above) == 1.0
    overlap = position_score("left of", (0.0, 0.0, 0.6, 0.2), (0.3, 0.0, 0.9, 0.2))
    assert overlap == pytest.approx(0.1 / (0.3 * 0.2 / (2 * 0.6 * 0.2 - 0.3 * 0.2)))   # iou_threshold / iou


def test_failure_policy_and_masking():
    from egrpo.rewards.base import Reward, mask_failed_rewards

    class Flaky(Reward):
        name = "flaky"

        def score(self, images, prompts, metadata):
            if "boom" in prompts:
                raise RuntimeError("model crashed")
            return [float("nan") if p == "nan" else 1.0 for p in prompts]

    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"flaky.*non-finite.*\[1\]"):
        Flaky()(images, ["a", "nan", "b", "c"])
    with pytest.raises(RuntimeError, match="flaky.*model crashed"):
        Flaky(batch_size=2)(images, ["a", "b", "boom", "c"])
    masked = Flaky(batch_size=2, on_failure="mask")
    got = masked(images, ["a", "nan", "boom", "c"])
    assert got[0] == 1.0 and got[1].isnan() and got[2].isnan() and got[3].isnan()   # whole failed chunk masked
    assert masked.metrics() == {"masked": 3.0, "scored": 4.0}
    with pytest.raises(ValueError, match="on_failure"):
        Flaky(on_failure="ignore")
    rewards = torch.tensor([[1.0, 0.0], [float("nan"), 2.0], [3.0, 4.0], [5.0, float("nan")]])
    filled, valid = mask_failed_rewards(rewards, group_size=2)
    assert filled.tolist() == [[1.0, 0.0], [1.0, 2.0], [3.0, 4.0], [5.0, 4.0]]
    assert valid.tolist() == [True, False, True, False]
    with pytest.raises(RuntimeError, match="group"):
        mask_failed_rewards(torch.tensor([float("nan"), float("nan"), 1.0, 2.0]), group_size=2)


def test_jpeg_compressibility_prefers_flat_images():
    from egrpo.rewards.compressibility import JpegCompressibilityReward

    images = torch.stack([torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64)])
    got = JpegCompressibilityReward()(images, ["x", "y"], None)
    assert got[0] > got[1] and got[1] < -5.0 and -1.5 < got[0] < 0
    assert (JpegCompressibilityReward(incompressible=True)(images, ["x", "y"], None) == -got).all()


def test_registry_and_lazy_imports(monkeypatch):
    import egrpo.rewards as rewards
    from egrpo.rewards.base import MissingDependencyError, require
    from egrpo.rewards.registry import REWARDS, build_rewards

    for name in ("ocr", "jpeg_compressibility", "geneval", "geneval_graded", "grounding_dino", "grounding_dino_strict", "git_vqa",
                 "orm", "clip_score", "hps"):
        assert name in REWARDS
    with pytest.raises(MissingDependencyError, match="pip install no-such-package"):
        require("no_such_module_xyz", "no-such-package", reward="test")
    reward_set = build_rewards([{"name": "jpeg_compressibility", "weight": 2.0}, {"name": "colour"}])
    assert reward_set.names == ["jpeg_compressibility", "colour"]
    # A module whose import fails is recorded; the others still import, and the name raises when built.
    monkeypatch.setitem(sys.modules, "egrpo.rewards.orm", None)
    monkeypatch.delitem(REWARDS, "orm")
    importlib.reload(rewards)
    try:
        assert "orm" in rewards.UNAVAILABLE and "hps" not in rewards.UNAVAILABLE
        with pytest.raises(ImportError, match="orm"):
            REWARDS["orm"](path="x")
    finally:
        monkeypatch.undo()
        del REWARDS["orm"]
        importlib.reload(importlib.import_module("egrpo.rewards.orm"))
        importlib.reload(rewards)
    assert REWARDS["orm"].__name__ == "ORMReward"


def test_to_pil_truncates_like_the_released_post_processing():
    import numpy as np

    from egrpo.rewards.base import to_pil

    x = torch.tensor([0.5, 0.999, 1.0, -0.2, 1.3, 254.9 / 255]).reshape(1, 3, 1, 2)
    got = np.asarray(to_pil(x)[0]).transpose(2, 0, 1).reshape(-1).tolist()
    assert got == [127, 254, 255, 0, 255, 254]                   # rounding would give 128, 255, ..., 255
    # decoder output in [-1, 1] (a little beyond): the released np.clip((x + 1) / 2 * 255, 0, 255).astype(uint8)
    dec = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    released = np.clip((dec.numpy() + 1) / 2 * 255, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    ours = np.stack([np.asarray(im) for im in to_pil(((dec + 1) / 2).clamp(0, 1))])
    assert np.array_equal(ours, released)
    # every uint8 value survives PNG -> [0, 1] float (egrpo.eval.io.load_image) -> pixels
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert np.array_equal(np.asarray(to_pil(values.float() / 255.0)[0]), values[0].permute(1, 2, 0).numpy())
