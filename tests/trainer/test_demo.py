"""The project's main job, `make demo`, as a test: the full demo config on the tiny random Janus."""

import json
import os
from pathlib import Path

import pytest

from egrpo.trainer.config import load_config
from egrpo.trainer.train import train

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# The margin the README promises: mean reward of the last 20% of steps above the first 20% by at least this.
DEMO_MARGIN = 0.05


@pytest.mark.slow
def test_demo_reward_rises(tmp_path):
    cfg = load_config(str(DEMO), [f"train.out_dir={tmp_path}", "train.progress=false"])
    summary = train(cfg)
    rewards = [json.loads(line)["reward/mean"] for line in open(summary["metrics"])]
    assert len(rewards) == cfg.train.steps
    n = max(1, len(rewards) // 5)
    first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
    assert last - first >= DEMO_MARGIN, (first, last, rewards)
    for key in ("plot", "checkpoint", "export"):
        assert summary.get(key) and os.path.exists(summary[key]), key
    assert summary["samples"] and all(os.path.exists(p) for p in summary["samples"])
