"""Entropy-percentile masks: which tokens of a row (group, batch) are low- / high-entropy.

For every selection unit (a row for ``scope="sequence"``, ``group_size`` consecutive rows for
``scope="group"``, everything for ``scope="batch"``) with ``n`` participating values::

    low  = valid & (H < thr(low_q))          high = valid & (H > thr(high_q))      (strict)

Percentile definitions (``method``):

* ``"index"`` (released EG-GRPO code): ``thr(q) = sorted[floor(q * n)]`` with ``q * n``
  evaluated in float64 like Python's ``int(q * n)``. On a 576-token row of distinct values,
  ``q = 0.5`` picks ``sorted[288]`` (287 values above it) and ``q = 0.2`` picks ``sorted[115]``
  (115 values below it).
* ``"linear"`` (``torch.quantile`` / ``nanquantile``, the released low-memory variant):
  ``pos = q * (n - 1)``, ``thr = lerp(sorted[floor(pos)], sorted[ceil(pos)], pos - floor(pos))``,
  evaluated in the entropy's dtype (float32 for half inputs), exactly as ``torch.quantile``.

Participating values are the valid ones (``mask != 0``). ``include_invalid=True`` lets padding
take part (``n`` is the full length of the unit); invalid tokens are never in either mask. Units
with no participating value give all-false masks.

``released_text_percentiles=True`` is the exact rule of the released EG-GRPO trainer for the
text-CoT part (the objective's ``include_padding_in_text_percentiles`` switch). The unit is the
whole padded row of length ``L``; ``n`` = the number of its positions whose entropy is ``> 0``
(post-EOS padding included, whatever ``mask`` says); the row is sorted in full and indexed from
the tail:

* ``"index"``: ``thr_high = sorted[L - max(1, floor(high_q * n))]`` and
  ``thr_low = sorted[L - n + max(1, floor(low_q * n))]``, ``q * n`` evaluated in float32 like the
  released ``n.float() * q``. This differs from ``sorted[floor(q * L)]`` for odd ``L``, for
  ``L < 5`` and for rows with zero entropies. Where the released index falls past the row
  (``n <= 1``: the released code stops with an index error) we clamp it to the last position.
* ``"linear"`` (the released low-memory trainer): ``torch.quantile`` over the positions with
  entropy ``> 0``; a row without any gets threshold 0 (the released ``nan_to_num``).

Backends: ``"triton"`` finds the needed order statistics with one program per unit and a
binary search over the order-preserving int32 image of the fp32 bit pattern (32 counting passes
per order statistic; no sort, no extra memory). All scopes run on the Triton kernel: a group or
the batch is just a longer unit (``scope="batch"`` is a single program, fine for the sizes RL
batches have). float64 entropies always take the torch path (the kernel selects on fp32 bits).
``"torch"`` sorts each unit (invalid values pushed to +inf) and gathers the same ranks. The
threshold arithmetic and the strict comparisons are shared, so both backends give identical masks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import HAS_TRITON, INTERPRETING, resolve_backend

SCOPES = ("sequence", "group", "batch")
NUM_WARPS = 4  # per program on a GPU (also what the sm_90 compile test uses)
METHODS = ("index", "linear")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _unit_order_stats_kernel(
        values_ptr, valid_ptr, ranks_ptr, out_ptr,
        L,
        HAS_VALID: tl.constexpr, NUM_RANKS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        unit = tl.program_id(0).to(tl.int64)
        base = unit * L
        cols = tl.arange(0, BLOCK)
        for r in tl.static_range(NUM_RANKS):
            k = tl.load(ranks_ptr + unit * NUM_RANKS + r).to(tl.int64)
            # Search the smallest key K with #{key <= K} > k over the whole int32 key range.
            lo = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0) - 2147483648
            hi = lo + 4294967295
            for _ in range(32):
                mid = lo + (hi - lo) // 2
                count = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
                for start in range(0, L, BLOCK):
                    offs = start + cols
                    inside = offs < L
                    x = tl.load(values_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
                    bits = x.to(tl.int32, bitcast=True)
                    # Negative floats order backwards as int32: flip their magnitude bits.
                    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
                    take = inside
                    if HAS_VALID:
                        take = take & (tl.load(valid_ptr + base + offs, mask=inside, other=0) != 0)
                    count += tl.sum((take & (key <= mid)).to(tl.int64), axis=0)
                found = count > k
                hi = tl.where(found, mid, hi)
                lo = tl.where(found, lo, mid + 1)
            key32 = lo.to(tl.int32)
            # (a name of its own: `bits` above is a [BLOCK] tensor inside the loops)
            value_bits = tl.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32)
            value = value_bits.to(tl.float32, bitcast=True)
            value = tl.where(k >= 0, value, 0.0)
            tl.store(out_ptr + unit * NUM_RANKS + r, value)


def _order_stats_triton(units: torch.Tensor, valid: Optional[torch.Tensor], ranks: torch.Tensor) -> torch.Tensor:
    n_units, L = units.shape
    values = units.float().contiguous()
    out = torch.empty(ranks.shape, dtype=torch.float32, device=units.device)
    block = min(1024, triton.next_power_of_2(max(L, 1)))
    _unit_order_stats_kernel[(n_units,)](
        values, valid.to(torch.uint8).contiguous() if valid is not None else values,
        ranks.to(torch.int32).contiguous(), out, L,
        HAS_VALID=valid is not None, NUM_RANKS=ranks.shape[1], BLOCK=block,
        num_warps=1 if INTERPRETING else NUM_WARPS,
    )
    return out.to(units.dtype if units.dtype != torch.float64 else torch.float64)


def _order_stats_torch(units: torch.Tensor, valid: Optional[torch.Tensor], ranks: torch.Tensor) -> torch.Tensor:
    values = units if valid is None else units.masked_fill(~valid, float("inf"))
    ordered = values.sort(dim=1).values
    picked = ordered.gather(1, ranks.clamp(0, max(units.shape[1] - 1, 0)))
    return torch.where(ranks >= 0, picked, torch.zeros_like(picked))


def _check_quantile(name, q):
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1), got {q!r}")
    if not (0.0 < float(q) < 1.0):
        raise ValueError(f"{name} must lie strictly inside (0, 1), got {q!r}")
    return float(q)


def check_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask", like_name: str = "entropy") -> torch.Tensor:
    """Validate a 0/1 token mask shaped like ``like``; returns it as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} must equal {like_name} shape {tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but {like_name} is on {like.device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1 (1 = valid token)")
    return mask != 0


def entropy_masks(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    low_q: float = 0.2,
    high_q: float = 0.5,
    *,
    scope: str = "sequence",
    group_size: Optional[int] = None,
    method: str = "index",
    include_invalid: bool = False,
    released_text_percentiles: bool = False,
    backend: str = "auto",
    check_finite: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Low- and high-entropy token masks from per-unit percentiles.

    Args:
        entropy: ``[B, T]`` float (any scale: raw nats or normalised by ln V).
        mask: ``[B, T]`` bool or 0/1 numbers, 1 = valid token.
        low_q, high_q: percentiles in (0, 1), ``low_q <= high_q``.
        scope: ``"sequence"`` (per row, EG-GRPO), ``"group"`` (``group_size`` consecutive rows)
            or ``"batch"`` (all tokens).
        group_size: rows per group, required for ``scope="group"``; must divide B.
        method: ``"index"`` (released: ``sorted[floor(q n)]``) or ``"linear"`` (``torch.quantile``).
        include_invalid: released-code compatibility: invalid (padding) positions take part in
            the percentiles (never in the masks), ``sorted[floor(q L)]``.
        released_text_percentiles: the released EG-GRPO text-CoT rule exactly (tail indexing with
            ``n`` = number of positions whose entropy is ``> 0``; see the module docstring).
            Excludes ``include_invalid``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        check_finite: reject NaN/inf entropies at participating positions. The check waits for the
            device (a host sync); a caller that checks what it derives from the masks anyway (the GRPO
            loss checks ``advantage_fn``'s result once per pass) turns it off, so a CUDA pass over many
            chunks never stalls.

    Returns:
        ``(low, high)``: bool ``[B, T]``; ``low = valid & (H < thr_low)``, ``high = valid & (H > thr_high)``.
    """
    if not isinstance(entropy, torch.Tensor):
        raise TypeError(f"entropy must be a torch.Tensor, got {type(entropy).__name__}")
    if not entropy.is_floating_point():
        raise TypeError(f"entropy must be a floating tensor, got {entropy.dtype}")
    if entropy.dim() != 2:
        raise ValueError(f"entropy must have shape [B, T], got {tuple(entropy.shape)}")
    valid = check_mask(mask, entropy)
    low_q = _check_quantile("low_q", low_q)
    high_q = _check_quantile("high_q", high_q)
    if low_q > high_q:
        raise ValueError(f"low_q ({low_q}) must not exceed high_q ({high_q})")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    B, T = entropy.shape
    if scope == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int for scope='group', got {group_size!r}")
        if B % group_size:
            raise ValueError(f"group_size ({group_size}) must divide the number of rows B ({B})")
    if not isinstance(released_text_percentiles, bool) or not isinstance(include_invalid, bool):
        raise TypeError("include_invalid and released_text_percentiles must be bools")
    if released_text_percentiles and include_invalid:
        raise ValueError("pass either include_invalid=True or released_text_percentiles=True, not both "
                         "(the released rule already decides which positions take part)")
    backend = resolve_backend(backend, entropy.device)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
    participating = None if (include_invalid or released_text_percentiles) else valid
    if check_finite and entropy.numel():
        finite = torch.isfinite(entropy)
        if not bool((finite if participating is None else finite | ~participating).all()):
            raise ValueError("entropy has NaN/inf values at participating (valid) positions")

    n_units = {"sequence": B, "group": B // group_size if scope == "group" else 0, "batch": 1}[scope]
    if B * T == 0:
        empty = torch.zeros(B, T, dtype=torch.bool, device=entropy.device)
        return empty, empty.clone()
    units = entropy.reshape(n_units, -1)
    unit_valid = valid.reshape(n_units, -1)
    L = units.shape[1]
    n = unit_valid.sum(1) if participating is not None else torch.full((n_units,), L, device=entropy.device)
    if released_text_percentiles:
        positive = units > 0
        n = positive.sum(1)
        if method == "linear":  # quantiles over the positive entries only (released nanquantile)
            participating = positive.reshape(B, T)

    # Ranks (0-based) of the order statistics each threshold needs; -1 marks an empty unit.
    if method == "index" and released_text_percentiles:
        # Released: float32 ``n * q``, floored, at least 1, counted from the tail of the full row.
        counts = [(n.to(torch.float32) * q).floor().long().clamp(min=1) for q in (low_q, high_q)]
        ranks = [L - n + counts[0], L - counts[1]]
        ranks = torch.stack([r.clamp(0, L - 1) for r in ranks], 1)
    elif method == "index":
        ranks = [torch.floor(q * n.to(torch.float64)).long() for q in (low_q, high_q)]
        ranks = [torch.minimum(r, n - 1) for r in ranks]
        ranks = torch.stack(ranks, 1)
    else:
        qdt = torch.float32 if entropy.dtype != torch.float64 else torch.float64
        positions = [torch.tensor(q, dtype=qdt, device=entropy.device) * (n - 1).to(qdt) for q in (low_q, high_q)]
        ranks = []
        for pos in positions:
            ranks += [pos.long(), pos.ceil().long()]
        ranks = torch.stack(ranks, 1)
    if not (released_text_percentiles and method == "index"):
        ranks = torch.where((n > 0)[:, None], ranks, torch.full_like(ranks, -1))

    use_triton = backend == "triton" and entropy.dtype != torch.float64
    select = _order_stats_triton if use_triton else _order_stats_torch
    stats = select(units, participating.reshape(n_units, -1) if participating is not None else None, ranks)

    if method == "index":
        thr_low, thr_high = stats[:, 0], stats[:, 1]
    else:
        stats = stats.to(qdt)
        thr = []
        for j, pos in enumerate(positions):
            below, above = stats[:, 2 * j], stats[:, 2 * j + 1]
            thr.append(torch.lerp(below, above, pos - pos.floor()))
        thr_low, thr_high = thr
    cmp = units.to(thr_low.dtype) if method == "linear" else units
    low = unit_valid & (cmp < thr_low.to(cmp.dtype)[:, None])
    high = unit_valid & (cmp > thr_high.to(cmp.dtype)[:, None])
    return low.reshape(B, T), high.reshape(B, T)

