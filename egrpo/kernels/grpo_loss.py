"""Chunked GRPO policy loss from hidden states and head weights, never holding [N, V] logits.

Per valid token (``mask = 1``), with ``logp`` from the fused head (:mod:`.linear_logprob_entropy`)::

    ratio = exp(logp - old_logp)                  (old_logp=None: on-policy, ratio = 1 in value, d ratio/d logp = 1)
    surr  = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    KL    = exp(ref_logp - logp) - (ref_logp - logp) - 1              (k3; 0 without ref_logp)
    loss  = -sum(surr * w * m) / den_pg  +  beta * sum(kl_w * KL * m) / den_kl

with ``w`` = ``policy_weights`` (default 1) and ``kl_w`` = ``kl_weights`` (default 1). Denominators
per ``normalization`` (each overridable with ``normalizer`` / ``kl_normalizer``, so one objective can
span two heads with one shared normalisation: call once per head with the shared denominators and
add the losses):

* ``"token_mean"``: ``den_pg = den_kl = sum(m)`` over the micro-batch (T2I-R1 / EG-GRPO).
* ``"sequence_mean"``: per row ``n_i = sum_t m`` (at least 1), then the mean over the B rows:
  ``loss = mean_i(sum_t(...) / n_i)``. Overrides may be a scalar or ``[B]``.
* ``"constant"`` (Dr. GRPO): ``den_pg = den_kl = normalizer`` (default ``B * T``).
* ``"weighted"`` (STAGE): ``den_pg = sum(w * m) + 1e-6``, ``den_kl = sum(m)``.

Count denominators are clamped to at least 1 so an all-padding micro-batch gives 0, not NaN.

Options (docs/algorithms.md, "GRPO options of the token loss"), all off by default:

* ``importance_sampling_level="sequence"`` (GSPO): ``ratio`` is one value per sequence,
  ``exp(sum_t m (logp - old_logp) / max(1, sum_t m))``, clipped as above; its gradient reaches every
  valid token of the sequence, so chunks are aligned to whole sequences.
* ``clip_ratio_c = c > 1`` (dual clip): for ``A < 0``, ``surr = max(surr, c * A)`` (the loss is capped
  at ``c |A|``); a capped token carries no gradient.
* ``entropy_coef = k``: ``loss -= k * sum(H * m) / den_kl``; the entropy carries gradient (``g_H``).

Gradient: the loss is ``sum_t g_t * logp_t`` to first order, with the elementwise upstream
``g_t = -d_surr_t * w_t m_t / den_pg + beta kl_w_t m_t (1 - exp(ref_t - logp_t)) / den_kl``
(``d_surr = ratio * A`` unless the token is clipped, then 0); entropy gets no gradient (it only
shapes advantages and is detached) unless ``entropy_coef`` is set. The [chunk, V] work goes through
:func:`~egrpo.kernels.linear_logprob_entropy.head_pass`'s Triton (or torch) row passes.

Cost in GEMM FLOPs (N = B*T rows, D hidden, V vocab; the logits GEMM is 2NDV, and each gradient
the caller needs adds one 2NDV GEMM: dx if ``hidden`` requires grad, dW if ``weight`` does):

* advantages given up front: one streaming pass; each chunk's logits become dz in the same pass
  (``head_pass(grad_fn=...)``). Trainable head **6NDV**; frozen head (``weight.requires_grad`` False,
  the image head in every recipe) **4NDV**: no dW GEMM, no recompute.
* ``advantage_fn`` with ``advantage_fn_scope="sequence"`` or a group size: chunks are aligned to
  whole sequences / groups, ``advantage_fn`` runs per chunk, and g is formed in the same pass:
  the same **6NDV / 4NDV**.
* ``advantage_fn`` over the whole batch (``"batch"``, the default; also what a batch-level factor
  such as EG-GRPO's ``budget_neutral`` scale needs): entropy carries no gradient, so each row's
  ``dz`` is ``g_row`` times a g-free vector and ``dx_row = g_row * ((onehot - p_row) W / tau)``; the
  first pass forms that bracket (kept in fp32, ``N x D``), and dx is scaled once ``advantage_fn``
  has run. Frozen head: **4NDV**, no recompute. dW and db sum over rows with g inside, so a
  trainable head still needs a second pass that recomputes the logits: **8NDV** (2 logits +
  2 dx bracket + 2 recompute + 2 dW). This is the one setting that still recomputes; with
  ``entropy_coef`` the bracket trick no longer holds (dz has a second, entropy term), so this path
  recomputes for every gradient (8NDV trainable, 6NDV frozen).

The autograd function computes loss and gradients in its forward (stored, O(N D + V D)) and its
backward only scales them by the incoming gradient. Extra memory is O(chunk x V), never O(N x V).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

from ._common import (
    check_chunk_size, check_head_inputs, check_temperature, chunk_logit_bytes, logits_dtype, resolve_backend,
)
from .entropy_masks import check_mask
from ._head import HeadGrads, head_backward, head_pass

NORMALIZATIONS = ("token_mean", "sequence_mean", "constant", "weighted")
IS_LEVELS = ("token", "sequence")
WEIGHTED_EPS = 1e-6
# log-probs are <= 0; this slack admits rounding in a caller's own log-softmax
LOGP_SLACK = 1e-4


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor          # scalar, differentiable w.r.t. hidden, weight, bias
    logp: torch.Tensor          # [B, T] detached
    entropy: torch.Tensor       # [B, T] detached (nats)
    kl: torch.Tensor            # [B, T] detached k3 KL (0 without ref_logp and at invalid tokens)
    clipped_low: torch.Tensor   # [B, T] bool: ratio < 1 - eps_low and A < 0 (valid tokens)
    clipped_high: torch.Tensor  # [B, T] bool: ratio > 1 + eps_high and A > 0 (valid tokens)
    advantages: torch.Tensor    # [B, T] the token advantages used (0 at invalid tokens)


class _Plan:
    """Flattened per-token inputs and scales, shared by the chunk callback and the final sums."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def token_terms(self, rows, logp, adv, entropy):
        """Per-token loss contributions and upstream gradients ``(g_logp, g_entropy)`` for ``rows`` (a slice;
        whole sequences when ``is_level="sequence"``)."""
        valid = self.valid[rows]
        pg_scale = self.pg_scale[rows]
        zero = torch.zeros_like(logp)
        # old_logp=None: 1 in value, but a NaN/inf log-prob at a valid token must still poison the loss
        log_ratio = torch.where(valid, logp - (logp if self.old_logp is None else self.old_logp[rows]), zero)
        if self.is_level == "sequence":
            # GSPO: one ratio per sequence from the mean log-ratio over its valid tokens
            n_seq = (rows.stop - rows.start) // self.T
            counts = valid.view(n_seq, self.T).sum(1).clamp(min=1).to(logp.dtype)
            seq_ratio = torch.exp(log_ratio.view(n_seq, self.T).sum(1) / counts)
            ratio = seq_ratio[:, None].expand(n_seq, self.T).reshape(-1)
        else:
            ratio = torch.exp(log_ratio)
        adv = torch.where(valid, adv, zero)
        clipped_low = valid & (ratio < 1.0 - self.eps_low) & (adv < 0)
        clipped_high = valid & (ratio > 1.0 + self.eps_high) & (adv > 0)
        surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high) * adv)
        flat = clipped_low | clipped_high
        if self.clip_ratio_c is not None:
            # dual clip: for A < 0 the surrogate never falls below c * A (the loss is capped at c |A|)
            dual = valid & (adv < 0) & (surr < self.clip_ratio_c * adv)
            surr = torch.where(dual, self.clip_ratio_c * adv, surr)
            flat = flat | dual
        # d surr / d log-ratio: ratio * A where no clip is active
        d_surr = torch.where(flat, zero, ratio * adv)
        loss_t = -surr * pg_scale
        g = -d_surr * pg_scale
        if self.is_level == "sequence":
            # d seq_ratio / d logp_t = seq_ratio / n_i at every valid token of sequence i
            per_seq = g.view(n_seq, self.T).sum(1) / counts
            g = torch.where(valid, per_seq[:, None].expand(n_seq, self.T).reshape(-1), zero)
        if self.ref_logp is not None:
            delta = torch.where(valid, self.ref_logp[rows] - logp, zero)
            e = torch.exp(delta)
            kl = e - delta - 1.0
            if self.kl_scale is not None:
                kl_scale = self.kl_scale[rows]
                loss_t = loss_t + kl * kl_scale
                g = g + (1.0 - e) * kl_scale
        else:
            kl = zero
        g_entropy = None
        if self.entropy_scale is not None:
            # entropy bonus: loss -= coef * (mean entropy with the token term's denominator)
            g_entropy = -self.entropy_scale[rows]
            loss_t = loss_t + g_entropy * torch.where(valid, entropy, zero)
        return loss_t, g, g_entropy, kl, clipped_low, clipped_high, adv


def _run(plan, hidden2, weight, bias, targets1, need):
    """Loss, per-token outputs and gradients (scaled by d loss = 1) at the cheapest GEMM cost.

    ``need = (dx, dW, db)``. Paths (see the module docstring for the cost of each)."""
    n_rows = hidden2.shape[0]
    ldt = logits_dtype(hidden2.dtype)
    loss_t = torch.zeros(n_rows, dtype=ldt, device=hidden2.device)
    kl = torch.zeros_like(loss_t)
    clipped_low = torch.zeros(n_rows, dtype=torch.bool, device=hidden2.device)
    clipped_high = torch.zeros_like(clipped_low)
    adv_used = torch.zeros_like(loss_t)

    def store(rows, logp_rows, entropy_rows, adv_rows):
        loss_rows, g_rows, g_entropy_rows, kl[rows], clipped_low[rows], clipped_high[rows], adv_used[rows] = \
            plan.token_terms(rows, logp_rows, adv_rows, entropy_rows)
        loss_t[rows] = loss_rows
        return g_rows, g_entropy_rows

    # NaN/inf in advantage_fn's results, gathered on the device and checked once after the pass: a check per
    # chunk would wait for the device at every chunk (and leave the GPU idle while the host catches up)
    nonfinite = []

    def run_advantage_fn(rows, logp_rows, entropy_rows):
        """``advantage_fn`` on whole sequences ``rows`` (a multiple of T rows) -> flat advantages."""
        b0, b1 = rows.start // plan.T, rows.stop // plan.T
        shape = (b1 - b0, plan.T)
        args = (logp_rows.detach().view(shape).float(), entropy_rows.detach().view(shape).float())
        if plan.scope_rows is not None:
            args = args + (slice(b0, b1),)
        adv = plan.advantage_fn(*args)
        valid_rows = plan.valid[rows].view(shape)
        adv = _check_token_tensor("advantage_fn's result", adv, shape[0], plan.T, valid_rows,
                                  allow_per_sequence=True, check_values=False)
        nonfinite.append(_nonfinite_at(adv, valid_rows))
        return adv.reshape(-1).to(ldt)

    def check_advantages():
        if nonfinite and bool(torch.stack(nonfinite).any()):
            raise ValueError("advantage_fn's result has NaN/inf values at valid tokens")

    if plan.advantage_fn is None or plan.scope_rows is not None:
        # One pass; g is formed per chunk (chunks hold whole sequences/groups when advantage_fn is
        # scoped), so dz comes from the logits in hand: 2NDV + 2NDV per gradient (dx, dW) needed.
        def grad_fn(rows, logp_rows, entropy_rows):
            adv_rows = plan.advantages[rows] if plan.advantage_fn is None else run_advantage_fn(
                rows, logp_rows, entropy_rows)
            return store(rows, logp_rows, entropy_rows, adv_rows)

        grads = HeadGrads(hidden2, weight, bias, *need)
        logp, entropy, _ = head_pass(hidden2, weight, targets1, bias, plan.inv_tau, plan.chunk, plan.backend,
                                     grad_fn=grad_fn, grads=grads, entropy_detached=plan.entropy_scale is None)
        check_advantages()
        return loss_t.sum(), (logp, entropy, kl, clipped_low, clipped_high, adv_used), grads

    # advantage_fn over the whole batch: g is known only after every row has been seen.
    if plan.entropy_scale is not None:
        # The entropy bonus gives each row a second upstream gradient (through dH/dz), so dx is no longer
        # g_row times one g-free vector: stream once for the statistics, then recompute for every gradient.
        logp, entropy, lse = head_pass(hidden2, weight, targets1, bias, plan.inv_tau, plan.chunk, plan.backend)
        adv = run_advantage_fn(slice(0, n_rows), logp, entropy)
        check_advantages()
        g, g_entropy = store(slice(0, n_rows), logp, entropy, adv)
        grads = HeadGrads(hidden2, weight, bias, *need)
        if grads.any:
            head_backward(hidden2, weight, targets1, bias, lse, entropy, g.contiguous(), g_entropy.contiguous(),
                          plan.inv_tau, plan.chunk, plan.backend, grads)
        return loss_t.sum(), (logp, entropy, kl, clipped_low, clipped_high, adv_used), grads

    # Entropy is detached, so a row's dz is g_row (onehot - p_row) / tau and dx_row = g_row * [(onehot - p_row) W / tau]:
    # the bracket ("unit dx", g = 1) is formed in the first pass and scaled once g is known. dW and db
    # sum over rows with g inside, so they need a second pass that recomputes the logits.
    unit = HeadGrads(hidden2, weight, bias, need[0], False, False, dx_dtype=ldt)
    ones = None

    def unit_grad_fn(rows, _logp_rows, _entropy_rows):
        nonlocal ones
        if ones is None:
            ones = torch.ones(plan.chunk, dtype=ldt, device=hidden2.device)
        return ones[: rows.stop - rows.start], None

    logp, entropy, lse = head_pass(hidden2, weight, targets1, bias, plan.inv_tau, plan.chunk, plan.backend,
                                   grad_fn=unit_grad_fn if need[0] else None, grads=unit, entropy_detached=True)
    adv = run_advantage_fn(slice(0, n_rows), logp, entropy)
    check_advantages()
    g, _ = store(slice(0, n_rows), logp, entropy, adv)
    grads = HeadGrads(hidden2, weight, bias, False, need[1], need[2])
    if grads.any:
        head_backward(hidden2, weight, targets1, bias, lse, entropy, g.contiguous(), None,
                      plan.inv_tau, plan.chunk, plan.backend, grads)
    if need[0]:
        grads.dx = unit.dx.mul_(g[:, None]).to(hidden2.dtype)
    return loss_t.sum(), (logp, entropy, kl, clipped_low, clipped_high, adv_used), grads


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2, weight, bias, targets1, plan):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with torch.no_grad():
            loss, per_token, grads = _run(plan, hidden2, weight, bias, targets1, need)
        # The gradients, computed here, are handed over once in backward (not saved for it): with no other
        # reference left, autograd takes them as the parameters' .grad without a copy, and the upstream scale is
        # applied in place, so no second [V, D] gradient is ever allocated.
        ctx.grads = grads.results(weight, bias)
        ctx.mark_non_differentiable(*per_token)
        return (loss,) + per_token

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError("grpo_loss: a second backward through the same loss; the fused loss computes its "
                               "gradients in the forward and hands them over once (retain_graph=True is not "
                               "supported: call grpo_loss again)")
        dx, dw, db = ctx.grads
        ctx.grads = None
        if g_loss is None:
            return None, None, None, None, None
        # an upstream gradient of exactly 1 (loss.backward()) needs no pass over dW; the check reads a host
        # value, so only on CPU (on CUDA the in-place scale is one cheap memory-bound pass without a sync)
        if not (g_loss.device.type == "cpu" and g_loss.numel() == 1 and float(g_loss) == 1.0):
            for t in (dx, dw, db):
                if t is not None:
                    t.mul_(g_loss.to(t.dtype))
        return dx, dw, db, None, None


def _nonfinite_at(t, valid):
    """0-d bool tensor: does ``t`` hold NaN/inf at a valid token (no host sync)."""
    return ~torch.isfinite(torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))).all()


def _check_token_tensor(name, t, B, T, valid, allow_per_sequence=False, device=None, check_values=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if allow_per_sequence and tuple(t.shape) == (B,):
        t = t[:, None].expand(B, T)
    if tuple(t.shape) != (B, T):
        extra = f" or [B] = [{B}]" if allow_per_sequence else ""
        raise ValueError(f"{name} must have shape [B, T] = [{B}, {T}]{extra}, got {tuple(t.shape)}")
    if t.device != valid.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {valid.device}")
    if check_values and bool(_nonfinite_at(t, valid)):
        raise ValueError(f"{name} has NaN/inf values at valid tokens")
    return t


def _check_denominator(name, value, B, allow_vector, device, dtype):
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dim() <= 1:
            value = value.reshape(())
        elif not (allow_vector and tuple(value.shape) == (B,)):
            shape = "a scalar or [B]" if allow_vector else "a scalar"
            raise ValueError(f"{name} must be {shape}, got shape {tuple(value.shape)}")
        value = value.detach().to(device=device, dtype=dtype)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a positive number or tensor, got {value!r}")
        value = torch.tensor(float(value), dtype=dtype, device=device)
    if not bool(((value > 0) & torch.isfinite(value)).all()):
        raise ValueError(f"{name} must be finite and > 0")
    return value


def _check_scope(scope, B, T):
    """Rows per ``advantage_fn`` call: None for the whole batch, else T (sequence) or G * T (group)."""
    if scope == "batch":
        return None
    if scope == "sequence":
        return T
    if isinstance(scope, bool) or not isinstance(scope, int) or scope < 1:
        raise ValueError(f"advantage_fn_scope must be 'batch', 'sequence' or a group size >= 1, got {scope!r}")
    if B % scope:
        raise ValueError(f"advantage_fn_scope={scope} (group size) must divide the batch size B={B}")
    return scope * T


def _aligned_chunk(chunk, scope_rows):
    """Round ``chunk`` to whole scopes (at least one) so no sequence/group straddles two chunks."""
    if scope_rows is None:
        return chunk
    return max(1, chunk // scope_rows) * scope_rows


def _check_float(name, value, lo=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")) or (lo is not None and value < lo):
        raise ValueError(f"{name} must be a finite float{'' if lo is None else f' >= {lo}'}, got {value!r}")
    return value


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: Optional[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_weights: Optional[torch.Tensor] = None,
    policy_weights: Optional[torch.Tensor] = None,
    normalization: str = "token_mean",
    normalizer=None,
    kl_normalizer=None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    temperature: float = 1.0,
    advantage_fn: Optional[Callable[..., torch.Tensor]] = None,
    advantage_fn_scope: Union[str, int] = "batch",
    importance_sampling_level: str = "token",
    clip_ratio_c: Optional[float] = None,
    entropy_coef: float = 0.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> GRPOLossOutput:
    """GRPO loss of one micro-batch through one head (see the module docstring for the math).

    Args:
        hidden: ``[B, T, D]`` float32 / bfloat16 / float16 (float64 on the torch backend).
        weight: ``[V, D]``; bias: ``[V]`` or None (same dtype as hidden).
        targets: int64 ``[B, T]`` sampled ids; mask: ``[B, T]`` bool or 0/1, 1 = valid token.
        advantages: ``[B, T]`` token or ``[B]`` sequence advantages (ignored, may be None, when
            ``advantage_fn`` is given).
        old_logp: ``[B, T]`` sampling-policy log-probs, or None (on-policy, ratio 1 in value).
        ref_logp: ``[B, T]`` reference log-probs for the k3 KL, or None; beta: KL coefficient.
        kl_weights, policy_weights: optional ``[B, T]`` per-token weights of the KL / policy terms.
        normalization: ``"token_mean"``, ``"sequence_mean"``, ``"constant"`` or ``"weighted"``.
        normalizer, kl_normalizer: denominator overrides (scalar; ``[B]`` for ``"sequence_mean"``).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; temperature: logits / tau.
        advantage_fn: token advantages from the current (detached, fp32) log-probs and entropies, for
            advantages that depend on them (EG-GRPO). With ``advantage_fn_scope="batch"`` it is called
            once as ``fn(logp [B, T], entropy [B, T]) -> [B, T] or [B]`` after a first pass.
        advantage_fn_scope: which rows ``advantage_fn`` must see together. ``"batch"`` (default): all
            of them (a trainable head then pays a recompute: 8NDV; a frozen head does not: 4NDV).
            ``"sequence"`` or an int ``G`` (groups of G consecutive sequences): chunks are aligned to
            whole sequences / groups and ``fn(logp [b, T], entropy [b, T], seqs: slice) -> [b, T] or [b]``
            is called per chunk for sequences ``seqs``, so the gradient is formed in the same pass
            (6NDV trainable, 4NDV frozen). A chunk then holds at least ``T`` (``G * T``) rows.
        importance_sampling_level: ``"token"`` (default: one ratio per token) or ``"sequence"`` (GSPO: one
            ratio per sequence, ``exp`` of the mean log-ratio over its valid tokens, clipped as a whole; its
            gradient reaches every valid token of the sequence, so chunks hold whole sequences).
        clip_ratio_c: dual clip (> 1) or None: for ``A < 0`` the per-token loss is capped at ``c |A|``.
        entropy_coef: entropy bonus: ``loss -= entropy_coef * sum(H m) / den`` (``den`` the KL term's
            denominator, i.e. the unweighted token denominator); the entropy carries gradient.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; chunk_size: rows per chunk.

    Returns:
        :class:`GRPOLossOutput` (``loss`` plus detached ``[B, T]`` logp, entropy, kl, clip flags, advantages).
    """
    check_head_inputs(hidden, weight, targets, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, D], got {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    inv_tau = 1.0 / check_temperature(temperature)
    backend = resolve_backend(backend, hidden.device)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden: float64 is supported by backend='torch' only")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    beta = _check_float("beta", beta, lo=0.0)
    eps_low = _check_float("eps_low", eps_low, lo=0.0)
    eps_high = _check_float("eps_high", eps_high, lo=0.0)
    if beta > 0.0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs of the targets); pass "
                         "ref_logp or set beta=0")
    if eps_low >= 1.0:
        raise ValueError(f"eps_low must lie in [0, 1) (the clip range's lower end 1 - eps_low must stay "
                         f"positive), got {eps_low!r}")
    if advantage_fn is not None and not callable(advantage_fn):
        raise TypeError("advantage_fn must be callable or None")
    scope_rows = _check_scope(advantage_fn_scope, B, T)
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    if clip_ratio_c is not None:
        clip_ratio_c = _check_float("clip_ratio_c", clip_ratio_c)
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c (dual clip) must be > 1 or None, got {clip_ratio_c!r}")
    entropy_coef = _check_float("entropy_coef", entropy_coef)
    valid2 = check_mask(mask, targets, like_name="targets")
    ldt = logits_dtype(hidden.dtype)
    dev = hidden.device

    def token_input(name, t, allow_per_sequence=False):
        if t is None:
            return None
        t = _check_token_tensor(name, t, B, T, valid2, allow_per_sequence)
        return t.detach().to(ldt).reshape(-1).contiguous()

    if advantage_fn is None:
        if advantages is None:
            raise ValueError("advantages must be given (or advantage_fn)")
        adv = token_input("advantages", advantages, allow_per_sequence=True)
    else:
        adv = None
    old = token_input("old_logp", old_logp)
    ref = token_input("ref_logp", ref_logp)
    for name, t in (("old_logp", old), ("ref_logp", ref)):
        if t is not None and bool((torch.where(valid2.reshape(-1), t, torch.zeros_like(t)) > LOGP_SLACK).any()):
            raise ValueError(f"{name} has positive values at valid tokens: it must hold log-probabilities "
                             f"(<= 0) of the targets, not probabilities or logits")
    kl_w = token_input("kl_weights", kl_weights)
    pol_w = token_input("policy_weights", policy_weights)
    if pol_w is not None and bool((pol_w < 0).any()):
        raise ValueError("policy_weights must be >= 0")

    valid = valid2.reshape(-1)
    m = valid.to(ldt)
    wm = m if pol_w is None else m * pol_w
    if normalization == "sequence_mean":
        counts = m.view(B, T).sum(1).clamp(min=1.0)
        den = counts if normalizer is None else _check_denominator("normalizer", normalizer, B, True, dev, ldt)
        kl_den = den if kl_normalizer is None else _check_denominator("kl_normalizer", kl_normalizer, B, True, dev, ldt)
        den_rows = (den * B).expand(B) if den.dim() == 0 else den * B
        kl_den_rows = (kl_den * B).expand(B) if kl_den.dim() == 0 else kl_den * B
        pg_scale = (wm.view(B, T) / den_rows[:, None]).reshape(-1)
        kl_base = (m.view(B, T) / kl_den_rows[:, None]).reshape(-1)
    else:
        if normalizer is not None:
            den = _check_denominator("normalizer", normalizer, B, False, dev, ldt)
        elif normalization == "token_mean":
            den = m.sum().clamp(min=1.0)
        elif normalization == "constant":
            den = torch.tensor(float(max(B * T, 1)), dtype=ldt, device=dev)
        else:
            den = wm.sum() + WEIGHTED_EPS
        if kl_normalizer is not None:
            kl_den = _check_denominator("kl_normalizer", kl_normalizer, B, False, dev, ldt)
        elif normalization == "weighted":
            kl_den = m.sum().clamp(min=1.0)
        else:
            kl_den = den
        pg_scale = wm / den
        kl_base = m / kl_den
    entropy_scale = entropy_coef * kl_base if entropy_coef != 0.0 else None
    kl_scale = None
    if ref is not None and beta != 0.0:
        kl_scale = beta * kl_base if kl_w is None else beta * kl_base * kl_w

    # chunks hold whole scopes of advantage_fn, and whole sequences for a sequence-level ratio
    align = scope_rows if advantage_fn is not None else None
    if importance_sampling_level == "sequence" and align is None:
        align = T
    plan = _Plan(
        B=B, T=T, valid=valid, advantages=adv, old_logp=old, ref_logp=ref,
        pg_scale=pg_scale.contiguous(), kl_scale=kl_scale, eps_low=eps_low, eps_high=eps_high,
        is_level=importance_sampling_level, clip_ratio_c=clip_ratio_c, entropy_scale=entropy_scale,
        inv_tau=inv_tau, backend=backend, advantage_fn=advantage_fn,
        scope_rows=scope_rows if advantage_fn is not None else None,
        chunk=_aligned_chunk(check_chunk_size(chunk_size, B * T, weight.shape[0], dev,
                                              chunk_logit_bytes(hidden.dtype, dev, backend)), align),
    )
    hidden2 = hidden.reshape(B * T, D)
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    targets1 = targets.reshape(-1).to(torch.int64).contiguous()
    loss, logp, entropy, kl, clipped_low, clipped_high, adv_used = GRPOLossFunction.apply(
        hidden2, weight, bias, targets1, plan
    )
    shape = lambda t: t.view(B, T)  # noqa: E731
    return GRPOLossOutput(loss, shape(logp), shape(entropy), shape(kl), shape(clipped_low),
                          shape(clipped_high), shape(adv_used))
