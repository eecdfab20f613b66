import pytest
import torch

from egrpo.kernels import linear_logprob_entropy
from egrpo.kernels._common import HAS_TRITON, INTERPRETING
from egrpo.kernels._head import num_warps as head_num_warps
from egrpo.kernels.reference import linear_logprob_entropy_reference as reference
from tests.kernels._utils import (
    BF16_ROUNDED_GRAD_TOL, AllocationTracker, PoisonEmpty, bf16_logit_rounding_bounds, compile_for_sm90, max_abs_err,
    rounds_logits_to_bf16,
)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1; compiled Triton is covered by the gpu tests"))]


def make_inputs(N, D, V, dtype, bias=True, device="cpu", scale=1.0):
    hidden = torch.randn(N, D, device=device).to(dtype)
    # Scale so logits have a realistic spread (a few nats), peaked enough for entropy to vary.
    weight = torch.randn(V, D, device=device) * scale / D**0.5 * 3
    # The last vocabulary column (where a block-masking off-by-one would drop) carries most of row 0's mass,
    # and some of row 1's, so losing it moves the results far beyond the tolerances.
    weight[-1] = (hidden[0].float() + 0.5 * hidden[1].float()) * scale / D**0.5 * 3
    weight = weight.to(dtype)
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), device=device)
    return hidden, weight, b, targets


def run_with_grads(fn, hidden, weight, bias, targets, temperature, g_logp, g_entropy, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    logp, ent = fn(leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, temperature, **kw)
    loss = 0
    if g_logp is not None:
        loss = loss + (logp.double() * g_logp).sum()
    if g_entropy is not None:
        loss = loss + (ent.double() * g_entropy).sum()
    grads = torch.autograd.grad(loss, leaves)
    return logp.detach(), ent.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 16387])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_parity_values_and_grads(backend, dtype, V, temperature, bias):
    N, D = 37, 32
    hidden, weight, b, targets = make_inputs(N, D, V, dtype, bias)
    cast = lambda t: None if t is None else t.double()  # noqa: E731
    upstream = {
        "logp": (torch.randn(N, dtype=torch.float64), None),
        "entropy": (None, torch.randn(N, dtype=torch.float64)),
        "both": (torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)),
    }
    for name, (g_lp, g_h) in upstream.items():
        truth = run_with_grads(reference, cast(hidden), cast(weight), cast(b), targets, temperature, g_lp, g_h)
        with PoisonEmpty():
            ours = run_with_grads(linear_logprob_entropy, hidden, weight, b, targets, temperature, g_lp, g_h,
                                  backend=backend, chunk_size=16)
        assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
        for g, t in zip(ours[2], (hidden, weight, b)):
            assert g.dtype == t.dtype, "gradients come back in the input dtype"
        eager = run_with_grads(reference, hidden, weight, b, targets, temperature, g_lp, g_h)
        # Values: never worse than eager PyTorch at the same dtype (max error against float64) plus
        # VALUE_TOL; with fp32 logits from bf16 inputs (CUDA, interpreter) the fused head keeps fp32 accuracy.
        # Where the GEMM rounds the logits to bf16 (as eager does), every row is within the first-order bound of
        # one such rounding (10% for second-order terms), which eager's own error obeys too.
        bf16_logits = rounds_logits_to_bf16(dtype, backend)
        bounds = bf16_logit_rounding_bounds(hidden, weight, b, temperature) if bf16_logits else None
        for k in (0, 1):
            ours_err, eager_err = max_abs_err(ours[k], truth[k]), max_abs_err(eager[k], truth[k])
            if bf16_logits:
                excess = (ours[k].double() - truth[k]).abs() - (1.1 * bounds[k] + VALUE_TOL)
                assert excess.max().item() <= 0, (name, k, ours_err, eager_err)
            else:
                assert ours_err <= eager_err + VALUE_TOL, (name, k, ours_err, eager_err)
                assert ours_err <= FP32_VALUE_ERR, (name, k, ours_err)
        # Gradients: never worse than eager, relative to the largest element, plus GRAD_TOL of the dtype. Where the
        # logits are rounded once, against the float64 gradient of those rounded logits (what is left is the
        # rounding of dz and of the result: BF16_ROUNDED_GRAD_TOL), not against eager's independent rounding.
        rounded = run_with_grads(reference, cast(hidden), cast(weight), cast(b), targets, temperature, g_lp, g_h,
                                 round_logits_to=torch.bfloat16) if bf16_logits else None
        for i, (g_ours, g_eager, g_true) in enumerate(zip(ours[2], eager[2], truth[2])):
            scale = g_true.abs().max().item() + 1e-12
            ours_err, eager_err = max_abs_err(g_ours, g_true) / scale, max_abs_err(g_eager, g_true) / scale
            if bf16_logits:
                g_r = rounded[2][i]
                assert max_abs_err(g_ours, g_r) <= BF16_ROUNDED_GRAD_TOL * (g_r.abs().max().item() + 1e-12), name
            else:
                assert ours_err <= eager_err + GRAD_TOL[dtype], (name, ours_err, eager_err)


# fp32 eager PyTorch against float64 at these shapes: logp/entropy max error 1e-6..6e-6 (V = 1000..16387);
# the fused head: 1e-6..4e-6 in fp32 and in bf16 (measured on CPU, torch 2.13). Dropping one vocabulary column
# moves them by >= 2e-4 (test_tolerance_is_below_a_dropped_vocab_column).
VALUE_TOL = 5e-6
FP32_VALUE_ERR = 2e-5
# Gradients relative to their largest element: fp32 ~1e-6 both; bf16 fused 1.5e-3..3.5e-3 (the rounding of
# a bf16 result), eager 5e-3..4e-2 (bf16 logits).
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tolerance_is_below_a_dropped_vocab_column(backend, temperature):
    """The guarded effect is larger than the tolerance: a head that forgets the last of V = 16387 columns
    (a masking off-by-one) is VALUE_TOL-distinguishable from the right answer at the parity test's shapes."""
    N, D, V = 37, 32, 16387
    hidden, weight, b, targets = make_inputs(N, D, V, torch.float32, bias=True)
    targets = targets.clamp(max=V - 2)
    truth = reference(hidden.double(), weight.double(), targets, b.double(), temperature)
    eager = reference(hidden, weight, targets, b, temperature)
    dropped = linear_logprob_entropy(hidden, weight[:-1].contiguous(), targets, b[:-1].contiguous(), temperature,
                                     backend=backend, chunk_size=16)
    for k in (0, 1):
        assert max_abs_err(dropped[k], truth[k]) > max_abs_err(eager[k], truth[k]) + 10 * VALUE_TOL


@pytest.mark.skipif(not rounds_logits_to_bf16(torch.bfloat16, "torch"), reason="this CPU has no bf16 GEMMs")
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_cpu_bf16_rounds_the_logits_once_and_nothing_else(temperature, bias):
    """On a CPU with bf16 GEMMs the torch path's only departure from float64 is the bf16 rounding of the logits
    GEMM's output: on those rounded logits (one GEMM over all rows, as a single chunk runs it) the log-probs and
    entropies match a float64 softmax to fp32 accuracy, far inside the rounding's own effect."""
    N, D, V = 37, 32, 16387
    hidden, weight, b, targets = make_inputs(N, D, V, torch.bfloat16, bias)
    z = (hidden @ weight.t()).double()   # the same bf16 GEMM, rounded once
    if b is not None:
        z = z + b.double()
    log_p = torch.log_softmax(z / temperature, dim=-1)
    logp_true = log_p.gather(1, targets[:, None]).squeeze(1)
    ent_true = -(log_p.exp() * log_p).sum(-1)
    logp, ent = linear_logprob_entropy(hidden, weight, targets, b, temperature, backend="torch", chunk_size=N)
    assert max_abs_err(logp, logp_true) <= FP32_VALUE_ERR and max_abs_err(ent, ent_true) <= FP32_VALUE_ERR
    full = reference(hidden.double(), weight.double(), targets, None if b is None else b.double(), temperature)
    assert max_abs_err(logp, full[0]) > 10 * FP32_VALUE_ERR, "the rounding is visible, so the test could fail"


@pytest.mark.parametrize("cpu_gemm", ["onednn", "blas"])
def test_cpu_fp32_gemm_libraries(cpu_gemm, monkeypatch):
    """Both fp32 GEMM libraries on CPU (EGRPO_CPU_FP32_GEMM), over ragged chunks and, for oneDNN, a dW accumulated
    through vocabulary blocks of a ragged size: never worse than eager fp32 against float64."""
    import egrpo.kernels._head as head

    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", cpu_gemm)
    N, D, V = 45, 24, 1037
    monkeypatch.setattr(head, "ONEDNN_DW_BLOCK_BYTES", 4 * D * 100)  # 11 blocks, the last of 37 rows
    hidden, weight, b, targets = make_inputs(N, D, V, torch.float32)
    g_lp, g_h = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    truth = run_with_grads(reference, hidden.double(), weight.double(), b.double(), targets, 0.7, g_lp, g_h)
    eager = run_with_grads(reference, hidden, weight, b, targets, 0.7, g_lp, g_h)
    with AllocationTracker(name_at_least=16 * V) as tracker:
        ours = run_with_grads(linear_logprob_entropy, hidden, weight, b, targets, 0.7, g_lp, g_h, chunk_size=16)
    linear_ops = [op for op in tracker.large_ops if "mkldnn" in op]
    assert bool(linear_ops) == (cpu_gemm == "onednn"), tracker.large_ops
    for k in (0, 1):
        assert max_abs_err(ours[k], truth[k]) <= max_abs_err(eager[k], truth[k]) + VALUE_TOL
    for g_ours, g_eager, g_true in zip(ours[2], eager[2], truth[2]):
        scale = g_true.abs().max().item()
        assert max_abs_err(g_ours, g_true) / scale <= max_abs_err(g_eager, g_true) / scale + GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dim_input_and_chunk_invariance(backend):
    B, T, D, V = 3, 11, 16, 300
    hidden, weight, b, _ = make_inputs(B * T, D, V, torch.float32)
    targets = torch.randint(0, V, (B, T))
    lp3, h3 = linear_logprob_entropy(hidden.view(B, T, D), weight, targets, b, backend=backend, chunk_size=4)
    lp2, h2 = linear_logprob_entropy(hidden, weight, targets.view(-1), b, backend=backend, chunk_size=64)
    assert lp3.shape == (B, T) and h3.shape == (B, T)
    torch.testing.assert_close(lp3.reshape(-1), lp2, rtol=0, atol=1e-5)
    torch.testing.assert_close(h3.reshape(-1), h2, rtol=0, atol=1e-5)


def test_gradcheck_float64_torch_backend():
    N, D, V = 5, 4, 13
    hidden, weight, b, targets = make_inputs(N, D, V, torch.float64)
    args = [t.requires_grad_() for t in (hidden, weight, b)]

    def fn(x, w, bias):
        return linear_logprob_entropy(x, w, targets, bias, 0.8, backend="torch", chunk_size=2)

    assert torch.autograd.gradcheck(fn, args)


def test_entropy_extremes():
    # A near-one-hot row has entropy ~0 and logp ~0; a uniform row has entropy ln V.
    V, D = 257, 8
    weight = torch.zeros(V, D)
    weight[3, 0] = 200.0
    hidden = torch.zeros(2, D)
    hidden[0, 0] = 1.0
    lp, h = linear_logprob_entropy(hidden, weight, torch.tensor([3, 5]), backend="torch")
    assert abs(h[0].item()) < 1e-6 and abs(lp[0].item()) < 1e-6
    assert abs(h[1].item() - torch.log(torch.tensor(float(V))).item()) < 1e-5
    assert lp.le(0).all() and h.ge(-1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_n_by_v_allocation(backend):
    N, D, V, chunk = 96, 16, 1000, 16
    hidden, weight, b, targets = make_inputs(N, D, V, torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    with AllocationTracker() as tracker:
        logp, ent = linear_logprob_entropy(*leaves[:2], targets, leaves[2], backend=backend, chunk_size=chunk)
        (logp.sum() + ent.sum()).backward()
    assert tracker.max_numel <= chunk * V, (tracker.max_numel, tracker.max_op)
    assert tracker.max_numel < N * V


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    D, V = 8, 50
    hidden = torch.randn(0, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    logp, ent = linear_logprob_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), backend=backend)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, D) and torch.all(weight.grad == 0)


def test_frozen_weight_skips_its_gradient():
    hidden, weight, b, targets = make_inputs(20, 8, 100, torch.float32)
    hidden.requires_grad_()
    logp, _ = linear_logprob_entropy(hidden, weight, targets, b, backend="torch")
    logp.sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize(
    "mutate,exc,word",
    [
        (lambda a: a.update(targets=a["targets"] + 100), ValueError, "targets"),
        (lambda a: a.update(targets=a["targets"] - 100), ValueError, "targets"),
        (lambda a: a.update(targets=a["targets"].float()), TypeError, "targets"),
        (lambda a: a.update(targets=a["targets"][:-1]), ValueError, "targets"),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
        (lambda a: a.update(hidden=a["hidden"][:, :-1]), ValueError, "hidden"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, "weight"),
        (lambda a: a.update(weight=a["weight"][:0]), ValueError, "V = 0"),
        (lambda a: a.update(hidden=a["hidden"][:, :0], weight=a["weight"][:, :0]), ValueError, "D"),
        (lambda a: a.update(bias=torch.zeros(7)), ValueError, "bias"),
        (lambda a: a.update(bias=torch.zeros(100, dtype=torch.float64)), TypeError, "bias"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(temperature=float("nan")), ValueError, "temperature"),
        (lambda a: a.update(backend="cuda"), ValueError, "backend"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_input_errors(mutate, exc, word):
    hidden, weight, b, targets = make_inputs(10, 8, 100, torch.float32, bias=False)
    args = dict(hidden=hidden, weight=weight, targets=targets, bias=None, temperature=1.0, backend="torch",
                chunk_size=None)
    mutate(args)
    with pytest.raises(exc, match=word):
        linear_logprob_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("bias"),
                               args.pop("temperature"), **args)


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs triton and no CUDA device")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    # The test process runs under the interpreter (conftest), so the check runs in a child without it.
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom egrpo.kernels import linear_logprob_entropy\n"
            "try:\n    linear_logprob_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long),"
            " backend='triton')\nexcept ValueError as e:\n    print('ERROR:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR:" in proc.stdout and "TRITON_INTERPRET" in proc.stdout, proc.stdout


# ------------------------------------------------------------------ GPU (compiled Triton) tests


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [16387, 102400])
def test_gpu_parity(dtype, V):
    N, D = 1031, 256
    hidden, weight, b, targets = make_inputs(N, D, V, dtype, True, device="cuda")
    g_lp = torch.randn(N, dtype=torch.float64, device="cuda")
    g_h = torch.randn(N, dtype=torch.float64, device="cuda")
    cast = lambda t: t.double()  # noqa: E731
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        truth = run_with_grads(reference, cast(hidden), cast(weight), cast(b), targets, 0.9, g_lp, g_h)
        ours = run_with_grads(linear_logprob_entropy, hidden, weight, b, targets, 0.9, g_lp, g_h,
                              backend="triton", chunk_size=256)
        eager = run_with_grads(reference, hidden, weight, b, targets, 0.9, g_lp, g_h)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    tol = 5e-4 if dtype == torch.float32 else 1e-2
    for k in (0, 1):
        assert max_abs_err(ours[k], truth[k]) <= max_abs_err(eager[k], truth[k]) + tol
    for g_ours, g_eager, g_true in zip(ours[2], eager[2], truth[2]):
        scale = g_true.abs().max().item()
        assert max_abs_err(g_ours, g_true) <= max_abs_err(g_eager, g_true) + tol * scale


@pytest.mark.gpu
def test_gpu_many_rows():
    # More rows than a CUDA grid's y/z limit (65535): the 1-D per-chunk grid must cope.
    N, D, V = 70_001, 64, 1000
    hidden, weight, b, targets = make_inputs(N, D, V, torch.bfloat16, True, device="cuda")
    logp, ent = linear_logprob_entropy(hidden, weight, targets, b, backend="triton", chunk_size=70_001)
    ref_lp, ref_h = reference(hidden.float(), weight.float(), targets, b.float())
    assert max_abs_err(logp, ref_lp) < 1e-2 and max_abs_err(ent, ref_h) < 1e-2


# ------------------------------------------------------------------ ahead-of-time compile for sm_90

_STATS_SIG = {"logits_ptr": "*fp32", "stride_logits": "i64", "bias_ptr": "*bf16", "targets_ptr": "*i64",
              "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "inv_tau": "fp32"}
_DLOGITS_SIG = {"logits_ptr": "*fp32", "stride_logits": "i64", "dz_ptr": "*bf16", "stride_dz": "i64",
                "bias_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                "g_logp_ptr": "*fp32", "g_entropy_ptr": "*fp32", "V": "i32", "inv_tau": "fp32"}


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("kernel,signature,constexprs", [
    ("_head_stats_kernel", _STATS_SIG, {"HAS_BIAS": True, "BLOCK_V": 4096}),
    ("_head_dlogits_kernel", _DLOGITS_SIG,
     {"HAS_BIAS": True, "HAS_G_LOGP": True, "HAS_G_ENTROPY": True, "BLOCK_V": 4096}),
    ("_head_dlogits_kernel", _DLOGITS_SIG,
     {"HAS_BIAS": False, "HAS_G_LOGP": False, "HAS_G_ENTROPY": True, "BLOCK_V": 1024}),
])
def test_kernels_compile_for_h100(kernel, signature, constexprs):
    compile_for_sm90("egrpo.kernels.linear_logprob_entropy", kernel, dict(signature), constexprs,
                     num_warps=head_num_warps(constexprs["BLOCK_V"], interpreting=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_bonus_loss_gradient_parity(backend, dtype):
    """The one loss in use that differentiates entropy is an entropy bonus built on this head
    (``grpo_loss`` and the objectives detach it): ``loss = -sum(H m) / sum(m) + 0.1 sum(logp m) / sum(m)`` with a
    ragged mask and a temperature, values and gradients against the hand-written float64 head
    (tests/_float64.py), never worse than eager PyTorch at the same dtype."""
    from tests import _float64 as f64

    B, T, D, V = 3, 9, 32, 16387
    hidden, weight, b, targets = make_inputs(B * T, D, V, dtype, bias=True)
    hidden, targets = hidden.view(B, T, D), targets.view(B, T)
    mask = torch.rand(B, T) > 0.3
    mask[0] = True
    m = mask.double()

    def loss_of(logp, ent):
        return (-(ent.double() * m).sum() + 0.1 * (logp.double() * m).sum()) / m.sum()

    def grads(fn, cast, **kw):
        leaves = [cast(t).detach().clone().requires_grad_() for t in (hidden, weight, b)]
        loss = loss_of(*fn(leaves[0], leaves[1], targets, leaves[2], 0.7, **kw))
        return loss.detach(), torch.autograd.grad(loss, leaves)

    truth, g_truth = grads(f64.logp_entropy, lambda t: t.double())
    ours, g_ours = grads(linear_logprob_entropy, lambda t: t, backend=backend, chunk_size=8)
    if rounds_logits_to_bf16(dtype, backend):
        # logits rounded once, as eager's are: against the float64 truth of those rounded logits (eager's own
        # rounding is an independent draw, so "eager + a margin" would hold by luck)
        rounded, g_rounded = grads(reference, lambda t: t.double(), round_logits_to=torch.bfloat16)
        assert abs(ours - rounded).item() <= 1e-5 * (1 + abs(rounded.item()))
        for go, gr in zip(g_ours, g_rounded):
            assert max_abs_err(go, gr) <= BF16_ROUNDED_GRAD_TOL * gr.abs().max().item()
    else:
        eager, g_eager = grads(reference, lambda t: t)
        assert abs(ours - truth).item() <= abs(eager - truth).item() + 1e-6
        for go, ge, gt in zip(g_ours, g_eager, g_truth):
            scale = gt.abs().max().item()
            assert max_abs_err(go, gt) / scale <= max_abs_err(ge, gt) / scale + GRAD_TOL[dtype]
    # the entropy term's share of the gradient is far above the tolerance
    h = hidden.double().requires_grad_()
    logp, ent = f64.logp_entropy(h, weight, targets, b, 0.7)
    (g_bonus,) = torch.autograd.grad(-(ent * m).sum() / m.sum(), h)
    assert g_bonus.abs().max() > 10 * GRAD_TOL[dtype] * g_truth[0].abs().max()


def test_grpo_loss_does_not_differentiate_entropy():
    """grpo_loss's entropy is an output only: it carries no gradient (so no entropy-gradient path to test there)."""
    from egrpo.kernels import grpo_loss

    hidden, weight, b, targets = make_inputs(8, 16, 100, torch.float32)
    out = grpo_loss(hidden.view(2, 4, 16).requires_grad_(), weight, targets.view(2, 4), torch.ones(2, 4),
                    torch.randn(2), b, backend="torch")
    assert not out.entropy.requires_grad and out.loss.requires_grad


def test_gpu_warp_counts_are_powers_of_two():
    """The launch's warp count (unused by the interpreter, so no CPU parity test sees it) must be a power of
    two on a GPU, where Triton rejects any other count."""
    from egrpo.kernels._head import num_warps

    for block in (16, 1024, 2048, 4096):
        n = num_warps(block, interpreting=False)
        assert n >= 1 and n & (n - 1) == 0, (block, n)
