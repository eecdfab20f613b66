"""``eval.evaluator: reward``: mean (weighted) reward of a generated folder, by hand on flat-colour images; a corrupt
PNG is a failed record that a rerun retries; bad reward specs are one-line errors."""

import json
import math

import pytest

from egrpo.eval.io import EvalError
from egrpo.eval.reward import build_reward_set, evaluate_reward

from .conftest import write_corrupt_png, write_png


def folder(tmp_path, rows):
    root = tmp_path / "images"
    root.mkdir()
    (root / "generations.jsonl").write_text("".join(json.dumps({"file": f, "prompt": p, "metadata": m}) + "\n"
                                                    for f, p, m in rows))
    return root


def test_weighted_mean_by_hand_failures_and_resume(tmp_path):
    root = folder(tmp_path, [("a.png", "a red apple", {}), ("b.png", "a red car", {}),
                             ("c.png", "a thing", {"colours": ["red"]}), ("d.png", "a red rose", {})])
    write_png(root / "a.png", (255, 0, 0))
    write_png(root / "b.png", (0, 0, 255))
    write_png(root / "c.png", (128, 128, 128))
    write_corrupt_png(root / "d.png")
    rewards = build_reward_set([{"name": "colour", "tolerance": 1.0}, {"name": "colour", "weight": 2.0, "tolerance": 0.5}])
    grey = 128 / 255
    d_grey = math.sqrt((1 - grey) ** 2 + 2 * grey ** 2)                 # distance of grey to red
    soft = [1.0, max(0.0, 1 - math.sqrt(2) / 1.0), max(0.0, 1 - d_grey / 1.0)]
    hard_ish = [1.0, 0.0, max(0.0, 1 - d_grey / 0.5)]
    summary = evaluate_reward(str(root), str(tmp_path / "scores"), rewards, show_progress=False)
    assert summary["scored"] == 3 and summary["failed"] == 1 and summary["complete"] is False
    assert summary["metrics"]["colour"] == pytest.approx(sum(soft) / 3, abs=1e-6)
    assert summary["metrics"]["colour_1"] == pytest.approx(sum(hard_ish) / 3, abs=1e-6)
    assert summary["score"] == pytest.approx(sum(s + 2 * h for s, h in zip(soft, hard_ish)) / 3, abs=1e-6)

    write_png(root / "d.png", (255, 0, 0))                               # fixed: only d is scored again
    again = evaluate_reward(str(root), str(tmp_path / "scores"), rewards, show_progress=False)
    assert again["scored"] == 4 and again["failed"] == 0 and again["complete"] is True
    assert again["score"] == pytest.approx((sum(s + 2 * h for s, h in zip(soft, hard_ish)) + 3.0) / 4, abs=1e-6)
    lines = (tmp_path / "scores" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5                                               # 4 + the retried one


def test_bad_reward_specs():
    with pytest.raises(EvalError, match="eval.rewards"):
        build_reward_set([])
    with pytest.raises(EvalError, match="eval.rewards.*tolerance"):
        build_reward_set([{"name": "colour", "tolerance": -1.0}])
    with pytest.raises(EvalError, match="eval.rewards.*nosuch"):
        build_reward_set([{"name": "nosuch"}])
