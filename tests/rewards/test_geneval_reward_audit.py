"""The graded GenEval training reward and GenEval's relative-position rule: cases the module docstring states,
with answers computed by hand, and the relation test against a transcription of GenEval's own numpy code."""

import math
import random

import pytest
import torch

from egrpo.rewards.detection import Detection, relative_position
from egrpo.rewards.geneval import GradedGenEvalReward, box_colour, geneval_score


def det(label, box, score=0.9):
    return Detection(label, score, box)


def geneval_relative_position(box_a, box_b, threshold=0.1):
    """GenEval's evaluation/evaluate_images.py ``relative_position``, transcribed with plain Python."""
    centre_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    centre_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dim_a = (abs(box_a[2] - box_a[0]), abs(box_a[3] - box_a[1]))
    dim_b = (abs(box_b[2] - box_b[0]), abs(box_b[3] - box_b[1]))
    offset = [ca - cb for ca, cb in zip(centre_a, centre_b)]
    revised = [max(abs(o) - threshold * (da + db), 0) * (1 if o > 0 else -1 if o < 0 else 0)
               for o, da, db in zip(offset, dim_a, dim_b)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.sqrt(offset[0] ** 2 + offset[1] ** 2)
    dx, dy = revised[0] / norm, revised[1] / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def test_relative_position_shrinks_by_both_sizes_and_divides_by_the_raw_offset():
    # offset -30 on x; shrink 0.1 x (100 + 100) = 20 -> -10 / 30 = -0.33: no relation
    assert relative_position(det("a", (0, 0, 100, 100)), det("b", (30, 0, 130, 100))) == set()
    # offset (-60, -40), sizes 250 x 50 each: revised (-10, -30) over |offset| = 72.1 -> (-0.14, -0.42): none
    # (dividing by the revised length, 31.6, would give "above")
    assert relative_position(det("a", (75, 175, 325, 225)), det("b", (135, 215, 385, 265))) == set()
    # the threshold is a parameter: offset -120, sizes 60 + 100; 0.1 -> 104 / 120 = 0.87; 0.5 -> 40 / 120 = 0.33
    a, b = det("a", (0, 120, 60, 180)), det("b", (100, 100, 200, 200))
    assert relative_position(a, b, 0.1) == {"left of"} and relative_position(a, b, 0.5) == set()


def test_relative_position_equals_genevals_code_on_random_boxes():
    rng = random.Random(0)
    for _ in range(2000):
        boxes = []
        for _ in range(2):
            x0, y0 = rng.uniform(0, 300), rng.uniform(0, 300)
            boxes.append((x0, y0, x0 + rng.uniform(1, 200), y0 + rng.uniform(1, 200)))
        got = relative_position(det("a", boxes[0]), det("b", boxes[1]))
        assert got == geneval_relative_position(*boxes), boxes


def test_presence_is_graded_and_exclude_needs_fewer_than_count():
    two = {"tag": "two_object", "include": [{"class": "dog", "count": 2}, {"class": "cat", "count": 1}]}
    one_dog = [det("dog", (0.0, 0.0, 0.2, 0.2)), det("cat", (0.5, 0.5, 0.7, 0.7))]
    assert geneval_score(two, one_dog) == (pytest.approx(0.75), [0.5, 1.0])       # min(1, 2) / 2 and 1 / 1
    cats = [det("cat", (0.25 * i, 0.1, 0.25 * i + 0.2, 0.3), 0.9 - 0.1 * i) for i in range(3)]
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    assert geneval_score(counting, cats[:2]) == (1.0, [1.0, 1.0])
    # 3 cats: include 1 - |3 - 2| / 2 = 0.5, exclude fails (3 is not < 3); mean over the two clauses
    assert geneval_score(counting, cats) == (pytest.approx(0.25), [0.5, 0.0])


def test_duplicate_boxes_are_suppressed_before_counting():
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    cats = [det("cat", (0.0, 0.0, 0.4, 0.4), 0.9), det("cat", (0.01, 0.0, 0.41, 0.4), 0.8),   # IoU ~ 0.95
            det("cat", (0.6, 0.6, 0.9, 0.9), 0.7)]
    assert geneval_score(counting, cats) == (1.0, [1.0])
    assert geneval_score(counting, cats, nms_iou=0.99) == (pytest.approx(0.5), [0.5])   # no suppression: 3 cats


def test_colour_examines_the_n_ref_most_confident_and_counts_missing_as_wrong():
    colour_of = lambda d: {0.9: "blue", 0.8: "red", 0.7: "red"}[d.score]    # noqa: E731
    one_red = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    cars = [det("car", (0.0, 0.0, 0.2, 0.2), 0.9), det("car", (0.5, 0.5, 0.7, 0.7), 0.8)]
    assert geneval_score(one_red, cars, colour_of=colour_of)[0] == 0.0           # only the best car is looked at
    two_red = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    assert geneval_score(two_red, cars[1:], colour_of=colour_of)[0] == pytest.approx(0.5)   # 1 red of the 2 wanted
    # a colour clause under the counting tag is a colour clause: fraction of the wanted objects with the colour
    counted = {"tag": "counting", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert geneval_score(counted, cars[1:] + [det("car", (0.3, 0.0, 0.4, 0.1), 0.7)], colour_of=colour_of)[0] == 1.0


def test_position_is_relative_to_the_most_confident_anchor_with_the_given_threshold():
    meta = {"tag": "position", "include": [{"class": "car"}, {"class": "dog", "position": ["left of", 0]}]}
    dog = det("dog", (0.4, 0.4, 0.5, 0.5))
    best_car = det("car", (0.8, 0.4, 0.9, 0.5), 0.9)            # right of the dog
    other_car = det("car", (0.0, 0.4, 0.1, 0.5), 0.5)           # left of the dog
    assert geneval_score(meta, [dog, best_car, other_car]) == (1.0, [1.0, 1.0])
    # offset -0.15 (sizes 0.1 + 0.1): 0.1 -> (0.15 - 0.02) / 0.15 = 0.87; 0.5 -> (0.15 - 0.1) / 0.15 = 0.33
    near_car = det("car", (0.55, 0.4, 0.65, 0.5))
    assert geneval_score(meta, [dog, near_car])[0] == 1.0
    assert geneval_score(meta, [dog, near_car], position_threshold=0.5)[0] == 0.5
    reward = GradedGenEvalReward(detector=lambda images, queries: [[dog, near_car]], position_threshold=0.5)
    assert reward(torch.rand(1, 3, 8, 8), ["a dog left of a car"], [meta]).tolist() == [0.5]


def test_box_colour_reads_the_centre_of_the_box():
    image = torch.ones(3, 40, 40)                                             # white
    image[:, 12:28, 12:28] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]     # red square: 16% of the image
    # the whole image as the box: its central half (rows/cols 10..30) is 256 red of 400 pixels
    assert box_colour(image, (0.0, 0.0, 1.0, 1.0)) == "red"
    assert box_colour(image, (0.0, 0.0, 1.0, 1.0), centre_fraction=1.0) == "white"
