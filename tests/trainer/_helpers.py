"""Shared pieces of the trainer tests: a very small config on top of configs/demo.yaml."""

import os

from egrpo.trainer.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")

# 32 px images -> 4x4 = 16 image tokens; one LM layer. Small enough for several runs per test file.
SMALL = [
    "model.tiny.image_size=32",
    "model.tiny.num_layers=1",
    "rollout.image_tokens=16",
    "rollout.group_size=4",
    "data.prompts_per_step=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.sample_every=0",
    "train.export_hf=false",
    "optim.warmup_steps=0",
    "optim.lr=1e-3",
]


def small_config(out_dir, *overrides):
    return load_config(DEMO, [*SMALL, f"train.out_dir={out_dir}", *overrides])
