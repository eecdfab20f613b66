"""Reward combination and the small rule pieces whose mistakes change reward values silently: weighted sums,
skipped-group bookkeeping, the colour reward's nearest colour and word parsing, the OCR target and reading order,
and failure messages naming the right samples. Expected values by hand."""

import sys
import types

import pytest
import torch

from egrpo.rewards.registry import RewardSet, build_rewards, colours_in


def flat(rgb, n=1, size=4):
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(n, 3, size, size).clone()


def test_combine_is_the_weighted_sum_of_the_functions():
    rewards = build_rewards([{"name": "colour", "weight": 2.0}, {"name": "colour", "weight": -0.5, "soft": False}])
    assert rewards.names == ["colour", "colour_1"]
    per_function = torch.tensor([[1.0, 4.0], [0.5, -2.0]])
    assert rewards.combine(per_function).tolist() == [2.0 - 2.0, 1.0 + 1.0]


def test_skipped_groups_are_counted_per_group_and_zeroed():
    calls = []

    def flaky(images, prompts, metadata):
        calls.append(list(prompts))
        if "bad" in prompts:
            raise RuntimeError("model crashed")
        return torch.arange(len(prompts), dtype=torch.float32) + 1

    rewards = RewardSet([flaky], ["flaky"], [1.0], on_error=["skip_group"])
    out = rewards(torch.rand(6, 3, 4, 4), ["a", "b", "bad", "c", "d", "e"], [{}] * 6, group_size=2)
    assert out[:, 0].tolist() == [1.0, 2.0, 0.0, 0.0, 1.0, 2.0]          # group 1 skipped, the others re-scored
    assert rewards.skipped == 1 and rewards.last_skipped.tolist() == [False, False, True, True, False, False]
    assert len(rewards.pop_failures()) == 1 and rewards.pop_failures() == []


def test_colour_reward_uses_the_nearest_named_colour():
    reward = build_rewards([{"name": "colour", "tolerance": 0.5}]).functions[0]
    blue = flat((0.0, 0.0, 1.0))
    # blue pixels: distance 0 to blue (1 - 0 / 0.5 = 1), sqrt(2) to red (0): the nearest colour counts
    assert reward(blue, ["a red and blue ball"], [{}]).tolist() == [1.0]
    assert reward(blue, ["a red ball"], [{}]).tolist() == [0.0]


def test_colour_words_are_read_through_punctuation():
    assert colours_in("A Red, shiny apple next to a blue-ish cup; green.") == ["red", "blue", "green"]
    assert colours_in("reddish bluebird") == []


def test_ocr_target_from_metadata_wins_over_the_prompt():
    from egrpo.rewards.ocr import OCRReward

    reward = OCRReward(reader=lambda image: "HELLO", upscale_to=None)
    images = torch.ones(2, 3, 8, 8)
    got = reward(images, ['a sign that says "WORLD"', 'a sign that says "WORLD"'], [{"text": "hello"}, {}])
    assert got[0] == 1.0 and got[1] == pytest.approx(1 - 4 / 5)        # "hello" vs "world": 4 substitutions


def test_rapidocr_lines_are_read_top_to_bottom_then_left_to_right(monkeypatch):
    from egrpo.rewards.ocr import rapidocr_engine

    def box(x, y):
        return [[x, y], [x + 30, y], [x + 30, y + 8], [x, y + 8]]

    result = [(box(0, 50), "WORLD", 0.9), (box(100, 10), "HELLO", 0.8), (box(0, 12), "SAY", 0.7),
              (box(60, 30), "noise", 0.1)]
    fake = types.ModuleType("rapidocr_onnxruntime")
    fake.RapidOCR = lambda **kwargs: (lambda array: (result, None))
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", fake)
    # rows 1 (y 10 and 12), 3, 5 by round(y / 10); within a row by x
    assert rapidocr_engine()(torch.zeros(4, 4, 3).numpy()) == "SAY HELLO noise WORLD"
    assert rapidocr_engine(min_confidence=0.5)(torch.zeros(4, 4, 3).numpy()) == "SAY HELLO WORLD"


def test_non_finite_values_are_reported_with_their_batch_index():
    from egrpo.rewards.base import Reward

    class NanAt3(Reward):
        name = "nan3"

        def score(self, images, prompts, metadata):
            return [float("nan") if p == "x3" else 0.0 for p in prompts]

    with pytest.raises(RuntimeError, match=r"samples \[3\]"):
        NanAt3(batch_size=2)(torch.rand(4, 3, 4, 4), ["x0", "x1", "x2", "x3"])


def test_git_vqa_min_and_prod_aggregate_the_per_question_answers(tmp_path):
    from egrpo.rewards.git_vqa import GitVQAReward
    from tests.rewards._tiny import save_tiny_git

    path = save_tiny_git(str(tmp_path))
    images = torch.rand(1, 3, 32, 32)
    single = GitVQAReward(path=path)
    p_cat = float(single(images, ["p"], [dict(attr_nouns=["red cat"])])[0])
    p_dog = float(single(images, ["p"], [dict(attr_nouns=["dog"])])[0])
    assert abs(p_cat - p_dog) > 1e-4                                   # distinct answers: min, mean, prod differ
    both = [dict(attr_nouns=["red cat", "dog"])]
    lowest = float(GitVQAReward(path=path, aggregate="min")(images, ["p"], both)[0])
    product = float(GitVQAReward(path=path, aggregate="prod")(images, ["p"], both)[0])
    assert lowest == pytest.approx(min(p_cat, p_dog), rel=1e-5) and product == pytest.approx(p_cat * p_dog, rel=1e-5)
    assert float(single(images, ["p"], both)[0]) == pytest.approx((p_cat + p_dog) / 2, rel=1e-5)


def test_clip_preprocess_resizes_the_shorter_side_and_centre_crops():
    from egrpo.rewards.clip_score import OPENAI_MEAN, OPENAI_STD, clip_preprocess

    mean = torch.tensor(OPENAI_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_STD)[:, None, None]
    # no resize needed (shorter side = 28): the centre 28 of 40 columns, i.e. 6..33
    image = torch.rand(1, 3, 28, 40)
    torch.testing.assert_close(clip_preprocess(image, 28)[0], (image[0, :, :, 6:34] - mean) / std)
    # 56 x 84 horizontal ramp: halved to 28 x 42 (output column j samples input x = 2j + 0.5, where a ramp is
    # reproduced exactly), then columns 7..34 kept: value (2 (k + 7) + 0.5) / 83 at output column k
    ramp = (torch.arange(84, dtype=torch.float32) / 83).expand(1, 3, 56, 84)
    got = clip_preprocess(ramp, 28)[0] * std + mean
    expected = ((2 * (torch.arange(28) + 7) + 0.5) / 83).expand(3, 28, 28)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_a_wholly_masked_group_is_a_reward_failure_not_a_crash():
    """docs/training.md: `on_failure: mask` fills a failed sample with its group's mean. When an adapter masks
    every sample of a group there is no mean: the failure options apply (stop with one line naming the reward,
    or skip the group with `on_error: skip_group`), instead of the trainer's RuntimeError traceback."""
    from egrpo.errors import RewardError
    from egrpo.rewards.base import Reward, mask_failed_rewards

    class MaskCar(Reward):
        name = "maskcar"

        def score(self, images, prompts, metadata):
            return [float("nan") if "car" in p else 1.0 for p in prompts]

    images = torch.rand(4, 3, 8, 8)
    prompts, meta = ["a car", "a car", "an apple", "an apple"], [{}] * 4
    stop = RewardSet([MaskCar(on_failure="mask")], ["maskcar"], [1.0])
    with pytest.raises(RewardError, match=r"maskcar.*group\(s\) \[0\].*on_error: skip_group"):
        stop(images, prompts, meta, group_size=2)
    skip = RewardSet([MaskCar(on_failure="mask")], ["maskcar"], [1.0], on_error=["skip_group"])
    out = skip(images, prompts, meta, group_size=2)
    assert skip.last_skipped.tolist() == [True, True, False, False] and skip.skipped == 1
    filled, valid = mask_failed_rewards(out, 2)   # what the trainer does next: no group left to raise on
    assert filled[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0] and valid.all()
    # A partly masked group is still filled from its scored samples (no failure).
    part = RewardSet([MaskCar(on_failure="mask")], ["maskcar"], [1.0])(images, ["a car", "x", "y", "z"], meta,
                                                                       group_size=2)
    assert part[0, 0].isnan() and part[1:, 0].tolist() == [1.0, 1.0, 1.0]


def test_a_constructor_refusing_a_value_names_the_reward_entry():
    """A reward's own argument check (docs/training.md's `MyReward(scale <= 0)`) names which `rewards[i]` entry
    it came from, as the signature check does: with two entries of one class, "scale must be > 0" alone does
    not say which to fix."""
    with pytest.raises(ValueError, match=r"rewards\[1\] \('colour'\): tolerance must be > 0"):
        build_rewards([{"name": "colour"}, {"name": "colour", "tolerance": -1.0}])
