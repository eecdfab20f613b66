import math

import pytest
import torch

from egrpo.kernels._common import INTERPRETING
from egrpo.kernels.reference import eg_grpo_loss_reference, linear_logprob_entropy_reference
from egrpo.objectives import (
    OBJECTIVES,
    HeadBatch,
    build_objective,
    eg_grpo_token_advantages,
    group_advantages,
)
from tests import _float64 as f64

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1; compiled Triton is covered by the gpu tests"))]


def head(B, T, D, V, dtype=torch.float64, padded=False, ref=True, tail_scale=1.0):
    hidden = torch.randn(B, T, D, dtype=dtype)
    hidden[:, T // 2:] *= tail_scale  # different entropies at the (padding) tail
    weight = torch.randn(V, D, dtype=dtype) * 3 / D**0.5
    bias = torch.randn(V, dtype=dtype) * 0.5
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:  # text CoTs of different lengths
        for i in range(B):
            mask[i, torch.randint(2, T, ()).item():] = False
    ref_logp = None
    if ref:
        with torch.no_grad():
            lp, _ = linear_logprob_entropy_reference(hidden.double(), weight.double(), targets, bias.double())
        ref_logp = (lp + 0.3 * torch.randn_like(lp)).clamp(max=0.0).to(torch.float32)
    return HeadBatch(hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), targets, mask,
                     ref_logp=ref_logp)


def fresh(batch: HeadBatch) -> HeadBatch:
    leaves = [t.detach().clone().requires_grad_() for t in (batch.hidden, batch.weight, batch.bias)]
    return HeadBatch(*leaves, batch.targets, batch.mask, ref_logp=batch.ref_logp, old_logp=batch.old_logp)


def grads(batch: HeadBatch):
    return [batch.hidden.grad, batch.weight.grad, batch.bias.grad]


def rel_err(a, b):
    return (a.double() - b.double()).abs().max().item() / (b.double().abs().max().item() + 1e-12)


# ---- group advantages ----------------------------------------------------------------------

def test_group_advantages_formula_and_zero_std_groups():
    r = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 0.5, 3.0, -1.0, 0.0])
    a = group_advantages(r, 3)
    # by hand: group 1 mean 7/3, unbiased std sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2) = sqrt(7/3)
    s1 = math.sqrt(7 / 3)
    assert torch.allclose(a[:3].double(), torch.tensor([-4 / 3, -1 / 3, 5 / 3], dtype=torch.float64) / (s1 + 1e-4),
                          rtol=1e-6, atol=0)
    assert torch.allclose(a.double(), f64.group_advantages(r, 3), rtol=1e-6, atol=1e-7)
    assert torch.equal(a[3:6], torch.zeros(3)), "a zero-std group gets advantage 0, not NaN"
    assert torch.allclose(group_advantages(r, 3, scale="none").double(), f64.group_advantages(r, 3, scale="none"),
                          atol=1e-6)
    assert torch.allclose(group_advantages(r, 3, scale="batch").double(), f64.group_advantages(r, 3, scale="batch"),
                          rtol=1e-6, atol=1e-7)
    assert torch.allclose(group_advantages(r, 3, eps=0.5).double(), f64.group_advantages(r, 3, eps=0.5), atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 3, scale="prompt")


# ---- EG-GRPO token advantages ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_eg_token_advantages_576_row_and_sign_property(backend):
    B, V = 4, 16384
    entropy = torch.stack([torch.randperm(576).float() for _ in range(B)]) / 576 * math.log(V)
    adv = torch.tensor([1.5, -0.7, 0.0, 3e-3])
    a_tok, low, high = eg_grpo_token_advantages(adv, entropy, torch.ones(B, 576), V, backend=backend)
    assert low.sum(1).tolist() == [115] * B and high.sum(1).tolist() == [287] * B
    ref, ref_low, ref_high = f64.eg_token_advantages(adv, entropy, torch.ones(B, 576), V)
    assert torch.equal(low, ref_low) and torch.equal(high, ref_high)
    assert torch.allclose(a_tok.double(), ref, atol=1e-6)
    ratio = a_tok / adv[:, None]
    for i in (0, 1, 3):
        assert bool(((ratio[i][high[i]] >= 0.7 - 1e-6) & (ratio[i][high[i]] <= 1.3 + 1e-6)).all())
        assert bool((a_tok[i][low[i]] == 0).all())
        middle = ~(low[i] | high[i])
        assert bool((a_tok[i][middle] == adv[i]).all())
    assert bool((a_tok[2] == 0).all())
    assert bool((ratio[0][high[0]] > 1).any()), "the bonus is active"


def test_text_padding_excluded_by_default_and_included_in_compat_mode():
    B, T, V = 3, 30, 1037
    entropy = torch.rand(B, T) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 12:] = False
    entropy[:, 12:] = 6.0  # post-EOS padding with large entropy
    adv = torch.tensor([1.0, -2.0, 0.5])
    default, low_d, high_d = eg_grpo_token_advantages(adv, entropy, mask, V, backend="torch")
    compat, low_c, high_c = eg_grpo_token_advantages(adv, entropy, mask, V, released_text_percentiles=True,
                                                         backend="torch")
    ref_d, _, _ = f64.eg_token_advantages(adv, entropy, mask, V)
    ref_c, _, _ = f64.eg_token_advantages(adv, entropy, mask, V, released_text_percentiles=True)
    assert torch.allclose(default.double() * mask, ref_d * mask, atol=1e-6)
    assert torch.allclose(compat.double() * mask, ref_c * mask, atol=1e-6)
    assert high_d.sum(1).tolist() == [5] * B and high_c.sum() == 0  # floor(0.5*12)=6 -> 5 above; padding wins
    assert not (low_c & ~mask).any() and not (high_d & ~mask).any()


# ---- objectives ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_eg_grpo_image_only_matches_released_eager(backend):
    B, T, D, V = 4, 16, 16, 1000
    dtype = torch.float64 if backend == "torch" else torch.float32
    image = head(B, T, D, V, dtype)
    rewards = torch.randn(B)
    out = build_objective("eg_grpo", backend=backend, chunk_size=24)(rewards, 2, image)
    out.loss.backward()
    truth = fresh(image)
    adv = f64.group_advantages(rewards, 2)
    expected = eg_grpo_loss_reference(truth.hidden.double(), truth.weight.double(), truth.targets, truth.mask, adv,
                                      truth.bias.double(), ref_logp=truth.ref_logp, beta=0.01,
                                      compute_dtype=torch.float64)
    expected.backward()
    # and the same loss written by hand (tests/_float64.py), on-policy: ratio 1, token mean over B * T
    lp, ent = f64.logp_entropy(truth.hidden, truth.weight, truth.targets, truth.bias)
    a_tok, _, _ = f64.eg_token_advantages(adv, ent, truth.mask, V)
    by_hand = (-(f64.clipped_surrogate(lp, None, a_tok)[0]) + 0.01 * f64.k3_kl(lp, truth.ref_logp)).mean()
    assert abs(by_hand.item() - expected.item()) < 1e-8   # the released code takes ln V in fp32
    assert abs(out.loss.item() - expected.item()) < 1e-5
    for g, gt in zip(grads(image), grads(truth)):
        assert rel_err(g, gt) < 1e-4
    assert torch.allclose(out.advantages.double(), adv, rtol=1e-6, atol=1e-7)
    assert out.metrics["mask/high_frac_image"] == 7 / 16 and out.metrics["mask/low_frac_image"] == 3 / 16


def expected_two_part_loss(image, text, rewards, G, *, shape_text=True, shape_image=True, compat=False,
                           budget_kappa=None, beta=0.01):
    """Written by hand in float64 (tests/_float64.py): one token mean over both parts."""
    adv = f64.group_advantages(rewards, G)
    parts = [("text", text), ("image", image)]
    n_total = sum(b.mask.double().sum() for _, b in parts)
    tok, lp = {}, {}
    for name, b in parts:
        lp[name], ent = f64.logp_entropy(b.hidden, b.weight, b.targets, b.bias)
        shaped = shape_text if name == "text" else shape_image
        if shaped:
            tok[name] = f64.eg_token_advantages(adv, ent, b.mask, b.weight.shape[0],
                                                released_text_percentiles=(name == "text" and compat))[0]
        else:
            tok[name] = adv[:, None].expand(b.mask.shape) * b.mask.double()
    scale = 1.0
    if budget_kappa is not None:
        grpo_budget = sum((b.mask.double() * adv.abs()[:, None]).sum() for _, b in parts)
        eg_budget = sum((b.mask.double() * tok[n].abs()).sum() for n, b in parts)
        scale = budget_kappa * grpo_budget / eg_budget
    total = 0
    for name, b in parts:
        m = b.mask.double()
        surr = f64.clipped_surrogate(lp[name], None, tok[name] * scale)[0]
        total = total + (-(surr * m).sum() + beta * (f64.k3_kl(lp[name], b.ref_logp) * m).sum()) / n_total
    return total, scale


@pytest.mark.parametrize("config", [
    dict(),
    dict(shape_text=False),
    dict(shape_image=False, include_padding_in_text_percentiles=True),
    dict(budget_neutral=True, kappa=1.5),
    dict(budget_neutral=True, shape_image=False),
])
def test_eg_grpo_text_and_image_share_one_normalisation(config):
    B, D = 4, 16
    image = head(B, 12, D, 1000)
    text = head(B, 9, D, 1037, padded=True, tail_scale=3.0)  # compat mode must matter
    rewards = torch.tensor([0.3, 1.0, 2.0, 2.0])  # second group has zero std
    obj = build_objective("eg_grpo", backend="torch", chunk_size=10, **config)
    out = obj(rewards, 2, image, text)
    out.loss.backward()
    t_img, t_txt = fresh(image), fresh(text)
    expected, scale = expected_two_part_loss(
        t_img, t_txt, rewards, 2, shape_text=config.get("shape_text", True),
        shape_image=config.get("shape_image", True),
        compat=config.get("include_padding_in_text_percentiles", False),
        budget_kappa=config.get("kappa", 1.0) if config.get("budget_neutral") else None)
    expected.backward()
    assert abs(out.loss.item() - expected.item()) < 1e-5 * (1 + abs(expected.item()))
    for ours, truth in ((image, t_img), (text, t_txt)):
        for g, gt in zip(grads(ours), grads(truth)):
            assert rel_err(g, gt) < 1e-4
    assert out.advantages[2:].abs().max() == 0
    if config.get("budget_neutral"):
        assert abs(out.metrics["budget/scale"] - float(scale)) < 1e-5


def test_eg_without_shaping_equals_grpo_and_compat_switch_matters():
    B, D = 4, 8
    image, text = head(B, 10, D, 1000), head(B, 8, D, 1037, padded=True)
    rewards = torch.randn(B, 3)
    weights = [1.0, 0.5, 2.0]
    grpo = build_objective("grpo", backend="torch")(rewards, 2, fresh(image), fresh(text), reward_weights=weights)
    eg_off = build_objective("eg_grpo", backend="torch", shape_text=False, shape_image=False)(
        rewards, 2, fresh(image), fresh(text), reward_weights=weights)
    assert abs(grpo.loss.item() - eg_off.loss.item()) < 1e-12
    assert torch.allclose(grpo.advantages.double(), f64.group_advantages(rewards @ torch.tensor(weights), 2),
                          rtol=1e-5, atol=1e-6)
    eg = build_objective("eg_grpo", backend="torch")(rewards, 2, fresh(image), fresh(text), reward_weights=weights)
    assert abs(eg.loss.item() - grpo.loss.item()) > 1e-6


@pytest.mark.parametrize("normalization", ["sequence_mean", "constant"])
def test_grpo_other_normalisations_span_both_heads(normalization):
    B, D = 4, 8
    image, text = head(B, 6, D, 1000), head(B, 5, D, 1037, padded=True)
    rewards = torch.randn(B)
    out = build_objective("grpo", backend="torch", normalization=normalization, beta=0.05)(rewards, 2, image, text)
    adv = f64.group_advantages(rewards, 2)
    den = image.mask.double().sum(1) + text.mask.double().sum(1)   # sequence_mean: per sample, both heads
    per_sample = 0
    for b in (image, text):
        lp, _ = f64.logp_entropy(b.hidden, b.weight, b.targets, b.bias)
        m = b.mask.double()
        per_token = -f64.clipped_surrogate(lp, None, adv[:, None].expand_as(m))[0] + 0.05 * f64.k3_kl(lp, b.ref_logp)
        per_sample = per_sample + (per_token * m).sum(1)
    if normalization == "sequence_mean":
        expected = (per_sample / den).mean()
    else:   # Dr. GRPO: one constant, B * (tokens per sample over both heads)
        expected = per_sample.sum() / (B * (6 + 5))
    assert abs(out.loss.item() - expected.item()) < 1e-6


def test_registry_and_errors():
    assert {"grpo", "eg_grpo"} <= set(OBJECTIVES)
    assert build_objective("eg_grpo").c1 == 0.3 and build_objective("eg_grpo").low_q == 0.2
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("ppo")
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        build_objective("grpo", c1=0.3)
    with pytest.raises(ValueError, match="low_q"):
        build_objective("eg_grpo", low_q=1.2)
    with pytest.raises(ValueError, match="must not exceed"):
        build_objective("eg_grpo", low_q=0.6, high_q=0.5)
    with pytest.raises(ValueError, match="kappa"):
        build_objective("eg_grpo", kappa=0)
    with pytest.raises(ValueError, match="normalization"):
        build_objective("grpo", normalization="mean")
    obj = build_objective("eg_grpo", backend="torch")
    image = head(4, 6, 8, 1000)
    with pytest.raises(ValueError, match="B = 4"):
        obj(torch.randn(6), 2, image)
    with pytest.raises(ValueError, match="group_size"):
        obj(torch.randn(4), 3, image)
    with pytest.raises(ValueError, match="NaN"):
        obj(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, image)
    with pytest.raises(ValueError, match="same B"):
        obj(torch.randn(4), 2, image, head(2, 6, 8, 1000))
    broken = fresh(image)
    with torch.no_grad():
        broken.hidden[1, 3, 0] = float("nan")  # a NaN entropy at a valid token: rejected, not shaped into the loss
    for head_path in ("fused", "eager"):
        with pytest.raises(ValueError, match="NaN"):
            obj(torch.randn(4), 2, fresh(broken), head=head_path)
    with pytest.raises(ValueError, match="vocab_size"):
        obj(torch.randn(4), 2, head(4, 6, 8, 1, ref=False))  # V = 1: noisy ref log-probs would be > 0


@pytest.mark.gpu
def test_gpu_eg_grpo_image_head_memory_vs_released_eager():
    B, T, D, V = 16, 576, 2048, 16384
    torch.manual_seed(0)
    hidden = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(V, D, device="cuda") * 3 / D**0.5).to(torch.bfloat16)
    bias = torch.zeros(V, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (B, T), device="cuda")
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    ref_logp = torch.randn(B, T, device="cuda") - 9
    rewards = torch.randn(B, device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def ours():
        image = HeadBatch(hidden.clone().requires_grad_(), weight, bias, targets, mask, ref_logp=ref_logp)
        build_objective("eg_grpo", backend="triton", chunk_size=1024)(rewards, 8, image).loss.backward()

    def eager():
        h = hidden.clone().requires_grad_()
        eg_grpo_loss_reference(h, weight, targets, mask, group_advantages(rewards, 8), bias,
                               ref_logp=ref_logp).backward()

    assert peak(ours) * 8 <= peak(eager)


def test_entropy_reward_correlations_with_a_partial_mask_by_hand():
    """The `corr/` metrics: Pearson r of the rewards with each row's masked image-entropy mean and (unbiased) std
    and its masked CoT-entropy mean, recomputed here with plain Python over the valid tokens only."""
    from egrpo.objectives.metrics import entropy_reward_correlations

    g = torch.Generator().manual_seed(5)
    B, T = 6, 7
    image, text = torch.rand(B, T, generator=g), torch.rand(B, T, generator=g)
    image_mask = (torch.rand(B, T, generator=g) > 0.3).float()
    image_mask[:, :2] = 1                       # at least two valid tokens per row (a std needs them)
    text_mask = (torch.rand(B, T, generator=g) > 0.5).float()
    text_mask[:, 0] = 1
    rewards = torch.rand(B, generator=g)

    def pearson(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
        return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))

    def valid(values, mask, i):
        return [float(v) for v, m in zip(values[i], mask[i]) if m > 0]

    means, stds, text_means = [], [], []
    for i in range(B):
        v = valid(image, image_mask, i)
        mean = sum(v) / len(v)
        means.append(mean)
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)))
        t = valid(text, text_mask, i)
        text_means.append(sum(t) / len(t))
    r = [float(x) for x in rewards]
    out = entropy_reward_correlations(rewards, image, image_mask, text, text_mask)
    assert float(out["corr/reward_vs_image_entropy_mean"]) == pytest.approx(pearson(r, means), abs=1e-9)
    assert float(out["corr/reward_vs_image_entropy_std"]) == pytest.approx(pearson(r, stds), abs=1e-9)
    assert float(out["corr/reward_vs_cot_entropy_mean"]) == pytest.approx(pearson(r, text_means), abs=1e-9)


def test_token_metrics_over_a_single_valid_token():
    """kl/, entropy/, logp/ and adv/token_mean are means over the valid tokens; with one valid token they are that
    token's values (the denominator's floor of 1 only guards an empty mask), and with none they are 0."""
    from types import SimpleNamespace

    from egrpo.objectives.metrics import base_metrics

    T = 5
    mask = torch.zeros(2, T)
    mask[1, 3] = 1.0
    out = SimpleNamespace(kl=torch.rand(2, T) + 0.5, entropy=torch.rand(2, T) + 0.5, logp=-torch.rand(2, T) - 0.5,
                          advantages=torch.rand(2, T) + 0.5, clipped_low=torch.zeros(2, T), clipped_high=torch.zeros(2, T))
    empty = SimpleNamespace(**{k: v.clone() for k, v in vars(out).items()})
    parts = [("image", SimpleNamespace(mask=mask)), ("text", SimpleNamespace(mask=torch.zeros(2, T)))]
    m = base_metrics(torch.tensor([0.1, 0.2]), torch.tensor([1.0, -1.0]), torch.tensor(0.0),
                     {"image": out, "text": empty}, parts)
    for key, field in (("kl/image", "kl"), ("entropy/image_mean", "entropy"), ("logp/image_mean", "logp"),
                       ("adv/token_mean_image", "advantages")):
        assert float(m[key]) == pytest.approx(float(getattr(out, field)[1, 3]))
    assert float(m["kl/text"]) == 0.0 and float(m["entropy/text_mean"]) == 0.0


@pytest.mark.parametrize("settings", [dict(), dict(budget_neutral=True), dict(include_padding_in_text_percentiles=True)])
@pytest.mark.parametrize("head_path", ["fused", "eager"])
def test_non_finite_entropies_are_refused_on_every_shaping_path(settings, head_path):
    """The masks no longer check their entropies themselves (a host sync per chunk): a NaN in the text head (at a
    valid token; at padding too where the released rule lets padding into the percentiles) must still stop the
    step with an error, through the fused and the eager loss, also where budget_neutral shapes the text part in a
    pass of its own."""
    obj = build_objective("eg_grpo", backend="torch", **settings)
    image, text = head(4, 6, 8, 50), head(4, 7, 8, 40, padded=True)
    position = (1, 1) if not settings.get("include_padding_in_text_percentiles") else (1, 6)
    if settings.get("include_padding_in_text_percentiles"):
        assert not text.mask[position]  # padding: only the released rule reads it
    broken = fresh(text)
    with torch.no_grad():
        broken.hidden[position[0], position[1], 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        obj(torch.randn(4), 2, fresh(image), broken, head=head_path)
    obj(torch.randn(4), 2, fresh(image), fresh(text), head=head_path)  # the intact batch goes through


def test_unchecked_shaping_turns_a_broken_row_into_nan_advantages():
    entropy = torch.tensor([[0.5, 0.9, 0.1, 0.7, 0.3, 0.2, 0.05, 0.04], [0.4, 0.8, 0.2, 0.6, 0.1, 0.3, 0.5, 0.7]])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 6:] = False
    adv = torch.tensor([1.0, -1.0])
    clean, _, _ = eg_grpo_token_advantages(adv, entropy, mask, 1000, check_finite=False)
    assert torch.isfinite(clean).all()
    for value, where, released in ((float("inf"), (0, 1), False), (float("nan"), (0, 7), True)):
        bad = entropy.clone()
        bad[where] = value
        out, _, _ = eg_grpo_token_advantages(adv, bad, mask, 1000, check_finite=False,
                                             released_text_percentiles=released)
        assert torch.isnan(out[0]).all() and torch.equal(out[1], clean[1] if not released else out[1])
        assert torch.isfinite(out[1]).all()
    # a NaN at padding outside the released rule takes no part: nothing to refuse
    bad = entropy.clone()
    bad[0, 7] = float("nan")
    out, _, _ = eg_grpo_token_advantages(adv, bad, mask, 1000, check_finite=False)
    assert torch.isfinite(out[0, :6]).all()
