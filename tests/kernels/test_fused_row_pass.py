"""The fused statistics + direction row pass (``EGRPO_FUSED_ROW_PASS=1``, opt-in, Triton row passes): one kernel
writes a chunk's logp / entropy / lse and the g-free gradient direction ``(onehot - p) / tau``; the caller's g
scales the [rows, D] side (dx after its GEMM, x's rows for dW). Run here through the Triton interpreter: the
trainer paths against float64 (frozen and trainable heads, fp32 and bf16), both kernel variants (a row held whole,
and two loops over column blocks with a ragged last block), agreement with the two-kernel path, where the pass is
not used (entropy bonus, db needed), half logits with it, no [N, V] allocation; and compiled on a GPU."""

import pytest
import torch

import egrpo.kernels._head as head
from egrpo.kernels import grpo_loss
from egrpo.kernels._common import INTERPRETING, cpu_has_fast_bf16
from egrpo.kernels.reference import grpo_loss_reference, linear_logprob_entropy_reference
from tests.kernels._utils import AllocationTracker, PoisonEmpty, max_abs_err, record_row_pass

from . import test_head_paths as paths

needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setenv("EGRPO_FUSED_ROW_PASS", "1")
    monkeypatch.setenv("EGRPO_HALF_LOGITS", "0")


@pytest.fixture
def fused_calls(monkeypatch):
    """How often the fused kernel ran, and the dtype of the logits it read."""
    return record_row_pass(monkeypatch, "stats_direction")


def _grpo(hidden, weight, bias, targets, mask, adv, kw, frozen, **extra):
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(not frozen)]
    b = None if bias is None else bias.detach().clone().requires_grad_(not frozen)
    out = grpo_loss(leaves[0], leaves[1], targets, mask, adv, b, **kw, **extra)
    out.loss.backward()
    return out, [leaves[0].grad] + ([] if frozen else [leaves[1].grad] + ([] if b is None else [b.grad]))


@needs_interpreter
@pytest.mark.parametrize("path", paths.PATHS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_paths_parity_with_float64(path, frozen, dtype, fused_calls):
    # the head-paths test (bias included) with the fused pass on; a trainable head then needs db, which keeps the
    # two-kernel pass, except for fn_batch's first pass (the g-free dx bracket; db comes from its recompute)
    paths.test_path_parity_with_float64("triton", path, frozen, dtype)
    assert bool(fused_calls) == (frozen or path == "fn_batch")


@needs_interpreter
@pytest.mark.parametrize("path", ["advantages", "fn_sequence", "fn_batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainable_head_without_bias_parity_with_float64(path, dtype, fused_calls):
    """dW with g on x's rows (the text head: trainable, no bias)."""
    torch.manual_seed(1)
    hidden, weight, _, targets, mask, seq_adv, kw = paths.make_case(dtype)
    seen = []
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    out = grpo_loss(leaves[0], leaves[1], targets, mask, **paths.advantage_kwargs(path, seq_adv, seen), **kw,
                    backend="triton", chunk_size=14)
    out.loss.backward()
    assert fused_calls
    d = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    with torch.no_grad():
        _, ent = linear_logprob_entropy_reference(d[0], d[1], targets, None, kw["temperature"])
    adv = paths.reference_advantages(path, seq_adv, ent.float())
    loss_true = grpo_loss_reference(d[0], d[1], targets, mask, adv, None, compute_dtype=torch.float64, **kw)[0]
    g_true = torch.autograd.grad(loss_true, d)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert abs(out.loss.item() - loss_true.item()) < tol * (1 + abs(loss_true.item()))
    for leaf, gt in zip(leaves, g_true):
        assert leaf.grad.dtype == dtype
        assert max_abs_err(leaf.grad, gt) / (gt.abs().max().item() + 1e-12) < tol


def _wide_case(V, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    B, T, D = 3, 5, 16
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 3 / D**0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = V - 1  # a target in the ragged last block
    mask = torch.rand(B, T, generator=g) > 0.2
    adv = torch.randn(B, generator=g)
    return hidden, weight, bias, targets, mask, adv


@needs_interpreter
@pytest.mark.parametrize("one_block_max_v", [head.DIRECTION_ONE_BLOCK_MAX_V, 0], ids=["row-whole", "two-loops"])
@pytest.mark.parametrize("V", [1000, 4099])
def test_both_kernel_variants_match_float64_and_the_two_kernel_pass(V, one_block_max_v, monkeypatch, fused_calls):
    """V = 4099: two column blocks of 4096, the second with 3 columns, when the row is not held whole."""
    monkeypatch.setattr(head, "DIRECTION_ONE_BLOCK_MAX_V", one_block_max_v)
    assert head.direction_launch(V)[1] == (one_block_max_v >= V)
    hidden, weight, bias, targets, mask, adv = _wide_case(V)
    kw = dict(backend="triton", chunk_size=4, temperature=0.6)   # 4 rows per chunk: every chunk's loop strided
    with PoisonEmpty():
        fused, g_fused = _grpo(hidden, weight, bias, targets, mask, adv, {}, True, **kw)
    assert len(fused_calls) == 4
    monkeypatch.setenv("EGRPO_FUSED_ROW_PASS", "0")
    plain, g_plain = _grpo(hidden, weight, bias, targets, mask, adv, {}, True, **kw)
    assert len(fused_calls) == 4
    # the statistics are the same arithmetic (bit for bit with the loops; the whole row sums in another order)
    for a, b in ((fused.loss, plain.loss), (fused.logp, plain.logp), (fused.entropy, plain.entropy)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert max_abs_err(g_fused[0], g_plain[0]) <= 1e-6 * g_plain[0].abs().max().item()
    d = lambda t: t.double()  # noqa: E731
    h = d(hidden).requires_grad_()
    truth = grpo_loss_reference(h, d(weight), targets, mask, adv, d(bias), temperature=0.6,
                                compute_dtype=torch.float64)[0]
    (g_true,) = torch.autograd.grad(truth, [h])
    assert abs(fused.loss.item() - truth.item()) < 1e-5 * (1 + abs(truth.item()))
    assert max_abs_err(g_fused[0], g_true) / g_true.abs().max().item() < 1e-4


@needs_interpreter
def test_not_used_where_dz_needs_g_inside(fused_calls):
    """An entropy bonus (dz has a second, entropy term) and a trainable bias (db sums g inside) keep the two-kernel
    pass, with results identical to the switch off."""
    hidden, weight, bias, targets, mask, adv = _wide_case(700)
    _grpo(hidden, weight, bias, targets, mask, adv, dict(entropy_coef=0.01), True, backend="triton", chunk_size=5)
    _grpo(hidden, weight, bias, targets, mask, adv, {}, False, backend="triton", chunk_size=5)
    assert not fused_calls


@needs_interpreter
def test_a_grad_fn_that_breaks_its_promise_is_refused():
    hidden, weight, bias, targets, _, _ = _wide_case(300)
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    grads = head.HeadGrads(h2, weight, None, True, False, False)
    with pytest.raises(RuntimeError, match="entropy_detached"):
        head.head_pass(h2, weight, t1, None, 1.0, 5, "triton", grads=grads, entropy_detached=True,
                       grad_fn=lambda rows, lp, ent: (torch.ones_like(lp), torch.ones_like(ent)))


@needs_interpreter
@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="the CPU stand-in for the half-logits GEMM needs bf16 GEMMs")
@pytest.mark.parametrize("path", ["advantages", "fn_batch"])
def test_with_half_logits(path, monkeypatch, fused_calls):
    """EGRPO_HALF_LOGITS=1 too: the kernel reads the half logits and writes the direction over them in place;
    parity as for half logits alone (float64 on the rounded logits)."""
    monkeypatch.setenv("EGRPO_HALF_LOGITS", "1")
    paths.test_path_parity_with_float64("triton", path, True, torch.bfloat16)
    assert fused_calls and set(fused_calls) == {torch.bfloat16}


@needs_interpreter
@pytest.mark.parametrize("path", paths.PATHS)
def test_no_full_logits_allocated(path):
    hidden, weight, bias, targets, mask, seq_adv, kw = paths.make_case(torch.float32)
    with AllocationTracker() as tracker:
        paths.run_ours(path, hidden, weight, bias, targets, mask, seq_adv, kw, True, [], backend="triton",
                       chunk_size=7)
    assert tracker.max_numel <= max(14 * paths.V, paths.V * paths.D), tracker.max_op  # 2 sequences, or W's copy
    assert tracker.max_numel < paths.B * paths.T * paths.V


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_switch_takes_only_0_or_1(value, monkeypatch):
    monkeypatch.setenv("EGRPO_FUSED_ROW_PASS", value)
    with pytest.raises(ValueError, match="EGRPO_FUSED_ROW_PASS must be 0 or 1") as info:
        head.fused_row_pass()
    assert "\n" not in str(info.value)


def test_launch_configuration():
    # the image vocabulary is held whole over 16 warps; the text vocabulary streams in 4096-column blocks
    assert head.direction_launch(16384, interpreting=False) == (16384, True, 16)
    assert head.direction_launch(1000, interpreting=False) == (1024, True, 4)
    assert head.direction_launch(102400, interpreting=False) == (4096, False, 8)
    assert head.direction_programs(10, torch.device("cpu")) == head.DIRECTION_PROGRAMS_INTERPRETED
    assert head.direction_programs(2, torch.device("cpu")) == 2


def test_persistent_grid_on_cuda_is_a_few_programs_per_sm(monkeypatch):
    """On CUDA the fused pass launches DIRECTION_PROGRAMS_PER_SM programs per SM (the rows in flight fit the L2),
    never more than the rows; the SM count is read once per device (here: an H100's 132, without a GPU)."""
    monkeypatch.setattr(head, "_SM_COUNTS", {0: 132})
    cuda0 = torch.device("cuda", 0)
    assert head.direction_programs(10**4, cuda0) == 132 * head.DIRECTION_PROGRAMS_PER_SM == 528
    assert head.direction_programs(5, cuda0) == 5


# ------------------------------------------------------------------ compiled on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("V,frozen", [(16384, True), (102400, False), (16387, True)])
def test_gpu_fused_pass_parity_bf16(V, frozen, monkeypatch, fused_calls):
    """Image head (frozen, bias, row held whole), text head (trainable, no bias, two loops), and a ragged V:
    against float64, never worse than eager bf16 plus a small margin, and within bf16 rounding of the two-kernel
    pass (fp32 logits read, bf16 dz written to its own buffer: the CUDA default's layout)."""
    torch.manual_seed(0)
    B, T, D = 4, 96, 256
    dev = "cuda"
    hidden = torch.randn(B, T, D, device=dev).to(torch.bfloat16)
    weight = (torch.randn(V, D, device=dev) * 3 / D**0.5).to(torch.bfloat16)
    bias = (torch.randn(V, device=dev) * 0.5).to(torch.bfloat16) if frozen else None
    targets = torch.randint(0, V, (B, T), device=dev)
    mask = torch.rand(B, T, device=dev) > 0.2
    adv = torch.randn(B, device=dev)
    kw = dict(temperature=0.8)
    ours, g_ours = _grpo(hidden, weight, bias, targets, mask, adv, kw, frozen, backend="triton", chunk_size=128)
    assert fused_calls == [torch.float32] * 3   # 384 rows in chunks of 128, fp32 logits
    monkeypatch.setenv("EGRPO_FUSED_ROW_PASS", "0")
    plain, g_plain = _grpo(hidden, weight, bias, targets, mask, adv, kw, frozen, backend="triton", chunk_size=128)
    assert len(fused_calls) == 3
    assert torch.allclose(ours.logp, plain.logp, atol=1e-5) and torch.allclose(ours.entropy, plain.entropy, atol=1e-5)
    for go, gp in zip(g_ours, g_plain):   # each rounded to bf16 once, at different points
        assert max_abs_err(go, gp) <= 4 * 2**-9 * gp.abs().max().item()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    leaves = [d(hidden).requires_grad_(), d(weight).requires_grad_(not frozen)]
    truth = grpo_loss_reference(leaves[0], leaves[1], targets, mask, adv, d(bias), compute_dtype=torch.float64,
                                **kw)[0]
    g_truth = torch.autograd.grad(truth, leaves if not frozen else leaves[:1])
    e_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen)]
    eager = grpo_loss_reference(e_leaves[0], e_leaves[1], targets, mask, adv, bias, **kw)[0]
    g_eager = torch.autograd.grad(eager, e_leaves if not frozen else e_leaves[:1])
    assert abs(ours.loss.item() - truth.item()) <= abs(eager.item() - truth.item()) + 1e-2
    for go, ge, gt in zip(g_ours, g_eager, g_truth):
        scale = gt.abs().max().item() + 1e-12
        assert max_abs_err(go.double(), gt) <= max_abs_err(ge.double(), gt) + 2e-2 * scale
