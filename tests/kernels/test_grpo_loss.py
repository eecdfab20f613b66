import math

import pytest
import torch

from egrpo.kernels import grpo_loss, linear_logprob_entropy
from egrpo.kernels._common import INTERPRETING
from egrpo.kernels.reference import grpo_loss_reference, linear_logprob_entropy_reference
from tests import _float64 as f64
from tests.kernels._utils import (
    BF16_ROUNDED_GRAD_TOL, AllocationTracker, PoisonEmpty, max_abs_err, rounds_logits_to_bf16,
)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1; compiled Triton is covered by the gpu tests"))]
NORMALIZATIONS = ["token_mean", "sequence_mean", "constant", "weighted"]


def make_case(B, T, D, V, dtype, device="cpu", off_policy=True, weights=True):
    hidden = torch.randn(B, T, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * 3 / D**0.5).to(dtype)
    bias = (torch.randn(V, device=device) * 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), device=device)
    with torch.no_grad():  # the clip probes below (row 0, tokens 0-3) on each row's least likely token: old_logp =
        # logp + 1 stays a log-probability (<= 0) whatever the seed
        probe_logits = hidden[0, :4].double() @ weight.double().T + bias.double()
        targets[0, :4] = probe_logits.argmin(-1)
    mask = torch.rand(B, T, device=device) > 0.25
    mask[0, :] = True
    mask[1, T // 2:] = False  # ragged: post-EOS padding
    with torch.no_grad():
        logp, _ = linear_logprob_entropy_reference(hidden.double(), weight.double(), targets, bias.double())
    # noisy log-probs clamped to <= 0: the loss refuses positive ones (a seed put a likely token's above 0)
    kw = dict(ref_logp=(logp + 0.5 * torch.randn_like(logp)).clamp(max=0.0).float(), beta=0.1)
    if off_policy:  # ratios spread well outside [0.8, 1.2] on both sides: clipping is active
        old = (logp + 0.4 * torch.randn_like(logp)).clamp(max=0.0)
        old[0, 0], old[0, 1] = logp[0, 0] + 1.0, logp[0, 1] - 1.0  # one token clipped on each side
        # ratios 1.15 (A > 0) and 0.85 (A < 0): inside [0.8, 1.2]; with eps_low = 0.1, eps_high = 0.3 only the
        # second is clipped, with the bounds exchanged only the first
        old[0, 2], old[0, 3] = logp[0, 2] - math.log(1.15), logp[0, 3] - math.log(0.85)
        kw["old_logp"] = old.float()
    if weights:
        kw["kl_weights"] = torch.rand(B, T, device=device) + 0.5
        kw["policy_weights"] = torch.rand(B, T, device=device)
    adv = torch.randn(B, T, device=device)
    adv[0, 0], adv[0, 1], adv[0, 2], adv[0, 3] = -1.0, 1.0, 1.0, -1.0
    return hidden, weight, bias, targets, mask, adv, kw


def run(fn, hidden, weight, bias, targets, mask, adv, kw, **extra):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], targets, mask, adv, leaves[2], **kw, **extra)
    loss = out[0]
    grads = torch.autograd.grad(loss, leaves)
    return out, grads


def ref_fn(compute_dtype=None):
    return lambda *a, **k: grpo_loss_reference(*a, compute_dtype=compute_dtype, **k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("variant", ["on_policy", "off_policy_weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_values_and_grads(backend, normalization, variant, dtype):
    B, T, D, V = 3, 7, 16, 1037 if dtype == torch.float32 else 1000
    off = variant != "on_policy"
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, dtype, off_policy=off, weights=off)
    kw["normalization"] = normalization
    if off:  # asymmetric clip range (DAPO's clip-higher): swapping the bounds anywhere changes the result
        kw["eps_low"], kw["eps_high"] = 0.1, 0.3
    d = lambda t: t.double()  # noqa: E731
    truth, g_truth = run(ref_fn(torch.float64), d(hidden), d(weight), d(bias), targets, mask, adv, kw)
    with PoisonEmpty():
        ours, g_ours = run(grpo_loss, hidden, weight, bias, targets, mask, adv, kw, backend=backend, chunk_size=8)
    # Where the CPU's bf16 GEMM rounds the logits (as eager's does), the float64 truth of those rounded logits
    # decides every clip (a token near a clip bound may flip with the rounding) and bounds the gradients
    bf16_logits = rounds_logits_to_bf16(dtype, backend)
    if bf16_logits:
        rounded, g_rounded = run(ref_fn(torch.float64), d(hidden), d(weight), d(bias), targets, mask, adv, kw,
                                 round_logits_to=torch.bfloat16)
    if off:
        assert ours.clipped_low.any() and ours.clipped_high.any(), "the test must exercise both clip sides"
        _, low, high = f64.clipped_surrogate((rounded if bf16_logits else truth)[1].detach(), kw["old_logp"], adv,
                                             0.1, 0.3)
        assert torch.equal(ours.clipped_low, mask & low) and torch.equal(ours.clipped_high, mask & high)
        # tokens whose ratio lies between the two bounds' mirror images: a swapped range flags them wrongly
        ratio = torch.exp(truth[1].detach() - kw["old_logp"].double())
        assert (mask & (ratio > 1.1) & (ratio < 1.3) & (adv > 0)).any()
        assert (mask & (ratio > 0.7) & (ratio < 0.9) & (adv < 0)).any()
    assert torch.equal(ours.advantages, torch.where(mask, adv, torch.zeros_like(adv)))
    for g, t in zip(g_ours, (hidden, weight, bias)):
        assert g.dtype == t.dtype
    # Never worse than eager PyTorch at the same dtype (against float64) plus a tolerance sized from fp32's
    # error here (loss ~1e-7 relative, logp/entropy/kl ~1e-6, gradients ~1e-6 of their largest element).
    eager, g_eager = run(ref_fn(), hidden, weight, bias, targets, mask, adv, kw)
    scale_loss = 1 + abs(truth[0].item())
    # Elsewhere bf16 inputs get fp32 logits and fp32-level values.
    if bf16_logits:   # against the float64 truth of the same rounded logits: fp32 softmax, bf16 gradient rounding
        assert abs(ours.loss.item() - rounded[0].item()) <= 1e-5 * scale_loss
        for k, name in ((1, "logp"), (2, "entropy"), (3, "kl")):
            assert max_abs_err(getattr(ours, name), rounded[k]) <= 2e-5 * (1 + rounded[k].abs().max().item()), name
        for go, gr in zip(g_ours, g_rounded):
            assert max_abs_err(go, gr) <= BF16_ROUNDED_GRAD_TOL * (gr.abs().max().item() + 1e-12)
        return
    assert abs(ours.loss.item() - truth[0].item()) <= abs(eager[0].item() - truth[0].item()) + 1e-6 * scale_loss
    value_tol = 5e-6 if dtype == torch.float32 else 2e-5  # bf16 inputs, fp32 logits: fp32-level values
    for k, name in ((1, "logp"), (2, "entropy"), (3, "kl")):
        err = max_abs_err(getattr(ours, name), truth[k])
        bound = value_tol * (1 + truth[k].abs().max().item())
        assert err <= bound, (name, err, bound)
    grad_tol = 1e-5 if dtype == torch.float32 else 4e-3   # bf16: the rounding of a bf16 gradient
    for go, ge, gt in zip(g_ours, g_eager, g_truth):
        scale = gt.abs().max().item() + 1e-12
        assert max_abs_err(go, gt) <= max_abs_err(ge, gt) + grad_tol * scale


def test_asymmetric_clip_range_values_and_gradients():
    """eps_low = 0.1, eps_high = 0.3 against the hand-written float64 surrogate (tests/_float64.py): the loss
    and its gradient move by far more than the tolerance when the two bounds are exchanged."""
    B, T, D, V = 4, 16, 16, 1000
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float32, off_policy=True,
                                                             weights=False)
    kw["beta"] = 0.0
    # the two probe tokens (ratios 1.15 with A = 1 and 0.85 with A < 0) move the loss in opposite directions when
    # the bounds are exchanged: unequal advantages keep them from cancelling
    adv[0, 3] = -0.5
    h = hidden.double().requires_grad_()
    logp, _ = f64.logp_entropy(h, weight, targets, bias)
    m = mask.double()

    def expected(eps_low, eps_high):
        surr, _, _ = f64.clipped_surrogate(logp, kw["old_logp"], adv, eps_low, eps_high)
        loss = -(surr * m).sum() / m.sum()
        return loss, torch.autograd.grad(loss, h, retain_graph=True)[0]

    right, g_right = expected(0.1, 0.3)
    swapped, g_swapped = expected(0.3, 0.1)
    assert abs(right.item() - swapped.item()) > 1e-4 and max_abs_err(g_right, g_swapped) > 1e-2 * g_right.abs().max()
    for backend in ("torch", "triton") if INTERPRETING else ("torch",):
        x = hidden.clone().requires_grad_()
        out = grpo_loss(x, weight, targets, mask, adv, bias, backend=backend, chunk_size=8, eps_low=0.1,
                        eps_high=0.3, **kw)
        (g,) = torch.autograd.grad(out.loss, x)
        assert abs(out.loss.item() - right.item()) < 1e-6 * (1 + abs(right.item())), backend
        assert max_abs_err(g, g_right) < 1e-5 * g_right.abs().max().item(), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_advantage_fn_matches_precomputed_and_sees_current_entropy(backend):
    B, T, D, V = 2, 9, 16, 1000
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float32)
    kw["temperature"] = 0.7
    seen = {}

    def advantage_fn(logp, entropy):
        seen["logp"], seen["entropy"] = logp, entropy
        return adv * entropy  # advantages that depend on the current entropies

    ours, g_ours = run(grpo_loss, hidden, weight, bias, targets, mask, None, kw, advantage_fn=advantage_fn,
                       backend=backend, chunk_size=5)
    lp, ent = linear_logprob_entropy(hidden, weight, targets, bias, 0.7, backend=backend, chunk_size=5)
    assert torch.equal(seen["logp"], lp) and torch.equal(seen["entropy"], ent)
    assert not seen["entropy"].requires_grad
    truth, g_truth = run(ref_fn(torch.float64), hidden.double(), weight.double(), bias.double(), targets, mask,
                         (adv * ent).double(), kw)
    assert abs(ours.loss.item() - truth[0].item()) < 1e-5 * (1 + abs(truth[0].item()))
    for go, gt in zip(g_ours, g_truth):
        assert max_abs_err(go, gt) / (gt.abs().max().item() + 1e-12) < 1e-4


@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean", "weighted"])
def test_shared_normalizer_spans_two_heads(normalization):
    # Splitting the tokens of a sequence between two calls with shared denominators equals one call.
    B, T, D, V = 3, 10, 16, 1000
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float64, off_policy=True)
    kw["normalization"] = normalization
    full, g_full = run(grpo_loss, hidden, weight, bias, targets, mask, adv, kw, backend="torch")
    m = mask.double()
    if normalization == "token_mean":
        den = kl_den = m.sum()
    elif normalization == "sequence_mean":
        den = kl_den = m.sum(1)
    else:
        den, kl_den = (m * kw["policy_weights"]).sum() + 1e-6, m.sum()
    split = 4
    h = hidden.detach().clone().requires_grad_()
    total = 0
    for sl in (slice(0, split), slice(split, T)):
        part_kw = {k: (v[:, sl] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        total = total + grpo_loss(h[:, sl], weight, targets[:, sl], mask[:, sl], adv[:, sl], bias, backend="torch",
                                  normalizer=den, kl_normalizer=kl_den, **part_kw).loss
    (g_h,) = torch.autograd.grad(total, h)
    assert abs(total.item() - full.loss.item()) < 1e-12
    assert max_abs_err(g_h, g_full[0]) < 1e-12


def test_sequence_advantages_broadcast_and_empty_mask():
    B, T, D, V = 3, 5, 8, 1000
    hidden, weight, bias, targets, mask, _, kw = make_case(B, T, D, V, torch.float32, off_policy=False, weights=False)
    seq = torch.randn(B)
    a = grpo_loss(hidden, weight, targets, mask, seq, bias, backend="torch", **kw)
    b = grpo_loss(hidden, weight, targets, mask, seq[:, None].expand(B, T), bias, backend="torch", **kw)
    assert a.loss.item() == b.loss.item()
    h = hidden.clone().requires_grad_()
    empty = grpo_loss(h, weight, targets, torch.zeros(B, T), seq, bias, backend="torch", **kw)
    empty.loss.backward()
    assert empty.loss.item() == 0.0 and bool((h.grad == 0).all())


def test_frozen_head_gets_no_weight_grad():
    B, T, D, V = 2, 4, 8, 1000
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float32)
    h = hidden.clone().requires_grad_()
    out = grpo_loss(h, weight, targets, mask, adv, bias, backend="torch", **kw)
    (2.0 * out.loss).backward()
    ref = hidden.double().requires_grad_()
    (2.0 * grpo_loss_reference(ref, weight.double(), targets, mask, adv, bias.double(), **kw)[0]).backward()
    assert weight.grad is None and max_abs_err(h.grad, ref.grad) / ref.grad.abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_advantage_fn", [False, True])
def test_never_allocates_n_by_v(backend, with_advantage_fn):
    B, T, D, V = 4, 16, 16, 1037
    N = B * T
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    extra = dict(advantage_fn=lambda lp, ent: adv * ent) if with_advantage_fn else {}
    with AllocationTracker() as tracker:
        out = grpo_loss(leaves[0], leaves[1], targets, mask, None if extra else adv, leaves[2],
                        backend=backend, chunk_size=8, **kw, **extra)
        out.loss.backward()
    assert all(t.grad is not None for t in leaves)
    assert tracker.max_numel < N * V, (tracker.max_numel, tracker.max_op)
    assert tracker.max_numel <= max(8 * V, V * D, N * D)


def test_errors():
    B, T, D, V = 2, 4, 8, 1000
    hidden, weight, bias, targets, mask, adv, _ = make_case(B, T, D, V, torch.float32)
    call = lambda **k: grpo_loss(**{**dict(hidden=hidden, weight=weight, targets=targets, mask=mask,  # noqa: E731
                                           advantages=adv, bias=bias, backend="torch"), **k})
    with pytest.raises(ValueError, match="mask shape"):
        call(mask=mask[:, :3])
    with pytest.raises(ValueError, match="advantages must have shape"):
        call(advantages=adv[:, :3])
    bad = adv.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="advantages has NaN"):
        call(advantages=bad)
    with pytest.raises(ValueError, match="advantage_fn's result has NaN"):
        call(advantages=None, advantage_fn=lambda lp, ent: ent * float("nan"))
    # per-chunk calls (whole sequences, one chunk each): a NaN in the last chunk alone is still caught (the check
    # runs once after the pass instead of waiting for the device at every chunk)
    def nan_in_last_sequence(lp, ent, seqs):
        out = torch.ones_like(ent)
        return out * float("nan") if seqs.stop == B else out
    with pytest.raises(ValueError, match="advantage_fn's result has NaN"):
        call(advantages=None, advantage_fn=nan_in_last_sequence, advantage_fn_scope="sequence", chunk_size=T)
    call(advantages=None, advantage_fn=lambda lp, ent, seqs: torch.ones_like(ent), advantage_fn_scope="sequence",
         chunk_size=T)
    with pytest.raises(ValueError, match="advantage_fn's result must have shape"):
        call(advantages=None, advantage_fn=lambda lp, ent: ent[:, :2])
    with pytest.raises(ValueError, match="old_logp must have shape"):
        call(old_logp=torch.zeros(B, T + 1))
    with pytest.raises(ValueError, match="ref_logp has NaN"):
        call(ref_logp=torch.full((B, T), float("nan")), beta=0.1)
    with pytest.raises(ValueError, match="normalization"):
        call(normalization="mean")
    with pytest.raises(ValueError, match="normalizer"):
        call(normalizer=0.0)
    with pytest.raises(ValueError, match="normalizer"):
        call(normalizer=torch.ones(B))  # [B] only for sequence_mean
    with pytest.raises(ValueError, match="beta"):
        call(beta=-1.0)
    with pytest.raises(ValueError, match="hidden must have shape"):
        call(hidden=hidden[0], targets=targets[0], mask=mask[0], advantages=adv[0])
    with pytest.raises(ValueError, match="advantages must be given"):
        call(advantages=None)
    with pytest.raises(ValueError, match="policy_weights"):
        call(policy_weights=-torch.ones(B, T))
    with pytest.raises(ValueError, match="targets must be token ids"):
        call(targets=targets + V)


@pytest.mark.gpu
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("with_advantage_fn", [False, True])
def test_gpu_parity_bf16(normalization, with_advantage_fn):
    B, T, D, V = 4, 300, 256, 16387
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.bfloat16, device="cuda")
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw["normalization"] = normalization
    extra = dict(advantage_fn=lambda lp, ent: adv) if with_advantage_fn else {}
    ours, g_ours = run(grpo_loss, hidden, weight, bias, targets, mask, None if extra else adv, kw,
                       backend="triton", chunk_size=512, **extra)
    d = lambda t: t.double()  # noqa: E731
    truth, g_truth = run(ref_fn(torch.float64), d(hidden), d(weight), d(bias), targets, mask, adv, kw)
    eager, g_eager = run(ref_fn(), hidden, weight, bias, targets, mask, adv, kw)
    assert abs(ours.loss.item() - truth[0].item()) <= abs(eager[0].item() - truth[0].item()) + 1e-2
    for go, ge, gt in zip(g_ours, g_eager, g_truth):
        scale = gt.abs().max().item() + 1e-12
        assert max_abs_err(go, gt) <= max_abs_err(ge, gt) + 2e-2 * scale


@pytest.mark.gpu
def test_gpu_peak_memory_far_below_eager():
    B, T, D, V = 16, 576, 2048, 16384
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.bfloat16, device="cuda",
                                                             off_policy=False, weights=False)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    def peak(fn, **extra):
        h = hidden.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, weight, targets, mask, adv, bias, **kw, **extra)[0].backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(grpo_loss, backend="triton", chunk_size=1024)
    eager = peak(grpo_loss_reference)
    assert ours * 8 <= eager, (ours, eager)


def test_a_ratio_exactly_on_the_clip_bound_is_not_clipped():
    """eps_low = eps_high = 0 on policy: every ratio is exactly 1 = both bounds. The surrogate's derivative there
    is A (min and clamp both pass it), so the policy gradient is the unclipped one; a strict `<` / `>` test of
    the bound (not `<=` / `>=`) must mark no token clipped."""
    B, T, D, V = 4, 16, 16, 1000
    hidden, weight, bias, targets, mask, adv, kw = make_case(B, T, D, V, torch.float32, off_policy=False,
                                                             weights=False)
    kw["beta"] = 0.0
    assert (adv < 0).any() and (adv > 0).any()
    h = hidden.double().requires_grad_()
    logp, _ = f64.logp_entropy(h, weight, targets, bias)
    m = mask.double()
    a = adv.double()[:, None] if adv.dim() == 1 else adv.double()
    loss = -(a * torch.exp(logp - logp.detach()) * m).sum() / m.sum()     # unclipped policy gradient
    (g_expected,) = torch.autograd.grad(loss, h)
    for backend in ("torch", "triton") if INTERPRETING else ("torch",):
        x = hidden.clone().requires_grad_()
        out = grpo_loss(x, weight, targets, mask, adv, bias, backend=backend, chunk_size=8, eps_low=0.0,
                        eps_high=0.0, **kw)
        (g,) = torch.autograd.grad(out.loss, x)
        assert not out.clipped_low.any() and not out.clipped_high.any(), backend
        assert max_abs_err(g, g_expected) < 1e-5 * g_expected.abs().max().item(), backend
