"""Fused LM/generation head: hidden -> (log-prob of the sampled token, entropy), no [N, V] logits.

Math (per row, ``z = (x W^T + b) / tau``, ``p = softmax(z)``)::

    lse  = logsumexp(z)            logp = z_y - lse          H = lse - E_p[z]
    dz_j = g_lp (1[j = y] - p_j) - g_H p_j (log p_j + H)       (note z_j - E_p[z] = log p_j + H)
    dx = dz W / tau     dW = dz^T x / tau     db = sum_rows dz / tau

Design (chosen to reach most of the H100's matmul peak without writing a GEMM):

* Rows are processed in chunks of ``chunk_size`` (default: 256 MiB of fp32 logits on CUDA, i.e.
  4096 rows at V = 16384, 640 rows at V = 102400). Per chunk, a cuBLAS GEMM writes the chunk's
  logits in fp32 (fp32-output GEMM from bf16 operands where torch has it), so softmax statistics
  never see bf16-rounded logits. Peak extra memory is O(chunk x V), never O(N x V).
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

The ``"torch"`` backend runs the same chunk loop with PyTorch ops in place of the two Triton
passes; :mod:`egrpo.kernels.reference` holds the eager full-logits reference used by tests.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._common import (
    HAS_TRITON,
    addmm_wide,
    INTERPRETING,
    check_chunk_size,
    check_head_inputs,
    check_temperature,
    gemm_dtype,
    logits_dtype,
    mm_wide,
    resolve_backend,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _head_stats_kernel(
        logits_ptr, stride_logits, bias_ptr, targets_ptr,
        logp_ptr, entropy_ptr, lse_ptr,
        V, inv_tau,
        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_logits
        cols = tl.arange(0, BLOCK_V)
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)  # running max
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)  # sum exp(z - m)
        u = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)  # sum exp(z - m) (z - m)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            valid = offs < V
            z = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            z = tl.where(valid, z * inv_tau, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = tl.where(s > 0, m - m_new, 0.0)  # m may still be -inf on the first block
            scale = tl.exp(shift)
            d = tl.where(valid, z - m_new, 0.0)
            e = tl.where(valid, tl.exp(d), 0.0)
            u = scale * (u + s * shift) + tl.sum(e * d, axis=0)
            s = scale * s + tl.sum(e, axis=0)
            m = m_new
        log_s = tl.log(s)
        lse = m + log_s
        y = tl.load(targets_ptr + row)
        z_y = tl.load(row_ptr + y).to(tl.float32)
        if HAS_BIAS:
            z_y += tl.load(bias_ptr + y).to(tl.float32)
        tl.store(logp_ptr + row, z_y * inv_tau - lse)
        tl.store(entropy_ptr + row, log_s - u / s)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _head_dlogits_kernel(
        logits_ptr, stride_logits, dz_ptr, stride_dz, bias_ptr, targets_ptr,
        lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr,
        V, inv_tau,
        HAS_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_logits
        out_ptr = dz_ptr + row * stride_dz
        cols = tl.arange(0, BLOCK_V)
        lse = tl.load(lse_ptr + row)
        ent = tl.load(entropy_ptr + row)
        y = tl.load(targets_ptr + row)
        g_lp = 0.0
        g_h = 0.0
        if HAS_G_LOGP:
            g_lp = tl.load(g_logp_ptr + row).to(tl.float32)
        if HAS_G_ENTROPY:
            g_h = tl.load(g_entropy_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            valid = offs < V
            z = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            logp = z * inv_tau - lse
            p = tl.exp(logp)
            dz = tl.zeros([BLOCK_V], tl.float32)
            if HAS_G_LOGP:
                dz = tl.where(offs == y, g_lp, 0.0) - g_lp * p
            if HAS_G_ENTROPY:
                dz -= g_h * p * (logp + ent)
            tl.store(out_ptr + offs, (dz * inv_tau).to(out_ptr.dtype.element_ty), mask=valid)


def _block_v(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))


def _num_warps(block_v: int) -> int:
    return 1 if INTERPRETING else (8 if block_v >= 2048 else 4)


# --------------------------------------------------------------------------------------------
# Row passes over one chunk of fp32 logits: Triton and PyTorch versions of the same math.
# --------------------------------------------------------------------------------------------

def _stats_triton(logits, bias, targets, inv_tau, logp, entropy, lse):
    rows, V = logits.shape
    block = _block_v(V)
    _head_stats_kernel[(rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, targets,
        logp, entropy, lse, V, inv_tau,
        HAS_BIAS=bias is not None, BLOCK_V=block, num_warps=_num_warps(block),
    )


def _stats_torch(logits, bias, targets, inv_tau, logp, entropy, lse):
    z = logits if bias is None else logits + bias.to(logits.dtype)
    if inv_tau != 1.0:
        z = z * inv_tau
    row_lse = torch.logsumexp(z, dim=-1)
    log_p = z - row_lse[:, None]
    lse.copy_(row_lse)
    logp.copy_(log_p.gather(1, targets[:, None]).squeeze(1))
    entropy.copy_(-(log_p.exp() * log_p).sum(-1))


def _dlogits_triton(logits, bias, targets, lse, entropy, g_logp, g_entropy, inv_tau, out):
    rows, V = logits.shape
    block = _block_v(V)
    _head_dlogits_kernel[(rows,)](
        logits, logits.stride(0), out, out.stride(0), bias if bias is not None else logits, targets,
        lse, entropy,
        g_logp if g_logp is not None else lse, g_entropy if g_entropy is not None else lse,
        V, inv_tau,
        HAS_BIAS=bias is not None, HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None,
        BLOCK_V=block, num_warps=_num_warps(block),
    )


def _dlogits_torch(logits, bias, targets, lse, entropy, g_logp, g_entropy, inv_tau, out):
    z = logits if bias is None else logits + bias.to(logits.dtype)
    log_p = z * inv_tau - lse[:, None]
    p = log_p.exp()
    dz = torch.zeros_like(log_p)
    if g_logp is not None:
        g = g_logp.to(log_p.dtype)
        dz -= g[:, None] * p
        dz.scatter_add_(1, targets[:, None], g[:, None])
    if g_entropy is not None:
        dz -= g_entropy.to(log_p.dtype)[:, None] * p * (log_p + entropy[:, None])
    if inv_tau != 1.0:
        dz *= inv_tau
    out.copy_(dz)


_ROW_PASSES = {"triton": (_stats_triton, _dlogits_triton), "torch": (_stats_torch, _dlogits_torch)}


# --------------------------------------------------------------------------------------------
# Chunk loops shared by both backends (and by the GRPO loss).
# --------------------------------------------------------------------------------------------

class HeadGrads:
    """fp32 (fp64 for fp64 inputs) gradient accumulators for one pass over the rows."""

    def __init__(self, hidden, weight, bias, need_dx, need_dw, need_db):
        acc = logits_dtype(hidden.dtype)
        self.dx = torch.empty_like(hidden) if need_dx else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_db and bias is not None) else None

    def results(self, weight, bias):
        dw = self.dw.to(weight.dtype) if self.dw is not None else None
        db = self.db.to(bias.dtype) if self.db is not None else None
        return self.dx, dw, db


def _accumulate_chunk_grads(grads, dz, rows, x_chunk, w_gemm):
    if grads.dx is not None:
        if dz.dtype == grads.dx.dtype:
            torch.mm(dz, w_gemm, out=grads.dx[rows])
        else:
            grads.dx[rows] = torch.mm(dz, w_gemm).to(grads.dx.dtype)
    if grads.dw is not None:
        grads.dw = addmm_wide(grads.dw, dz.t(), x_chunk)
    if grads.db is not None:
        grads.db += dz.sum(0, dtype=grads.db.dtype)


def head_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    inv_tau: float,
    chunk_size: int,
    backend: str,
    grad_fn: Optional[Callable] = None,
    grads: Optional[HeadGrads] = None,
):
    """One streaming pass over ``hidden [N, D]`` in row chunks.

    Returns ``(logp, entropy, lse)``, each ``[N]`` fp32 (fp64 for fp64 inputs). If ``grad_fn``
    is given, it is called per chunk as ``grad_fn(rows: slice, logp_chunk, entropy_chunk)`` and
    returns the upstream ``(g_logp, g_entropy)`` for those rows (either may be ``None``); the
    gradients are then formed from the logits already in hand (no recompute) into ``grads``.
    """
    stats_pass, dlogits_pass = _ROW_PASSES[backend]
    n_rows, V = hidden.shape[0], weight.shape[0]
    ldt = logits_dtype(hidden.dtype)
    gdt = gemm_dtype(hidden.dtype, hidden.device)
    w_gemm = weight.to(gdt)
    logp = torch.empty(n_rows, dtype=ldt, device=hidden.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, min(n_rows, start + chunk_size))
        x_chunk = hidden[rows].to(gdt)
        logits = mm_wide(x_chunk, w_gemm.t(), ldt)
        stats_pass(logits, bias, targets[rows], inv_tau, logp[rows], entropy[rows], lse[rows])
        if grad_fn is not None:
            g_logp, g_entropy = grad_fn(rows, logp[rows], entropy[rows])
            dz = logits if gdt == ldt else torch.empty(logits.shape, dtype=gdt, device=logits.device)
            dlogits_pass(logits, bias, targets[rows], lse[rows], entropy[rows], g_logp, g_entropy, inv_tau, dz)
            _accumulate_chunk_grads(grads, dz, rows, x_chunk, w_gemm)
    return logp, entropy, lse


def head_backward(
    hidden, weight, targets, bias, lse, entropy, g_logp, g_entropy, inv_tau, chunk_size, backend, grads
):
    """Recompute each chunk's logits and accumulate the gradients of ``g_logp . logp + g_entropy . H``."""
    _, dlogits_pass = _ROW_PASSES[backend]
    n_rows = hidden.shape[0]
    ldt = logits_dtype(hidden.dtype)
    gdt = gemm_dtype(hidden.dtype, hidden.device)
    w_gemm = weight.to(gdt)
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, min(n_rows, start + chunk_size))
        x_chunk = hidden[rows].to(gdt)
        logits = mm_wide(x_chunk, w_gemm.t(), ldt)
        dz = logits if gdt == ldt else torch.empty(logits.shape, dtype=gdt, device=logits.device)
        dlogits_pass(
            logits, bias, targets[rows], lse[rows], entropy[rows],
            None if g_logp is None else g_logp[rows], None if g_entropy is None else g_entropy[rows],
            inv_tau, dz,
        )
        _accumulate_chunk_grads(grads, dz, rows, x_chunk, w_gemm)
    return grads


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
        chunk_size: rows per chunk (default: 256 MiB of fp32 logits on CUDA, 32 MiB on CPU).

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
    chunk = check_chunk_size(chunk_size, hidden2.shape[0], weight.shape[0], hidden.device)
    logp, entropy = LinearLogprobEntropyFunction.apply(
        hidden2, weight, targets1, bias, inv_tau, chunk, backend
    )
    return logp.reshape(lead), entropy.reshape(lead)
