"""Half logits (EGRPO_HALF_LOGITS=1, opt-in on CUDA and in the interpreter; unset or "0" keeps fp32 logits): the chunk GEMM writes half-precision logits that the Triton row passes read as they are and turn
into dz in place. Run here through the Triton interpreter (EGRPO_HALF_LOGITS=1) with CPU bf16 GEMMs, which
round the logits exactly as the CUDA variant's GEMM does: the same parity bounds as the CPU path that rounds its
logits once (float64 on the rounded logits), the kernels really see half logits, and no fp32 [chunk, V] buffer
is allocated."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import egrpo.kernels._head as head
from egrpo.kernels import grpo_loss, linear_logprob_entropy
from egrpo.kernels import _common
from egrpo.kernels._common import INTERPRETING, cpu_has_fast_bf16, half_logits
from tests.kernels._utils import record_row_pass

from . import test_head_paths as paths
from . import test_linear_logprob_entropy as standalone

pytestmark = [
    pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1 (the GPU runs it compiled)"),
    pytest.mark.skipif(not cpu_has_fast_bf16(), reason="the CPU stand-in for the half-logits GEMM needs bf16 GEMMs"),
]


@pytest.fixture(autouse=True)
def half_logits_on(monkeypatch):
    monkeypatch.setenv("EGRPO_HALF_LOGITS", "1")
    assert half_logits(torch.bfloat16, "triton")


@pytest.mark.parametrize("V", [1000, 16387])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_standalone_head_parity(V, temperature, bias):
    # the standalone head's test, where the rounded-logits tolerance now applies to the Triton backend too
    standalone.test_parity_values_and_grads("triton", torch.bfloat16, V, temperature, bias)


@pytest.mark.parametrize("path", paths.PATHS)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_grpo_paths_parity(path, frozen):
    # float64 on the bf16-rounded logits, as for the CPU path that rounds them (test_head_paths)
    paths.test_path_parity_with_float64("triton", path, frozen, torch.bfloat16)


class DtypeAllocations(TorchDispatchMode):
    """The largest new tensor per dtype (views and in-place results allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:
            return out
        inputs = {a.untyped_storage().data_ptr() for a in list(args) + list((kwargs or {}).values())
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_kernels_read_half_logits_and_no_fp32_chunk_exists(frozen, monkeypatch):
    hidden, weight, bias, targets, mask, seq_adv, kw = paths.make_case(torch.bfloat16)
    seen_dtypes = record_row_pass(monkeypatch, "stats")
    chunk = 21  # three sequences of T = 7 (chunk x V above the fp32 dW accumulator's V x D)
    head.free_cpu_workspace()
    with DtypeAllocations() as allocations:
        out = grpo_loss(hidden.requires_grad_(), weight.requires_grad_(not frozen), targets, mask, seq_adv,
                        bias.requires_grad_(not frozen), backend="triton", chunk_size=chunk, **kw)
        out.loss.backward()
    assert seen_dtypes and set(seen_dtypes) == {torch.bfloat16}
    assert paths.V * paths.D < chunk * paths.V
    assert allocations.largest.get(torch.float32, 0) <= paths.V * paths.D, allocations.largest
    assert allocations.largest[torch.bfloat16] >= chunk * paths.V  # the half logits (= dz) themselves


@pytest.mark.parametrize("env", [None, "0"], ids=["unset", "0"])
def test_interpreter_keeps_fp32_logits_unless_1(env, monkeypatch):
    """The interpreter keeps fp32 logits when the switch is unset (the default everywhere) or 0."""
    if env is None:
        monkeypatch.delenv("EGRPO_HALF_LOGITS")
    else:
        monkeypatch.setenv("EGRPO_HALF_LOGITS", env)
    hidden, weight, bias, targets, mask, seq_adv, kw = paths.make_case(torch.bfloat16)
    seen_dtypes = []
    stats = head.ROW_PASSES["triton"].stats
    monkeypatch.setitem(head.ROW_PASSES, "triton", head.ROW_PASSES["triton"]._replace(
        stats=lambda z, *a: (seen_dtypes.append(z.dtype), stats(z, *a))[1]))
    grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="triton", chunk_size=14, **kw)
    assert set(seen_dtypes) == {torch.float32}


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_with_the_next_chunk_running_ahead_results_are_bit_identical(frozen, monkeypatch):
    """EGRPO_OVERLAP_ROW_PASSES=1 computes chunk k+1's logits before chunk k's row passes: with half logits each
    chunk needs logits of its own (a shared buffer was overwritten by the next chunk's GEMM)."""
    hidden, weight, bias, targets, mask, seq_adv, kw = paths.make_case(torch.bfloat16)

    def run():
        leaves = [t.detach().clone().requires_grad_(i == 0 or not frozen) for i, t in enumerate((hidden, weight, bias))]
        out = grpo_loss(leaves[0], leaves[1], targets, mask, seq_adv, leaves[2], backend="triton", chunk_size=7, **kw)
        out.loss.backward()
        return [out.loss, out.logp] + [t.grad for t in leaves if t.grad is not None]

    monkeypatch.setenv("EGRPO_OVERLAP_ROW_PASSES", "0")
    serial = run()
    monkeypatch.setenv("EGRPO_OVERLAP_ROW_PASSES", "1")
    ahead = run()
    assert len(serial) == len(ahead)
    for a, b in zip(serial, ahead):
        assert torch.equal(a, b)


@pytest.mark.parametrize("env,logit_bytes", [("1", 2), ("0", 4), (None, 4)])
def test_default_chunk_is_sized_by_the_logits_held(env, logit_bytes, monkeypatch):
    """With half logits the default chunk counts 2 bytes per logit (on CUDA: twice the rows of fp32 logits), else 4;
    both head ops ask for it so."""
    if env is None:
        monkeypatch.delenv("EGRPO_HALF_LOGITS")
    else:
        monkeypatch.setenv("EGRPO_HALF_LOGITS", env)
    asked = []
    real = _common.default_chunk_rows
    monkeypatch.setattr(_common, "default_chunk_rows",
                        lambda n, v, device, b=4: (asked.append(b), real(n, v, device, b))[1])
    hidden, weight, bias, targets, mask, seq_adv, kw = paths.make_case(torch.bfloat16)
    grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="triton", **kw)
    linear_logprob_entropy(hidden, weight, targets, bias, backend="triton")
    assert asked == [logit_bytes, logit_bytes]


@pytest.mark.parametrize("name", ["EGRPO_HALF_LOGITS", "EGRPO_OVERLAP_ROW_PASSES"])
def test_switch_values_other_than_0_or_1_are_refused(name, monkeypatch):
    hidden, weight, bias, targets, mask, seq_adv, kw = paths.make_case(torch.bfloat16)
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1"):
        grpo_loss(hidden, weight, targets, mask, seq_adv, bias, backend="triton", **kw)
