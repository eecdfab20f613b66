"""Attention of one new query position per row over the K/V cache (a decode step), as one Triton kernel.

For each row ``r`` and query head ``h`` (K/V head ``h // group``)::

    s_j   = scale * <q[r, h], K[r, h // group, j]>     for the slots j < keys that are valid (mask) and, when
                                                        ``limit`` is given, j < limit
    out   = sum_j softmax(s)_j V[r, h // group, j]

Why a kernel of our own: on CUDA, PyTorch's SDPA with a boolean mask and one query runs the memory-efficient
kernel, which computes query tiles of 64 rows for our 1 and re-reads the mask per head; on an H200 it was a third
of the 7B-shape decode step (bench/README.md, rollout profile). Decoding is bound by reading K and V; this kernel
reads each valid slot's K and V once (masked slots and slots past ``limit`` are not read at all), in fp32
arithmetic, one program per (row, head) and, when rows x heads are too few to fill the GPU, per key split (the
splits are merged by a log-sum-exp in torch).

``limit`` is a device scalar (the number of filled slots), so a CUDA graph captured once serves every step: the
grid and ``keys`` are fixed, only the loop bound read from memory changes.
"""

from __future__ import annotations

from typing import Optional

import torch

from egrpo.kernels._common import HAS_TRITON, tl, triton

# Keys per loop iteration and warps per program (our choice: a [64, head_dim] fp32 tile of K and of V per step
# keeps 4 warps' registers within bounds at head_dim 128).
BLOCK_KEYS = 64
NUM_WARPS = 4
# Fewer programs than this (rows x heads) and the key range is split across programs (our choice: ~4 programs of
# 4 warps per SM of a 132-SM H100/H200).
MIN_PROGRAMS = 512

if HAS_TRITON:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, limit_ptr, out_ptr, m_ptr, l_ptr,
        stride_qr, stride_qh, stride_kr, stride_kh, stride_ks, stride_vr, stride_vh, stride_vs, stride_mr,
        stride_or, stride_oh, stride_os,
        heads, group, keys, split_len, scale,
        HAS_LIMIT: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr, GATED: tl.constexpr,
    ):
        program = tl.program_id(0)
        split = tl.program_id(1)
        row = (program // heads).to(tl.int64)
        head = program % heads
        kv_head = (head // group).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + row * stride_qr + head * stride_qh + dims, mask=dim_ok, other=0.0).to(tl.float32)
        q = q * scale
        end = keys
        if HAS_LIMIT:
            end = tl.minimum(tl.load(limit_ptr).to(tl.int32), keys)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, end)
        k_base = k_ptr + row * stride_kr + kv_head * stride_kh
        v_base = v_ptr + row * stride_vr + kv_head * stride_vh
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        offs = tl.arange(0, BLOCK_S)
        for start in range(lo, hi, BLOCK_S):
            slots = start + offs
            inside = slots < hi
            valid = tl.load(mask_ptr + row * stride_mr + slots, mask=inside, other=0) != 0  # (0 past hi)
            if GATED:  # K and V of valid slots only: masked slots are not read (their loads wait for the mask's)
                tile = valid[:, None] & dim_ok[None, :]
            else:  # K and V of every slot below hi, issued with the mask's load: one memory round trip per block
                tile = inside[:, None] & dim_ok[None, :]
            k = tl.load(k_base + slots[:, None].to(tl.int64) * stride_ks + dims[None, :], mask=tile, other=0.0)
            if not GATED:
                v = tl.load(v_base + slots[:, None].to(tl.int64) * stride_vs + dims[None, :], mask=tile, other=0.0)
                v = tl.where(valid[:, None], v, 0.0)  # a masked slot's V (even NaN) must not reach acc
            scores = tl.sum(k.to(tl.float32) * q[None, :], 1)
            scores = tl.where(valid, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 0))
            # all slots so far masked: m_new is -inf; subtracting 0 instead keeps exp() at 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(scores - m_safe)
            if GATED:
                v = tl.load(v_base + slots[:, None].to(tl.int64) * stride_vs + dims[None, :], mask=tile, other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            l = l * alpha + tl.sum(p, 0)
            m = m_new
        out = out_ptr + row * stride_or + head * stride_oh + split * stride_os + dims
        if SPLIT:  # unnormalised partial result and its statistics; merged in torch
            tl.store(out, acc, mask=dim_ok)
            tl.store(m_ptr + program * tl.num_programs(1) + split, m)
            tl.store(l_ptr + program * tl.num_programs(1) + split, l)
        else:  # l >= 1 once a slot is valid (the maximum's own term is exp(0)); a row with none has acc = 0 and
            # writes 0 (SDPA would write NaN; the engine never asks for one)
            tl.store(out, (acc / tl.maximum(l, 1.0)).to(out_ptr.dtype.element_ty), mask=dim_ok)


def key_splits(programs: int, keys: int, block: int = BLOCK_KEYS, min_programs: int = MIN_PROGRAMS) -> int:
    """How many programs share one (row, head)'s keys: enough to reach ``min_programs`` programs, at most one per
    ``block`` keys (and per 4 blocks past the first split, so a split never holds fewer than 4 blocks)."""
    wanted = -(-min_programs // programs)  # 1 once the rows x heads fill the GPU
    return max(1, min(wanted, -(-keys // (4 * block))))


def split_length(keys: int, splits: int, block: int = BLOCK_KEYS) -> int:
    """Keys per split: the keys shared evenly by ``splits`` programs, rounded up to whole blocks."""
    per_split = -(-keys // splits)
    return -(-per_split // block) * block


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor,
                     scale: float, limit: Optional[torch.Tensor] = None, *, block_keys: int = BLOCK_KEYS,
                     num_warps: int = NUM_WARPS, gated_loads: bool = True,
                     num_stages: Optional[int] = None) -> torch.Tensor:
    """Attention of one query position per row over a K/V cache.

    Args:
        q: [R, H, 1, d] queries (CUDA; or CPU under the Triton interpreter).
        keys, values: [R, Hkv, S, d] (H a multiple of Hkv: grouped-query heads share a K/V head); any strides with
            a unit last one (views of a larger cache are fine).
        key_mask: [R, S] or [R, 1, 1, S] bool, True where a slot may be attended (unit last stride).
        scale: the softmax scale (1/sqrt(d) for Llama).
        limit: optional int64 device tensor of one element: slots at or past it are neither attended nor read.
        block_keys, num_warps: keys per loop iteration (a power of two) and warps per program (the engine uses the
            defaults; ``bench/decode_attention.py`` times others).
        gated_loads: True (the engine's): a block's K and V loads wait for its mask and skip masked slots; False:
            they are issued with the mask's load for every slot below the limit (masked ones selected out, so NaN
            there still changes nothing): fewer memory round trips, a little more traffic where rows are padded.
            Not yet measured on a GPU (``bench/decode_attention.py`` has both).
        num_stages: Triton's software-pipelining depth for the key loop (None: Triton's default).
    Returns:
        [R, H, 1, d] in q's dtype.
    """
    if not HAS_TRITON:
        raise RuntimeError("decode_attention needs the 'triton' package")
    rows, heads, length, dim = q.shape
    if length != 1:
        raise ValueError(f"decode_attention: q must hold one position per row ([R, H, 1, d]), got {tuple(q.shape)}")
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if keys.shape != values.shape or keys.shape[0] != rows or keys.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"decode_attention: keys/values {tuple(keys.shape)}/{tuple(values.shape)} do not fit "
                         f"q {tuple(q.shape)}")
    if key_mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"decode_attention: key_mask must be bool (True = attend), got {key_mask.dtype}; an "
                         "additive float mask (0 / -inf) is not accepted")
    mask = key_mask.reshape(rows, -1)
    if mask.shape[1] < slots:
        raise ValueError(f"decode_attention: key_mask covers {mask.shape[1]} slots, the keys {slots}")
    for name, t in (("q", q), ("keys", keys), ("values", values), ("key_mask", mask)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} needs a unit last stride")
    mask = mask.view(torch.uint8)  # (bool or uint8: the kernel reads bytes, *u8 in the compiled signature)
    if block_keys < 1 or block_keys & (block_keys - 1):
        raise ValueError(f"decode_attention: block_keys must be a power of two, got {block_keys}")
    programs = rows * heads
    splits = key_splits(programs, slots, block_keys)
    split_len = split_length(slots, splits, block_keys)
    block_d = triton.next_power_of_2(dim)
    if splits == 1:
        out = torch.empty(rows, heads, dim, device=q.device, dtype=q.dtype)
        m = l = out  # unused
        out_strides = (out.stride(0), out.stride(1), 0)
    else:
        out = torch.empty(rows, heads, splits, dim, device=q.device, dtype=torch.float32)
        m = torch.empty(rows * heads, splits, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        out_strides = (out.stride(0), out.stride(1), out.stride(2))
    _decode_attention_kernel[(programs, splits)](
        q, keys, values, mask, limit if limit is not None else mask, out, m, l,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0), *out_strides,
        heads, heads // kv_heads, slots, split_len, float(scale),
        HAS_LIMIT=limit is not None, SPLIT=splits > 1, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=block_keys,
        GATED=gated_loads, num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    if splits > 1:  # merge the splits: softmax over the union of their keys
        m = m.view(rows, heads, splits)
        top = m.amax(-1, keepdim=True)
        weight = torch.exp(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # empty splits: 0
        total = (weight * l.view(rows, heads, splits)).sum(-1, keepdim=True)
        out = torch.where(total > 0, (out * weight[..., None]).sum(2) / total, 0.0)
        out = out.to(q.dtype)
    return out.view(rows, heads, 1, dim)


# The kernel as a torch operator, for compiled decode steps: torch.compile sees one opaque call (its output shape from
# the fake implementation below) instead of tracing the launch, and fuses the step's other ops around it.
@torch.library.custom_op("egrpo::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor,
                        scale: float, limit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`decode_attention` (default block and warps) as the operator ``torch.ops.egrpo.decode_attention``."""
    return decode_attention(q, keys, values, key_mask, scale, limit)


@decode_attention_op.register_fake
def _(q, keys, values, key_mask, scale, limit=None):
    return q.new_empty(q.shape)   # (the kernel's output: contiguous [R, H, 1, d] in q's dtype)
