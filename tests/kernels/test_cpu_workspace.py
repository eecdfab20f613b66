"""The CPU chunk workspace: buffers kept between calls, fresh ones for a nested call, released on request."""

import torch

from egrpo.kernels import free_cpu_workspace, grpo_loss, linear_logprob_entropy
from egrpo.kernels._head import CPU_WORKSPACE_MAX_BYTES
from egrpo.kernels.reference import linear_logprob_entropy_reference
from tests.kernels._utils import AllocationTracker, max_abs_err

N, D, V, CHUNK = 64, 16, 4000, 16


def _inputs():
    torch.manual_seed(0)
    return torch.randn(N, D), torch.randn(V, D) / D**0.5, torch.randint(0, V, (N,))


def test_second_call_allocates_no_chunk_buffer_and_free_releases_them():
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


def test_cap_bounds_what_is_kept():
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
