"""The published recipes decay the LR as the released runs did: transformers' default linear schedule (no
warm-up, down to 0 over the run's updates), which the released scripts keep because their DeepSpeed configs
define no scheduler. Checked against transformers' own schedule, update by update."""

import glob
import os

import pytest
import torch

from egrpo.trainer.config import load_config
from egrpo.trainer.train import WarmupSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")) if not p.endswith("demo.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_lr_follows_the_released_linear_schedule(recipe):
    from transformers import get_linear_schedule_with_warmup

    cfg = load_config(recipe)
    o = cfg.optim
    assert (o.schedule, o.warmup_steps, o.min_lr_ratio) == ("linear", 0, 0.0)
    total = cfg.train.steps * cfg.train.updates_per_rollout
    assert total == 1600

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, WarmupSchedule(o.warmup_steps, total, o.schedule, o.min_lr_ratio)))
    released = lrs(lambda opt: get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=total))
    assert ours == pytest.approx(released, rel=1e-12, abs=0)
    assert ours[0] == o.lr and ours[-1] == pytest.approx(o.lr / total)
