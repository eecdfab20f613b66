"""The CPU chunk workspace: buffers kept between calls, fresh ones for a nested call, released on request."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from egrpo.kernels import free_cpu_workspace, grpo_loss, linear_logprob_entropy
from egrpo.kernels._common import cpu_fp32_gemm
from egrpo.kernels._head import CPU_WORKSPACE_MAX_BYTES
from egrpo.kernels.reference import linear_logprob_entropy_reference
from tests.kernels._utils import AllocationTracker, max_abs_err

N, D, V, CHUNK = 64, 16, 4000, 16


def _inputs():
    torch.manual_seed(0)
    return torch.randn(N, D), torch.randn(V, D) / D**0.5, torch.randint(0, V, (N,))


@pytest.fixture
def blas_gemms(monkeypatch):
    """fp32 GEMMs by torch.mm (BLAS), which writes into the workspace's logits buffer; the default oneDNN GEMM
    returns logits of its own (test_onednn_logits_are_the_only_fresh_chunk_buffer)."""
    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", "blas")


def test_second_call_allocates_no_chunk_buffer_and_free_releases_them(blas_gemms):
    hidden, weight, targets = _inputs()
    free_cpu_workspace()
    with AllocationTracker() as first:
        linear_logprob_entropy(hidden, weight, targets, chunk_size=CHUNK)
    assert first.max_numel == CHUNK * V            # the buffers are allocated once...
    with AllocationTracker() as second:
        logp, ent = linear_logprob_entropy(hidden, weight, targets, chunk_size=CHUNK)
    assert second.max_numel < CHUNK * V            # ...and reused by the next call
    truth = linear_logprob_entropy_reference(hidden.double(), weight.double(), targets)
    assert max_abs_err(logp, truth[0]) < 1e-5 and max_abs_err(ent, truth[1]) < 1e-5
    assert free_cpu_workspace() >= CHUNK * V * 4   # fp32 logits (+ a [rows, 1024] block temporary)
    assert free_cpu_workspace() == 0
    with AllocationTracker() as third:
        linear_logprob_entropy(hidden, weight, targets, chunk_size=CHUNK)
    assert third.max_numel == CHUNK * V


def test_entropy_gradient_needs_no_second_chunk_buffer(blas_gemms):
    """With gradients through logp and entropy (forward, then the recompute in backward), the only [chunk, V]
    buffer ever allocated is the logits buffer: p goes through [chunk, 1024] block temporaries."""
    hidden, weight, targets = _inputs()
    free_cpu_workspace()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with AllocationTracker(name_at_least=CHUNK * V) as tracker:
        logp, ent = linear_logprob_entropy(h, w, targets, chunk_size=CHUNK)
        (logp.sum() + ent.sum()).backward()
    buffers = [op for op in tracker.large_ops if "mm" not in op]  # (dW, [V, D], is as large here)
    assert buffers == ["aten.empty.memory_format"], tracker.large_ops
    assert h.grad.abs().max() > 0 and w.grad.abs().max() > 0


def test_onednn_logits_are_the_only_fresh_chunk_buffer(monkeypatch):
    """With oneDNN's fp32 GEMM the chunk logits are its output tensor (it has no ``out=``); every other chunk
    buffer still comes from the workspace on the second call."""
    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", "onednn")
    if cpu_fp32_gemm() != "onednn":
        pytest.skip("this torch build has no oneDNN linear")
    hidden, weight, targets = _inputs()
    free_cpu_workspace()
    linear_logprob_entropy(hidden, weight, targets, chunk_size=CHUNK)
    with AllocationTracker(name_at_least=CHUNK * V) as second:
        linear_logprob_entropy(hidden, weight, targets, chunk_size=CHUNK)
    # one per chunk's logits GEMM, nothing else of chunk size
    assert second.large_ops == ["mkldnn._linear_pointwise.default"] * (N // CHUNK), second.large_ops


class LiveChunkLogits(TorchDispatchMode):
    """The most chunk-sized tensors (>= ``numel`` elements) alive at once, counted at each new one."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.alive, self.most = numel, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() >= self.numel and "mkldnn" in str(func):
            self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(out)]
            self.most = max(self.most, len(self.alive))
        return out


@pytest.mark.parametrize("with_grad_fn", [False, True], ids=["forward+recompute", "one-pass"])
def test_onednn_keeps_one_chunk_of_logits_alive(with_grad_fn, monkeypatch):
    """Each oneDNN GEMM returns a fresh [chunk, V] tensor: the chunk loops must drop the previous one before the
    next GEMM, or the peak holds two chunks."""
    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", "onednn")
    if cpu_fp32_gemm() != "onednn":
        pytest.skip("this torch build has no oneDNN linear")
    hidden, weight, targets = _inputs()
    B, T = N // 8, 8
    h = hidden.view(B, T, D).clone().requires_grad_()
    with LiveChunkLogits(CHUNK * V) as live:
        if with_grad_fn:
            out = grpo_loss(h, weight, targets.view(B, T), torch.ones(B, T, dtype=torch.bool), None,
                            advantage_fn=lambda lp, ent, seqs: ent.detach(), advantage_fn_scope="sequence",
                            chunk_size=CHUNK)
            out.loss.backward()
        else:
            logp, _ = linear_logprob_entropy(h, weight, targets.view(B, T), chunk_size=CHUNK)
            logp.sum().backward()
    assert live.most == 1, live.most


def test_a_head_op_nested_in_advantage_fn_does_not_share_the_buffers():
    """An advantage_fn that runs a head op itself (between the outer chunk's statistics and its gradient pass)
    must not overwrite the outer pass's logits: the gradients equal those of the same loss without it."""
    hidden, weight, targets = _inputs()
    B, T = N // 8, 8
    t = targets.view(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    other = torch.randn(N, D) * 3

    def grads(nested):
        def advantage_fn(logp, entropy, seqs):
            if nested:
                linear_logprob_entropy(other, weight, targets, chunk_size=CHUNK)
            return torch.linspace(-1, 1, B)[seqs.start:seqs.stop, None].expand_as(logp)

        h = hidden.view(B, T, D).clone().requires_grad_()
        out = grpo_loss(h, weight, t, mask, None, advantage_fn=advantage_fn, advantage_fn_scope="sequence",
                        chunk_size=CHUNK)
        out.loss.backward()
        return h.grad

    plain = grads(False)
    assert plain.abs().max() > 0
    assert torch.equal(grads(True), plain)


def test_cap_bounds_what_is_kept(blas_gemms):
    assert CPU_WORKSPACE_MAX_BYTES == 1 << 30
    hidden, weight, targets = _inputs()
    import egrpo.kernels._head as head

    free_cpu_workspace()
    old = head.CPU_WORKSPACE_MAX_BYTES
    try:
        head.CPU_WORKSPACE_MAX_BYTES = CHUNK * V * 4   # room for the logits buffer only
        linear_logprob_entropy(hidden, weight, targets, chunk_size=CHUNK)
        assert free_cpu_workspace() == CHUNK * V * 4
    finally:
        head.CPU_WORKSPACE_MAX_BYTES = old
