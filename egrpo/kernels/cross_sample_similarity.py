"""STAGE's cross-sample similarity: per image and grid position, the mean cosine similarity of its
VQ codebook vector to those of the opposite-advantage images of its group (docs/algorithms.md, STAGE step 4).

Math (groups are ``group_size`` consecutive rows; ``q`` = L2-normalised codebook vectors)::

    opp[i, j, t] = j != i  and  not (A[i, t] > 0 and A[j, t] > 0)  and  not (A[i, t] < 0 and A[j, t] < 0)
    Sim[i, t]    = sum_j opp[i, j, t] <q[i, t], q[j, t]> / sum_j opp[i, j, t]      (0 when no j qualifies)

``opp`` is the spec's ``1[A_i * A_j <= 0]`` written with signs, so that two tiny same-sign
advantages whose product underflows to 0 are not taken for opposite ones. Zero advantages count
as opposite to everything (a zero-std group compares every image with all the others).

Normalisation: the vectors are always L2-normalised here (``q / max(|q|, 1e-12)``, like
``torch.nn.functional.normalize``), so raw codebook rows and already-normalised ones give the same
result; an all-zero vector has cosine 0 with everything.

Design: one Triton program per (image, block of ``BLOCK_T`` positions), a 1-D grid (no grid-limit
issue at any B*T). It loads its own vectors once and loops over the ``group_size`` images of its
group, reading their vectors either from ``codes [B, T, C]`` or through token ids from the
``codebook [K, C]`` (no ``[B, T, C]`` gather is materialised on that path). All arithmetic is fp32.
At B = 64, T = 576, C = 8 the whole op reads ~1 MB per group pass: one launch, a few microseconds.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import FLOAT_DTYPES, HAS_TRITON, INTERPRETING, resolve_backend

NORM_EPS = 1e-12
NUM_WARPS = 2  # per program on a GPU (also what the sm_90 compile test uses)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_unit_vectors(vec_ptr, row_offsets, cols, valid, stride_c):
        q = tl.load(vec_ptr + row_offsets[:, None] + cols[None, :] * stride_c, mask=valid, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(q * q, axis=1))
        return q / tl.maximum(norm, 1e-12)[:, None]

    @triton.jit
    def _cross_sample_similarity_kernel(
        vec_ptr, stride_vb, stride_vt, stride_vc,
        ids_ptr, stride_ib, stride_it,
        adv_ptr, stride_ab, stride_at,
        sim_ptr, stride_sb,
        T, C, group_size, n_tblocks,
        HAS_IDS: tl.constexpr, INCLUDE_SELF_WHEN_ZERO: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        i = pid // n_tblocks
        t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        cols = tl.arange(0, BLOCK_C)
        valid = t_ok[:, None] & (cols[None, :] < C)
        first = (i // group_size) * group_size

        if HAS_IDS:
            rows_i = tl.load(ids_ptr + i * stride_ib + t * stride_it, mask=t_ok, other=0).to(tl.int64) * stride_vb
        else:
            rows_i = i * stride_vb + t * stride_vt
        q_i = _load_unit_vectors(vec_ptr, rows_i, cols, valid, stride_vc)
        a_i = tl.load(adv_ptr + i * stride_ab + t * stride_at, mask=t_ok, other=0.0).to(tl.float32)

        num = tl.zeros([BLOCK_T], tl.float32)
        cnt = tl.zeros([BLOCK_T], tl.float32)
        for k in range(0, group_size):
            j = first + k
            if HAS_IDS:
                rows_j = tl.load(ids_ptr + j * stride_ib + t * stride_it, mask=t_ok, other=0).to(tl.int64) * stride_vb
            else:
                rows_j = j * stride_vb + t * stride_vt
            q_j = _load_unit_vectors(vec_ptr, rows_j, cols, valid, stride_vc)
            a_j = tl.load(adv_ptr + j * stride_ab + t * stride_at, mask=t_ok, other=0.0).to(tl.float32)
            same_sign = ((a_i > 0) & (a_j > 0)) | ((a_i < 0) & (a_j < 0))
            opposite = (same_sign == 0) & (j != i)
            cos = tl.sum(q_i * q_j, axis=1)
            num += tl.where(opposite, cos, 0.0)
            cnt += tl.where(opposite, 1.0, 0.0)
        if INCLUDE_SELF_WHEN_ZERO:
            cnt += tl.where(a_i == 0, 1.0, 0.0)
        sim = tl.where(cnt > 0, num / tl.maximum(cnt, 1.0), 0.0)
        tl.store(sim_ptr + i * stride_sb + t, sim, mask=t_ok)


def _similarity_triton(vectors, ids, adv, group_size, include_self_when_zero):
    B, T = adv.shape
    C = vectors.shape[-1]
    block_t = min(64, triton.next_power_of_2(max(T, 1)))
    block_c = triton.next_power_of_2(C)
    n_tblocks = triton.cdiv(T, block_t)
    sim = torch.empty((B, T), dtype=torch.float32, device=adv.device)
    if ids is None:
        vec_strides = (vectors.stride(0), vectors.stride(1), vectors.stride(2))
        ids_arg, ids_strides = adv, (0, 0)
    else:
        vec_strides = (vectors.stride(0), 0, vectors.stride(1))
        ids_arg, ids_strides = ids, (ids.stride(0), ids.stride(1))
    _cross_sample_similarity_kernel[(B * n_tblocks,)](
        vectors, *vec_strides,
        ids_arg, *ids_strides,
        adv, adv.stride(0), adv.stride(1),
        sim, sim.stride(0),
        T, C, group_size, n_tblocks,
        HAS_IDS=ids is not None, INCLUDE_SELF_WHEN_ZERO=include_self_when_zero,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=1 if INTERPRETING else NUM_WARPS,
    )
    return sim


def _similarity_torch(vectors, ids, adv, group_size, include_self_when_zero):
    B, T = adv.shape
    acc = torch.float64 if vectors.dtype == torch.float64 else torch.float32
    q = vectors.to(acc)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    if ids is not None:
        q = q[ids]  # [B, T, C]; tiny next to the head's activations
    n = B // group_size
    q = q.reshape(n, group_size, T, -1)
    cos = torch.einsum("nitc,njtc->nijt", q, q)  # [n, G, G, T]
    sign = torch.sign(adv).reshape(n, group_size, 1, -1)  # [B] advantages arrive expanded (stride 0)
    opposite = (sign * sign.transpose(1, 2)) <= 0  # signs are in {-1, 0, 1}: no underflow
    opposite = opposite & ~torch.eye(group_size, dtype=torch.bool, device=adv.device)[None, :, :, None]
    num = (cos * opposite).sum(2)
    cnt = opposite.sum(2).to(acc)
    if include_self_when_zero:
        cnt = cnt + (sign.squeeze(2) == 0).to(acc)
    sim = torch.where(cnt > 0, num / cnt.clamp_min(1.0), torch.zeros((), dtype=acc, device=adv.device))
    return sim.reshape(B, T).to(torch.float32)


def _check_inputs(codes, advantages, group_size, codebook):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    for name, t in (("codes", codes), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if codebook is None:
        if not codes.is_floating_point() or codes.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"codes must be float codebook vectors [B, T, C] (or int token ids [B, T] with codebook=), got {codes.dtype}"
            )
        if codes.dim() != 3 or codes.shape[-1] == 0:
            raise ValueError(f"codes must have shape [B, T, C] with C >= 1, got {tuple(codes.shape)}")
    else:
        if not isinstance(codebook, torch.Tensor):
            raise TypeError(f"codebook must be a torch.Tensor or None, got {type(codebook).__name__}")
        if not codebook.is_floating_point() or codebook.dtype not in FLOAT_DTYPES:
            raise TypeError(f"codebook must be a float tensor [K, C], got {codebook.dtype}")
        if codebook.dim() != 2 or codebook.shape[0] == 0 or codebook.shape[1] == 0:
            raise ValueError(f"codebook must have shape [K, C] with K, C >= 1, got {tuple(codebook.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be integer token ids [B, T] when codebook is given, got {codes.dtype}")
        if codes.dim() != 2:
            raise ValueError(f"codes (token ids) must have shape [B, T] when codebook is given, got {tuple(codes.shape)}")
        if codebook.device != codes.device:
            raise ValueError(f"codebook is on {codebook.device} but codes is on {codes.device}")
        if codes.numel() > 0:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= codebook.shape[0]:
                raise ValueError(f"codes (token ids) must lie in [0, {codebook.shape[0]}); found values in [{lo}, {hi}]")
    B, T = codes.shape[0], codes.shape[1]
    if B % group_size != 0:
        raise ValueError(f"batch size B = {B} (codes' first dim) is not divisible by group_size = {group_size}")
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a float tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape [B] = [{B}] or [B, T] = [{B}, {T}], got {tuple(advantages.shape)}")
    if advantages.device != codes.device:
        raise ValueError(f"advantages is on {advantages.device} but codes is on {codes.device}")
    vectors = codes if codebook is None else codebook
    bad_adv = ~torch.isfinite(advantages).all()
    bad_vec = ~torch.isfinite(vectors).all()
    if bool(bad_adv | bad_vec):  # one host sync for both checks
        raise ValueError(f"{'advantages' if bool(bad_adv) else ('codes' if codebook is None else 'codebook')} contains NaN or Inf")


def cross_sample_similarity(
    codes: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    *,
    codebook: Optional[torch.Tensor] = None,
    backend: str = "auto",
    include_self_when_zero_advantage: bool = False,
) -> torch.Tensor:
    """Mean cosine similarity of each image token to the opposite-advantage images of its group.

    Args:
        codes: ``[B, T, C]`` float codebook vectors of the sampled tokens (normalised inside; C = 8
            for Janus-Pro, any C works), or ``[B, T]`` integer token ids when ``codebook`` is given.
        advantages: ``[B]`` sequence advantages (as in STAGE) or ``[B, T]`` token advantages (the
            sign test is then per position). Only signs matter; zero counts as opposite.
        group_size: images per prompt; groups are ``group_size`` consecutive rows, B % group_size == 0.
        codebook: optional ``[K, C]`` float codebook (rows need not be normalised).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        include_self_when_zero_advantage: released-code compatibility: an image with advantage 0
            also counts itself in the denominator (with cosine 0), i.e. its Sim shrinks by a factor
            (n / (n + 1)). Off by default (docs/algorithms.md, STAGE step 4).

    Returns:
        ``Sim [B, T]`` float32 in [-1, 1]; 0 where no image of the group qualifies.
    """
    _check_inputs(codes, advantages, group_size, codebook)
    backend = resolve_backend(backend, codes.device)
    B, T = codes.shape[0], codes.shape[1]
    # Only signs enter; taking them first (before any cast) keeps tiny float64 advantages' signs.
    adv_sign = torch.sign(advantages).to(torch.float32)
    adv = adv_sign if adv_sign.dim() == 2 else adv_sign[:, None].expand(B, T)
    if codebook is None:
        vectors, ids = codes, None
    else:
        vectors, ids = codebook, codes
    if B * T == 0:
        return torch.zeros((B, T), dtype=torch.float32, device=codes.device)
    if backend == "triton":
        if vectors.stride(-1) != 1:
            vectors = vectors.contiguous()
        return _similarity_triton(vectors, ids, adv, group_size, include_self_when_zero_advantage)
    return _similarity_torch(vectors, ids, adv, group_size, include_self_when_zero_advantage)
