"""One training step of each objective, and the fused vs eager loss paths inside the trainer."""

import copy
import json
import math
import os
import random

import numpy as np

import pytest
import torch
from safetensors.torch import load_file

from egrpo.objectives import build_objective
from egrpo.trainer.metrics import read_metrics
from egrpo.trainer.model import build_model
from egrpo.rewards.registry import build_rewards
from egrpo.trainer.rollout import codebook_vectors, head_inputs, rollout
from egrpo.trainer.config import RewardConfig
from egrpo.rewards.registry import ColourReward
from egrpo.trainer.train import (MicroBatch, derived_seed, head_logp_entropy, micro_loss, rng_state, set_rng_state,
                                 train)

from tests import _float64 as f64

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
        # released percentiles over the 16 image tokens of each row: floor(0.5 * 16) = 8 -> 7 above the median,
        # floor(0.2 * 16) = 3 -> 3 below the low threshold (the sharp random head leaves no ties)
        assert record["mask/high_frac_image"] == 7 / 16 and record["mask/low_frac_image"] == 3 / 16
    # Values known without running the objective: group-centred advantages average 0; the first update is
    # on-policy (no ratio is clipped); the reference is the initial policy, so the first step's KL is 0.
    assert abs(record["adv/mean"]) < 1e-6
    assert record["clip/frac_low"] == 0.0 and record["clip/frac_high"] == 0.0
    assert abs(record["kl/image"]) < 1e-6

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


def _sharpened_models(cfg, head_scale):
    """Policy and a perturbed reference; heads scaled so that entropies are spread well above fp32 noise
    (percentile decisions are then not made by rounding) while the losses stay O(1)."""
    model, tokenizer = build_model(cfg.model, "cpu")
    ref_model, _ = build_model(cfg.model, "cpu")
    with torch.no_grad():
        for m in (model, ref_model):
            m.model.generation_head.vision_head.weight.mul_(head_scale)
            m.lm_head.weight.mul_(head_scale)
        for p in ref_model.model.language_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, tokenizer, ref_model


def _float64_loss(name, h, model64, ro, per_function, reward_weights, ref, old, codes, G):
    """The objective written out by hand in float64 (tests/_float64.py): no egrpo objective, kernel or
    reference code. Returns ``(policy_term, kl_term, policy_scale)``; the loss is the sum of the two terms,
    ``policy_scale`` is the policy term with ``|surrogate|`` (the size its fp32 rounding is relative to: the
    group-centred advantages make the term itself a difference of nearly equal sums)."""
    image, text = head_inputs(model64, ro)
    parts = [("image", image)] + ([("text", text)] if text is not None else [])
    lp, ent, mask = {}, {}, {}
    for part, b in parts:
        lp[part], ent[part] = f64.logp_entropy(b.hidden, b.weight, b.targets, b.bias, b.temperature)
        mask[part] = b.mask.double()
    weights = torch.as_tensor(reward_weights, dtype=torch.float64)
    if name == "stage":
        assert text is None
        final, has_signal = f64.stage_final_rewards(
            per_function.double() * weights, G, ent["image"].detach(), ref["image"][1], mask["image"],
            coef=h["entropy_reward_coef"], centered=h["entropy_reward_centered"], entropy_reward=h["entropy_reward"])
        adv = f64.group_advantages(final, G, eps=h["adv_eps"])
        w, kl_w = f64.stage_weights(f64.similarity(codes, adv, G), h["kl_a"], h["kl_b"])
        if not h["entropy_reward"]:
            for g, signal in enumerate(has_signal):
                if not signal:   # released: Sim := 1 there, so policy weight 0 and KL weight a + b
                    w[g * G:(g + 1) * G] = 0.0
                    kl_w[g * G:(g + 1) * G] = h["kl_a"] + h["kl_b"]
        m = mask["image"]
        surr, _, _ = f64.clipped_surrogate(lp["image"], old.get("image"), adv[:, None].expand_as(m),
                                           h["eps_low"], h["eps_high"])
        policy = -(surr * w * m).sum() / ((w * m).sum() + 1e-6)
        scale = (surr.abs() * w * m).sum() / ((w * m).sum() + 1e-6)
        kl = h["beta"] * (kl_w * f64.k3_kl(lp["image"], ref["image"][0]) * m).sum() / m.sum()
        return policy, kl, scale.detach()
    adv = f64.group_advantages(per_function.double() @ weights, G, eps=h["adv_eps"])
    n_tokens = sum(m.sum() for m in mask.values())
    policy, kl, scale = 0.0, 0.0, 0.0
    for part, b in parts:
        m = mask[part]
        if name == "eg_grpo":
            a_tok, _, _ = f64.eg_token_advantages(adv, ent[part], b.mask, b.weight.shape[0], low_q=h["low_q"],
                                                  high_q=h["high_q"], c1=h["c1"], c2=h["c2"])
        else:
            a_tok = adv[:, None].expand_as(m)
        surr, _, _ = f64.clipped_surrogate(lp[part], old.get(part), a_tok, h["eps_low"], h["eps_high"])
        policy = policy - (surr * m).sum() / n_tokens
        scale = scale + (surr.abs() * m).sum().detach() / n_tokens
        kl = kl + h["beta"] * (f64.k3_kl(lp[part], ref[part][0]) * m).sum() / n_tokens
    return policy, kl, scale


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# term: "policy" (beta = 0, distinct rewards, off-policy ratios with eps_low != eps_high so both clip sides
# act), "kl" (identical rewards: every advantage is 0; STAGE without the entropy reward so no group keeps a
# policy term). Each term is O(1e-2..1), so a change in either is far above the tolerance.
@pytest.mark.parametrize("term", ["policy", "kl"])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_fused_and_eager_loss_paths_match_float64_by_hand(tmp_path, name, term):
    cfg = small_config(tmp_path, *OBJECTIVES[name])
    model, tokenizer, ref_model = _sharpened_models(cfg, head_scale=4.0)
    over = dict(backend="torch", eps_low=0.1, eps_high=0.3)
    if term == "policy":
        over["beta"] = 0.0
    else:
        over["beta"] = 0.5
        if name == "stage":
            over["entropy_reward"] = False
    objective = build_objective(cfg.objective.name, **{**cfg.objective.hparams, **over})
    h = objective.hparams
    rewards = build_rewards(cfg.rewards)
    generator = torch.Generator().manual_seed(derived_seed(0, 0, 0))
    ro = rollout(model, tokenizer, ["a red apple", "a red car"], cfg.rollout, generator)
    B = len(ro.prompts)
    n_fn = len(rewards.weights)
    if term == "policy":   # distinct rewards, spread over a range where the std matters
        per_function = torch.randn(B, n_fn)
    else:
        per_function = torch.full((B, n_fn), 0.5)
    ref = head_logp_entropy(ref_model, ro, "torch", None)
    old = {}
    if term == "policy":   # sampling-policy log-probs: ratios spread on both sides of [0.9, 1.3]
        cur = head_logp_entropy(model, ro, "torch", None)
        old = {part: (lp + 0.3 * torch.randn_like(lp)).clamp(max=0.0) for part, (lp, _) in cur.items()}
    codes = codebook_vectors(model, ro.image_tokens) if name == "stage" else None
    mb = MicroBatch(rollout=ro, metadata=[{}] * B, rewards=per_function, ref=ref, old=dict(old), codes=codes)
    G = cfg.rollout.group_size

    model64 = copy.deepcopy(model).double()
    policy64, kl64, policy_scale = _float64_loss(name, h, model64, ro, per_function, rewards.weights, ref, old, codes, G)
    (policy64 + kl64).backward()
    grads64 = {n: p.grad for n, p in model64.named_parameters() if p.grad is not None}
    expected = (policy64 if term == "policy" else kl64).detach()
    other = (kl64 if term == "policy" else policy64)
    assert float(other.detach()) == 0.0, "the other term must vanish for the comparison to isolate this one"
    magnitude = float(policy_scale if term == "policy" else kl64)
    assert abs(float(expected)) > 1e-3 and magnitude > 1e-2, (float(expected), magnitude)

    results = {}
    for impl in ("fused", "eager") if name != "stage" or term == "policy" else ("fused",):
        model.zero_grad(set_to_none=True)
        loss, _ = micro_loss(model, objective, mb, G, rewards.weights, impl)
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for impl, (loss, grads) in results.items():
        # fp32 through a one-layer model: ~1e-6 of the term's magnitude against float64 (measured, eager and
        # fused alike), up to 1.8e-5 for a KL term of ~40 (EGRPO_TEST_SEED=11: the k3 KL's exp(ref - logp) carries
        # the fp32 log-probs' relative error, ~1e-6 of |logp| ~ 10-20, into the sum); 5e-5 leaves room for that
        # and stays far below what any piece of the objective contributes (a mask, a weight, a std convention:
        # >= 1e-2 of the magnitude).
        err = abs(float(loss) - float(expected))
        assert err <= 5e-5 * magnitude, (impl, float(loss), float(expected), magnitude)
        assert grads.keys() == grads64.keys() and grads
        for n in grads:
            assert _rel(grads[n], grads64[n]) < 1e-3, (impl, n, _rel(grads[n], grads64[n]))


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


# ---------------------------------------------------------------------------------------------- RNG state


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_a_checkpoint_file(tmp_path):
    """rng_state / set_rng_state restore Python's, NumPy's and torch's global generators, also after a
    torch.save / torch.load round trip (how checkpoints carry them)."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert _draws() != expected
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert _draws() == expected
    # each generator separately: dropping any one of them changes its draw
    for key, draw in (("python", lambda: random.random()), ("numpy", lambda: float(np.random.rand())),
                      ("torch", lambda: torch.rand(1).item())):
        state = rng_state()
        first = draw()
        draw()
        set_rng_state(state)
        assert draw() == first, key


class GlobalRngReward:
    """The colour reward plus noise from the global torch, NumPy and Python generators: a consumer of the
    process-wide RNG (like dropout or a sampling reward model), whose draws a resume must continue."""

    def __init__(self):
        self.colour = ColourReward()

    def __call__(self, images, prompts, metadata):
        noise = torch.rand(len(prompts)) + float(np.random.rand()) + random.random()
        return self.colour(images, prompts, metadata) + 0.1 * noise


def test_resume_continues_the_global_rng(tmp_path):
    """Two steps straight and one step + resume + one step see the same global-RNG draws (the rewards of step 2
    depend on them), so a resume that does not restore the RNG state would log other rewards."""
    overrides = ["objective.name=grpo", "objective.beta=0.0", "train.steps=2", "train.save_every=1"]

    def config(out):
        cfg = small_config(out, *overrides)
        cfg.rewards = [RewardConfig(name="tests.trainer.test_train:GlobalRngReward")]
        return cfg

    straight = train(config(tmp_path / "straight"))
    first = train(config(tmp_path / "killed"), stop_after=1)
    assert first["step"] == 1
    random.seed(123)   # the resuming process's global RNG starts elsewhere
    np.random.seed(123)
    torch.manual_seed(123)
    resumed = train(config(tmp_path / "killed"), resume=str(tmp_path / "killed"))
    a, b = read_metrics(straight["metrics"]), read_metrics(resumed["metrics"])
    assert [r["step"] for r in b] == [1, 2]
    assert a[1]["reward/mean"] == b[1]["reward/mean"] and a[1]["reward/std"] == b[1]["reward/std"]
    assert a[0]["reward/mean"] != a[1]["reward/mean"]


@pytest.mark.parametrize("trainable", [["model.vqmodel"], ["model.vision_model"], ["lm_head"]])
def test_trainable_parameters_that_never_reach_the_loss_are_one_config_error(tmp_path, trainable):
    """A `model.trainable` whose parameters the loss does not depend on (the VQ model, the understanding encoder)
    used to reach DeepSpeed's backward and fail there with "AssertionError: loss must be a scalar tensor". lm_head
    alone reaches it only through CoT tokens (small_config has no CoT)."""
    from egrpo.errors import ConfigError

    cfg = small_config(tmp_path / "run", "objective.name=grpo", "train.steps=1", f"model.trainable={trainable}")
    with pytest.raises(ConfigError, match=r"model\.trainable=.*no trainable parameter reaches the loss"):
        train(cfg)
