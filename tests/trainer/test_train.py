"""One training step of each objective, and the fused vs eager loss paths inside the trainer."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from egrpo.objectives import build_objective
from egrpo.trainer.metrics import read_metrics
from egrpo.trainer.model import build_model
from egrpo.trainer.rewards import build_rewards
from egrpo.trainer.rollout import codebook_vectors, rollout
from egrpo.trainer.train import MicroBatch, derived_seed, head_logp_entropy, micro_loss, train

from ._helpers import small_config

OBJECTIVES = {
    "grpo": ["objective.name=grpo", "rollout.cot=true", "rollout.cot_max_tokens=4"],
    "eg_grpo": ["objective.name=eg_grpo", "rollout.cot=true", "rollout.cot_max_tokens=4"],
    "stage": ["objective.name=stage", "objective.entropy_reward=true", "objective.beta=0.03"],
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_step_changes_only_trainable_params(tmp_path, name):
    cfg = small_config(tmp_path / "run", *OBJECTIVES[name], "train.steps=1", "train.export_hf=true")
    summary = train(cfg)
    assert summary["finished"] and summary["step"] == 1
    record = read_metrics(summary["metrics"])[0]
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    for key in ("reward/mean", "reward/std", "reward/colour/mean", "lr", "time/rollout", "time/reward",
                "time/loss", "time/update", "memory/peak_mb", "entropy/image_mean", "kl/image", "adv/abs_mean",
                "clip/frac_low", "rollout/cfg_kl", "reward/masked_frac",
                "corr/reward_vs_image_entropy_mean", "corr/reward_vs_image_entropy_std"):
        assert key in record, key
    for key in ("corr/reward_vs_image_entropy_mean", "corr/reward_vs_image_entropy_std"):
        assert math.isnan(record[key]) or -1.0 <= record[key] <= 1.0, (key, record[key])
    if name != "stage":
        assert "entropy/text_mean" in record and "rollout/cot_tokens" in record
        assert "corr/reward_vs_cot_entropy_mean" in record
    if name == "eg_grpo":
        assert 0 < record["mask/high_frac_image"] < 1 and 0 < record["mask/low_frac_image"] < 1

    initial, _ = build_model(cfg.model, "cpu")
    trained = load_file(os.path.join(summary["export"], "model.safetensors"))
    changed, frozen_changed = [], []
    for pname, p in initial.named_parameters():
        moved = not torch.equal(trained[pname], p.detach())
        if p.requires_grad and moved:
            changed.append(pname)
        if not p.requires_grad and moved:
            frozen_changed.append(pname)
    assert not frozen_changed, frozen_changed[:5]
    assert any(n.startswith("model.language_model.layers") for n in changed)
    if name != "stage":   # the LM head only gets gradient through CoT tokens
        assert "lm_head.weight" in changed
    # The exported directory loads back as a transformers model.
    with open(os.path.join(summary["export"], "config.json")) as f:
        assert json.load(f)["model_type"] == "janus"


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_fused_and_eager_loss_paths_agree(tmp_path, name):
    cfg = small_config(tmp_path, *OBJECTIVES[name])
    model, tokenizer = build_model(cfg.model, "cpu")
    ref_model, _ = build_model(cfg.model, "cpu")
    with torch.no_grad():
        # The random heads give near-uniform distributions whose entropies differ by ~1e-5, below fp32 noise,
        # so the entropy percentiles would be decided by rounding: sharpen both heads of both models.
        for m in (model, ref_model):
            m.model.generation_head.vision_head.weight.mul_(30.0)
            # x10 only: at x30 the CoT tokens sampled after the released template have p ~ 1 - 1e-11, and the
            # lm_head gradient (1 - p) h is then fp32 rounding in both paths.
            m.lm_head.weight.mul_(10.0)
        # A reference that differs from the policy, so the KL term is not trivially zero.
        for p in ref_model.model.language_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    objective = build_objective(cfg.objective.name, **cfg.objective.hparams, backend="torch")
    rewards = build_rewards(cfg.rewards)
    generator = torch.Generator().manual_seed(derived_seed(0, 0, 0))
    ro = rollout(model, tokenizer, ["a red apple", "a red car"], cfg.rollout, generator)
    per_function = rewards(ro.images, ro.prompts, [{}] * len(ro.prompts))
    per_function = per_function + 0.01 * torch.randn_like(per_function)   # distinct rewards: non-zero advantages
    mb = MicroBatch(rollout=ro, metadata=[{}] * len(ro.prompts), rewards=per_function,
                    ref=head_logp_entropy(ref_model, ro, "torch", None),
                    codes=codebook_vectors(model, ro.image_tokens) if name == "stage" else None)
    G = cfg.rollout.group_size
    results = {}
    for impl in ("fused", "eager"):
        model.zero_grad(set_to_none=True)
        loss, _ = micro_loss(model, objective, mb, G, rewards.weights, impl)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (loss.detach(), grads)
    (loss_f, grads_f), (loss_e, grads_e) = results["fused"], results["eager"]
    assert torch.isfinite(loss_f) and loss_f.abs() > 0
    torch.testing.assert_close(loss_f.double(), loss_e.double(), rtol=1e-4, atol=1e-6)
    assert grads_f.keys() == grads_e.keys() and grads_f
    for n in grads_f:
        assert all(p.requires_grad for pn, p in model.named_parameters() if pn == n)
        # Relative error of the whole tensor: the sharpened heads make some attention gradients huge and
        # ill-conditioned, so single elements of two fp32 summation orders can differ by ~1% of themselves.
        rel = (grads_f[n].double() - grads_e[n].double()).norm() / grads_e[n].double().norm().clamp_min(1e-30)
        assert rel < 1e-4, (n, float(rel))


def test_updates_per_rollout_reuses_the_rollout_with_clipped_ratios(tmp_path):
    """updates_per_rollout=2: the same rollout is used for two optimizer steps, the ratio is taken against the
    sampling policy (1 on the first update, away from 1 on the second, where a large step makes PPO's clip
    engage), and the sampled data is that of a one-update run (same seed, same policy before any update)."""
    common = ["objective.name=grpo", "objective.beta=0.0", "train.steps=1", "optim.lr=0.05", "optim.grad_clip=0"]
    single = train(small_config(tmp_path / "one", *common, "train.updates_per_rollout=1"), return_params=True)
    double = train(small_config(tmp_path / "two", *common, "train.updates_per_rollout=2"), return_params=True)
    r1, r2 = read_metrics(single["metrics"])[0], read_metrics(double["metrics"])[0]
    assert r1["reward/mean"] == r2["reward/mean"] and r1["reward/std"] == r2["reward/std"]
    assert r1["clip/frac_low"] == 0.0 and r1["clip/frac_high"] == 0.0   # on-policy: ratio exactly 1
    assert r2["clip/frac_low"] + r2["clip/frac_high"] > 0.0             # second update: clipped tokens
    moved = [n for n in single["params"] if not torch.equal(single["params"][n], double["params"][n])]
    assert moved   # the second update changed the weights further
