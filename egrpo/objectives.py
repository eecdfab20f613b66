"""Training objectives: GRPO baseline and EG-GRPO (STAGE registers itself from ``egrpo.stage``).

An objective turns one micro-batch (rewards of ``B = n_groups * group_size`` samples plus the
hidden states of their image tokens and, optionally, their text chain-of-thought tokens) into a
scalar loss. Every head's tokens go through ONE :func:`egrpo.kernels.grpo_loss` call, and all
heads share one normalisation (ALGORITHMS.md 1): the denominators (token count, per-sequence
counts, Dr. GRPO constant, or weight sum) are computed over the text and image tokens together
and handed to each call, so ``loss = loss_text + loss_image`` is exactly the loss over the
concatenated tokens.

GRPO and EG-GRPO differ only in the token advantages:

* GRPO: ``A[i, t] = A_i`` (group-normalised reward, broadcast over tokens).
* EG-GRPO (released-code semantics, ALGORITHMS.md 2): per part (text, image), ``Hn = H / ln V_part``
  (detached), per-row percentile masks over the valid tokens (strict ``H < q_low``, ``H > q_high``),
  ``A[i, t] = (A_i + min(c1 |A_i|, c2 Hn) * high) * (1 - low)``; the KL term stays on every token.
  Because the masks need the current entropies of the whole row, each shaped part runs as one
  ``grpo_loss(advantage_fn=...)`` call (8NDV: a streaming pass, then a pass that recomputes the
  logits to form gradients); unshaped parts run in one pass (6NDV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .kernels.entropy_masks import METHODS, entropy_masks
from .kernels.grpo_loss import NORMALIZATIONS, WEIGHTED_EPS, GRPOLossOutput, grpo_loss
from .kernels.linear_logprob_entropy import linear_logprob_entropy

REWARD_SCALES = ("group", "batch", "none")


@dataclass
class HeadBatch:
    """One head's tokens for a micro-batch of ``B = n_groups * group_size`` samples."""

    hidden: torch.Tensor                        # [B, T, D], requires grad (policy)
    weight: torch.Tensor                        # [V, D] head weight
    bias: Optional[torch.Tensor]                # [V] or None
    targets: torch.Tensor                       # int64 [B, T] sampled ids
    mask: torch.Tensor                          # [B, T] 1 = valid
    ref_logp: Optional[torch.Tensor] = None     # [B, T] reference log-probs (no grad)
    old_logp: Optional[torch.Tensor] = None     # [B, T] sampling-policy log-probs; None = on-policy
    ref_entropy: Optional[torch.Tensor] = None  # [B, T] reference entropies (raw nats), for STAGE
    temperature: float = 1.0


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                               # scalar, differentiable
    metrics: Dict[str, float] = field(default_factory=dict)
    advantages: Optional[torch.Tensor] = None        # [B] sequence advantages (detached)


OBJECTIVES: Dict[str, type] = {}


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_objective("stage")`` adds the class to :data:`OBJECTIVES`."""

    def deco(cls):
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def build_objective(name: str, **hparams) -> "Objective":
    """Instantiate a registered objective; ``ValueError`` on an unknown name or hyper-parameter."""
    if name not in OBJECTIVES:
        try:  # STAGE lives in its own module and registers itself on import.
            import egrpo.stage  # noqa: F401
        except ImportError:
            pass
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**hparams)


# --------------------------------------------------------------------------------------------
# Rewards -> sequence advantages
# --------------------------------------------------------------------------------------------

def reward_weight_vector(reward_weights, per_function: torch.Tensor) -> torch.Tensor:
    """The ``[R]`` weights for ``per_function [B, R]`` rewards (default ones), checked for shape and finiteness."""
    R = per_function.shape[1]
    if reward_weights is None:
        return torch.ones(R, dtype=per_function.dtype, device=per_function.device)
    w = torch.as_tensor(reward_weights, dtype=per_function.dtype, device=per_function.device)
    if tuple(w.shape) != (R,):
        raise ValueError(f"reward_weights must have shape [R] = [{R}] (one per reward column), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("reward_weights contain NaN/inf")
    return w


def combine_rewards(rewards: torch.Tensor, reward_weights=None) -> torch.Tensor:
    """``[B]`` rewards, or ``[B, R]`` per reward function summed with ``reward_weights [R]`` (default ones)."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.dim() == 1:
        if reward_weights is not None:
            raise ValueError("reward_weights needs per-function rewards of shape [B, R]")
        combined = rewards
    elif rewards.dim() == 2:
        combined = rewards @ reward_weight_vector(reward_weights, rewards)
    else:
        raise ValueError(f"rewards must have shape [B] or [B, R], got {tuple(rewards.shape)}")
    if not bool(torch.isfinite(combined).all()):
        raise ValueError("rewards contain NaN/inf")
    return combined.detach()


def _check_group_size(group_size, B):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if B % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of samples B ({B})")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages of ``rewards [B]``; groups are ``group_size`` consecutive rows.

    ``scale="group"``: ``(r - mean_g) / (std_g + eps)`` (T2I-R1 / EG-GRPO; std unbiased);
    ``"batch"``: ``(r - mean_g) / (std_batch + eps)``; ``"none"``: ``r - mean_g`` (Dr. GRPO).
    A group whose rewards are all equal gets advantage 0.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a [B] tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    B = rewards.shape[0]
    _check_group_size(group_size, B)
    r = rewards.detach().float() if rewards.dtype != torch.float64 else rewards.detach()
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN/inf")
    groups = r.view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).reshape(B)
    if scale == "none":
        return centred
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (the unbiased std of one sample is undefined)")
        std = groups.std(1, keepdim=True).expand_as(groups).reshape(B)
    else:
        if B < 2:
            raise ValueError("scale='batch' needs at least 2 samples")
        std = r.std()
    return centred / (std + eps)


def eg_grpo_token_advantages(
    seq_advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: int,
    *,
    low_q: float = 0.2,
    high_q: float = 0.5,
    c1: float = 0.3,
    c2: float = 0.3,
    method: str = "index",
    include_invalid: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EG-GRPO token advantages of one part (ALGORITHMS.md 2.1-2.3).

    ``entropy [B, T]`` is raw (nats) and is normalised here by ``ln(vocab_size)``; thresholds are
    per row over the valid tokens (all positions with ``include_invalid``, the released text-CoT
    behaviour). Returns ``(A_tok [B, T], low, high)``; ``A_tok / A_i`` lies in ``[1 - c1, 1 + c1]``
    on high tokens (the bonus is capped at ``c1 |A_i|`` and never flips the sign) and is 0 on low ones.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2 (entropy is normalised by ln V), got {vocab_size!r}")
    hn = entropy.detach() / math.log(vocab_size)
    low, high = entropy_masks(hn, mask, low_q, high_q, scope="sequence", method=method,
                              include_invalid=include_invalid, backend=backend)
    a = seq_advantages.detach().to(hn.dtype)[:, None]
    bonus = torch.minimum(c1 * a.abs(), c2 * hn) * high
    return (a + bonus) * (~low), low, high


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------

def _is_number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))


class Objective:
    """Base class: hyper-parameters are constructor kwargs listed (with defaults) in ``HPARAMS``."""

    name = "base"
    HPARAMS: Dict[str, object] = {
        "beta": 0.01,                 # KL coefficient
        "eps_low": 0.2,               # clip range [1 - eps_low, 1 + eps_high] (active with old_logp)
        "eps_high": 0.2,
        "normalization": "token_mean",  # token_mean | sequence_mean | constant | weighted
        "constant_normalizer": None,  # Dr. GRPO denominator (default B * total tokens per sample)
        "scale_rewards": "group",     # group | batch | none
        "adv_eps": 1e-4,              # (r - mean) / (std + adv_eps)
        "backend": "auto",
        "chunk_size": None,
    }

    def __init__(self, **hparams):
        unknown = sorted(set(hparams) - set(self.HPARAMS))
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) for objective {self.name!r}: {unknown}; "
                             f"known: {sorted(self.HPARAMS)}")
        self.hparams = {**self.HPARAMS, **hparams}
        for k, v in self.hparams.items():
            setattr(self, k, v)
        self._validate()

    def _validate(self):
        for k in ("beta", "eps_low", "eps_high", "adv_eps"):
            v = getattr(self, k)
            if not _is_number(v) or v < 0:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.scale_rewards not in REWARD_SCALES:
            raise ValueError(f"scale_rewards must be one of {REWARD_SCALES}, got {self.scale_rewards!r}")
        cn = self.constant_normalizer
        if cn is not None and (not _is_number(cn) or cn <= 0):
            raise ValueError(f"constant_normalizer must be a positive number or None, got {cn!r}")

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams.items())})"

    # ---- pieces shared by the objectives (STAGE builds on these) --------------------------------

    @staticmethod
    def parts(image: HeadBatch, text: Optional[HeadBatch] = None) -> List[Tuple[str, HeadBatch]]:
        """``[("text", text), ("image", image)]`` (text first when given), after consistency checks."""
        out = []
        for name, batch in (("text", text), ("image", image)):
            if batch is None:
                if name == "image":
                    raise ValueError("image must be a HeadBatch")
                continue
            if not isinstance(batch, HeadBatch):
                raise TypeError(f"{name} must be a HeadBatch, got {type(batch).__name__}")
            if not isinstance(batch.hidden, torch.Tensor) or batch.hidden.dim() != 3:
                raise ValueError(f"{name}.hidden must have shape [B, T, D]")
            out.append((name, batch))
        if len({b.hidden.shape[0] for _, b in out}) > 1:
            raise ValueError("text and image batches must hold the same B samples: "
                             f"{[(n, b.hidden.shape[0]) for n, b in out]}")
        return out

    def sequence_advantages(self, rewards, group_size, reward_weights=None, B=None):
        r = combine_rewards(rewards, reward_weights)
        if B is not None and r.shape[0] != B:
            raise ValueError(f"rewards has {r.shape[0]} samples but the head batches have B = {B}")
        return r, group_advantages(r, group_size, eps=self.adv_eps, scale=self.scale_rewards)

    def shared_denominators(self, parts, policy_weights: Optional[Dict[str, torch.Tensor]] = None):
        """``(normalizer, kl_normalizer)`` over the tokens of all parts together (ALGORITHMS.md 1)."""
        masks = [b.mask.to(torch.float32) for _, b in parts]
        B = masks[0].shape[0]
        if self.normalization == "token_mean":
            den = sum(m.sum() for m in masks).clamp(min=1.0)
            return den, den
        if self.normalization == "sequence_mean":
            den = sum(m.sum(1) for m in masks).clamp(min=1.0)
            return den, den
        if self.normalization == "constant":
            den = self.constant_normalizer or B * sum(m.shape[1] for m in masks)
            return float(den), float(den)
        weights = policy_weights or {}
        pol = sum((m * weights[n].to(m.dtype)).sum() if n in weights else m.sum()
                  for m, (n, _) in zip(masks, parts))
        return pol + WEIGHTED_EPS, sum(m.sum() for m in masks).clamp(min=1.0)

    def run_head(self, batch: HeadBatch, normalizer, kl_normalizer, **kw) -> GRPOLossOutput:
        return grpo_loss(
            batch.hidden, batch.weight, batch.targets, batch.mask, kw.pop("advantages", None), batch.bias,
            old_logp=batch.old_logp, ref_logp=batch.ref_logp, beta=self.beta if batch.ref_logp is not None else 0.0,
            normalization=self.normalization, normalizer=normalizer, kl_normalizer=kl_normalizer,
            eps_low=self.eps_low, eps_high=self.eps_high, temperature=batch.temperature,
            backend=self.backend, chunk_size=self.chunk_size, **kw,
        )

    @staticmethod
    def base_metrics(rewards, advantages, loss, results: Dict[str, GRPOLossOutput], parts) -> Dict[str, torch.Tensor]:
        """Scalar tensors (converted to floats with one sync by :meth:`finish`)."""
        metrics = {
            "loss": loss.detach(),
            "reward/mean": rewards.float().mean(),
            "reward/std": rewards.float().std() if rewards.numel() > 1 else torch.zeros(()),
            "adv/mean": advantages.float().mean(),
            "adv/abs_mean": advantages.float().abs().mean(),
        }
        n_total, low, high = 0.0, 0.0, 0.0
        for name, batch in parts:
            out = results[name]
            m = batch.mask.to(torch.float32)
            n = m.sum().clamp(min=1.0)
            metrics[f"kl/{name}"] = (out.kl * m).sum() / n
            metrics[f"entropy/{name}_mean"] = (out.entropy.float() * m).sum() / n
            metrics[f"logp/{name}_mean"] = (out.logp.float() * m).sum() / n
            metrics[f"adv/token_mean_{name}"] = (out.advantages.float() * m).sum() / n
            n_total = n_total + m.sum()
            low = low + out.clipped_low.sum()
            high = high + out.clipped_high.sum()
        n_total = torch.as_tensor(n_total).clamp(min=1.0)
        if "image" in results and rewards.dim() == 1 and rewards.numel() > 2:
            # the paper's entropy-reward coupling (EG-GRPO findings 1-3), watched during training
            from egrpo.tools.stats import entropy_reward_correlations

            text_out, text_batch = results.get("text"), dict(parts).get("text")
            metrics.update(entropy_reward_correlations(
                rewards, results["image"].entropy,
                None if text_out is None else text_out.entropy,
                None if text_batch is None else text_batch.mask))
        metrics["clip/frac_low"] = low / n_total
        metrics["clip/frac_high"] = high / n_total
        return metrics

    @staticmethod
    def mask_metrics(parts, masks_seen) -> Dict[str, torch.Tensor]:
        """Fractions of valid tokens in the low / high entropy masks of each shaped part."""
        out = {}
        for name, batch in parts:
            if name in masks_seen:
                low, high = masks_seen[name]
                n = batch.mask.float().sum().clamp(min=1.0)
                out[f"mask/high_frac_{name}"] = high.float().sum() / n
                out[f"mask/low_frac_{name}"] = low.float().sum() / n
        return out

    @staticmethod
    def finish(loss, metrics: Dict[str, torch.Tensor], advantages) -> ObjectiveOutput:
        keys = list(metrics)
        values = torch.stack([torch.as_tensor(metrics[k]).detach().float().reshape(()).cpu() for k in keys]).tolist()
        return ObjectiveOutput(loss=loss, metrics=dict(zip(keys, values)), advantages=advantages.detach())

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None) -> ObjectiveOutput:
        raise NotImplementedError


@register_objective("grpo")
class GRPOObjective(Objective):
    """GRPO as in T2I-R1 (ALGORITHMS.md 1): every token of sample i gets advantage ``A_i``."""

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None) -> ObjectiveOutput:
        parts = self.parts(image, text)
        B = image.hidden.shape[0]
        r, adv = self.sequence_advantages(rewards, group_size, reward_weights, B)
        den, kl_den = self.shared_denominators(parts)
        results = {name: self.run_head(batch, den, kl_den, advantages=adv.to(batch.hidden.device))
                   for name, batch in parts}
        loss = sum(out.loss for out in results.values())
        return self.finish(loss, self.base_metrics(r, adv, loss, results, parts), adv)


# EG-GRPO token-shaping hyper-parameters (ALGORITHMS.md 2), shared with STAGE's token_shaping="eg".
EG_SHAPING_HPARAMS: Dict[str, object] = {
    "c1": 0.3,                # bonus cap, fraction of |A|
    "c2": 0.3,                # bonus slope on normalised entropy
    "low_q": 0.2,             # low-entropy percentile (tokens below: advantage zeroed)
    "high_q": 0.5,            # high-entropy percentile (tokens above: bonus)
    "percentile_method": "index",
    "shape_text": True,
    "shape_image": True,
    "include_padding_in_text_percentiles": False,
}


@register_objective("eg_grpo")
class EGGRPOObjective(Objective):
    """EG-GRPO (ALGORITHMS.md 2), released-code semantics by default.

    Hyper-parameters beyond GRPO's: ``c1``, ``c2`` (bonus caps, 0.3), ``low_q``, ``high_q``
    (percentiles, 0.2 / 0.5), ``percentile_method`` ("index" = released ``sorted[floor(q n)]``,
    "linear" = ``torch.quantile``), ``shape_text`` / ``shape_image`` (which parts get shaped
    advantages; an unshaped part uses plain GRPO advantages), ``include_padding_in_text_percentiles``
    (reproduce the released defect where post-EOS padding takes part in the text percentiles),
    ``budget_neutral`` and ``kappa``.

    ``budget_neutral`` is the project's reading of the paper's Proposition 1 ("per-batch budget
    balance"); the released code has no such calibration. When on, all token advantages of the
    micro-batch (both parts) are multiplied by one scalar ``s`` so that
    ``sum m |A_EG| = kappa * sum m |A_GRPO|`` (``s = 1`` when ``sum m |A_EG| = 0``). The policy term is
    linear in the advantages and a positive scale keeps every clipping decision, so only the KL
    term is left unscaled. To keep one loss call per head, shaped parts other than the image first
    get their entropies from a forward-only pass (2NDV; their loss call then needs no recompute,
    so the cost stays 8NDV per shaped part), and the image call's ``advantage_fn`` computes ``s``.
    """

    HPARAMS = {
        **Objective.HPARAMS,
        **EG_SHAPING_HPARAMS,
        "budget_neutral": False,
        "kappa": 1.0,
    }

    def _validate(self):
        super()._validate()
        for k in ("c1", "c2"):
            v = getattr(self, k)
            if not _is_number(v) or v < 0:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        for k in ("low_q", "high_q"):
            v = getattr(self, k)
            if not _is_number(v) or not 0 < v < 1:
                raise ValueError(f"{k} must lie strictly inside (0, 1), got {v!r}")
        if self.low_q > self.high_q:
            raise ValueError(f"low_q ({self.low_q}) must not exceed high_q ({self.high_q})")
        if self.percentile_method not in METHODS:
            raise ValueError(f"percentile_method must be one of {METHODS}, got {self.percentile_method!r}")
        for k in ("shape_text", "shape_image", "include_padding_in_text_percentiles", "budget_neutral"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be a bool, got {getattr(self, k)!r}")
        if not _is_number(self.kappa) or self.kappa <= 0:
            raise ValueError(f"kappa must be a finite number > 0, got {self.kappa!r}")

    def shapes(self, part: str) -> bool:
        return self.shape_text if part == "text" else self.shape_image

    def token_advantages(self, part: str, batch: HeadBatch, adv: torch.Tensor, entropy: torch.Tensor):
        """``(A_tok, low, high)`` of one shaped part from its raw entropies ``[B, T]``."""
        return eg_grpo_token_advantages(
            adv, entropy, batch.mask, batch.weight.shape[0], low_q=self.low_q, high_q=self.high_q,
            c1=self.c1, c2=self.c2, method=self.percentile_method,
            include_invalid=(part == "text" and self.include_padding_in_text_percentiles),
            backend=self.backend,
        )

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None) -> ObjectiveOutput:
        parts = self.parts(image, text)
        B = image.hidden.shape[0]
        r, adv = self.sequence_advantages(rewards, group_size, reward_weights, B)
        den, kl_den = self.shared_denominators(parts)
        masks_seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        results: Dict[str, GRPOLossOutput] = {}
        extra: Dict[str, torch.Tensor] = {}

        def shaped_fn(name, batch, scale_fn=None):
            def fn(_logp, entropy):
                a_tok, low, high = self.token_advantages(name, batch, adv.to(entropy.device), entropy)
                masks_seen[name] = (low, high)
                return a_tok if scale_fn is None else scale_fn(a_tok)
            return fn

        if not self.budget_neutral:
            for name, batch in parts:
                if self.shapes(name):
                    results[name] = self.run_head(batch, den, kl_den, advantage_fn=shaped_fn(name, batch))
                else:
                    results[name] = self.run_head(batch, den, kl_den, advantages=adv.to(batch.hidden.device))
        else:
            shaped = [(n, b) for n, b in parts if self.shapes(n)]
            pivot = shaped[-1] if shaped else None
            fixed: Dict[str, torch.Tensor] = {}
            for name, batch in parts:
                if pivot is not None and name == pivot[0]:
                    continue
                if self.shapes(name):
                    with torch.no_grad():
                        _, entropy = linear_logprob_entropy(
                            batch.hidden.detach(), batch.weight.detach(), batch.targets,
                            None if batch.bias is None else batch.bias.detach(), batch.temperature,
                            backend=self.backend, chunk_size=self.chunk_size)
                    a_tok, low, high = self.token_advantages(name, batch, adv.to(entropy.device), entropy.float())
                    masks_seen[name] = (low, high)
                    fixed[name] = a_tok
                else:
                    fixed[name] = adv.to(batch.hidden.device)[:, None].expand(batch.mask.shape).float()
            grpo_budget = sum((batch.mask.float() * adv.to(batch.hidden.device).abs()[:, None]).sum()
                              for _, batch in parts)
            fixed_budget = sum((dict(parts)[n].mask.float() * a.abs()).sum() for n, a in fixed.items())
            scale_box: Dict[str, torch.Tensor] = {}

            def budget_scale(eg_budget):
                s = torch.where(eg_budget > 0, self.kappa * grpo_budget / eg_budget.clamp(min=1e-30),
                                torch.ones_like(eg_budget))
                scale_box["s"] = s
                return s

            if pivot is not None:
                p_name, p_batch = pivot
                p_mask = p_batch.mask.float()

                def scale_pivot(a_tok):
                    return a_tok * budget_scale(fixed_budget + (p_mask * a_tok.abs()).sum())

                results[p_name] = self.run_head(p_batch, den, kl_den, advantage_fn=shaped_fn(p_name, p_batch, scale_pivot))
            else:
                budget_scale(torch.as_tensor(fixed_budget, dtype=torch.float32))
            for name, batch in parts:
                if name in fixed:
                    results[name] = self.run_head(batch, den, kl_den, advantages=fixed[name] * scale_box["s"])
            extra["budget/scale"] = scale_box["s"]

        loss = sum(results[n].loss for n, _ in parts)
        metrics = self.base_metrics(r, adv, loss, results, parts)
        metrics.update(self.mask_metrics(parts, masks_seen))
        metrics.update(extra)
        return self.finish(loss, metrics, adv)

