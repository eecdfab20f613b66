"""GRPO as in T2I-R1: every token of sample i gets the group-normalised advantage ``A_i``
(docs/algorithms.md, "GRPO")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import HeadBatch, Objective, ObjectiveOutput, ObjectiveSettings
from .metrics import base_metrics


@dataclass
class GRPOSettings(ObjectiveSettings):
    """GRPO has exactly the common settings (see :class:`~egrpo.objectives.base.ObjectiveSettings`)."""


class GRPOObjective(Objective):
    """GRPO as in T2I-R1: one token loss over the text and image tokens with advantage ``A_i`` per sample."""

    name = "grpo"
    Settings = GRPOSettings

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None, codebook=None, head: str = "fused") -> ObjectiveOutput:
        parts = self.parts(image, text)
        B = image.hidden.shape[0]
        r, adv = self.sequence_advantages(rewards, group_size, reward_weights, B)
        extra = {}
        parts = self.drop_flat_groups(parts, r, group_size, extra)
        den, kl_den = self.shared_denominators(parts)
        results = {name: self.run_head(batch, den, kl_den, head=head, part=name, seen=extra,
                                       advantages=adv.to(batch.hidden.device))
                   for name, batch in parts}
        loss = sum(out.loss for out in results.values())
        metrics = base_metrics(r, adv, loss, results, parts)
        metrics.update(extra)
        return self.finish(loss, metrics, adv)
