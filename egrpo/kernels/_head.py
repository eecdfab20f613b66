"""The chunk engine shared by the head-based losses: one streaming pass over row chunks.

Every head op (:mod:`.linear_logprob_entropy`, :mod:`.grpo_loss`) is this loop with a different
upstream gradient. Per chunk of rows of ``hidden [N, D]``:

1. one GEMM writes the chunk's logits ``[rows, V]`` into a buffer reused by every chunk: on CUDA with
   bf16/fp16 operands fp32 output by default, or, with the Triton row passes and ``EGRPO_HALF_LOGITS=1``
   (opt-in), half logits read as they are; on a CPU with bf16 units a bf16 GEMM, as eager bf16 code
   runs it, whose logits are widened to fp32 (see :class:`_Operands`);
2. a row pass (Triton kernel, or in-place PyTorch ops) reduces them to ``logp``, ``entropy``, ``lse``;
3. if the caller already knows the upstream gradient of these rows (``grad_fn``), a second row pass
   turns the same logits into ``dz`` in place and the dx / dW / db GEMMs consume it: no recompute.

The losses only parameterise ``grad_fn`` (and which gradients they need); :func:`head_backward` is
the recompute pass for callers whose gradient is known only after every row has been seen.

Buffers per chunk: with half logits, those logits alone (dz formed over them in place): 2 bytes per logit.
Otherwise the fp32 logits (formed into dz in place) and a half-precision copy for the GEMMs when the operands
are bf16/fp16: 1.5 fp32 ``[chunk, V]`` buffers, plus [chunk, 1024] block temporaries in the PyTorch row passes.
No ``[N, V]`` tensor is ever allocated.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, NamedTuple, Optional

import torch

from ._common import (
    HAS_TRITON, INTERPRETING, addmm_wide, env_switch, gemm_dtype, half_logits, logits_dtype, mm_wide, onednn_mm,
    uses_onednn,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scaled_block(row_ptr, bias_ptr, offs, V, inv_tau, HAS_BIAS: tl.constexpr):
        """One block of a row's logits, bias added, times 1/tau (fp32), and which columns are real."""
        valid = offs < V
        z = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        return z * inv_tau, valid

    @triton.jit
    def _target_logit(row_ptr, bias_ptr, y, inv_tau, HAS_BIAS: tl.constexpr):
        z_y = tl.load(row_ptr + y).to(tl.float32)
        if HAS_BIAS:
            z_y += tl.load(bias_ptr + y).to(tl.float32)
        return z_y * inv_tau

    @triton.jit
    def _row_moments(row_ptr, bias_ptr, V, inv_tau, HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
        """Online over column blocks: the row max m, s = sum exp(z - m) and u = sum exp(z - m) (z - m)."""
        cols = tl.arange(0, BLOCK_V)
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        u = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        for start in range(0, V, BLOCK_V):
            z, valid = _scaled_block(row_ptr, bias_ptr, start + cols, V, inv_tau, HAS_BIAS)
            z = tl.where(valid, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = tl.where(s > 0, m - m_new, 0.0)  # m may still be -inf on the first block
            scale = tl.exp(shift)
            d = tl.where(valid, z - m_new, 0.0)
            e = tl.where(valid, tl.exp(d), 0.0)
            u = scale * (u + s * shift) + tl.sum(e * d, axis=0)
            s = scale * s + tl.sum(e, axis=0)
            m = m_new
        return m, s, u

    @triton.jit
    def _store_dz(row_ptr, out_ptr, bias_ptr, V, inv_tau, lse, ent, y, g_lp, g_h,
                  HAS_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr,
                  BLOCK_V: tl.constexpr):
        """dz = [g_lp (onehot - p) - g_h p (log p + H)] / tau over the row, block by block."""
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z, valid = _scaled_block(row_ptr, bias_ptr, offs, V, inv_tau, HAS_BIAS)
            logp = z - lse
            p = tl.exp(logp)
            dz = tl.zeros([BLOCK_V], tl.float32)
            if HAS_G_LOGP:
                dz = tl.where(offs == y, g_lp, 0.0) - g_lp * p
            if HAS_G_ENTROPY:
                dz -= g_h * p * (logp + ent)
            tl.store(out_ptr + offs, (dz * inv_tau).to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _head_stats_kernel(
        logits_ptr, stride_logits, bias_ptr, targets_ptr,
        logp_ptr, entropy_ptr, lse_ptr,
        V, inv_tau,
        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_logits
        m, s, u = _row_moments(row_ptr, bias_ptr, V, inv_tau, HAS_BIAS, BLOCK_V)
        log_s = tl.log(s)
        lse = m + log_s
        y = tl.load(targets_ptr + row)
        tl.store(logp_ptr + row, _target_logit(row_ptr, bias_ptr, y, inv_tau, HAS_BIAS) - lse)
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
        g_lp = 0.0
        g_h = 0.0
        if HAS_G_LOGP:
            g_lp = tl.load(g_logp_ptr + row).to(tl.float32)
        if HAS_G_ENTROPY:
            g_h = tl.load(g_entropy_ptr + row).to(tl.float32)
        _store_dz(logits_ptr + row * stride_logits, dz_ptr + row * stride_dz, bias_ptr, V, inv_tau,
                  tl.load(lse_ptr + row), tl.load(entropy_ptr + row), tl.load(targets_ptr + row), g_lp, g_h,
                  HAS_BIAS, HAS_G_LOGP, HAS_G_ENTROPY, BLOCK_V)

    @triton.jit
    def _head_stats_direction_kernel(
        logits_ptr, stride_logits, dz_ptr, stride_dz, bias_ptr, targets_ptr,
        logp_ptr, entropy_ptr, lse_ptr,
        n_rows, V, inv_tau,
        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
    ):
        """The statistics and the g-free gradient direction (onehot - p) / tau of each row, in one program per
        row: the row's logits come from HBM once. ONE_BLOCK (BLOCK_V >= V): the row is held whole and read once;
        otherwise the direction loop re-reads it right after the statistics loop, while it is still in L2 (the
        grid is persistent, a few programs per SM, so the rows in flight stay well below the L2 size)."""
        for i in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            row = tl.cast(i, tl.int64)  # (a new name: the loop index keeps its type)
            row_ptr = logits_ptr + row * stride_logits
            out_ptr = dz_ptr + row * stride_dz
            y = tl.load(targets_ptr + row)
            # read before the direction is stored: dz may overwrite the logits in place (fp32 operands)
            z_y = _target_logit(row_ptr, bias_ptr, y, inv_tau, HAS_BIAS)
            if ONE_BLOCK:
                cols = tl.arange(0, BLOCK_V)
                z, valid = _scaled_block(row_ptr, bias_ptr, cols, V, inv_tau, HAS_BIAS)
                z = tl.where(valid, z, float("-inf"))
                m = tl.max(z, axis=0)
                d = tl.where(valid, z - m, 0.0)
                e = tl.where(valid, tl.exp(d), 0.0)
                s = tl.sum(e, axis=0)
                u = tl.sum(e * d, axis=0)
                lse = m + tl.log(s)
                dz = tl.where(cols == y, 1.0, 0.0) - e / s
                tl.store(out_ptr + cols, (dz * inv_tau).to(out_ptr.dtype.element_ty), mask=valid)
            else:
                m, s, u = _row_moments(row_ptr, bias_ptr, V, inv_tau, HAS_BIAS, BLOCK_V)
                lse = m + tl.log(s)
                _store_dz(row_ptr, out_ptr, bias_ptr, V, inv_tau, lse, 0.0, y, 1.0, 0.0,
                          HAS_BIAS, True, False, BLOCK_V)
            tl.store(logp_ptr + row, z_y - lse)
            tl.store(entropy_ptr + row, tl.log(s) - u / s)
            tl.store(lse_ptr + row, lse)



def block_v(V: int) -> int:
    """Columns per Triton block (also what the GPU compile check must use)."""
    return min(4096, triton.next_power_of_2(V))


def num_warps(block: int, interpreting: bool = INTERPRETING) -> int:
    """Warps per row program (1 under the interpreter, where warps only cost time)."""
    return 1 if interpreting else (8 if block >= 2048 else 4)


# The fused statistics + direction pass (EGRPO_FUSED_ROW_PASS=1, :func:`fused_row_pass`). Our choices, not yet
# measured on a GPU (bench/gpu_quick.py has the paired "+fusedrows" rows): a row of at most this many columns (the
# image vocabulary: 64 KiB of fp32 logits, 16 warps of 32 values per thread) is held whole and read once; wider rows
# are read by the statistics loop and again by the direction loop. The grid is persistent, a few programs per SM:
# streamed twice, a 64 KiB row (the "+fusedrows-loop" row: 4 x 132 SMs x 64 KiB = 33 MiB in flight on an H100/H200)
# is still in the 50 MiB L2 for its second read; a text row (400 KiB, ~211 MiB in flight) is not, so the text head
# is expected to gain nothing from it (the same 14 bytes per logit as the two-kernel path).
DIRECTION_ONE_BLOCK_MAX_V = 16384
DIRECTION_PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another: a few programs still walk the strided row loop, as every CUDA
# launch does (a chunk's rows always outnumber the programs there).
DIRECTION_PROGRAMS_INTERPRETED = 3


def direction_launch(V: int, interpreting: bool = INTERPRETING):
    """``(BLOCK_V, ONE_BLOCK, num_warps)`` of the fused statistics + direction kernel for ``V`` columns (also what
    the GPU compile check must use)."""
    if V <= DIRECTION_ONE_BLOCK_MAX_V:
        block = triton.next_power_of_2(V)
        return block, True, max(num_warps(block, interpreting), 1 if interpreting else block // 1024)
    block = block_v(V)
    return block, False, num_warps(block, interpreting)


_SM_COUNTS = {}


def direction_programs(rows: int, device: torch.device) -> int:
    """Programs of the persistent fused row pass over ``rows`` rows on ``device``."""
    if device.type != "cuda":
        return max(1, min(rows, DIRECTION_PROGRAMS_INTERPRETED))
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(rows, _SM_COUNTS[index] * DIRECTION_PROGRAMS_PER_SM))


def fused_row_pass() -> bool:
    """Whether the Triton row passes form a chunk's statistics and its g-free gradient direction in one kernel
    (``EGRPO_FUSED_ROW_PASS=1``; off by default: not yet measured on a GPU).

    Where the entropy carries no gradient (every GRPO / EG-GRPO / STAGE loss without ``entropy_coef``), a row's dz
    is ``g_row (onehot - p_row) / tau``: the bracket needs only the row's own statistics, not g. One kernel then
    writes logp, entropy, lse and the bracket, reading the row's logits from HBM once instead of twice (the
    statistics kernel and, after the caller's g, the dz kernel); g is applied on the [rows, D] side: dx rows are
    scaled after their GEMM (fp32 output), dW takes g on x's rows. 4 fewer bytes of traffic per fp32 logit (14 -> 10).
    Not used where db is needed (it would be a [rows, V] pass with g inside)."""
    return env_switch("EGRPO_FUSED_ROW_PASS")


# --------------------------------------------------------------------------------------------
# Row passes over one chunk. ``z`` is the fp32 (fp64) logits buffer of the chunk. The Triton passes
# leave it untouched (they apply bias and 1/tau themselves); the PyTorch passes turn it into the row
# log-softmax in place (and then into dz), with [rows, 1024] block temporaries: one live [rows, V]
# buffer, also while the entropy carries gradient. ``prepare`` brings a recomputed chunk into
# the state the backend's dlogits pass expects. ``bufs`` (:class:`_ChunkBuffers`) lends temporaries.
# --------------------------------------------------------------------------------------------

def _stats_triton(z, bufs, bias, targets, inv_tau, logp, entropy, lse):
    rows, V = z.shape
    block = block_v(V)
    _head_stats_kernel[(rows,)](
        z, z.stride(0), bias if bias is not None else z, targets,
        logp, entropy, lse, V, inv_tau,
        HAS_BIAS=bias is not None, BLOCK_V=block, num_warps=num_warps(block),
    )


def _dlogits_triton(z, bufs, bias, targets, lse, entropy, g_logp, g_entropy, inv_tau, out):
    rows, V = z.shape
    block = block_v(V)
    _head_dlogits_kernel[(rows,)](
        z, z.stride(0), out, out.stride(0), bias if bias is not None else z, targets,
        lse, entropy,
        g_logp if g_logp is not None else lse, g_entropy if g_entropy is not None else lse,
        V, inv_tau,
        HAS_BIAS=bias is not None, HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None,
        BLOCK_V=block, num_warps=num_warps(block),
    )


def _stats_direction_triton(z, bias, targets, inv_tau, logp, entropy, lse, out):
    rows, V = z.shape
    block, one_block, warps = direction_launch(V)
    _head_stats_direction_kernel[(direction_programs(rows, z.device),)](
        z, z.stride(0), out, out.stride(0), bias if bias is not None else z, targets,
        logp, entropy, lse, rows, V, inv_tau,
        HAS_BIAS=bias is not None, BLOCK_V=block, ONE_BLOCK=one_block, num_warps=warps,
    )


def _prepare_triton(z, bufs, bias, inv_tau, lse):
    return None


_BLOCK = 1024  # columns per block of the torch stats pass


def _stats_torch(z, bufs, bias, targets, inv_tau, logp, entropy, lse):
    if bias is not None:
        z.add_(bias)
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    m = z.amax(dim=1)
    z.sub_(m[:, None])
    # over column blocks: e = exp(z - m) into a [rows, 1024] temporary, s = sum e and u = sum e (z - m), the
    # block partial sums added in float64 (one long fp32 sum over V = 16k-100k columns loses ~10x the accuracy
    # of eager's pairwise sum); H = log s - u / s
    # (two [rows, 1024] temporaries from the workspace: per-block temporaries would be fresh allocations of
    # several MiB each, page-faulted on every block)
    rows, cols = z.shape[0], min(_BLOCK, z.shape[1])
    e, prod = bufs.scratch("block", rows, cols), bufs.scratch("block_product", rows, cols)
    s = torch.zeros(rows, dtype=torch.float64, device=z.device)
    u = torch.zeros_like(s)
    for start in range(0, z.shape[1], _BLOCK):
        zb = z[:, start:start + _BLOCK]
        eb, pb = e[:, :zb.shape[1]], prod[:, :zb.shape[1]]
        torch.exp(zb, out=eb)
        s += eb.sum(dim=1)
        torch.mul(eb, zb, out=pb)
        u += pb.sum(dim=1)
    log_s = s.log()
    entropy.copy_(log_s - u / s)
    log_s = log_s.to(z.dtype)
    z.sub_(log_s[:, None])  # z = log p, what the dlogits pass starts from
    lse.copy_(m + log_s)
    logp.copy_(z.gather(1, targets[:, None]).squeeze(1))


def _prepare_torch(z, bufs, bias, inv_tau, lse):
    if bias is not None:
        z.add_(bias)
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    z.sub_(lse[:, None])


def _dlogits_torch(z, bufs, bias, targets, lse, entropy, g_logp, g_entropy, inv_tau, out):
    # z holds log p (left there by _stats_torch or _prepare_torch);
    # dz = g_lp (onehot - p) - g_H p (log p + H), formed in place in z
    if g_entropy is None:
        z.exp_().mul_((-g_logp.to(z.dtype))[:, None])
    else:
        # the entropy term needs p and log p at once: p goes through a [rows, 1024] block temporary, column block
        # by column block, rather than a second [rows, V] buffer
        rows, cols = z.shape[0], min(_BLOCK, z.shape[1])
        p = bufs.scratch("block", rows, cols)
        g_h = g_entropy.to(z.dtype)[:, None]
        g_lp = None if g_logp is None else g_logp.to(z.dtype)[:, None]
        h = entropy.to(z.dtype)[:, None]
        for start in range(0, z.shape[1], _BLOCK):
            zb = z[:, start:start + _BLOCK]
            pb = p[:, :zb.shape[1]]
            torch.exp(zb, out=pb)
            zb.add_(h).mul_(g_h)
            if g_lp is not None:
                zb.add_(g_lp)
            zb.mul_(pb).neg_()
    if g_logp is not None:
        z.scatter_add_(1, targets[:, None], g_logp.to(z.dtype)[:, None])
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    if out is not z:
        out.copy_(z)


class RowPasses(NamedTuple):
    stats: Callable
    dlogits: Callable
    prepare: Callable
    stats_direction: Optional[Callable]  # statistics + g-free dz in one pass (see fused_row_pass); None: not offered


ROW_PASSES = {
    "triton": RowPasses(_stats_triton, _dlogits_triton, _prepare_triton, _stats_direction_triton),
    # (the torch passes already form dz from the log-probabilities they leave in the buffer: no second read to save)
    "torch": RowPasses(_stats_torch, _dlogits_torch, _prepare_torch, None),
}


# --------------------------------------------------------------------------------------------
# Gradient accumulators and chunk buffers
# --------------------------------------------------------------------------------------------

# dW's per-block temporary on the oneDNN fp32 path (our choice): below glibc's 32 MiB mmap threshold, so the
# allocator hands the same block back instead of page-faulting a fresh one for every block.
ONEDNN_DW_BLOCK_BYTES = 16 * 2**20


class HeadGrads:
    """Gradient accumulators of one pass: dx in ``dx_dtype`` (default the input dtype), dW and db
    in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, hidden, weight, bias, need_dx, need_dw, need_db, dx_dtype=None):
        acc = logits_dtype(hidden.dtype)
        self.n_rows = hidden.shape[0]
        self.dx = torch.empty(hidden.shape, dtype=dx_dtype or hidden.dtype, device=hidden.device) if need_dx else None
        # dW is created by the first chunk's GEMM (no zero fill, no add); see accumulate()
        self.need_dw, self.dw, self._acc_dtype = bool(need_dw), None, acc
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_db and bias is not None) else None
        self._dw_part = None  # reusable [V, D] buffer for a CPU half-precision dW GEMM's output
        self._dw_t = None  # the oneDNN fp32 path accumulates dW^T [D, V] (see _accumulate_dw_onednn)

    def accumulate(self, dz, rows, x_chunk, w_gemm, ws=None, onednn=False, row_scale=None):
        """Add the chunk's gradients from its ``dz``; ``onednn``: the pass's fp32 CPU GEMMs run through oneDNN.

        ``row_scale [rows]``: the chunk's gradient of the logits is ``row_scale[:, None] * dz`` (``dz`` a g-free
        direction, :func:`fused_row_pass`): dx rows are scaled after their GEMM (fp32 output, rounded once), dW
        takes the scale on x's rows; db is not formed this way (a [rows, V] pass with the scale inside)."""
        if row_scale is not None:
            if self.db is not None:
                raise RuntimeError("HeadGrads.accumulate: row_scale cannot form db; use the dz pass with g inside")
            scale = row_scale.to(self._acc_dtype)[:, None]
            if self.dx is not None:
                wide = onednn_mm(dz, w_gemm) if onednn else mm_wide(dz, w_gemm, self._acc_dtype)
                self.dx[rows] = wide.mul_(scale)
            if self.need_dw:
                self._accumulate_dw(dz, rows, (x_chunk.to(self._acc_dtype) * scale).to(x_chunk.dtype), ws, onednn)
            return
        if self.dx is not None:
            if onednn:
                self.dx[rows] = onednn_mm(dz, w_gemm)
            elif dz.dtype == self.dx.dtype:
                torch.mm(dz, w_gemm, out=self.dx[rows])
            else:
                self.dx[rows] = mm_wide(dz, w_gemm, logits_dtype(dz.dtype)).to(self.dx.dtype)
        if self.need_dw:
            self._accumulate_dw(dz, rows, x_chunk, ws, onednn)
        if self.db is not None:
            self.db += dz.sum(0, dtype=self.db.dtype)

    def _accumulate_dw(self, dz, rows, x_chunk, ws, onednn):
        if onednn:
            self._accumulate_dw_onednn(dz, x_chunk)
        elif self.dw is None:
            if rows.start == 0 and rows.stop >= self.n_rows:
                # one chunk: a single GEMM with fp32 accumulation inside it, rounded once, exactly as the
                # final cast of an fp32 accumulator would be
                self.dw = torch.mm(dz.t(), x_chunk)
            else:
                self.dw = mm_wide(dz.t(), x_chunk, self._acc_dtype)
        elif dz.dtype != self.dw.dtype and not dz.is_cuda:
            # CPU half GEMM: write into one reused [V, D] buffer, add it (widening) to the accumulator
            if self._dw_part is None:
                self._dw_part = _buffer(ws, "dw_part", self.dw.shape, dz.dtype, dz.device)
            torch.mm(dz.t(), x_chunk, out=self._dw_part)
            self.dw.add_(self._dw_part)
        else:
            self.dw = addmm_wide(self.dw, dz.t(), x_chunk)

    def _accumulate_dw_onednn(self, dz, x_chunk):
        # dW^T = x^T dz, kept as [D, V] until results(): oneDNN reads dz^T as a strided weight where it is, while
        # dW = dz^T x would first copy dz^T (one more [chunk, V] buffer at the peak)
        x_t = x_chunk.t().contiguous()
        if self._dw_t is None:
            self._dw_t = onednn_mm(x_t, dz)
            return
        # oneDNN's GEMM cannot accumulate in place: each block of vocabulary columns goes through a temporary of
        # at most ONEDNN_DW_BLOCK_BYTES (recycled by the allocator, unlike a whole new [D, V]) added into dW^T
        block = max(1, ONEDNN_DW_BLOCK_BYTES // (4 * self._dw_t.shape[0]))
        for start in range(0, self._dw_t.shape[1], block):
            cols = slice(start, start + block)
            self._dw_t[:, cols] += onednn_mm(x_t, dz[:, cols])

    @property
    def any(self):
        return self.dx is not None or self.need_dw or self.db is not None

    def results(self, weight, bias):
        if self._dw_t is not None:
            self.dw, self._dw_t = self._dw_t.t().contiguous(), None
        if self.need_dw and self.dw is None:  # no rows at all
            self.dw = torch.zeros(weight.shape, dtype=self._acc_dtype, device=weight.device)
        dw = self.dw.to(weight.dtype) if self.dw is not None else None
        db = self.db.to(bias.dtype) if self.db is not None else None
        return self.dx, dw, db


# --------------------------------------------------------------------------------------------
# The CPU workspace. glibc hands blocks above 32 MiB back to the OS when they are freed, so a fresh
# [chunk, V] buffer page-faults on first touch every call: ~33 ms per 64 MiB on the development CPU,
# about a third of a 1024 x 1024 x 16384 bf16 loss step. On CPU the chunk buffers therefore stay
# allocated between calls (per thread), as CUDA's caching allocator keeps its blocks; at most
# CPU_WORKSPACE_MAX_BYTES are kept (beyond that a call allocates afresh) and
# free_cpu_workspace() gives the memory back. A call nested inside another's pass (an advantage_fn
# that itself runs a head op) gets fresh buffers.
# --------------------------------------------------------------------------------------------

CPU_WORKSPACE_MAX_BYTES = 1 << 30


class _Workspace(threading.local):
    def __init__(self):
        self.buffers = {}   # (name, dtype) -> flat tensor, grown to the largest request
        self.busy = False


_WORKSPACE = _Workspace()


def free_cpu_workspace() -> int:
    """Release the chunk buffers kept between calls on CPU (this thread's); returns the bytes freed."""
    freed = sum(b.numel() * b.element_size() for b in _WORKSPACE.buffers.values())
    _WORKSPACE.buffers.clear()
    return freed


@contextlib.contextmanager
def _workspace(device):
    """The workspace for one pass on ``device`` (``None``: allocate afresh, on CUDA or when nested)."""
    ws = _WORKSPACE
    if device.type != "cpu" or ws.busy:
        yield None
        return
    ws.busy = True
    try:
        yield ws
    finally:
        ws.busy = False


def _buffer(ws, name, shape, dtype, device):
    numel = shape[0] * shape[1]
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, dtype)
    buf = ws.buffers.get(key)
    if buf is None or buf.numel() < numel:
        kept = sum(b.numel() * b.element_size() for k, b in ws.buffers.items() if k != key)
        if kept + numel * dtype.itemsize > CPU_WORKSPACE_MAX_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        ws.buffers.pop(key, None)  # free the smaller one first
        buf = ws.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


class _ChunkBuffers:
    """[chunk, V] buffers allocated once per pass and reused by every chunk (and, on CPU, kept between
    calls: see the workspace above)."""

    def __init__(self, chunk, V, ldt, gdt, device, need_half, ws=None, per_chunk_logits=False, onednn=False,
                 half_logits=False):
        cpu_half = gdt != ldt and device.type != "cuda"
        shape = (chunk, V)
        self.ws, self.ldt, self.device = ws, ldt, device
        # half logits (EGRPO_HALF_LOGITS=1, opt-in; Triton row passes only): the GEMM writes half logits,
        # read as they are and turned into dz in place: no fp32 buffer, no half copy
        self.half_logits = half_logits and gdt != ldt
        if self.half_logits:
            self.onednn, self.cpu_half, self.z = False, False, None
            # per-chunk logits (CUDA, or the next chunk's GEMM running ahead): each chunk's own tensor; otherwise
            # one reused CPU buffer
            self.half = None if (device.type == "cuda" or per_chunk_logits) else _buffer(ws, "half", shape, gdt, device)
            return
        # fp32 on CPU through oneDNN: its GEMM writes the logits into a tensor of its own (see _Operands)
        self.onednn = onednn
        # CUDA half operands: the fp32-output GEMM allocates z itself (the caching allocator reuses it); so does
        # every chunk when the next chunk's GEMM runs ahead (two chunks' logits are alive at once)
        per_chunk = per_chunk_logits or self.onednn or (gdt != ldt and device.type == "cuda")
        self.z = None if per_chunk else _buffer(ws, "z", shape, ldt, device)
        # CPU half operands: the GEMM writes its half logits here first (then dz reuses it)
        self.half = _buffer(ws, "half", shape, gdt, device) if (gdt != ldt and (need_half or cpu_half)) else None
        self.cpu_half = cpu_half

    def scratch(self, name, rows, cols):
        """A [rows, cols] temporary in the logits dtype for a row pass (from the workspace on CPU)."""
        return _buffer(self.ws, name, (rows, cols), self.ldt, self.device)

    def logits(self, x, w):
        """The chunk's fp32 (fp64) logits, and the half buffer sized to its rows (or None)."""
        r = x.shape[0]
        if self.half_logits:  # dz is formed in place in the half logits (see __init__)
            z = torch.mm(x, w.t()) if self.half is None else torch.mm(x, w.t(), out=self.half[:r])
            return z, z
        half = None if self.half is None else self.half[:r]
        if self.onednn:
            z = onednn_mm(x, w.t())
        elif self.z is None:
            z = mm_wide(x, w.t(), self.ldt)  # fp32 output where torch has it (CPU: rounded to half, widened)
        elif self.cpu_half:
            # CPU GEMMs cannot write fp32 from bf16 operands: the logits are rounded to bf16 once, exactly as
            # eager bf16 code rounds them, and widened before any softmax statistic
            torch.mm(x, w.t(), out=half)
            z = self.z[:r]
            z.copy_(half)
        else:
            z = self.z[:r]
            torch.mm(x, w.t(), out=z)
        return z, half


class _Operands:
    """The input rows and weight in the dtype every chunk GEMM uses (:func:`gemm_dtype`): bf16 tensor cores
    on CUDA (fp32 output by default, half logits with EGRPO_HALF_LOGITS=1: :func:`half_logits`), bf16 on a CPU
    with bf16 GEMMs (no fp32 copy of the weight), fp32 where half GEMMs would be slow."""

    def __init__(self, hidden, weight, backend):
        self.ldt = logits_dtype(hidden.dtype)
        self.gdt = gemm_dtype(hidden.dtype, hidden.device, backend)
        self.w = weight.to(self.gdt)
        # who runs the fp32 GEMMs on CPU (cpu_fp32_gemm), decided once for the whole pass
        self.onednn = uses_onednn(self.w)

    def x(self, hidden, rows):
        return hidden[rows].to(self.gdt)


def overlap_row_passes() -> bool:
    """Whether the logits GEMM of chunk k+1 is issued before the row passes of chunk k (on CUDA: on a second
    stream, so the memory-bound row passes overlap a compute-bound GEMM). Off unless
    ``EGRPO_OVERLAP_ROW_PASSES=1``: never yet measured on a GPU (``bench/gpu_quick.py`` has the paired row).
    Costs one more chunk of logits. On CPU it only changes the order (a test vehicle)."""
    return env_switch("EGRPO_OVERLAP_ROW_PASSES")


def _chunk_setup(hidden, weight, chunk_size, backend, need_dz_half, ws, lookahead=False):
    n_rows, V = hidden.shape[0], weight.shape[0]
    ops = _Operands(hidden, weight, backend)
    chunk = max(1, min(chunk_size, n_rows))
    passes = ROW_PASSES[backend]
    bufs = _ChunkBuffers(chunk, V, ops.ldt, ops.gdt, hidden.device, need_dz_half, ws, per_chunk_logits=lookahead,
                         onednn=ops.onednn, half_logits=half_logits(hidden.dtype, backend))
    return passes, ops, bufs


_SIDE_STREAMS = {}


def _side_stream(device):
    """One side stream per device for the whole process: cuBLAS keeps a workspace per (handle, stream) that is never
    freed, so a new stream per call would add one per call (up to the 32 streams of torch's pool)."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def _chunks(hidden, ops, bufs, chunk_size, lookahead):
    """``(rows, x, z, half)`` per chunk of ``hidden``'s rows, ``z`` the chunk's logits.

    ``lookahead``: the next chunk's logits GEMM is issued before this chunk is handed out, i.e. before the
    caller queues this chunk's row passes and gradient GEMMs. On CUDA it runs on a side stream that first
    waits for everything already queued on the current stream (so every earlier chunk's work, which frees
    nothing it needs, is ordered before it); the current stream waits for its event before using ``z``, and
    ``z`` is recorded on the current stream so the caching allocator keeps it until that use is done."""
    n_rows = hidden.shape[0]
    starts = list(range(0, n_rows, chunk_size))
    cuda = hidden.device.type == "cuda"
    side = _side_stream(hidden.device) if (lookahead and cuda) else None

    def logits(start):
        rows = slice(start, min(n_rows, start + chunk_size))
        x = ops.x(hidden, rows)
        if side is None:
            return rows, x, *bufs.logits(x, ops.w), None
        current = torch.cuda.current_stream(hidden.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            z, half = bufs.logits(x, ops.w)
            ready = torch.cuda.Event()
            ready.record(side)
        z.record_stream(current)
        return rows, x, z, half, ready

    pending = logits(starts[0]) if (lookahead and starts) else None
    for i, start in enumerate(starts):
        if lookahead:
            chunk, pending = pending, (logits(starts[i + 1]) if i + 1 < len(starts) else None)
        else:
            chunk = logits(start)
        rows, x, z, half, ready = chunk
        if ready is not None:
            torch.cuda.current_stream(hidden.device).wait_event(ready)
        yield rows, x, z, half
        # drop this chunk before the next one's GEMM: where each chunk's logits are a tensor of their own, two
        # chunks would otherwise be alive at once (the callers drop theirs too)
        del chunk, x, z, half, ready


# --------------------------------------------------------------------------------------------
# The two chunk loops
# --------------------------------------------------------------------------------------------

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
    entropy_detached: bool = False,
):
    """One streaming pass over ``hidden [N, D]`` in row chunks of ``chunk_size``.

    Returns ``(logp, entropy, lse)``, each ``[N]`` fp32 (fp64 for fp64 inputs). If ``grad_fn``
    is given, it is called per chunk as ``grad_fn(rows: slice, logp_chunk, entropy_chunk)`` and
    returns the upstream ``(g_logp, g_entropy)`` for those rows (either may be ``None``); the
    gradients are then formed from the logits already in hand (no recompute) into ``grads``.
    A caller that needs whole sequences (or groups) per call passes a ``chunk_size`` that is a
    multiple of their length: chunk boundaries are ``0, chunk_size, 2 chunk_size, ...``.

    ``entropy_detached``: the caller promises that ``grad_fn`` never returns an entropy gradient; with the
    Triton row passes and ``EGRPO_FUSED_ROW_PASS=1`` each chunk's statistics and g-free dz then come from one
    kernel (:func:`fused_row_pass`).
    """
    n_rows = hidden.shape[0]
    with_grads = grad_fn is not None and grads is not None and grads.any
    lookahead = overlap_row_passes()
    with _workspace(hidden.device) as ws:
        passes, ops, bufs = _chunk_setup(hidden, weight, chunk_size, backend, with_grads, ws, lookahead)
        logp = torch.empty(n_rows, dtype=ops.ldt, device=hidden.device)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        direction = (fused_row_pass() and with_grads and entropy_detached and grads.db is None
                     and passes.stats_direction is not None)   # (the switch read first: a bad value is always refused)
        for rows, x, z, half in _chunks(hidden, ops, bufs, chunk_size, lookahead):
            if direction:
                dz = z if half is None else half
                passes.stats_direction(z, bias, targets[rows], inv_tau, logp[rows], entropy[rows], lse[rows], dz)
                g_logp, g_entropy = grad_fn(rows, logp[rows], entropy[rows])
                if g_entropy is not None:
                    raise RuntimeError("head_pass: grad_fn returned an entropy gradient although the caller "
                                       "declared entropy_detached")
                if g_logp is not None:
                    grads.accumulate(dz, rows, x, ops.w, ws, onednn=ops.onednn, row_scale=g_logp)
                del x, z, half, dz
                continue
            passes.stats(z, bufs, bias, targets[rows], inv_tau, logp[rows], entropy[rows], lse[rows])
            if grad_fn is not None:
                g_logp, g_entropy = grad_fn(rows, logp[rows], entropy[rows])
                if with_grads and (g_logp is not None or g_entropy is not None):
                    dz = z if half is None else half
                    passes.dlogits(z, bufs, bias, targets[rows], lse[rows], entropy[rows], g_logp, g_entropy, inv_tau, dz)
                    grads.accumulate(dz, rows, x, ops.w, ws, onednn=ops.onednn)
                    del dz
            del x, z, half  # one chunk's logits alive at a time (see _chunks)
    return logp, entropy, lse


def head_backward(
    hidden, weight, targets, bias, lse, entropy, g_logp, g_entropy, inv_tau, chunk_size, backend, grads
):
    """Recompute each chunk's logits and accumulate the gradients of ``g_logp . logp + g_entropy . H``."""
    lookahead = overlap_row_passes()
    with _workspace(hidden.device) as ws:
        passes, ops, bufs = _chunk_setup(hidden, weight, chunk_size, backend, True, ws, lookahead)
        for rows, x, z, half in _chunks(hidden, ops, bufs, chunk_size, lookahead):
            passes.prepare(z, bufs, bias, inv_tau, lse[rows])
            dz = z if half is None else half
            passes.dlogits(
                z, bufs, bias, targets[rows], lse[rows], entropy[rows],
                None if g_logp is None else g_logp[rows], None if g_entropy is None else g_entropy[rows],
                inv_tau, dz,
            )
            grads.accumulate(dz, rows, x, ops.w, ws, onednn=ops.onednn)
            del x, z, half, dz  # one chunk's logits alive at a time (see _chunks)
    return grads
