"""EG-GRPO, released-code semantics: entropy-shaped token advantages (docs/algorithms.md, "EG-GRPO").

Per part (text, image): ``Hn = H / ln V_part`` (detached), per-row percentile masks over the valid tokens
(strict ``H < q_low``, ``H > q_high``), ``A[i, t] = (A_i + min(c1 |A_i|, c2 Hn) * high) * (1 - low)``; the KL
term stays on every token. The masks need the current entropies of the whole row, so each shaped part runs as
one head call with a per-sequence ``advantage_fn`` (``advantage_fn_scope="sequence"``: chunks hold whole rows and
the gradient is formed in the same pass, 6NDV with a trainable head, 4NDV frozen), like unshaped parts. Only
``budget_neutral`` (one scale for the whole micro-batch) runs its last shaped part with a batch-wide
``advantage_fn``: 8NDV if that head is trainable (the image head, frozen in every recipe, stays at 4NDV).
The shaping settings and :func:`shaping_fn` are shared with STAGE's ``token_shaping="eg"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..kernels.entropy_masks import METHODS, entropy_masks
from .base import OURS, RELEASED, HeadBatch, Objective, ObjectiveOutput, ObjectiveSettings, setting
from .metrics import base_metrics, mask_metrics


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
    released_text_percentiles: bool = False,
    backend: str = "auto",
    check_finite: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EG-GRPO token advantages of one part.

    ``entropy [B, T]`` is raw (nats) and is normalised here by ``ln(vocab_size)``; thresholds are
    per row over the valid tokens (with ``released_text_percentiles``, the released text-CoT rule:
    the whole padded row, indexed from its tail; see ``egrpo.kernels.entropy_masks``). Returns ``(A_tok [B, T], low, high)``; ``A_tok / A_i`` lies in ``[1 - c1, 1 + c1]``
    on high tokens (the bonus is capped at ``c1 |A_i|`` and never flips the sign) and is 0 on low ones.
    ``check_finite=False`` skips the entropy check (a host sync; see ``entropy_masks``): a NaN entropy (what
    a head with NaN logits gives) then surfaces as a NaN advantage, which the GRPO loss rejects.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2 (entropy is normalised by ln V), got {vocab_size!r}")
    hn = entropy.detach() / math.log(vocab_size)
    low, high = entropy_masks(hn, mask, low_q, high_q, scope="sequence", method=method,
                              released_text_percentiles=released_text_percentiles, backend=backend,
                              check_finite=check_finite)
    a = seq_advantages.detach().to(hn.dtype)[:, None]
    bonus = torch.minimum(c1 * a.abs(), c2 * hn) * high
    a_tok = (a + bonus) * (~low)
    if not check_finite:
        # Unchecked here, so make any non-finite entropy that took part in a row's percentiles (padding too under
        # the released text rule; +inf, which the capped bonus would hide) a NaN advantage of that row, for the
        # loss's own check to refuse: no host sync.
        valid = mask != 0
        taking_part = torch.ones_like(valid) if released_text_percentiles else valid
        broken = (~torch.isfinite(hn) & taking_part).any(1, keepdim=True)
        a_tok = torch.where(broken, torch.full_like(a_tok, float("nan")), a_tok)
    return a_tok, low, high


@dataclass
class EntropyShapingSettings(ObjectiveSettings):
    """EG-GRPO's token shaping (also STAGE's ``token_shaping="eg"``)."""

    c1: float = setting(0.3, "bonus cap as a fraction of |A_i| (the bonus never exceeds c1 |A_i|)", RELEASED, "nonneg")
    c2: float = setting(0.3, "bonus slope on the normalised entropy H / ln V", RELEASED, "nonneg")
    low_q: float = setting(0.2, "low-entropy percentile per row: tokens strictly below get advantage 0", RELEASED,
                           "unit_open")
    high_q: float = setting(0.5, "high-entropy percentile per row: tokens strictly above get the bonus", RELEASED,
                            "unit_open")
    percentile_method: str = setting("index", "index = sorted[floor(q n)] of the valid values (released); linear = "
                                     "interpolated quantile (released low-memory variant)", RELEASED, choices=METHODS)
    shape_text: bool = setting(True, "shape the text chain-of-thought tokens (false: plain GRPO advantages there)",
                               RELEASED, "bool")
    shape_image: bool = setting(True, "shape the image tokens", RELEASED, "bool")
    include_padding_in_text_percentiles: bool = setting(
        False, "true reproduces the released code, whose text percentiles also count post-EOS padding; false "
        "(default) uses the valid tokens only", OURS, "bool")

    def check_combination(self) -> None:
        super().check_combination()
        if self.low_q > self.high_q:
            raise ValueError(f"low_q ({self.low_q}) must not exceed high_q ({self.high_q})")

    def shapes(self, part: str) -> bool:
        return self.shape_text if part == "text" else self.shape_image


# The shaping settings and their defaults as a plain mapping (for code that lists them).
EG_SHAPING_HPARAMS = {name: f.default for name, f in EntropyShapingSettings.__dataclass_fields__.items()
                      if name not in ObjectiveSettings.__dataclass_fields__}


def shaped_advantages(settings: EntropyShapingSettings, part: str, batch: HeadBatch, adv: torch.Tensor,
                      entropy: torch.Tensor, seqs: slice = slice(None)):
    """``(A_tok, low, high)`` of the sequences ``seqs`` of one shaped part from their raw entropies ``[b, T]``
    (the percentiles are per row, so any subset of rows gives the same values as the whole batch)."""
    return eg_grpo_token_advantages(
        adv[seqs].to(entropy.device), entropy, batch.mask[seqs], batch.weight.shape[0], low_q=settings.low_q,
        high_q=settings.high_q, c1=settings.c1, c2=settings.c2, method=settings.percentile_method,
        released_text_percentiles=(part == "text" and settings.include_padding_in_text_percentiles),
        backend=settings.backend,
        # the advantages go through the GRPO loss, which rejects NaN ones (a NaN entropy makes one) once
        # per pass: no host sync per chunk here
        check_finite=False)


def shaping_fn(settings: EntropyShapingSettings, part: str, batch: HeadBatch, adv: torch.Tensor,
               masks_seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
               then: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """The head's ``advantage_fn``: shaped token advantages from the current entropies (masks kept for metrics).

    ``fn(logp, entropy, seqs=None)``: with ``advantage_fn_scope="sequence"`` the kernel calls it per chunk of
    whole sequences ``seqs`` (one pass: 6NDV trainable head, 4NDV frozen); without ``seqs`` it shapes the whole
    batch (``advantage_fn_scope="batch"``, needed only when ``then`` spans the batch, e.g. ``budget_neutral``)."""
    def fn(_logp, entropy, seqs: Optional[slice] = None):
        rows = slice(None) if seqs is None else seqs
        a_tok, low, high = shaped_advantages(settings, part, batch, adv, entropy, rows)
        if seqs is None:
            masks_seen[part] = (low, high)
        else:
            if part not in masks_seen:
                empty = torch.zeros(batch.mask.shape, dtype=torch.bool, device=low.device)
                masks_seen[part] = (empty, empty.clone())
            masks_seen[part][0][rows], masks_seen[part][1][rows] = low, high
        return a_tok if then is None else then(a_tok)
    return fn


@dataclass
class EGGRPOSettings(EntropyShapingSettings):
    budget_neutral: bool = setting(
        False, "rescale all token advantages of the micro-batch by one scalar so that sum m|A_EG| = kappa sum "
        "m|A_GRPO| (an option: the project's reading of the paper's Proposition 1; the released code has no such "
        "step, hence off)", RELEASED, "bool")
    kappa: float = setting(1.0, "budget ratio of budget_neutral (1: the same budget as GRPO)", OURS, "positive")

    def check_combination(self) -> None:
        super().check_combination()
        if self.budget_neutral and (self.top_entropy_quantile < 1.0 or self.tis_clip_max is not None):
            raise ValueError("budget_neutral cannot be combined with top_entropy_quantile < 1 or tis_clip_max "
                             "(the budget would be measured before their factors)")


class EGGRPOObjective(Objective):
    """EG-GRPO, released-code semantics by default; ``budget_neutral`` is the paper's Proposition 1 as an option.

    ``budget_neutral``: all token advantages of the micro-batch (both parts) are multiplied by one scalar ``s`` so
    that ``sum m |A_EG| = kappa * sum m |A_GRPO|`` (``s = 1`` when ``sum m |A_EG| = 0``). The policy term is linear
    in the advantages and a positive scale keeps every clipping decision. To keep one loss call per head, shaped
    parts other than the image first get their entropies from a no-grad pass (2NDV; their loss call then needs
    no recompute), and the image call's ``advantage_fn`` computes ``s``.
    """

    name = "eg_grpo"
    Settings = EGGRPOSettings

    def shapes(self, part: str) -> bool:
        return self.settings.shapes(part)

    def token_advantages(self, part: str, batch: HeadBatch, adv: torch.Tensor, entropy: torch.Tensor):
        return shaped_advantages(self.settings, part, batch, adv, entropy)

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None, codebook=None, head: str = "fused") -> ObjectiveOutput:
        s = self.settings
        parts = self.parts(image, text)
        B = image.hidden.shape[0]
        r, adv = self.sequence_advantages(rewards, group_size, reward_weights, B)
        extra: Dict[str, torch.Tensor] = {}
        parts = self.drop_flat_groups(parts, r, group_size, extra)
        den, kl_den = self.shared_denominators(parts)
        masks_seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        results = {}

        if not s.budget_neutral:
            for name, batch in parts:
                # per-row percentiles: one sequence's entropies suffice, so the gradient is formed in the
                # same pass (advantage_fn_scope="sequence")
                kw = (dict(advantage_fn=shaping_fn(s, name, batch, adv, masks_seen), advantage_fn_scope="sequence")
                      if s.shapes(name) else dict(advantages=adv.to(batch.hidden.device)))
                results[name] = self.run_head(batch, den, kl_den, head=head, part=name, seen=extra, **kw)
        else:
            shaped = [(n, b) for n, b in parts if s.shapes(n)]
            pivot = shaped[-1] if shaped else None
            fixed: Dict[str, torch.Tensor] = {}
            for name, batch in parts:
                if pivot is not None and name == pivot[0]:
                    continue
                if s.shapes(name):
                    _, entropy = self.logp_entropy(batch, head=head)
                    a_tok, low, high = self.token_advantages(name, batch, adv, entropy.float())
                    masks_seen[name] = (low, high)
                    fixed[name] = a_tok
                else:
                    fixed[name] = adv.to(batch.hidden.device)[:, None].expand(batch.mask.shape).float()
            grpo_budget = sum((batch.mask.float() * adv.to(batch.hidden.device).abs()[:, None]).sum()
                              for _, batch in parts)
            fixed_budget = sum((dict(parts)[n].mask.float() * a.abs()).sum() for n, a in fixed.items())
            scale_box: Dict[str, torch.Tensor] = {}

            def budget_scale(eg_budget):
                scale = torch.where(eg_budget > 0, s.kappa * grpo_budget / eg_budget.clamp(min=1e-30),
                                    torch.ones_like(eg_budget))
                scale_box["s"] = scale
                return scale

            if pivot is not None:
                p_name, p_batch = pivot
                p_mask = p_batch.mask.float()

                def scale_pivot(a_tok):
                    return a_tok * budget_scale(fixed_budget + (p_mask * a_tok.abs()).sum())

                results[p_name] = self.run_head(p_batch, den, kl_den, head=head, advantage_fn=shaping_fn(
                    s, p_name, p_batch, adv, masks_seen, then=scale_pivot))
            else:
                budget_scale(torch.as_tensor(fixed_budget, dtype=torch.float32))
            for name, batch in parts:
                if name in fixed:
                    results[name] = self.run_head(batch, den, kl_den, head=head,
                                                  advantages=fixed[name] * scale_box["s"])
            extra["budget/scale"] = scale_box["s"]

        loss = sum(results[n].loss for n, _ in parts)
        metrics = base_metrics(r, adv, loss, results, parts)
        metrics.update(mask_metrics(parts, masks_seen))
        metrics.update(extra)
        return self.finish(loss, metrics, adv)
