"""GRPO options that need no kernel change (docs/algorithms.md, "Options for every objective"), each against an
eager float64 computation written here from the formulas: top-rho entropy masking (alone and with EG-GRPO),
the truncated importance-sampling correction, GDPO's normalise-then-sum, and dropping zero-spread groups."""

import math

import pytest
import torch

from egrpo.kernels.reference import eg_grpo_token_advantages_reference
from egrpo.objectives import HeadBatch, build_objective

G, B, T, D, V = 4, 8, 9, 6, 31
BETA = 0.05


def _batch(seed=0, old=False, sampling=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.8
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).double()
    mask[:, 0] = 1
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[..., None])[..., 0]
    noise = lambda s: s * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    return HeadBatch(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), bias=bias.requires_grad_(),
                     targets=targets, mask=mask, ref_logp=lp + noise(0.3), old_logp=(lp + noise(0.2)) if old else None,
                     sampling_logp=(lp + noise(0.5)) if sampling else None)


def _group_adv(r):
    groups = r.view(-1, G)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)


def _eager_loss(batch, token_adv_fn):
    """-sum(surr * m) / sum(m) + beta * sum(KL * m) / sum(m) from full float64 logits; token_adv_fn(logp, H)."""
    logprobs = torch.log_softmax(batch.hidden @ batch.weight.T + batch.bias, -1)
    logp = logprobs.gather(-1, batch.targets[..., None])[..., 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    a = token_adv_fn(logp.detach(), entropy.detach())
    old = batch.old_logp if batch.old_logp is not None else logp.detach()
    ratio = torch.exp(logp - old)
    surr = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    d = batch.ref_logp - logp
    kl = torch.exp(d) - d - 1
    m = batch.mask
    return -(surr * m).sum() / m.sum() + BETA * (kl * m).sum() / m.sum()


def _compare(ours, truth, batch, rtol, atol=1e-12):
    assert ours.item() == pytest.approx(truth.item(), rel=rtol, abs=atol)
    params = (batch.hidden, batch.weight, batch.bias)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(truth, params)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _top_rho_keep(entropy, mask, rho):
    thr = torch.quantile(entropy[mask.bool()], 1.0 - rho)
    return (entropy >= thr) & mask.bool()


@pytest.mark.parametrize("head", ["fused", "eager"])
@pytest.mark.parametrize("rho", [0.2, 0.5])
def test_top_entropy_quantile_alone(head, rho):
    batch = _batch()
    rewards = torch.rand(B, dtype=torch.float64)
    obj = build_objective("grpo", backend="torch", beta=BETA, top_entropy_quantile=rho)
    out = obj(rewards, G, batch, head=head)
    adv = _group_adv(rewards)

    def token_adv(_logp, entropy):
        return adv[:, None] * _top_rho_keep(entropy, batch.mask, rho)

    _compare(out.loss, _eager_loss(batch, token_adv), batch, rtol=1e-9)
    kept = _top_rho_keep(_eager_entropy(batch), batch.mask, rho).double().sum() / batch.mask.sum()
    assert out.metrics["mask/top_entropy_frac_image"] == pytest.approx(kept.item())
    assert abs(kept.item() - rho) < 0.1



@pytest.mark.parametrize("tis", [None, 1.5])
def test_top_entropy_quantile_one_is_off(tis):
    """rho = 1 (the default) masks nothing, also when the IS correction runs the token-options pass: the same
    loss as without the option, and no top-entropy mask metric (the quantile is never taken)."""
    batch = _batch(seed=2, sampling=True)
    rewards = torch.rand(B, dtype=torch.float64)
    out = build_objective("grpo", backend="torch", beta=BETA, top_entropy_quantile=1.0, tis_clip_max=tis)(
        rewards, G, batch, head="fused")
    plain = build_objective("grpo", backend="torch", beta=BETA, tis_clip_max=tis)(rewards, G, batch, head="fused")
    assert not any(k.startswith("mask/top_entropy_frac") for k in out.metrics)
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)


def _eager_entropy(batch):
    with torch.no_grad():
        logprobs = torch.log_softmax(batch.hidden @ batch.weight.T + batch.bias, -1)
        return -(logprobs.exp() * logprobs).sum(-1)


def test_top_entropy_quantile_with_eg_grpo_shaping():
    batch = _batch(seed=1)
    rewards = torch.rand(B, dtype=torch.float64)
    obj = build_objective("eg_grpo", backend="torch", beta=BETA, top_entropy_quantile=0.4)
    out = obj(rewards, G, batch)
    adv = _group_adv(rewards)

    def token_adv(_logp, entropy):
        shaped, _, _ = eg_grpo_token_advantages_reference(adv, entropy, batch.mask, V)
        return shaped * _top_rho_keep(entropy, batch.mask, 0.4)

    # EG-GRPO's bonus uses the entropies the head hands to advantage hooks, in float32
    _compare(out.loss, _eager_loss(batch, token_adv), batch, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("old", [False, True])
def test_truncated_importance_sampling_correction(old):
    batch = _batch(seed=2, old=old, sampling=True)
    rewards = torch.rand(B, dtype=torch.float64)
    obj = build_objective("grpo", backend="torch", beta=BETA, tis_clip_max=1.5)
    assert obj.needs.sampling_logp
    out = obj(rewards, G, batch)
    adv = _group_adv(rewards)

    def token_adv(logp, _entropy):
        base = batch.old_logp if old else logp
        weight = torch.exp(base - batch.sampling_logp).clamp(max=1.5)
        return adv[:, None] * weight

    if old:   # the weights come from the given float64 old_logp
        _compare(out.loss, _eager_loss(batch, token_adv), batch, rtol=1e-9)
    else:     # on-policy they come from the head's log-probs, handed to advantage hooks in float32 (~3e-7 abs)
        _compare(out.loss, _eager_loss(batch, token_adv), batch, rtol=3e-5, atol=1e-8)
    with pytest.raises(ValueError, match="sampling_logp"):
        obj(rewards, G, _batch(seed=2))


def test_gdpo_normalise_then_sum_hand_computed():
    # Two groups of G = 2, two reward functions with very different scales.
    rewards = torch.tensor([[1.0, 0.0], [0.0, 10.0], [1.0, 2.0], [0.0, 2.0]], dtype=torch.float64)
    s2 = math.sqrt(0.5) + 1e-4        # std of a pair {x, x + 1} is sqrt(0.5)
    s10 = math.sqrt(50.0) + 1e-4      # std of {0, 10}
    # per function, per group: f0 -> [.5, -.5, .5, -.5] / s2; f1 -> [-5, 5] / s10 in group 0, flat (0) in group 1
    summed = [0.5 / s2 - 5 / s10, -0.5 / s2 + 5 / s10, 0.5 / s2, -0.5 / s2]
    mean = sum(summed) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in summed) / 3)
    want = torch.tensor([(x - mean) / (std + 1e-4) for x in summed], dtype=torch.float64)
    batch = _batch(seed=3)
    batch = HeadBatch(**{**batch.__dict__, **{k: getattr(batch, k)[:4] for k in ("targets", "mask", "ref_logp")},
                         "hidden": batch.hidden.detach()[:4].requires_grad_()})
    out = build_objective("grpo", backend="torch", reward_aggregation="normalize_then_sum")(rewards, 2, batch)
    torch.testing.assert_close(out.advantages, want, rtol=1e-12, atol=1e-12)
    plain = build_objective("grpo", backend="torch")(rewards, 2, batch)   # sum first: f1 dominates group 0
    assert not torch.allclose(plain.advantages, want)


@pytest.mark.parametrize("name", ["grpo", "eg_grpo"])
def test_drop_zero_spread_groups_equals_the_loss_without_them(name):
    batch = _batch(seed=4)
    rewards = torch.rand(B, dtype=torch.float64)
    rewards[G:] = 0.7                          # the second group is flat
    out = build_objective(name, backend="torch", beta=BETA, drop_zero_spread_groups=True)(rewards, G, batch)
    sub = HeadBatch(hidden=batch.hidden[:G], weight=batch.weight, bias=batch.bias, targets=batch.targets[:G],
                    mask=batch.mask[:G], ref_logp=batch.ref_logp[:G])
    truth = build_objective(name, backend="torch", beta=BETA)(rewards[:G], G, sub)
    _compare(out.loss, truth.loss, batch, rtol=1e-12)
    assert out.metrics["groups/dropped_frac"] == 0.5
    kept = build_objective(name, backend="torch", beta=BETA)(rewards, G, batch)   # the KL of the flat group counts
    assert abs(kept.loss.item() - truth.loss.item()) > 1e-6


def test_option_combinations_that_are_refused():
    with pytest.raises(ValueError, match="budget_neutral cannot be combined"):
        build_objective("eg_grpo", budget_neutral=True, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="reward_aggregation must be 'sum' for STAGE"):
        build_objective("stage", reward_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match=r"top_entropy_quantile must be a number in \(0, 1\]"):
        build_objective("grpo", top_entropy_quantile=0.0)


def test_trainer_runs_the_is_correction_with_the_rollouts_sampling_logprobs(tmp_path):
    """The rollout records the sampled tokens' log-probs under the CFG sampling distribution (both samplers);
    the trainer hands them to HeadBatch.sampling_logp, so tis_clip_max trains and reports its weights."""
    import json

    from egrpo.trainer.train import train

    from .trainer._helpers import small_config


    cfg = small_config(tmp_path, "objective.name=grpo", "objective.tis_clip_max=2.0")
    summary = train(cfg)
    records = [json.loads(line) for line in open(summary["metrics"])]
    weights = [r["tis/weight_mean_image"] for r in records]
    # With CFG the sampling distribution differs from the policy: weights are positive, finite, not all 1, <= 2.
    assert all(0 < w <= 2.0 for w in weights) and any(abs(w - 1.0) > 1e-3 for w in weights)
