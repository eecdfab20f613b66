"""GenEval's filtering, correctness rule and summary on synthetic detections with hand-computed answers."""

import pytest

from egrpo.eval.geneval import evaluate_image, filter_detections, summarise
from egrpo.eval.io import EvalError
from egrpo.rewards.detection import Detection


def det(label, score, box):
    return Detection(label, score, box)


def test_filter_thresholds_order_and_cap():
    dets = [det("cat", 0.5, (0, 0, 1, 1)), det("cat", 0.95, (0, 0, 2, 2)), det("cat", 0.3, (0, 0, 3, 3)),
            det("dog", 0.31, (0, 0, 4, 4))]
    kept = filter_detections(dets, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.5]              # > 0.3 strictly, best first
    assert [d.score for d in kept["dog"]] == [0.31]
    kept = filter_detections(dets, "counting")
    assert [d.score for d in kept["cat"]] == [0.95] and "dog" not in kept   # counting: > 0.9
    many = [det("cup", 0.4 + i / 100, (i, 0, i + 1, 1)) for i in range(20)]
    kept = filter_detections(many, "single_object")["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)


COUNTING = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}


@pytest.mark.parametrize("n, expected", [(1, False), (2, True), (3, False), (4, False)])
def test_counting_needs_exactly_n(n, expected):
    objects = {"cat": [det("cat", 0.95, (10 * i, 0, 10 * i + 5, 5)) for i in range(n)]}
    correct, reason = evaluate_image(COUNTING, objects)
    assert correct is expected
    assert (reason == "") is expected
    if n == 1:
        assert reason == "expected cat>=2, found 1"
    if n >= 3:
        assert reason == f"expected cat<3, found {n}"


def test_two_object_missing_class():
    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert evaluate_image(meta, {"cat": [det("cat", 0.5, (0, 0, 1, 1))]}) == (False, "expected dog>=1, found 0")
    both = {"cat": [det("cat", 0.5, (0, 0, 1, 1))], "dog": [det("dog", 0.5, (0, 0, 1, 1))]}
    assert evaluate_image(meta, both) == (True, "")


def colours_by_score(table):
    return lambda dets, name: [table[d.score] for d in dets]


def test_colour_looks_only_at_the_top_count_detections():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    objects = {"car": [det("car", 0.9, (0, 0, 1, 1)), det("car", 0.8, (2, 0, 3, 1))]}
    assert evaluate_image(meta, objects, colours_by_score({0.9: "red", 0.8: "blue"}))[0] is True
    correct, reason = evaluate_image(meta, objects, colours_by_score({0.9: "blue", 0.8: "red"}))
    assert correct is False and reason.startswith("expected red car>=1, found 0 red")
    with pytest.raises(ValueError, match="colours_of"):
        evaluate_image(meta, objects)


def test_color_attr_both_clauses():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "dog", "count": 1, "color": "white"}]}
    objects = {"car": [det("car", 0.7, (0, 0, 1, 1))], "dog": [det("dog", 0.6, (0, 0, 1, 1))]}
    assert evaluate_image(meta, objects, colours_by_score({0.7: "red", 0.6: "white"})) == (True, "")
    assert evaluate_image(meta, objects, colours_by_score({0.7: "red", 0.6: "black"}))[0] is False


POSITION = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}]}
DOG = det("dog", 0.9, (100, 100, 200, 200))        # centre (150, 150), 100 x 100


@pytest.mark.parametrize("cat_box, relation", [
    ((0, 120, 60, 180), "left of"),        # o = (-120, 0); |r_x| = 120 - 0.1 (60 + 100) = 104; dx = -0.867
    ((240, 120, 300, 180), "right of"),    # o = (+120, 0)
    ((120, 0, 180, 60), "above"),          # o = (0, -120)
    ((120, 240, 180, 300), "below"),       # o = (0, +120)
    ((90, 100, 190, 200), None),           # o = (-10, 0): shrunk to 0 -> no relation
    ((0, 0, 60, 60), "left of"),           # o = (-120, -120): r = (-104, -104) / 169.7 = -0.613 each ->
])
def test_position_relations(cat_box, relation):
    cat = det("cat", 0.9, cat_box)
    for wanted in ("left of", "right of", "above", "below"):
        meta = {**POSITION, "include": [POSITION["include"][0],
                                        {"class": "cat", "count": 1, "position": [wanted, 0]}]}
        correct, _ = evaluate_image(meta, {"dog": [DOG], "cat": [cat]})
        if cat_box == (0, 0, 60, 60):      # diagonal: both "left of" and "above" hold (|d| > 0.5 on both axes)
            assert correct is (wanted in ("left of", "above"))
        else:
            assert correct is (wanted == relation), (cat_box, wanted)


def test_position_needs_matched_target_and_every_pair():
    cat = det("cat", 0.9, (0, 120, 60, 180))
    correct, reason = evaluate_image(POSITION, {"cat": [cat]})
    assert correct is False and reason == "expected dog>=1, found 0\nno target for cat to be left of"
    meta = {"tag": "position", "include": [{"class": "dog", "count": 2},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    far_dog = det("dog", 0.8, (400, 100, 500, 200))
    assert evaluate_image(meta, {"dog": [DOG, far_dog], "cat": [cat]})[0] is True
    dog_left_of_cat = det("dog", 0.8, (-300, 100, -200, 200))
    correct, reason = evaluate_image(meta, {"dog": [DOG, dog_left_of_cat], "cat": [cat]})
    assert correct is False and reason == "expected cat left of target, found right of"


def test_bad_metadata_is_an_error():
    with pytest.raises(ValueError, match="include"):
        evaluate_image({"tag": "colors", "include": []}, {})


def test_summary_is_unweighted_mean_of_tasks():
    records = [{"tag": "single_object", "correct": c} for c in (True, True, False, True)]
    records += [{"tag": "counting", "correct": c} for c in (False, True)]
    summary = summarise(records, failed=1)
    assert summary["tasks"] == {"single_object": 0.75, "counting": 0.5}
    assert summary["overall"] == pytest.approx(0.625)        # not the per-image mean 4/6
    assert summary["images"] == {"single_object": 4, "counting": 2}
    assert summary["failed"] == 1 and summary["complete"] is False
    assert summarise([])["overall"] is None
    assert issubclass(EvalError, ValueError)


def test_untagged_images_are_reported_but_left_out_of_the_overall():
    """As GenEval's summary (a group-by over the tag, which skips rows without one): the overall is the mean of
    the tagged tasks; untagged images get their own line, and make the overall only when nothing is tagged."""
    records = [{"tag": "colors", "correct": True}, {"tag": "position", "correct": False}]
    records += [{"correct": False}, {"tag": "", "correct": False}, {"tag": None, "correct": True}]
    summary = summarise(records)
    assert summary["tasks"]["untagged"] == pytest.approx(1 / 3) and summary["images"]["untagged"] == 3
    assert summary["overall"] == pytest.approx(0.5)                          # (1 + 0) / 2, untagged left out
    assert summarise([{"correct": True}, {"correct": False}])["overall"] == pytest.approx(0.5)
