"""STAGE, released-code semantics: similarity-aware advantage/KL reweighting and the entropy reward
(docs/algorithms.md, "STAGE").

Pieces, each a small function so the trainer, tests and ablations can use them alone:

* :func:`stage_policy_weights` ``w = clamp((1 - Sim) / 2, 0, 1)`` and :func:`stage_kl_weights`
  ``kl_w = a + b * clamp(Sim + 1, 0, 1)`` from the opposite-sign similarity
  (:func:`egrpo.kernels.cross_sample_similarity`).
* :func:`~egrpo.objectives.advantages.combine_group_rewards` sums the reward functions per sample, dropping inside
  each group the functions whose spread is zero, and reports which groups have signal left.
* :func:`entropy_reward` ``1 / (1 + (Hbar_ref - Hbar)^2)`` and :func:`add_entropy_reward`, which adds
  ``lambda`` times it (centred over the tied top samples as in the released code, or plain as in the
  paper's Eq. 12) to the samples tied at their group's maximum reward, before group normalisation.
* :class:`STAGEObjective` (alias ``STAGE``), the ``"stage"`` objective, running the loss through one head call
  per part with ``policy_weights=w``, ``kl_weights=kl_w`` and ``normalization="weighted"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.cross_sample_similarity import cross_sample_similarity
from ..kernels.grpo_loss import NORMALIZATIONS
from .advantages import (ZERO_SPREAD_TOL, check_finite, check_group_size, combine_group_rewards, group_advantages,
                         group_spread)
from .base import OURS, PAPER, RELEASED, HeadBatch, Needs, Objective, ObjectiveOutput, setting
from .eg_grpo import EntropyShapingSettings, shaping_fn
from .metrics import base_metrics, mask_metrics, masked_row_mean

ENTROPY_REWARD_COEF = 0.4
TOKEN_SHAPINGS = ("none", "eg")

masked_mean = masked_row_mean


def stage_policy_weights(sim: torch.Tensor) -> torch.Tensor:
    """Advantage weight ``clamp((1 - Sim) / 2, 0, 1)``: Sim = 1 -> 0, Sim = 0 -> 0.5, Sim = -1 -> 1."""
    return ((1.0 - sim) * 0.5).clamp(0.0, 1.0)


def stage_kl_weights(sim: torch.Tensor, a: float = 0.5, b: float = 0.5) -> torch.Tensor:
    """Per-token KL weight ``a + b * clamp(Sim + 1, 0, 1)`` (exactly ``a + b`` = 1 wherever Sim >= 0)."""
    return a + b * (sim + 1.0).clamp(0.0, 1.0)


def entropy_reward(policy_entropy_mean: torch.Tensor, ref_entropy_mean: torch.Tensor) -> torch.Tensor:
    """STAGE Eq. 11: ``1 / (1 + (Hbar_ref - Hbar)^2)`` from per-sample mean raw entropies (nats)."""
    if policy_entropy_mean.shape != ref_entropy_mean.shape:
        raise ValueError(
            f"policy and reference mean entropies must have the same shape, got {tuple(policy_entropy_mean.shape)} "
            f"and {tuple(ref_entropy_mean.shape)}"
        )
    gap = ref_entropy_mean - policy_entropy_mean
    return 1.0 / (1.0 + gap * gap)


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
    """Add the entropy reward to the samples tied at their group's maximum reward.

    ``centered=True`` (released code, default): ``r_i += coef * (re_i - mean_{j in top} re_j)`` for
    ``i`` in top: reorders tied top samples, and is a no-op when one sample is alone at the top.
    ``centered=False`` (paper Eq. 12): ``r_i += coef * re_i`` for ``i`` in top.
    Returns the new ``[B]`` rewards (the input is not modified).
    """
    if rewards.shape != entropy_rewards.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and entropy_rewards must both have shape [B], got {tuple(rewards.shape)} and {tuple(entropy_rewards.shape)}"
        )
    check_finite("rewards", rewards)
    check_finite("entropy_rewards", entropy_rewards)
    check_group_size(group_size, rewards.shape[0], "rewards")
    top = top_reward_mask(rewards, group_size)
    bonus = entropy_rewards.to(rewards.dtype) * top
    if centered:
        top_g = top.reshape(-1, group_size).to(rewards.dtype)
        top_mean = (bonus.reshape(-1, group_size).sum(1) / top_g.sum(1)).repeat_interleave(group_size)
        bonus = (bonus - top_mean) * top
    return rewards + coef * bonus


@dataclass
class STAGESettings(EntropyShapingSettings):
    """STAGE's settings; the EG-GRPO shaping fields apply only with ``token_shaping="eg"``."""

    normalization: str = setting("weighted", "as for GRPO; STAGE's policy term is a w-weighted mean "
                                 "(sum of w over valid tokens), its KL term a token mean", RELEASED,
                                 choices=NORMALIZATIONS)
    kl_a: float = setting(0.5, "KL weight a + b clamp(Sim + 1, 0, 1): the floor a", PAPER, "nonneg")
    kl_b: float = setting(0.5, "KL weight: the slope b", PAPER, "nonneg")
    reweight_advantages: bool = setting(True, "policy weight w = clamp((1 - Sim) / 2, 0, 1); false = the paper's "
                                        "'w/o reweight' ablation (w = 1)", RELEASED, "bool")
    reweight_kl: bool = setting(True, "per-token KL weight from Sim; false = KL weight 1", RELEASED, "bool")
    entropy_reward: bool = setting(True, "add the entropy reward to each group's top samples (the released GenEval "
                                   "runs; off for the HPS and OCR runs)", RELEASED, "bool")
    entropy_reward_coef: float = setting(ENTROPY_REWARD_COEF, "lambda, the entropy reward's coefficient", RELEASED,
                                         "nonneg")
    entropy_reward_centered: bool = setting(True, "centre the entropy reward over the tied top samples (released); "
                                            "false = the paper's Eq. 12", RELEASED, "bool")
    drop_zero_spread_rewards: bool = setting(True, "inside a group, drop reward functions whose std <= "
                                             "zero_spread_tol; a group with none left (and no entropy reward) gets "
                                             "policy weight 0 and KL weight a + b (Sim := 1)", RELEASED, "bool")
    zero_spread_tol: float = setting(ZERO_SPREAD_TOL, "spread at or below which a reward function is constant",
                                     RELEASED, "nonneg")
    drop_kl_for_zero_std_groups: bool = setting(False, "KL weight 0 in groups whose combined reward has zero spread "
                                                "(the paper's 'w/o KL' ablation; the released code keeps the KL)", RELEASED, "bool")
    include_self_when_zero_advantage: bool = setting(
        False, "true reproduces the released similarity, which keeps j = i (cosine 0) in the denominator when "
        "A_i = 0", OURS, "bool")
    def check_combination(self) -> None:
        super().check_combination()
        if self.reward_aggregation != "sum":
            raise ValueError("reward_aggregation must be 'sum' for STAGE (it combines reward functions per group "
                             "itself, dropping the constant ones)")

    token_shaping: str = setting("none", "none, or eg: EG-GRPO token advantages (c1, c2, low_q, high_q, ...) times "
                                 "STAGE's w", OURS, choices=TOKEN_SHAPINGS)


class STAGEObjective(Objective):
    """The ``"stage"`` objective: GRPO with STAGE's similarity-aware advantage/KL reweighting and entropy reward.

    Per micro-batch of ``B = n_groups * group_size`` images (``codes [B, T_img, C]``: the sampled tokens'
    codebook vectors, or ``[B, T_img]`` ids with the ``codebook`` passed to the call):

    1. rewards ``[B]`` or ``[B, R]`` -> :func:`combine_group_rewards` (zero-spread functions dropped per group);
    2. entropy reward: ``Hbar`` (policy, current weights, no grad) and ``Hbar_ref`` (from ``image.ref_entropy``),
       raw nats, means over the valid image tokens -> :func:`add_entropy_reward`;
    3. sequence advantages ``A`` by group normalisation;
    4. ``Sim`` of the codes under ``sign(A)``, ``w`` = :func:`stage_policy_weights`, ``kl_w`` =
       :func:`stage_kl_weights`; in groups left with no reward function (and no entropy reward) the released
       trainer sets ``Sim := 1``: policy weight 0 and KL weight exactly ``a + b`` (= 1);
       ``drop_kl_for_zero_std_groups`` sets ``kl_w = 0`` where the combined reward has zero spread;
    5. one head call per part with ``policy_weights=w``, ``kl_weights=kl_w`` and (default) ``"weighted"``:
       ``loss = -sum(surr * w * m) / (sum(w * m) + 1e-6) + beta * sum(kl_w * KL * m) / sum(m)``.

    Cost: the similarity and weights are O(B G T C). The entropy reward needs the policy's mean entropies
    before the weights exist, so one no-grad pass of the image head runs first (2NDV).
    Text tokens (optional; STAGE's published runs have no CoT) have no codebook vectors: policy weight 1 (0 in
    groups without signal) and KL weight 1 (0 in dropped-KL groups), in the same shared normalisation.
    ``token_shaping="eg"`` multiplies EG-GRPO's token advantages by ``w`` (sound because the shaping never flips
    a sign, so Sim, computed from the sequence advantages' signs, is unchanged).
    """

    name = "stage"
    Settings = STAGESettings

    @property
    def needs(self) -> Needs:
        s = self.settings
        return dataclasses.replace(super().needs, reference_entropy=s.entropy_reward,
                                   codebook_vectors=s.reweight_advantages or s.reweight_kl)

    # ---- pieces ----------------------------------------------------------------------------------

    def weights(self, advantages: torch.Tensor, codes, group_size: int, T: int, codebook=None,
                no_signal: Optional[torch.Tensor] = None):
        """``(sim, w, kl_w)``, each ``[B, T]`` fp32, from sequence advantages and the sampled codes.

        ``no_signal [n_groups]`` (bool): groups with no reward signal, where Sim := 1 as in the released trainer.
        """
        s = self.settings
        B = advantages.shape[0]
        if s.reweight_advantages or s.reweight_kl:
            if codes is None:
                raise ValueError("codes ([B, T_img, C] codebook vectors of the sampled image tokens, or [B, T_img] "
                                 "ids with codebook=) are required by STAGE's reweighting")
            if not isinstance(codes, torch.Tensor):
                raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
            if tuple(codes.shape[:2]) != (B, T):
                raise ValueError(f"codes must have shape [B, T_img, C] = [{B}, {T}, C] (or [B, T_img] ids), "
                                 f"got {tuple(codes.shape)}")
            sim = cross_sample_similarity(
                codes, advantages.to(codes.device), group_size, codebook=codebook, backend=s.backend,
                include_self_when_zero_advantage=s.include_self_when_zero_advantage,
            )
        else:
            sim = torch.zeros(B, T, dtype=torch.float32, device=advantages.device)
        if no_signal is not None:
            rows = no_signal.to(sim.device).repeat_interleave(group_size)[:, None]
            sim = torch.where(rows, torch.ones_like(sim), sim)
        ones = torch.ones_like(sim)
        w = stage_policy_weights(sim) if s.reweight_advantages else ones
        kl_w = stage_kl_weights(sim, s.kl_a, s.kl_b) if s.reweight_kl else ones
        return sim, w, kl_w

    def policy_entropy_mean(self, image: HeadBatch, head: str = "fused") -> torch.Tensor:
        """Mean raw entropy (nats) over each row's valid image tokens under the current policy, no grad."""
        _, entropy = self.logp_entropy(image, head=head)
        return masked_row_mean(entropy.double(), image.mask)

    def stage_rewards(self, rewards, group_size, image: HeadBatch, reward_weights=None, head: str = "fused"):
        """``(final [B], has_signal [n_groups], zero_std [n_groups], metrics)``: steps 1-2 above."""
        s = self.settings
        B, T = image.targets.shape
        if not isinstance(rewards, torch.Tensor):
            raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
        if rewards.dim() not in (1, 2) or rewards.shape[0] != B:
            raise ValueError(f"rewards must have shape [B] or [B, R] with B = {B} (the image batch), got {tuple(rewards.shape)}")
        if not rewards.is_floating_point():
            rewards = rewards.float()
        rewards = rewards.detach().to(image.hidden.device)
        combined, has_signal = combine_group_rewards(
            rewards, group_size, reward_weights, drop_zero_spread=s.drop_zero_spread_rewards, tol=s.zero_spread_tol
        )
        zero_std = group_spread(combined, group_size) <= s.zero_spread_tol
        metrics = {"reward/raw_mean": combined.float().mean()}
        if not s.entropy_reward:
            return combined, has_signal, zero_std, metrics
        ref = image.ref_entropy
        if ref is None:
            raise ValueError("image.ref_entropy ([B, T] reference entropies in nats) is required by the entropy "
                             "reward (entropy_reward=True)")
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != (B, T):
            raise ValueError(f"image.ref_entropy must have shape [B, T] = [{B}, {T}], got {tuple(getattr(ref, 'shape', ()))}")
        check_finite("image.ref_entropy", ref)
        hbar = self.policy_entropy_mean(image, head=head)
        hbar_ref = masked_row_mean(ref.detach().double(), image.mask)
        re = entropy_reward(hbar, hbar_ref)
        final = add_entropy_reward(
            combined.double(), re, group_size, coef=s.entropy_reward_coef, centered=s.entropy_reward_centered
        )
        metrics.update({
            "entropy/image_policy_mean_nograd": hbar.mean(),
            "entropy/image_ref_mean": hbar_ref.mean(),
            "reward/entropy_reward_mean": re.mean(),
            "reward/entropy_top_frac": top_reward_mask(combined, group_size).float().mean(),
        })
        return final, has_signal, zero_std, metrics

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None, codebook=None, head: str = "fused") -> ObjectiveOutput:
        s = self.settings
        parts = self.parts(image, text)
        B, T = image.targets.shape
        check_group_size(group_size, B, "rewards")
        final, has_signal, zero_std, extra = self.stage_rewards(rewards, group_size, image, reward_weights, head)
        adv = group_advantages(final, group_size, eps=s.adv_eps, scale=s.scale_rewards)
        no_signal = ~has_signal if not s.entropy_reward else torch.zeros_like(has_signal)
        sim, w, kl_w = self.weights(adv, codes, group_size, T, codebook=codebook, no_signal=no_signal)

        row_policy = (~no_signal).repeat_interleave(group_size).to(w.dtype)[:, None]
        row_kl = torch.ones_like(row_policy)
        if s.drop_kl_for_zero_std_groups:
            row_kl = (~zero_std).repeat_interleave(group_size).to(w.dtype)[:, None]
        parts = self.drop_flat_groups(parts, final, group_size, extra)
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
            if s.token_shaping == "eg" and s.shapes(name):
                kw["advantage_fn"] = shaping_fn(s, name, batch, adv, masks_seen)
                kw["advantage_fn_scope"] = "sequence"   # per-row percentiles: one pass
            else:
                kw["advantages"] = adv.to(batch.hidden.device)
            results[name] = self.run_head(batch, den, kl_den, head=head, part=name, seen=extra, **kw)
        loss = sum(results[n].loss for n, _ in parts)

        metrics = base_metrics(final, adv, loss, results, parts)
        m = dict(parts)["image"].mask.to(torch.float32)
        n = m.sum().clamp(min=1.0)
        metrics.update(extra)
        metrics.update({
            "stage/sim_mean_image": (sim * m).sum() / n,
            "stage/w_mean_image": (policy_weights["image"] * m).sum() / n,
            "stage/kl_w_mean_image": (kl_weights["image"] * m).sum() / n,
            "stage/groups_without_signal_frac": (~has_signal).float().mean(),
            "stage/zero_std_groups_frac": zero_std.float().mean(),
        })
        metrics.update(mask_metrics(parts, masks_seen))
        return self.finish(loss, metrics, adv)


STAGE = STAGEObjective
