"""GRPO options on the fused path: GSPO's sequence-level ratio, the dual clip, the entropy bonus.

Expected values come from :func:`options_reference`, written here from the formulas (docs/algorithms.md,
"GRPO options") with full float64 logits and plain autograd; it shares no code with ``egrpo``. The eager
head (``egrpo.objectives.heads.eager_grpo_loss``) is checked against the same reference.
"""

import math

import pytest
import torch

from egrpo.kernels import grpo_loss
from egrpo.kernels._common import INTERPRETING
from egrpo.objectives.heads import eager_grpo_loss
from tests import _float64 as f64
from tests.kernels._utils import (
    BF16_ROUNDED_GRAD_TOL, AllocationTracker, PoisonEmpty, max_abs_err, rounds_logits_to_bf16,
)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1; compiled Triton is covered by the gpu tests"))]


def options_reference(hidden, weight, targets, mask, adv, bias, *, old_logp, ref_logp, beta, policy_weights,
                      kl_weights, eps_low, eps_high, level, clip_c, entropy_coef, temperature, round_logits_to=None):
    """Token-mean loss with one shared denominator sum(m); every quantity in float64, one sequence at a time
    (``round_logits_to``: see :func:`tests._float64.logp_entropy`)."""
    logp, entropy = f64.logp_entropy(hidden, weight, targets, bias, temperature, round_logits_to)
    B, T = targets.shape
    m = mask.double()
    den = m.sum().clamp(min=1.0)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(B):
        valid = mask[i]
        lr = (logp[i] - old_logp[i].double())[valid]
        if level == "sequence":
            ratios = torch.exp(lr.mean()).expand(lr.shape[0]) if lr.numel() else lr
        else:
            ratios = torch.exp(lr)
        a = adv[i].double()[valid]
        pg_losses1 = -a * ratios
        pg_losses2 = -a * ratios.clamp(1 - eps_low, 1 + eps_high)
        per_token = torch.maximum(pg_losses1, pg_losses2)
        if clip_c is not None:
            per_token = torch.where(a < 0, torch.minimum(per_token, -a * clip_c), per_token)
        total = total + (per_token * policy_weights[i].double()[valid]).sum() / den
        d = ref_logp[i].double()[valid] - logp[i][valid]
        total = total + beta * ((torch.exp(d) - d - 1) * kl_weights[i].double()[valid]).sum() / den
        total = total - entropy_coef * entropy[i][valid].sum() / den
    return total, logp, entropy


def make_case(B, T, D, V, dtype):
    hidden = torch.randn(B, T, D).to(dtype)
    weight = (torch.randn(V, D) * 3 / D**0.5).to(dtype)
    bias = (torch.randn(V) * 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[0, :] = True
    mask[1, T // 2:] = False   # ragged: post-EOS padding
    with torch.no_grad():
        logp, _ = f64.logp_entropy(hidden, weight, targets, bias, 0.9)
    # ratios well outside [0.8, 1.3], per token and per sequence (row offsets), so every clip is active
    old = (logp + 0.6 * torch.randn_like(logp) + torch.linspace(-0.6, 0.6, B)[:, None].double()).clamp(max=0.0)
    adv = torch.randn(B, T)
    adv[::2] = -adv[::2].abs() - 0.5   # negative rows: the dual clip has something to cap
    kw = dict(old_logp=old.float(), ref_logp=(logp + 0.5 * torch.randn_like(logp)).clamp(max=0.0).float(), beta=0.1,
              policy_weights=torch.rand(B, T), kl_weights=torch.rand(B, T) + 0.5, eps_low=0.2, eps_high=0.3,
              temperature=0.9)
    return hidden, weight, bias, targets, mask, adv, kw


OPTIONS = [
    dict(level="sequence", clip_c=None, entropy_coef=0.0),
    dict(level="token", clip_c=1.5, entropy_coef=0.0),
    dict(level="token", clip_c=None, entropy_coef=0.05),
    dict(level="sequence", clip_c=1.4, entropy_coef=0.05),
]


def _run(fn, hidden, weight, bias, targets, mask, adv, kw, opts, **extra):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], targets, mask, adv, leaves[2], normalization="token_mean",
             importance_sampling_level=opts["level"], clip_ratio_c=opts["clip_c"],
             entropy_coef=opts["entropy_coef"], **kw, **extra)
    return out, torch.autograd.grad(out.loss, leaves)


def _truth(hidden, weight, bias, targets, mask, adv, kw, opts, round_logits_to=None):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    loss, logp, entropy = options_reference(leaves[0], leaves[1], targets, mask, adv, leaves[2], level=opts["level"],
                                            clip_c=opts["clip_c"], entropy_coef=opts["entropy_coef"],
                                            round_logits_to=round_logits_to, **kw)
    return loss, logp.detach(), entropy.detach(), torch.autograd.grad(loss, leaves)


def _check(out, grads, truth, dtype, hidden, rounded=False):
    loss, logp, entropy, g_truth = truth
    tol = 2e-6 if dtype == torch.float32 else 2e-5
    assert abs(out.loss.item() - loss.item()) <= tol * (1 + abs(loss.item())), (out.loss.item(), loss.item())
    assert max_abs_err(out.logp, logp) <= tol * (1 + logp.abs().max().item())
    assert max_abs_err(out.entropy, entropy) <= tol * (1 + entropy.abs().max().item())
    # bf16: the rounding of a bf16 gradient (fp32 logits); where the logits were rounded too, that of dz as well
    grad_tol = 2e-5 if dtype == torch.float32 else (BF16_ROUNDED_GRAD_TOL if rounded else 6e-3)
    for g, t in zip(grads, g_truth):
        assert max_abs_err(g, t) <= grad_tol * (t.abs().max().item() + 1e-12), max_abs_err(g, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"{o['level']}-c{o['clip_c']}-h{o['entropy_coef']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_options_parity(backend, opts, dtype):
    torch.manual_seed(0)
    B, T, D, V = 4, 6, 16, 1037 if dtype == torch.float32 else 1000
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, dtype)
    truth = _truth(hidden, weight, bias, targets, mask, adv, kw, opts)
    # chunk 8 is not a multiple of T = 6: the sequence-level ratio must still see whole sequences
    with PoisonEmpty():
        out, grads = _run(grpo_loss, hidden, weight, bias, targets, mask, adv, kw, opts, backend=backend, chunk_size=8)
    # where the CPU's bf16 GEMM rounds the logits (as eager bf16 code does), the truth rounds them the same way
    rounded = rounds_logits_to_bf16(dtype, backend)
    _check(out, grads, _truth(hidden, weight, bias, targets, mask, adv, kw, opts, dtype) if rounded else truth,
           dtype, hidden, rounded)
    if opts["clip_c"] is not None:   # the dual clip is active somewhere (else the test could not fail)
        r = torch.exp(truth[1] - kw["old_logp"].double())
        if opts["level"] == "sequence":
            m = mask.double()
            r = torch.exp(((truth[1] - kw["old_logp"].double()) * m).sum(1) / m.sum(1))[:, None].expand_as(m)
        assert (mask & (adv < 0) & (r > opts["clip_c"])).any()


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"{o['level']}-c{o['clip_c']}-h{o['entropy_coef']}")
def test_eager_head_matches_reference(opts):
    torch.manual_seed(1)
    hidden, weight, bias, targets, mask, adv, kw = make_case(3, 5, 8, 300, torch.float64)
    truth = _truth(hidden, weight, bias, targets, mask, adv, kw, opts)
    out, grads = _run(eager_grpo_loss, hidden, weight, bias, targets, mask, adv, kw, opts)
    assert abs(out.loss.item() - truth[0].item()) < 1e-12
    for g, t in zip(grads, truth[3]):
        assert max_abs_err(g, t) < 1e-12


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_options_with_advantage_fn(scope):
    """The options compose with an entropy-dependent advantage_fn on both the one-pass and the recompute path."""
    torch.manual_seed(2)
    hidden, weight, bias, targets, mask, adv, kw = make_case(4, 5, 8, 300, torch.float32)
    opts = dict(level="sequence", clip_c=1.5, entropy_coef=0.03)
    with torch.no_grad():
        _, ent = f64.logp_entropy(hidden, weight, targets, bias, 0.9)
    token_adv = (adv.double() * ent).float()
    truth = _truth(hidden, weight, bias, targets, mask, token_adv, kw, opts)
    fn = (lambda lp, h: adv * h) if scope == "batch" else (lambda lp, h, seqs: adv[seqs] * h)
    out, grads = _run(grpo_loss, hidden, weight, bias, targets, mask, None, kw, opts, advantage_fn=fn,
                      advantage_fn_scope=scope, backend="torch", chunk_size=7)
    _check(out, grads, truth, torch.float32, hidden)


@pytest.mark.parametrize("frozen", [False, True])
def test_options_never_allocate_n_by_v(frozen):
    B, T, D, V = 4, 16, 16, 1037
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float32)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen),
              bias.clone().requires_grad_(not frozen)]
    with AllocationTracker() as tracker:
        out = grpo_loss(leaves[0], leaves[1], targets, mask, adv, leaves[2], backend="torch", chunk_size=8,
                        importance_sampling_level="sequence", clip_ratio_c=2.0, entropy_coef=0.01, **kw)
        out.loss.backward()
    assert tracker.max_numel < B * T * V, (tracker.max_numel, tracker.max_op)
    assert tracker.max_numel <= max(2 * T * V, V * D, B * T * D)


def test_option_errors():
    hidden, weight, bias, targets, mask, adv, kw = make_case(2, 3, 4, 50, torch.float32)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(hidden, weight, targets, mask, adv, bias, importance_sampling_level="seq", backend="torch")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        grpo_loss(hidden, weight, targets, mask, adv, bias, clip_ratio_c=0.9, backend="torch")
    with pytest.raises(ValueError, match="entropy_coef"):
        grpo_loss(hidden, weight, targets, mask, adv, bias, entropy_coef=math.nan, backend="torch")


@pytest.mark.parametrize("opts,scope,frozen,cost", [
    (dict(importance_sampling_level="sequence", clip_ratio_c=2.0, entropy_coef=0.01), None, False, 6),
    (dict(importance_sampling_level="sequence", clip_ratio_c=2.0, entropy_coef=0.01), None, True, 4),
    (dict(importance_sampling_level="sequence", entropy_coef=0.01), "sequence", False, 6),
    (dict(importance_sampling_level="sequence"), "batch", False, 8),
    (dict(entropy_coef=0.01), "batch", True, 6),    # the entropy bonus breaks the dx bracket: recompute
    (dict(entropy_coef=0.01), "batch", False, 8),
])
def test_gemm_cost_with_options(opts, scope, frozen, cost):
    from tests.kernels.test_head_paths import GemmFlops
    B, T, D, V = 4, 6, 16, 300
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float32)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen),
              bias.clone().requires_grad_(not frozen)]
    extra = {}
    if scope == "batch":
        extra = dict(advantage_fn=lambda lp, h: adv * h)
    elif scope == "sequence":
        extra = dict(advantage_fn=lambda lp, h, seqs: adv[seqs] * h, advantage_fn_scope="sequence")
    with GemmFlops() as counter:
        out = grpo_loss(leaves[0], leaves[1], targets, mask, None if extra else adv, leaves[2], backend="torch",
                        chunk_size=7, **opts, **kw, **extra)
        out.loss.backward()
    assert counter.flops == cost * B * T * D * V


def test_gradients_are_handed_over_once_and_scaled_by_the_upstream_gradient():
    """The fused loss computes its gradients in the forward and hands them to autograd in backward (scaled in place
    by the upstream gradient, skipped when it is exactly 1 on CPU): a scaled loss scales every gradient, and a
    second backward through the same loss is a clear error instead of wrong gradients."""
    g = torch.Generator().manual_seed(11)
    B, T, D, V = 3, 4, 8, 50
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, generator=g)

    def grads(scale):
        x, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = grpo_loss(x, w, targets, mask, adv, b, backend="torch")
        (out.loss * scale).backward() if scale != 1 else out.loss.backward()
        return x.grad, w.grad, b.grad

    for a, b3 in zip(grads(1), grads(-3.0)):
        torch.testing.assert_close(b3, -3.0 * a, rtol=1e-6, atol=1e-7)
    x = hidden.clone().requires_grad_()
    out = grpo_loss(x, weight, targets, mask, adv, bias, backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.loss.backward()
