"""Fused LM/generation head: hidden -> (log-prob of the sampled token, entropy), no [N, V] logits.

Math (per row, ``z = (x W^T + b) / tau``, ``p = softmax(z)``)::

    lse  = logsumexp(z)            logp = z_y - lse          H = lse - E_p[z]
    dz_j = g_lp (1[j = y] - p_j) - g_H p_j (log p_j + H)       (note z_j - E_p[z] = log p_j + H)
    dx = dz W / tau     dW = dz^T x / tau     db = sum_rows dz / tau

Design (chosen to reach most of the H100's matmul peak without writing a GEMM):

* Rows are processed in chunks of ``chunk_size`` (default on CUDA: 256 MiB of logits at the bytes each
  logit takes, at least 4096 rows: 4096 rows of fp32 logits at V = 16384 and at V = 102400). Per
  chunk, a cuBLAS GEMM writes the chunk's logits: by default in fp32 (fp32-output GEMM from bf16 operands
  where torch has it), so softmax statistics never see rounded logits; with ``EGRPO_HALF_LOGITS=1``
  (opt-in, see :func:`egrpo.kernels._common.half_logits`) on CUDA with bf16/fp16 operands in the operands'
  dtype, rounded once as eager bf16 code rounds them, and the row passes form dz over them in place. (On a
  CPU with bf16 GEMMs the torch backend rounds them once too, as eager bf16 code does.) Softmax statistics
  are fp32 either way. Peak extra memory is O(chunk x V), never O(N x V).
* One Triton program per row streams the chunk's logits once in blocks of ``BLOCK_V`` columns with
  an online max / sum-exp / sum-exp*(z - m) recurrence (running max starts at -inf, ragged tail
  columns masked out) and writes logp, H and lse. Temperature and bias are applied in the kernel.
* Backward recomputes each chunk's logits (one more GEMM), a second Triton pass turns them into
  dz (scaled by 1/tau, in place when the dtypes allow, else into a half-precision buffer that feeds
  the tensor cores), then cuBLAS GEMMs form dx (one GEMM per row block, fp32 accumulation inside
  cuBLAS) and dW (fp32 accumulator across chunks). db is an fp32 column sum of dz. Gradients the
  caller does not need (e.g. a frozen head's dW) are skipped, saving their GEMM.
* The grid is one-dimensional over the rows of a chunk (never more than ``chunk_size`` programs),
  so N in the millions never reaches a CUDA grid-dimension limit; offsets are 64-bit.

Cost: forward 2NDV, backward 6NDV (recompute + dx + dW): 8NDV in all, against 6NDV of useful
work. With cuBLAS near 85-90% of peak and the two memory-bound row passes costing ~10-15% of the
GEMM time at V = 16384, the expected fraction of the bf16 matmul peak (counting 6NDV as useful) is
about 6/8 x ~0.85 = ~0.6-0.65 on the image-head case. Callers that know the upstream gradient at
forward time (the GRPO loss in ``egrpo.kernels.grpo_loss``) use :func:`head_pass` with ``grad_fn``
and skip the recompute: 6NDV, ~0.8 of peak.

The chunk loop, the row passes and the buffers live in :mod:`egrpo.kernels._head` (shared with
the GRPO loss); the ``"torch"`` backend runs the same loop with in-place PyTorch row passes.
:mod:`egrpo.kernels.reference` holds the eager full-logits reference used by tests. See
``docs/kernels.md`` for the cost model of every path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import check_chunk_size, check_head_inputs, check_temperature, chunk_logit_bytes, resolve_backend
from ._head import HAS_TRITON, HeadGrads, head_backward, head_pass

if HAS_TRITON:  # the row kernels live with the chunk engine; re-exported for compile checks
    from ._head import _head_dlogits_kernel, _head_stats_kernel  # noqa: F401

__all__ = ["linear_logprob_entropy", "LinearLogprobEntropyFunction", "HeadGrads", "head_pass", "head_backward"]


class LinearLogprobEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, inv_tau, chunk_size, backend):
        with torch.no_grad():
            logp, entropy, lse = head_pass(hidden, weight, targets, bias, inv_tau, chunk_size, backend)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
        ctx.inv_tau, ctx.chunk_size, ctx.backend = inv_tau, chunk_size, backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
        need_dx, need_dw, _, need_db = ctx.needs_input_grad[:4]
        if (g_logp is None and g_entropy is None) or not (need_dx or need_dw or need_db):
            return None, None, None, None, None, None, None
        grads = HeadGrads(hidden, weight, bias, need_dx, need_dw, need_db)
        with torch.no_grad():
            head_backward(
                hidden, weight, targets, bias, lse, entropy,
                None if g_logp is None else g_logp.contiguous(),
                None if g_entropy is None else g_entropy.contiguous(),
                ctx.inv_tau, ctx.chunk_size, ctx.backend, grads,
            )
        dx, dw, db = grads.results(weight, bias)
        return dx, dw, None, db, None, None, None


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy (nats) of ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, D]`` or ``[B, T, D]``, float32 / bfloat16 / float16 (float64 on the torch backend).
        weight: ``[V, D]``, same dtype and device as ``hidden``.
        targets: integer token ids in ``[0, V)``, shape ``hidden.shape[:-1]``.
        bias: optional ``[V]``, same dtype as ``hidden``.
        temperature: positive float; logits are divided by it.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
        chunk_size: rows per chunk (default: 256 MiB of logits, 2 bytes each with half logits, 4 with fp32 ones,
            and at least 4096 rows on CUDA; 64 MiB and at least 512 rows on CPU).

    Returns:
        ``(logp, entropy)``, each of shape ``hidden.shape[:-1]``, float32 (float64 for float64 input).
        Both are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Memory: O(chunk_size x V + N x D + V x D); no [N, V] tensor is ever allocated.
    """
    check_head_inputs(hidden, weight, targets, bias)
    inv_tau = 1.0 / check_temperature(temperature)
    backend = resolve_backend(backend, hidden.device)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden: float64 is supported by backend='torch' only")
    lead = hidden.shape[:-1]
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    targets1 = targets.reshape(-1).to(torch.int64).contiguous()
    chunk = check_chunk_size(chunk_size, hidden2.shape[0], weight.shape[0], hidden.device,
                             chunk_logit_bytes(hidden.dtype, hidden.device, backend))
    logp, entropy = LinearLogprobEntropyFunction.apply(
        hidden2, weight, targets1, bias, inv_tau, chunk, backend
    )
    return logp.reshape(lead), entropy.reshape(lead)
