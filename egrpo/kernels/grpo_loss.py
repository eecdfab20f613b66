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

Gradient: the loss is ``sum_t g_t * logp_t`` to first order, with the elementwise upstream
``g_t = -d_surr_t * w_t m_t / den_pg + beta kl_w_t m_t (1 - exp(ref_t - logp_t)) / den_kl``
(``d_surr = ratio * A`` unless the token is clipped, then 0); entropy gets no gradient (it only
shapes advantages and is detached). The [chunk, V] work goes through
:func:`~egrpo.kernels.linear_logprob_entropy.head_pass`'s Triton (or torch) row passes.

Cost (N = B*T rows, D hidden, V vocab):

* advantages given up front: **6NDV**. One streaming pass; each chunk's logits are turned into
  dz in the same pass (``head_pass(grad_fn=...)``), then dx and dW GEMMs. No recompute.
* ``advantage_fn`` given (advantages depend on the current entropies, e.g. EG-GRPO's per-row
  percentiles need the whole row first): **8NDV**. A first pass computes logp/entropy of every
  row (2NDV), ``advantage_fn(logp, entropy)`` returns ``[B, T]`` token advantages, then a second
  pass recomputes each chunk's logits and forms the gradients (6NDV).

The autograd function computes loss and gradients in its forward (stored, O(N D + V D)) and its
backward only scales them by the incoming gradient. Extra memory is O(chunk x V), never O(N x V).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ._common import check_chunk_size, check_head_inputs, check_temperature, logits_dtype, resolve_backend
from .entropy_masks import check_mask
from .linear_logprob_entropy import HeadGrads, head_backward, head_pass

NORMALIZATIONS = ("token_mean", "sequence_mean", "constant", "weighted")
WEIGHTED_EPS = 1e-6


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

    def token_terms(self, rows, logp, adv):
        """Per-token loss contributions and upstream gradients for ``rows`` (a slice)."""
        valid = self.valid[rows]
        pg_scale = self.pg_scale[rows]
        if self.old_logp is None:
            ratio = torch.ones_like(logp)
        else:
            ratio = torch.exp(torch.where(valid, logp - self.old_logp[rows], torch.zeros_like(logp)))
        adv = torch.where(valid, adv, torch.zeros_like(adv))
        clipped_low = valid & (ratio < 1.0 - self.eps_low) & (adv < 0)
        clipped_high = valid & (ratio > 1.0 + self.eps_high) & (adv > 0)
        surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high) * adv)
        d_surr = torch.where(clipped_low | clipped_high, torch.zeros_like(ratio), ratio * adv)
        loss_t = -surr * pg_scale
        g = -d_surr * pg_scale
        if self.ref_logp is not None:
            delta = torch.where(valid, self.ref_logp[rows] - logp, torch.zeros_like(logp))
            e = torch.exp(delta)
            kl = e - delta - 1.0
            if self.kl_scale is not None:
                kl_scale = self.kl_scale[rows]
                loss_t = loss_t + kl * kl_scale
                g = g + (1.0 - e) * kl_scale
        else:
            kl = torch.zeros_like(logp)
        return loss_t, g, kl, clipped_low, clipped_high, adv


def _run(plan, hidden2, weight, bias, targets1, need):
    n_rows = hidden2.shape[0]
    ldt = logits_dtype(hidden2.dtype)
    grads = HeadGrads(hidden2, weight, bias, *need) if any(need) else None
    loss_t = torch.zeros(n_rows, dtype=ldt, device=hidden2.device)
    kl = torch.zeros_like(loss_t)
    clipped_low = torch.zeros(n_rows, dtype=torch.bool, device=hidden2.device)
    clipped_high = torch.zeros_like(clipped_low)
    adv_used = torch.zeros_like(loss_t)

    def store(rows, logp_rows, adv_rows):
        loss_rows, g_rows, kl[rows], clipped_low[rows], clipped_high[rows], adv_used[rows] = plan.token_terms(
            rows, logp_rows, adv_rows)
        loss_t[rows] = loss_rows
        return g_rows

    if plan.advantage_fn is None:
        def grad_fn(rows, logp_rows, _entropy_rows):
            g = store(rows, logp_rows, plan.advantages[rows])
            return (g if grads is not None else None), None

        logp, entropy, _ = head_pass(
            hidden2, weight, targets1, bias, plan.inv_tau, plan.chunk, plan.backend,
            grad_fn=grad_fn if grads is not None else None, grads=grads,
        )
        if grads is None:
            store(slice(0, n_rows), logp, plan.advantages)
    else:
        logp, entropy, lse = head_pass(hidden2, weight, targets1, bias, plan.inv_tau, plan.chunk, plan.backend)
        adv = plan.advantage_fn(logp.detach().view(plan.B, plan.T).float(), entropy.detach().view(plan.B, plan.T).float())
        adv = _check_token_tensor("advantage_fn's result", adv, plan.B, plan.T, plan.valid.view(plan.B, plan.T),
                                  allow_per_sequence=True)
        g = store(slice(0, n_rows), logp, adv.reshape(-1).to(ldt))
        if grads is not None:
            head_backward(hidden2, weight, targets1, bias, lse, entropy, g.contiguous(), None,
                          plan.inv_tau, plan.chunk, plan.backend, grads)
    loss = loss_t.sum()
    return loss, (logp, entropy, kl, clipped_low, clipped_high, adv_used), grads


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2, weight, bias, targets1, plan):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with torch.no_grad():
            loss, per_token, grads = _run(plan, hidden2, weight, bias, targets1, need)
        dx, dw, db = grads.results(weight, bias) if grads is not None else (None, None, None)
        ctx.save_for_backward(dx, dw, db)
        ctx.mark_non_differentiable(*per_token)
        return (loss,) + per_token

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        dx, dw, db = ctx.saved_tensors
        if g_loss is None:
            return None, None, None, None, None
        scale = lambda t: None if t is None else t * g_loss.to(t.dtype)  # noqa: E731
        return scale(dx), scale(dw), scale(db), None, None


def _check_token_tensor(name, t, B, T, valid, allow_per_sequence=False, device=None):
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
    if not bool(torch.isfinite(torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))).all()):
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
    advantage_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
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
        advantage_fn: ``fn(logp [B, T], entropy [B, T]) -> [B, T]`` (detached fp32 inputs), called
            after a first pass when advantages depend on the current entropies (8NDV instead of 6NDV).
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
    if advantage_fn is not None and not callable(advantage_fn):
        raise TypeError("advantage_fn must be callable or None")
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
    kl_scale = None
    if ref is not None and beta != 0.0:
        kl_scale = beta * kl_base if kl_w is None else beta * kl_base * kl_w

    plan = _Plan(
        B=B, T=T, valid=valid, advantages=adv, old_logp=old, ref_logp=ref,
        pg_scale=pg_scale.contiguous(), kl_scale=kl_scale, eps_low=eps_low, eps_high=eps_high,
        inv_tau=inv_tau, backend=backend, advantage_fn=advantage_fn,
        chunk=check_chunk_size(chunk_size, B * T, weight.shape[0], dev),
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
