"""A run killed after 2 of 4 steps and resumed from its checkpoint ends where an uninterrupted run ends."""

import pytest
import torch

from egrpo.trainer.metrics import read_metrics, stable_metrics
from egrpo.trainer.train import train

from ._helpers import small_config

# Cosine schedule with warm-up (scheduler state matters), Adam moments (optimizer state matters), a shuffled
# prompt list longer than one step (data position matters), KL to the reference, two micro-batches.
OVERRIDES = [
    "train.steps=4", "train.save_every=2", "optim.warmup_steps=1", "optim.schedule=cosine", "optim.grad_accum=2",
    "objective.name=eg_grpo", "objective.beta=0.05", "data.prompts_per_step=2",
]


# bf16 under ZeRO-2: DeepSpeed's fp32 master weights and their optimizer state must come back too.
PRECISIONS = {"fp32": [], "bf16-zero2": ["model.dtype=bf16", "deepspeed.zero_stage=2"]}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_resume_matches_uninterrupted_run(tmp_path, precision):
    overrides = [*OVERRIDES, *PRECISIONS[precision]]
    straight = train(small_config(tmp_path / "straight", *overrides), return_params=True)

    cfg = small_config(tmp_path / "killed", *overrides)
    first = train(cfg, stop_after=2)
    assert not first["finished"] and first["step"] == 2
    resumed = train(small_config(tmp_path / "killed", *overrides), resume=str(tmp_path / "killed"), return_params=True)
    assert resumed["finished"] and resumed["step"] == 4

    for name, p in straight["params"].items():
        assert torch.equal(p, resumed["params"][name]), name
    a = [stable_metrics(r) for r in read_metrics(straight["metrics"])]
    b = [stable_metrics(r) for r in read_metrics(resumed["metrics"])]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    # The parameters did move, and the LR followed the schedule across the restart.
    assert len({r["lr"] for r in a}) > 1


def test_runs_saved_before_a_setting_existed_resume_with_its_old_value():
    """A checkpoint config without ``rollout.engine`` / ``rollout.cot_max_prompt_tokens`` was made when they were
    effectively false / None: passing those values resumes it unchanged; today's defaults are changes, named with
    the value the old run had and refused without --allow-changes."""
    from egrpo.trainer.train import ResumeError, check_resume_changes

    old = {"rollout": {"group_size": 8}, "train": {"steps": 10}}
    same = {"rollout": {"group_size": 8, "engine": False, "cot_max_prompt_tokens": None}, "train": {"steps": 10}}
    assert check_resume_changes(old, same, 5, allow_changes=False) == []
    new = {"rollout": {"group_size": 8, "engine": True, "cot_max_prompt_tokens": 512}, "train": {"steps": 10}}
    with pytest.raises(ResumeError) as refused:
        check_resume_changes(old, new, 5, allow_changes=False)
    assert "rollout.engine: (absent: False) -> True" in str(refused.value)
    assert "rollout.cot_max_prompt_tokens: (absent: None) -> 512" in str(refused.value)
    assert len(check_resume_changes(old, new, 5, allow_changes=True)) == 2
    # A setting that is not in the table still counts as a change when it appears.
    with pytest.raises(ResumeError, match=r"rollout.top_k: \(absent\) -> 5"):
        check_resume_changes(old, {**same, "rollout": {**same["rollout"], "top_k": 5}}, 5, allow_changes=False)


def test_refusing_an_absent_setting_names_the_overrides_that_resume_as_before():
    """The refusal suggests `--config <checkpoint>/config.yaml` to resume with the checkpoint's own settings; a
    checkpoint saved before `rollout.engine` existed has no such key in that file, so the suggestion alone is
    refused again. The message must also give the overrides that reproduce the old run (docs/training.md,
    "Settings added after runs were saved")."""
    from egrpo.trainer.train import ResumeError, check_resume_changes

    old = {"rollout": {"group_size": 8}, "train": {"steps": 10}}
    new = {"rollout": {"group_size": 8, "engine": True, "cot_max_prompt_tokens": 512}, "train": {"steps": 10}}
    with pytest.raises(ResumeError) as refused:
        check_resume_changes(old, new, 5, allow_changes=False, checkpoint_config="ck/config.yaml")
    message = str(refused.value)
    assert "--config ck/config.yaml" in message
    assert "rollout.cot_max_prompt_tokens=null rollout.engine=false" in message
