"""grpo_loss's trainer paths (frozen / trainable head; advantages given; advantage_fn over the batch,
per sequence, per group): values and gradients against float64 eager, the GEMM FLOPs each path
really runs, no [N, V] allocation, non-finite inputs, argument checks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from egrpo.kernels import grpo_loss, linear_logprob_entropy
from egrpo.kernels._common import INTERPRETING, cpu_fp32_gemm
from egrpo.kernels.reference import grpo_loss_reference, linear_logprob_entropy_reference
from tests.kernels._utils import (
    BF16_ROUNDED_GRAD_TOL, AllocationTracker, PoisonEmpty, max_abs_err, rounds_logits_to_bf16,
)

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1"))
B, T, D, V, G = 4, 7, 16, 1037, 2
PATHS = ["advantages", "fn_batch", "fn_sequence", "fn_group"]


def make_case(dtype):
    hidden = torch.randn(B, T, D).to(dtype)
    weight = (torch.randn(V, D) * 3 / D**0.5).to(dtype)
    bias = (torch.randn(V) * 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[0, :] = True
    mask[1, T // 2:] = False  # ragged
    with torch.no_grad():
        logp, _ = linear_logprob_entropy_reference(hidden.double(), weight.double(), targets, bias.double(), 0.7)
    kw = dict(
        old_logp=(logp + 0.3 * torch.randn_like(logp)).clamp(max=0).float(),
        ref_logp=(logp + 0.3 * torch.randn_like(logp)).clamp(max=0).float(),
        beta=0.1, kl_weights=torch.rand(B, T) + 0.5, policy_weights=torch.rand(B, T), temperature=0.7,
    )
    seq_adv = torch.randn(B)
    return hidden, weight, bias, targets, mask, seq_adv, kw


# Advantages that depend on the current entropies over the rows each scope allows.
def adv_batch(seq_adv, entropy):
    return seq_adv.to(entropy)[:, None] * entropy / entropy.mean()


def adv_rows(seq_adv, entropy, rows_per_unit):
    e = entropy.view(-1, rows_per_unit, entropy.shape[1])
    scale = e / e.mean(dim=(1, 2), keepdim=True)
    return seq_adv.to(entropy)[:, None] * scale.view_as(entropy)


def advantage_kwargs(path, seq_adv, seen):
    if path == "advantages":
        return dict(advantages=seq_adv)
    if path == "fn_batch":
        return dict(advantages=None, advantage_fn=lambda lp, ent: adv_batch(seq_adv, ent))
    per = 1 if path == "fn_sequence" else G

    def fn(lp, ent, seqs):
        seen.append(seqs)
        return adv_rows(seq_adv[seqs], ent, per)

    return dict(advantages=None, advantage_fn=fn, advantage_fn_scope="sequence" if per == 1 else G)


def reference_advantages(path, seq_adv, entropy):
    if path == "advantages":
        return seq_adv
    if path == "fn_batch":
        return adv_batch(seq_adv, entropy)
    return adv_rows(seq_adv, entropy, 1 if path == "fn_sequence" else G)


def run_ref(path, hidden, weight, bias, targets, mask, seq_adv, kw, frozen, compute_dtype, round_logits_to=None):
    with torch.no_grad():
        _, ent = linear_logprob_entropy_reference(hidden, weight, targets, bias, kw["temperature"],
                                                  compute_dtype=compute_dtype, round_logits_to=round_logits_to)
    adv = reference_advantages(path, seq_adv, ent.float())
    leaves = [hidden.detach().clone().requires_grad_()] + [
        t.detach().clone().requires_grad_(not frozen) for t in (weight, bias)]
    out = grpo_loss_reference(leaves[0], leaves[1], targets, mask, adv, leaves[2], compute_dtype=compute_dtype,
                              round_logits_to=round_logits_to, **kw)
    wanted = [leaves[0]] if frozen else leaves
    return out[0], torch.autograd.grad(out[0], wanted)


def run_ours(path, hidden, weight, bias, targets, mask, seq_adv, kw, frozen, seen, **extra):
    leaves = [hidden.detach().clone().requires_grad_()] + [
        t.detach().clone().requires_grad_(not frozen) for t in (weight, bias)]
    out = grpo_loss(leaves[0], leaves[1], targets, mask, bias=leaves[2], **advantage_kwargs(path, seq_adv, seen),
                    **kw, **extra)
    out.loss.backward()
    grads = [leaves[0].grad] if frozen else [t.grad for t in leaves]
    if frozen:
        assert leaves[1].grad is None and leaves[2].grad is None
    return out, grads


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_path_parity_with_float64(backend, path, frozen, dtype):
    hidden, weight, bias, targets, mask, seq_adv, kw = make_case(dtype)
    d = lambda t: t.double()  # noqa: E731
    loss_true, g_true = run_ref(path, d(hidden), d(weight), d(bias), targets, mask, seq_adv, kw, frozen, torch.float64)
    seen = []
    with PoisonEmpty():
        ours, g_ours = run_ours(path, hidden, weight, bias, targets, mask, seq_adv, kw, frozen, seen,
                                backend=backend, chunk_size=10)
    if path in ("fn_sequence", "fn_group"):  # chunk 10 rounds down to whole sequences / groups
        per = 1 if path == "fn_sequence" else G
        assert seen and all(s.start % per == 0 and s.stop % per == 0 for s in seen)
        assert [s.start for s in seen] == list(range(0, B, per))
    assert len(g_ours) == len(g_true)
    for g, t in zip(g_ours, (hidden, weight, bias)):
        assert g.dtype == t.dtype
    if rounds_logits_to_bf16(dtype, backend):
        # the CPU's bf16 GEMM rounds the logits once (as eager's does; clip decisions and entropy-driven
        # advantages follow that rounding): exact up to fp32 softmax and bf16 gradient rounding against the
        # float64 truth of the same rounded logits
        loss_r, g_r = run_ref(path, d(hidden), d(weight), d(bias), targets, mask, seq_adv, kw, frozen, torch.float64,
                              round_logits_to=torch.bfloat16)
        assert abs(ours.loss.item() - loss_r.item()) < 1e-5 * (1 + abs(loss_r.item()))
        for go, gt in zip(g_ours, g_r):
            assert max_abs_err(go, gt) / (gt.abs().max().item() + 1e-12) < BF16_ROUNDED_GRAD_TOL
    elif dtype == torch.float32:
        assert abs(ours.loss.item() - loss_true.item()) < 1e-5 * (1 + abs(loss_true.item()))
        for go, gt in zip(g_ours, g_true):
            assert max_abs_err(go, gt) / (gt.abs().max().item() + 1e-12) < 1e-4
    else:
        loss_eager, g_eager = run_ref(path, hidden, weight, bias, targets, mask, seq_adv, kw, frozen, None)
        assert abs(ours.loss.item() - loss_true.item()) <= abs(loss_eager.item() - loss_true.item()) + 1e-2
        for go, ge, gt in zip(g_ours, g_eager, g_true):
            scale = gt.abs().max().item() + 1e-12
            assert max_abs_err(go, gt) <= max_abs_err(ge, gt) + 2e-2 * scale


class GemmFlops(TorchDispatchMode):
    """Counts 2 m n k for every matrix multiply that runs (BLAS through aten, or oneDNN's linear: X W^T)."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
           torch.ops.aten.addmm.out}
    LINEAR_OPS = {torch.ops.mkldnn._linear_pointwise.default: 1, torch.ops.mkldnn._linear_pointwise.binary: 2}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            a, b = (args[0], args[1]) if "mm." in str(func) and "addmm" not in str(func) else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif func in self.LINEAR_OPS:
            x, w = args[0], args[self.LINEAR_OPS[func]]
            self.flops += 2 * x.shape[0] * x.shape[1] * w.shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cpu_gemm", ["onednn", "blas"])
@pytest.mark.parametrize("path,frozen,cost", [
    ("advantages", True, 4), ("advantages", False, 6),
    ("fn_sequence", True, 4), ("fn_sequence", False, 6), ("fn_group", False, 6),
    ("fn_batch", True, 4), ("fn_batch", False, 8),  # the one path that recomputes (dW needs g first)
])
def test_gemm_cost_of_each_path(path, frozen, cost, cpu_gemm, monkeypatch):
    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", cpu_gemm)
    assert cpu_fp32_gemm() == cpu_gemm  # (also runs oneDNN's one-time probe GEMM outside the count)
    hidden, weight, bias, targets, mask, seq_adv, kw = make_case(torch.float32)
    with GemmFlops() as counter:
        run_ours(path, hidden, weight, bias, targets, mask, seq_adv, kw, frozen, [], backend="torch", chunk_size=10)
    assert counter.flops == cost * B * T * D * V


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_no_full_logits_allocated(path, frozen):
    hidden, weight, bias, targets, mask, seq_adv, kw = make_case(torch.float32)
    with AllocationTracker() as tracker:
        run_ours(path, hidden, weight, bias, targets, mask, seq_adv, kw, frozen, [], backend="torch", chunk_size=7)
    assert tracker.max_numel <= max(14 * V, V * D), tracker.max_op  # a group of 2 sequences, or dW
    assert tracker.max_numel < B * T * V


def test_nan_hidden_at_a_valid_token_reaches_the_loss():
    hidden, weight, bias, targets, mask, seq_adv, _ = make_case(torch.float32)
    hidden[0, 2, 3] = float("nan")  # mask[0] is all valid
    for kw in (dict(), dict(beta=0.0), dict(old_logp=None)):
        out = grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="torch", **kw)
        assert not torch.isfinite(out.loss), kw
    lp, ent = linear_logprob_entropy(hidden, weight, targets, bias, backend="torch")
    assert torch.isnan(lp[0, 2]) and torch.isnan(ent[0, 2]) and torch.isfinite(lp[1]).all()


def test_nan_hidden_at_a_padding_token_is_ignored():
    hidden, weight, bias, targets, mask, seq_adv, _ = make_case(torch.float32)
    hidden[1, T - 1, 0] = float("nan")  # mask[1, T//2:] is padding
    out = grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="torch")
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kw,match", [
    (dict(beta=0.1), "beta > 0 needs ref_logp"),
    (dict(eps_low=1.0), "eps_low must lie in"),
    (dict(eps_low=-0.1), "eps_low"),
    (dict(ref_logp="positive", beta=0.1), "ref_logp has positive values"),
    (dict(old_logp="positive"), "old_logp has positive values"),
    (dict(advantage_fn=lambda lp, ent: ent, advantage_fn_scope=3), "must divide the batch size"),
    (dict(advantage_fn=lambda lp, ent: ent, advantage_fn_scope="row"), "advantage_fn_scope must be"),
])
def test_bad_arguments_raise_one_line_errors(kw, match):
    hidden, weight, bias, targets, mask, seq_adv, _ = make_case(torch.float32)
    for name in ("ref_logp", "old_logp"):
        if kw.get(name) == "positive":
            kw[name] = torch.full((B, T), -1.0)
            kw[name][0, 0] = 0.5
    with pytest.raises(ValueError, match=match) as info:
        grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="torch", **kw)
    assert "\n" not in str(info.value)


def test_log_prob_check_slack_is_rounding_only():
    """Reference log-probs a hair above 0 (a caller's own log-softmax rounding, <= 1e-4) pass; 1.5e-4 does not."""
    hidden, weight, bias, targets, mask, seq_adv, _ = make_case(torch.float32)
    ref = torch.full((B, T), -1.0)
    ref[0, 0] = 0.9e-4
    grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="torch", ref_logp=ref, beta=0.1)
    ref[0, 0] = 1.5e-4
    with pytest.raises(ValueError, match="ref_logp has positive values"):
        grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="torch", ref_logp=ref, beta=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_path_parity_compiled_triton_bf16(path, frozen):
    """The same paths with compiled Triton on CUDA in bf16: never worse than eager bf16 on the GPU."""
    hidden, weight, bias, targets, mask, seq_adv, kw = make_case(torch.bfloat16)
    d = lambda t: t.double()  # noqa: E731
    loss_true, g_true = run_ref(path, d(hidden), d(weight), d(bias), targets, mask, seq_adv, kw, frozen, torch.float64)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    args = [cuda(t) for t in (hidden, weight, bias, targets, mask, seq_adv)]
    kw_cuda = {k: cuda(v) for k, v in kw.items()}
    ours, g_ours = run_ours(path, *args, kw_cuda, frozen, [], backend="triton", chunk_size=10)
    loss_eager, g_eager = run_ref(path, *args, kw_cuda, frozen, None)
    assert abs(ours.loss.item() - loss_true.item()) <= abs(loss_eager.item() - loss_true.item()) + 1e-2
    for go, ge, gt in zip(g_ours, g_eager, g_true):
        scale = gt.abs().max().item() + 1e-12
        assert max_abs_err(go.cpu(), gt) <= max_abs_err(ge.cpu(), gt) + 2e-2 * scale
