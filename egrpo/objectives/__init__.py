"""Training objectives: GRPO, EG-GRPO and STAGE, each with one typed settings dataclass.

    from egrpo.objectives import build_objective
    objective = build_objective("eg_grpo", beta=0.01)            # or build_objective("eg_grpo", EGGRPOSettings(...))
    out = objective(rewards, group_size, image, text, reward_weights=w, codes=codes)
    out.loss.backward()

The registry below is explicit (no import side effects); :func:`register_objective` adds a user's own
objective class. Layout: ``base`` (HeadBatch, settings machinery, Needs, Objective), ``heads`` (fused and
eager head losses), ``advantages`` (rewards -> advantages), ``metrics`` (on-device metrics, one sync),
``grpo``, ``eg_grpo``, ``stage``. The math is in docs/algorithms.md.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from ..kernels.entropy_masks import METHODS
from ..kernels.grpo_loss import NORMALIZATIONS, WEIGHTED_EPS, GRPOLossOutput
from .advantages import (REWARD_SCALES, ZERO_SPREAD_TOL, combine_group_rewards, combine_rewards, group_advantages,
                         group_spread, reward_weight_vector)
from .base import HEAD_IMPLS, HeadBatch, Needs, Objective, ObjectiveOutput, ObjectiveSettings
from .eg_grpo import (EG_SHAPING_HPARAMS, EGGRPOObjective, EGGRPOSettings, EntropyShapingSettings,
                      eg_grpo_token_advantages)
from .grpo import GRPOObjective, GRPOSettings
from .stage import (ENTROPY_REWARD_COEF, STAGE, TOKEN_SHAPINGS, STAGEObjective, STAGESettings, add_entropy_reward,
                    entropy_reward, masked_mean, stage_kl_weights, stage_policy_weights, top_reward_mask)

OBJECTIVES: Dict[str, type] = {
    "grpo": GRPOObjective,
    "eg_grpo": EGGRPOObjective,
    "stage": STAGEObjective,
}


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator for a user's own :class:`Objective` subclass: ``@register_objective("mine")``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"register_objective: {cls!r} is not an Objective subclass")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def objective_class(name: str) -> type:
    """The registered objective class for ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def build_objective(name: str, settings: Optional[ObjectiveSettings] = None, **overrides) -> Objective:
    """Instantiate a registered objective from its settings dataclass and/or keyword overrides;
    ``ValueError`` (one line) on an unknown name, unknown setting or out-of-range value."""
    return objective_class(name)(settings, **overrides)


__all__ = [
    "OBJECTIVES", "register_objective", "objective_class", "build_objective",
    "Objective", "ObjectiveSettings", "ObjectiveOutput", "HeadBatch", "Needs", "HEAD_IMPLS",
    "GRPOObjective", "GRPOSettings", "EGGRPOObjective", "EGGRPOSettings", "EntropyShapingSettings",
    "STAGEObjective", "STAGESettings", "STAGE",
    "REWARD_SCALES", "ZERO_SPREAD_TOL", "ENTROPY_REWARD_COEF", "TOKEN_SHAPINGS", "EG_SHAPING_HPARAMS",
    "NORMALIZATIONS", "WEIGHTED_EPS", "METHODS", "GRPOLossOutput",
    "reward_weight_vector", "combine_rewards", "group_advantages", "group_spread", "combine_group_rewards",
    "eg_grpo_token_advantages", "stage_policy_weights", "stage_kl_weights", "entropy_reward", "masked_mean",
    "top_reward_mask", "add_entropy_reward",
]
