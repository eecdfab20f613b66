"""STAGE (ALGORITHMS.md section 3): similarity-aware advantage/KL reweighting and the entropy reward.

Pieces, each a small function so the trainer, tests and ablations can use them alone:

* :func:`stage_policy_weights` ``w = clamp((1 - Sim) / 2, 0, 1)`` and :func:`stage_kl_weights`
  ``kl_w = a + b * clamp(Sim + 1, 0, 1)`` from the opposite-sign similarity
  (:func:`egrpo.kernels.cross_sample_similarity`).
* :func:`combine_group_rewards` sums the reward functions per sample, dropping inside each group the
  functions whose spread is zero (unbiased std <= ``tol``), and reports which groups have signal left.
* :func:`entropy_reward` ``1 / (1 + (Hbar_ref - Hbar)^2)`` and :func:`add_entropy_reward`, which adds
  ``lambda`` times it (centred over the tied top samples as in the released code, or plain as in the
  paper's Eq. 12) to the samples tied at their group's maximum reward, before group normalisation.
* :class:`STAGEObjective` (alias ``STAGE``), the ``"stage"`` objective with the interface of the ``grpo`` and ``eg_grpo``
  objectives in :mod:`egrpo.objectives` (contract C), running the loss through the fused
  :func:`egrpo.kernels.grpo_loss` with ``policy_weights=w``, ``kl_weights=kl_w`` and
  ``normalization="weighted"``. Importing this module registers it in
  :data:`egrpo.objectives.OBJECTIVES` (``build_objective("stage")`` imports it on demand).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .kernels.cross_sample_similarity import cross_sample_similarity
from .kernels.entropy_masks import METHODS
from .kernels.linear_logprob_entropy import linear_logprob_entropy
from .objectives import (
    EG_SHAPING_HPARAMS,
    HeadBatch,
    Objective,
    ObjectiveOutput,
    eg_grpo_token_advantages,
    group_advantages,
    register_objective,
    reward_weight_vector,
)

ENTROPY_REWARD_COEF = 0.4
ZERO_SPREAD_TOL = 1e-6


def _check_group_size(group_size, batch: int, what: str):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if batch % group_size != 0:
        raise ValueError(f"batch size B = {batch} ({what}'s first dim) is not divisible by group_size = {group_size}")


def _check_finite(name: str, t: torch.Tensor):
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def stage_policy_weights(sim: torch.Tensor) -> torch.Tensor:
    """Advantage weight ``clamp((1 - Sim) / 2, 0, 1)``: Sim = 1 -> 0, Sim = 0 -> 0.5, Sim = -1 -> 1."""
    return ((1.0 - sim) * 0.5).clamp(0.0, 1.0)


def stage_kl_weights(sim: torch.Tensor, a: float = 0.5, b: float = 0.5) -> torch.Tensor:
    """Per-token KL weight ``a + b * clamp(Sim + 1, 0, 1)`` (exactly ``a + b`` = 1 wherever Sim >= 0)."""
    return a + b * (sim + 1.0).clamp(0.0, 1.0)


def group_spread(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unbiased std of ``values [B, ...]`` inside each group of ``group_size`` consecutive rows -> ``[n_groups, ...]``.

    Groups of one sample have zero spread (not NaN).
    """
    grouped = values.reshape(values.shape[0] // group_size, group_size, *values.shape[1:])
    if group_size == 1:
        return torch.zeros_like(grouped[:, 0])
    return grouped.std(dim=1)


def combine_group_rewards(
    rewards: torch.Tensor,
    group_size: int,
    reward_weights: Optional[torch.Tensor] = None,
    *,
    drop_zero_spread: bool = True,
    tol: float = ZERO_SPREAD_TOL,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of reward functions per sample, STAGE style (ALGORITHMS.md 3.6).

    Args:
        rewards: ``[B]`` (one, already combined reward) or ``[B, R]`` (one column per reward function).
        reward_weights: ``[R]`` (default ones).
        drop_zero_spread: inside each group, drop the functions whose unbiased std is ``<= tol``.

    Returns:
        ``(combined [B], has_signal [n_groups] bool)``: ``has_signal`` is False for groups where
        every function was dropped (their combined reward is then 0 for every sample); always True
        when ``drop_zero_spread`` is off.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape [B] or [B, R], got {tuple(rewards.shape)}")
    _check_finite("rewards", rewards)
    _check_group_size(group_size, rewards.shape[0], "rewards")
    per_fn = rewards if rewards.dim() == 2 else rewards[:, None]
    B, R = per_fn.shape
    weights = reward_weight_vector(reward_weights, per_fn)
    n_groups = B // group_size
    if drop_zero_spread:
        keep = (group_spread(per_fn, group_size) > tol) & (weights != 0)  # [n_groups, R]
    else:
        keep = torch.ones(n_groups, R, dtype=torch.bool, device=per_fn.device)
    keep_rows = keep.repeat_interleave(group_size, dim=0)  # [B, R]
    combined = (per_fn * weights * keep_rows).sum(dim=1)
    return combined, keep.any(dim=1)


def entropy_reward(policy_entropy_mean: torch.Tensor, ref_entropy_mean: torch.Tensor) -> torch.Tensor:
    """STAGE Eq. 11: ``1 / (1 + (Hbar_ref - Hbar)^2)`` from per-sample mean raw entropies (nats)."""
    if policy_entropy_mean.shape != ref_entropy_mean.shape:
        raise ValueError(
            f"policy and reference mean entropies must have the same shape, got {tuple(policy_entropy_mean.shape)} "
            f"and {tuple(ref_entropy_mean.shape)}"
        )
    gap = ref_entropy_mean - policy_entropy_mean
    return 1.0 / (1.0 + gap * gap)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values [B, T]`` over ``mask == 1`` -> ``[B]`` (0 for rows with no valid token)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def top_reward_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` bool: the samples whose reward equals (exactly) their group's maximum; ties all count."""
    grouped = rewards.reshape(-1, group_size)
    return (grouped == grouped.max(dim=1, keepdim=True).values).reshape(-1)


def add_entropy_reward(
    rewards: torch.Tensor,
    entropy_rewards: torch.Tensor,
    group_size: int,
    *,
    coef: float = ENTROPY_REWARD_COEF,
    centered: bool = True,
) -> torch.Tensor:
    """Add the entropy reward to the samples tied at their group's maximum reward (ALGORITHMS.md 3.5).

    ``centered=True`` (released code, default): ``r_i += coef * (re_i - mean_{j in top} re_j)`` for
    ``i`` in top: reorders tied top samples, and is a no-op when one sample is alone at the top.
    ``centered=False`` (paper Eq. 12): ``r_i += coef * re_i`` for ``i`` in top.
    Returns the new ``[B]`` rewards (the input is not modified).
    """
    if rewards.shape != entropy_rewards.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and entropy_rewards must both have shape [B], got {tuple(rewards.shape)} and {tuple(entropy_rewards.shape)}"
        )
    _check_finite("rewards", rewards)
    _check_finite("entropy_rewards", entropy_rewards)
    _check_group_size(group_size, rewards.shape[0], "rewards")
    top = top_reward_mask(rewards, group_size)
    bonus = entropy_rewards.to(rewards.dtype) * top
    if centered:
        top_g = top.reshape(-1, group_size).to(rewards.dtype)
        top_mean = (bonus.reshape(-1, group_size).sum(1) / top_g.sum(1)).repeat_interleave(group_size)
        bonus = (bonus - top_mean) * top
    return rewards + coef * bonus



TOKEN_SHAPINGS = ("none", "eg")


@register_objective("stage")
class STAGEObjective(Objective):
    """The ``"stage"`` objective: GRPO with STAGE's similarity-aware advantage/KL reweighting and
    entropy reward (ALGORITHMS.md section 3); same call interface as ``grpo`` / ``eg_grpo``.

    Per micro-batch of ``B = n_groups * group_size`` images (``codes [B, T_img, C]``: the sampled
    tokens' codebook vectors, or ``[B, T_img]`` ids with the ``codebook`` passed to the call):

    1. rewards ``[B]`` or ``[B, R]`` -> :func:`combine_group_rewards` (zero-spread functions dropped per
       group when ``drop_zero_spread_rewards``);
    2. ``entropy_reward``: ``Hbar`` (policy, current weights, no grad) and ``Hbar_ref`` (from
       ``image.ref_entropy``), raw nats, means over the valid image tokens -> :func:`add_entropy_reward`
       (``entropy_reward_centered``: released code; False: paper Eq. 12);
    3. sequence advantages ``A`` by group normalisation (:func:`egrpo.objectives.group_advantages`);
    4. ``Sim`` = :func:`~egrpo.kernels.cross_sample_similarity` of the codes under ``sign(A)``,
       ``w`` = :func:`stage_policy_weights`, ``kl_w`` = :func:`stage_kl_weights`; groups left with no
       reward function (and no entropy reward) get ``w = 0`` (their KL stays); with
       ``drop_kl_for_zero_std_groups`` groups whose combined reward (before the entropy reward) has
       std <= ``zero_spread_tol`` get ``kl_w = 0``;
    5. one fused :func:`~egrpo.kernels.grpo_loss` call per head with ``policy_weights=w``,
       ``kl_weights=kl_w`` and (default) ``normalization="weighted"``:
       ``loss = -sum(surr * w * m) / (sum(w * m) + 1e-6) + beta * sum(kl_w * KL * m) / sum(m)``.

    Cost: the similarity and weights are O(B G T C), negligible next to the head. Without entropy
    reward and token shaping the image loss is one pass with gradients formed in the forward (6NDV).
    The entropy reward needs the policy's mean entropies *before* the weights exist (``A``'s signs,
    hence ``Sim``, ``w`` and ``kl_w`` depend on them, and ``grpo_loss`` fixes the weights before its
    pass, so its ``advantage_fn`` hook cannot carry them): one no-grad forward of the image head
    runs first (2NDV), 8NDV in all, the same as an ``advantage_fn`` call (first pass + recompute).

    Text tokens (optional ``text`` head; STAGE's published runs have no CoT) have no codebook
    vectors: policy weight 1 (0 in groups without signal) and KL weight 1 (0 in dropped-KL groups),
    in the same shared normalisation as the image tokens.

    Allowed combinations:

    * ``token_shaping="eg"``: EG-GRPO token advantages ``(A_i + bonus) * (1 - low)`` (ALGORITHMS.md
      2.3, per-row percentiles of ``H / ln V``; ``c1``, ``c2``, ``low_q``, ``high_q``,
      ``percentile_method``, ``shape_text``, ``shape_image``, ``include_padding_in_text_percentiles``
      as in ``eg_grpo``), then multiplied by STAGE's ``w`` and normalised by ``sum(w m)``. Sound
      because the shaping never flips a sign, so ``Sim`` (from the sequence advantages' signs) is the
      same as with per-token signs except that low-entropy tokens (advantage 0) would count as
      "opposite" there; low tokens keep their KL term as in EG-GRPO. 8NDV per shaped head (+2NDV on
      the image head with the entropy reward).
    * Not allowed: EG-GRPO's ``budget_neutral`` rescaling (its budget is defined for unweighted token
      means and has no agreed meaning under ``sum(w m)`` normalisation).
    * Ablations: ``reweight_advantages=False`` / ``reweight_kl=False`` (the paper's "w/o reweight"),
      ``entropy_reward=False`` (HPS / OCR configuration), ``drop_kl_for_zero_std_groups=True``
      (the paper's "w/o KL"), any ``normalization`` of ``grpo_loss`` (the weights still multiply the
      policy term).
    """

    HPARAMS = {
        **Objective.HPARAMS,
        "beta": 0.01,
        "normalization": "weighted",
        "kl_a": 0.5,
        "kl_b": 0.5,
        "reweight_advantages": True,
        "reweight_kl": True,
        "entropy_reward": True,
        "entropy_reward_coef": ENTROPY_REWARD_COEF,
        "entropy_reward_centered": True,
        "drop_zero_spread_rewards": True,
        "zero_spread_tol": ZERO_SPREAD_TOL,
        "drop_kl_for_zero_std_groups": False,
        "include_self_when_zero_advantage": False,
        "token_shaping": "none",
        **EG_SHAPING_HPARAMS,
    }

    def _validate(self):
        super()._validate()
        for k in ("kl_a", "kl_b", "entropy_reward_coef", "zero_spread_tol", "c1", "c2"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        for k in ("low_q", "high_q"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{k} must lie strictly inside (0, 1), got {v!r}")
        if self.low_q > self.high_q:
            raise ValueError(f"low_q ({self.low_q}) must not exceed high_q ({self.high_q})")
        for k in ("reweight_advantages", "reweight_kl", "entropy_reward", "entropy_reward_centered",
                  "drop_zero_spread_rewards", "drop_kl_for_zero_std_groups", "include_self_when_zero_advantage",
                  "shape_text", "shape_image", "include_padding_in_text_percentiles"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be a bool, got {getattr(self, k)!r}")
        if self.token_shaping not in TOKEN_SHAPINGS:
            raise ValueError(f"token_shaping must be one of {TOKEN_SHAPINGS}, got {self.token_shaping!r}")
        if self.percentile_method not in METHODS:
            raise ValueError(f"percentile_method must be one of {METHODS}, got {self.percentile_method!r}")

    # ---- pieces ----------------------------------------------------------------------------------

    def weights(self, advantages: torch.Tensor, codes, group_size: int, T: int, codebook=None):
        """``(sim, w, kl_w)``, each ``[B, T]`` fp32, from sequence advantages and the sampled codes."""
        B = advantages.shape[0]
        if self.reweight_advantages or self.reweight_kl:
            if codes is None:
                raise ValueError("codes ([B, T_img, C] codebook vectors of the sampled image tokens, or [B, T_img] "
                                 "ids with codebook=) are required by STAGE's reweighting")
            if not isinstance(codes, torch.Tensor):
                raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
            if tuple(codes.shape[:2]) != (B, T):
                raise ValueError(f"codes must have shape [B, T_img, C] = [{B}, {T}, C] (or [B, T_img] ids), "
                                 f"got {tuple(codes.shape)}")
            sim = cross_sample_similarity(
                codes, advantages.to(codes.device), group_size, codebook=codebook, backend=self.backend,
                include_self_when_zero_advantage=self.include_self_when_zero_advantage,
            )
        else:
            sim = torch.zeros(B, T, dtype=torch.float32, device=advantages.device)
        ones = torch.ones_like(sim)
        w = stage_policy_weights(sim) if self.reweight_advantages else ones
        kl_w = stage_kl_weights(sim, self.kl_a, self.kl_b) if self.reweight_kl else ones
        return sim, w, kl_w

    def policy_entropy_mean(self, image: HeadBatch) -> torch.Tensor:
        """Mean raw entropy (nats) over each row's valid image tokens under the current policy, no grad."""
        with torch.no_grad():
            _, entropy = linear_logprob_entropy(
                image.hidden.detach(), image.weight.detach(), image.targets,
                None if image.bias is None else image.bias.detach(), image.temperature,
                backend=self.backend, chunk_size=self.chunk_size,
            )
        return masked_mean(entropy.double(), image.mask)

    def stage_rewards(self, rewards, group_size, image: HeadBatch, reward_weights=None):
        """``(final [B], has_signal [n_groups], zero_std [n_groups], metrics)``: steps 1-2 above."""
        B, T = image.targets.shape
        if not isinstance(rewards, torch.Tensor):
            raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
        if rewards.dim() not in (1, 2) or rewards.shape[0] != B:
            raise ValueError(f"rewards must have shape [B] or [B, R] with B = {B} (the image batch), got {tuple(rewards.shape)}")
        if not rewards.is_floating_point():
            rewards = rewards.float()
        rewards = rewards.detach().to(image.hidden.device)
        combined, has_signal = combine_group_rewards(
            rewards, group_size, reward_weights, drop_zero_spread=self.drop_zero_spread_rewards, tol=self.zero_spread_tol
        )
        zero_std = group_spread(combined, group_size) <= self.zero_spread_tol
        metrics = {"reward/raw_mean": combined.float().mean()}
        if not self.entropy_reward:
            return combined, has_signal, zero_std, metrics
        ref = image.ref_entropy
        if ref is None:
            raise ValueError("image.ref_entropy ([B, T] reference entropies in nats) is required by the entropy "
                             "reward (entropy_reward=True)")
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != (B, T):
            raise ValueError(f"image.ref_entropy must have shape [B, T] = [{B}, {T}], got {tuple(getattr(ref, 'shape', ()))}")
        _check_finite("image.ref_entropy", ref)
        hbar = self.policy_entropy_mean(image)
        hbar_ref = masked_mean(ref.detach().double(), image.mask)
        re = entropy_reward(hbar, hbar_ref)
        final = add_entropy_reward(
            combined.double(), re, group_size, coef=self.entropy_reward_coef, centered=self.entropy_reward_centered
        )
        metrics.update({
            "entropy/image_policy_mean_nograd": hbar.mean(),
            "entropy/image_ref_mean": hbar_ref.mean(),
            "reward/entropy_reward_mean": re.mean(),
            "reward/entropy_top_frac": top_reward_mask(combined, group_size).float().mean(),
        })
        return final, has_signal, zero_std, metrics

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None, codebook=None) -> ObjectiveOutput:
        parts = self.parts(image, text)
        B, T = image.targets.shape
        _check_group_size(group_size, B, "rewards")
        dev = image.hidden.device
        final, has_signal, zero_std, extra = self.stage_rewards(rewards, group_size, image, reward_weights)
        adv = group_advantages(final, group_size, eps=self.adv_eps, scale=self.scale_rewards)
        sim, w, kl_w = self.weights(adv, codes, group_size, T, codebook=codebook)

        row_policy = (has_signal | self.entropy_reward).repeat_interleave(group_size).to(w.dtype)[:, None]
        row_kl = torch.ones_like(row_policy)
        if self.drop_kl_for_zero_std_groups:
            row_kl = (~zero_std).repeat_interleave(group_size).to(w.dtype)[:, None]
        policy_weights, kl_weights = {}, {}
        for name, batch in parts:
            if name == "image":
                policy_weights[name], kl_weights[name] = w * row_policy, kl_w * row_kl
            else:
                shape = batch.mask.shape
                policy_weights[name], kl_weights[name] = row_policy.expand(shape), row_kl.expand(shape)
        den, kl_den = self.shared_denominators(parts, policy_weights)

        masks_seen = {}
        results = {}
        for name, batch in parts:
            kw = dict(policy_weights=policy_weights[name], kl_weights=kl_weights[name])
            shaped = self.token_shaping == "eg" and (self.shape_text if name == "text" else self.shape_image)
            if shaped:
                kw["advantage_fn"] = self._eg_fn(name, batch, adv, masks_seen)
            else:
                kw["advantages"] = adv.to(batch.hidden.device)
            results[name] = self.run_head(batch, den, kl_den, **kw)
        loss = sum(results[n].loss for n, _ in parts)

        metrics = self.base_metrics(final, adv, loss, results, parts)
        m = image.mask.to(torch.float32)
        n = m.sum().clamp(min=1.0)
        metrics.update(extra)
        metrics.update({
            "stage/sim_mean_image": (sim * m).sum() / n,
            "stage/w_mean_image": (policy_weights["image"] * m).sum() / n,
            "stage/kl_w_mean_image": (kl_weights["image"] * m).sum() / n,
            "stage/groups_without_signal_frac": (~has_signal).float().mean(),
            "stage/zero_std_groups_frac": zero_std.float().mean(),
        })
        metrics.update(self.mask_metrics(parts, masks_seen))
        return self.finish(loss, metrics, adv)

    def _eg_fn(self, name, batch, adv, masks_seen):
        def fn(_logp, entropy):
            a_tok, low, high = eg_grpo_token_advantages(
                adv.to(entropy.device), entropy, batch.mask, batch.weight.shape[0], low_q=self.low_q,
                high_q=self.high_q, c1=self.c1, c2=self.c2, method=self.percentile_method,
                include_invalid=(name == "text" and self.include_padding_in_text_percentiles), backend=self.backend,
            )
            masks_seen[name] = (low, high)
            return a_tok

        return fn


STAGE = STAGEObjective
