"""Fused sampling of one token per row: CFG mix, temperature, top-k, top-p, inverse-CDF draw, CFG KL.

For each row ``r`` of ``cond`` (and ``uncond`` when classifier-free guidance is on)::

    guided = (u + w (c - u)) / T                 (no CFG: guided = c / T)
    keep   = top-k set of guided (ties kept), then the nucleus (top-p) set of softmax(guided) over it
    p      = softmax(guided over keep)          (0 outside keep)
    token  = first index i with cumsum(p)_i > uniform_r * sum(p)     (inverse CDF)
    kl     = sum_i p_i (log p_i - log softmax(c)_i)                   (the rollout/cfg_kl metric)
    logp   = log p_token                        (optional: the sampled token's log-prob under p, for
                                                 truncated importance sampling)

The top-p rule is the one of ``transformers``: a token is dropped when the probability of the tokens strictly
above it already reaches ``top_p`` (the best token always stays). "Strictly above" is by value: tokens with
equal logits stay or go together (:func:`nucleus_keep`), in both backends and in today's loop.

Random numbers: the caller passes one uniform per row (``uniforms [N]`` float32 in [0, 1)). The engine draws
every uniform of a phase up front, one ``torch.Generator`` per row seeded from (phase seed, row)
(:func:`phase_uniforms`: Mersenne Twister on CPU, Philox on CUDA) and each step reads its row of that table
through a device-side index, so a CUDA graph replays with fresh numbers and nothing syncs with the host. (An
earlier in-kernel integer hash of ``(seed, step, row)`` passed pair tests; it was replaced by a tested generator
after a 4-seed demo comparison that a 40-seed sweep later showed to be within the spread; docs/rollout.md.)
One uniform per row (inverse CDF) instead of one per vocabulary entry (Gumbel-max) keeps the CPU path cheap;
fed the same uniforms both backends draw the same tokens (up to float summation order at a CDF boundary, a
~1e-7 event).

Backends: ``"triton"`` is one kernel, one program per row, streaming over the vocabulary in blocks and
never writing guided logits to memory (top-k / top-p thresholds by 32-step bisections on the order-
preserving integer image of the float logits, each a streaming pass); ``"torch"`` is the eager
reference and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from egrpo.kernels._common import HAS_TRITON, resolve_backend, tl, triton

@dataclass(frozen=True)
class SamplingParams:
    """How one phase samples. ``cfg_scale=None`` (text) means no guidance and no KL."""

    temperature: float = 1.0
    top_k: Optional[int] = None        # None: off
    top_p: Optional[float] = None      # None or 1.0: off
    cfg_scale: Optional[float] = None  # w in u + w (c - u); None: no CFG

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.cfg_scale)


def validate_sampling(temperature, top_k=None, top_p=None, cfg_scale=None, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first invalid sampling setting (``prefix`` e.g. ``"rollout."``)."""
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{prefix}temperature must be > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{prefix}top_k must be an integer >= 1 or None (off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"{prefix}top_p must be in (0, 1] or None (off), got {top_p!r}")
    if cfg_scale is not None and not (isinstance(cfg_scale, (int, float)) and cfg_scale >= 0):
        raise ValueError(f"{prefix}cfg_scale must be >= 0 or None (no guidance), got {cfg_scale!r}")


# ---------------------------------------------------------------------------------------------
# Uniforms
# ---------------------------------------------------------------------------------------------


_MASK64 = (1 << 64) - 1


def _row_seed(seed: int, row: int) -> int:
    """A 63-bit generator seed for ``row`` of a phase seeded ``seed`` (splitmix64's finaliser)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + row + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def phase_uniforms(seed: int, steps: int, rows: int, device) -> torch.Tensor:
    """``[steps, rows]`` float32 uniforms in [0, 1): every random number one sampling phase needs, drawn before its
    first step. Each row has its own ``torch.Generator`` on ``device`` (seeded from ``(seed, row)``), so a row's
    numbers do not depend on how many rows the phase samples, and a longer phase extends a shorter one."""
    out = torch.empty(steps, rows, dtype=torch.float32, device=device)
    for row in range(rows):
        generator = torch.Generator(device=device).manual_seed(_row_seed(seed, row))
        out[:, row] = torch.rand(steps, generator=generator, device=device, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# torch path (reference and CPU)
# ---------------------------------------------------------------------------------------------


def guided_logits(cond: torch.Tensor, uncond: Optional[torch.Tensor], params: SamplingParams) -> torch.Tensor:
    """``(u + w (c - u)) / T`` in float32 (``c / T`` without CFG); [N, V]."""
    logits = cond.float()
    if params.cfg_scale is not None:
        u = uncond.float()
        logits = (logits - u).mul_(params.cfg_scale).add_(u)  # u + w (c - u), the Triton kernel's rounding
    return logits / params.temperature if params.temperature != 1 else logits


def keep_mask(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> Optional[torch.Tensor]:
    """Bool [N, V] of the tokens top-k then top-p keep (None when both are off)."""
    keep = None
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        keep = logits >= kth
    if top_p is not None and top_p < 1.0:
        masked = logits if keep is None else logits.masked_fill(~keep, float("-inf"))
        keep_p = nucleus_keep(masked, top_p)
        keep = keep_p if keep is None else keep & keep_p
    return keep


def nucleus_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [N, V]: the tokens whose strictly larger logits hold less than ``top_p`` of ``softmax(logits)``.

    Tokens with equal logits are kept or dropped together, as the Triton kernel's threshold does. A rule that
    walks the sorted order (transformers' ``TopPLogitsWarper``) would cut a tie group wherever ``torch.sort``
    happened to place its members; the two differ only when the cut falls inside a group of equal logits
    (frequent with bf16 logits)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens sorted before each token
    # A tie group's mass strictly above is ``before`` at its first member; ``before`` never decreases along the
    # sorted row, so a running maximum over the group starts carries it to the whole group.
    starts = torch.ones_like(sorted_logits, dtype=torch.bool)
    starts[..., 1:] = sorted_logits[..., 1:] != sorted_logits[..., :-1]
    above = before.masked_fill(~starts, 0.0).cummax(-1).values
    keep_sorted = above < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_torch(cond: torch.Tensor, uncond: Optional[torch.Tensor], params: SamplingParams,
                 uniforms: torch.Tensor, want_kl: bool = True, want_logp: bool = False):
    """Eager path of :func:`sample`; see the module docstring. Few full passes over [N, V] (it is the CPU decode
    step's sampler): guided logits, max, exp, cumsum, and for the KL one log-softmax and one weighted sum."""
    logits = guided_logits(cond, uncond, params)
    keep = keep_mask(logits, params.top_k, params.top_p)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    shifted = logits - logits.amax(-1, keepdim=True)
    weights = torch.exp(shifted)  # 0 outside keep
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    # Inverse CDF: the first index whose cdf exceeds the target. A target that rounds up to the total is pulled
    # just below it, so the draw lands on the last token with non-zero weight, never on a zero-weight one.
    target = torch.minimum(uniforms.to(total.dtype)[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    # NaN weights (diverged weights) find no index: clamp, the NaN log-prob is what the caller checks.
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    log_total = torch.log(total)
    kl = None
    if want_kl:
        # KL(p || softmax(c)) = sum_i p_i (shifted_i - log_total - logp_c_i), p = weights / total.
        gap = shifted - torch.log_softmax(cond.float(), -1)
        if keep is not None:  # outside keep shifted is -inf and the weight 0: contributes nothing
            gap = gap.masked_fill_(~keep, 0.0)
        kl = (weights * gap).sum(-1) / total.squeeze(-1) - log_total.squeeze(-1)
    if not want_logp:
        return token, kl
    logp = shifted.gather(-1, token[:, None]).squeeze(-1) - log_total.squeeze(-1)
    return token, kl, logp


# ---------------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _float_key(x):
        # Order-preserving map float32 -> int32: larger float <=> larger key.
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _guided_block(cond_ptr, uncond_ptr, cols, in_range, cfg_scale, inv_temp, HAS_UNCOND: tl.constexpr):
        c = tl.load(cond_ptr + cols, mask=in_range, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(uncond_ptr + cols, mask=in_range, other=0.0).to(tl.float32)
            g = (u + cfg_scale * (c - u)) * inv_temp
        else:
            g = c * inv_temp
        g = tl.where(in_range, g, float("-inf"))
        return c, g

    @triton.jit
    def _cfg_sample_kernel(
        cond_ptr, uncond_ptr, stride_cond, stride_uncond, uniform_ptr, token_ptr, kl_ptr, logp_ptr,
        V, cfg_scale, inv_temp, top_k, top_p,
        HAS_UNCOND: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, WANT_KL: tl.constexpr,
        WANT_LOGP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cond_ptr += row * stride_cond
        uncond_ptr += row * stride_uncond
        offs = tl.arange(0, BLOCK)

        # Pass 1: maxima of the guided and the conditional logits.
        g_max = tl.full([BLOCK], float("-inf"), tl.float32)
        c_max = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            in_range = cols < V
            c, g = _guided_block(cond_ptr, uncond_ptr, cols, in_range, cfg_scale, inv_temp, HAS_UNCOND)
            g_max = tl.maximum(g_max, g)
            c_max = tl.maximum(c_max, tl.where(in_range, c, float("-inf")))
        m_g = tl.max(g_max, 0)
        m_c = tl.max(c_max, 0)

        # Top-k threshold: the largest key t with count(key >= t) >= k (bisection over the int32 keys).
        t_lo = -2147483648
        if TOP_K:
            lo = tl.full([], -2147483648, tl.int64)
            hi = tl.full([], 2147483647, tl.int64)
            for _ in range(32):
                mid = lo + (hi - lo + 1) // 2
                count = tl.zeros([BLOCK], tl.int32)
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    in_range = cols < V
                    c, g = _guided_block(cond_ptr, uncond_ptr, cols, in_range, cfg_scale, inv_temp, HAS_UNCOND)
                    count += (in_range & (_float_key(g).to(tl.int64) >= mid)).to(tl.int32)
                ok = tl.sum(count, 0) >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid - 1)
            t_lo = lo

        # Top-p threshold: the smallest key t with mass(key > t) < top_p * mass(kept by top-k).
        if TOP_P:
            z1 = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                in_range = cols < V
                c, g = _guided_block(cond_ptr, uncond_ptr, cols, in_range, cfg_scale, inv_temp, HAS_UNCOND)
                kept = in_range & (_float_key(g).to(tl.int64) >= t_lo)
                z1 += tl.where(kept, tl.exp(g - m_g), 0.0)
            total = tl.sum(z1, 0)
            lo = tl.full([], -2147483648, tl.int64)
            hi = _float_key(m_g).to(tl.int64)
            for _ in range(32):
                mid = lo + (hi - lo) // 2
                above = tl.zeros([BLOCK], tl.float32)
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    in_range = cols < V
                    c, g = _guided_block(cond_ptr, uncond_ptr, cols, in_range, cfg_scale, inv_temp, HAS_UNCOND)
                    key = _float_key(g).to(tl.int64)
                    above += tl.where(in_range & (key >= t_lo) & (key > mid), tl.exp(g - m_g), 0.0)
                ok = tl.sum(above, 0) < top_p * total
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid + 1)
            t_lo = tl.maximum(t_lo, hi)

        # Pass: mass of the kept set (and of the conditional softmax for the KL).
        z_vec = tl.zeros([BLOCK], tl.float32)
        zc_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            in_range = cols < V
            c, g = _guided_block(cond_ptr, uncond_ptr, cols, in_range, cfg_scale, inv_temp, HAS_UNCOND)
            kept = in_range & (_float_key(g).to(tl.int64) >= t_lo)
            z_vec += tl.where(kept, tl.exp(g - m_g), 0.0)
            if WANT_KL:
                zc_vec += tl.where(in_range, tl.exp(c - m_c), 0.0)
        z = tl.sum(z_vec, 0)

        uniform = tl.load(uniform_ptr + row).to(tl.float32)  # the row's uniform, drawn by the caller
        target = uniform * z

        # Final pass: inverse-CDF draw and KL(p || softmax(c)).
        acc = tl.zeros([], tl.float32)
        token = tl.full([], -1, tl.int64)
        last = tl.zeros([], tl.int64)
        kl_vec = tl.zeros([BLOCK], tl.float32)
        log_z = tl.log(z)
        log_zc = tl.log(tl.sum(zc_vec, 0))
        for start in range(0, V, BLOCK):
            cols = start + offs
            in_range = cols < V
            c, g = _guided_block(cond_ptr, uncond_ptr, cols, in_range, cfg_scale, inv_temp, HAS_UNCOND)
            kept = in_range & (_float_key(g).to(tl.int64) >= t_lo)
            w = tl.where(kept, tl.exp(g - m_g), 0.0)
            cdf = tl.cumsum(w, 0) + acc
            hit = (cdf > target) & (w > 0)
            first = tl.min(tl.where(hit, cols, 2147483647), 0).to(tl.int64)
            token = tl.where((token < 0) & (first < 2147483647), first, token)
            last = tl.maximum(last, tl.max(tl.where(w > 0, cols, 0), 0).to(tl.int64))
            acc += tl.sum(w, 0)
            if WANT_KL:
                logp_s = g - m_g - log_z
                logp_c = c - m_c - log_zc
                kl_vec += tl.where(w > 0, tl.exp(logp_s) * (logp_s - logp_c), 0.0)
        token = tl.where(token < 0, last, token)
        tl.store(token_ptr + row, token)
        if WANT_KL:
            tl.store(kl_ptr + row, tl.sum(kl_vec, 0))
        if WANT_LOGP:  # the sampled token's guided logit, reloaded (one element), minus the log-normaliser
            c_t = tl.load(cond_ptr + token).to(tl.float32)
            if HAS_UNCOND:
                u_t = tl.load(uncond_ptr + token).to(tl.float32)
                g_t = (u_t + cfg_scale * (c_t - u_t)) * inv_temp
            else:
                g_t = c_t * inv_temp
            tl.store(logp_ptr + row, g_t - m_g - log_z)


def sampler_num_warps(block: int) -> int:
    """Warps per row program of the Triton sampler (also what the sm_90 compile test uses)."""
    return 8 if block >= 2048 else 4


def sample_triton(cond: torch.Tensor, uncond: Optional[torch.Tensor], params: SamplingParams,
                  uniforms: torch.Tensor, want_kl: bool = True, want_logp: bool = False):
    """Triton path of :func:`sample`: one program per row; allocates only the [N] outputs."""
    rows, vocab = cond.shape
    cond = cond if cond.stride(-1) == 1 else cond.contiguous()
    has_uncond = params.cfg_scale is not None
    if has_uncond:
        uncond = uncond if uncond.stride(-1) == 1 else uncond.contiguous()
    token = torch.empty(rows, dtype=torch.int64, device=cond.device)
    kl = torch.empty(rows, dtype=torch.float32, device=cond.device) if want_kl else token
    logp = torch.empty(rows, dtype=torch.float32, device=cond.device) if want_logp else token
    top_k = params.top_k is not None and params.top_k < vocab
    top_p = params.top_p is not None and params.top_p < 1.0
    block = min(4096, triton.next_power_of_2(vocab))
    _cfg_sample_kernel[(rows,)](
        cond, uncond if has_uncond else cond, cond.stride(0), (uncond if has_uncond else cond).stride(0),
        uniforms.float().contiguous(), token, kl, logp, vocab,
        float(params.cfg_scale or 0.0), 1.0 / params.temperature, int(params.top_k or 0), float(params.top_p or 1.0),
        HAS_UNCOND=has_uncond, TOP_K=top_k, TOP_P=top_p, WANT_KL=want_kl, WANT_LOGP=want_logp, BLOCK=block,
        num_warps=sampler_num_warps(block),
    )
    if want_logp:
        return token, (kl if want_kl else None), logp
    return token, (kl if want_kl else None)


def sample(cond: torch.Tensor, uncond: Optional[torch.Tensor], params: SamplingParams, uniforms: torch.Tensor,
           want_kl: bool = True, backend: str = "auto", want_logp: bool = False):
    """Draw one token per row; returns ``(token [N] int64, kl [N] float32 or None)``, and with ``want_logp``
    a third element ``logp [N] float32``: the sampled token's log-prob under the sampling distribution
    (guided, tempered, top-k / top-p renormalised).

    cond, uncond: [N, V] logits (any float dtype; uncond only when ``params.cfg_scale`` is not None).
    uniforms: [N] float32 in [0, 1) on the same device, one per row (:func:`phase_uniforms`). ``want_kl`` False
    skips the KL (text phase).
    """
    if (params.cfg_scale is None) != (uncond is None):
        raise ValueError("sample: pass uncond exactly when params.cfg_scale is set")
    if uncond is not None and uncond.shape != cond.shape:
        raise ValueError(f"sample: uncond shape {tuple(uncond.shape)} != cond shape {tuple(cond.shape)}")
    if uniforms.shape != cond.shape[:1]:
        raise ValueError(f"sample: uniforms shape {tuple(uniforms.shape)} != ({cond.shape[0]},) (one per row)")
    if resolve_backend(backend, cond.device) == "triton":
        return sample_triton(cond, uncond, params, uniforms, want_kl, want_logp)
    return sample_torch(cond, uncond, params, uniforms, want_kl, want_logp)
