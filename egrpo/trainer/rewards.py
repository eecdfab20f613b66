"""The reward registry and `RewardSet` live in `egrpo.rewards.registry`; this name is kept so that existing
imports (``from egrpo.trainer.rewards import build_rewards``) keep working. The trainer imports the rewards,
never the reverse."""

from egrpo.rewards.registry import (COLOURS, REWARDS, ColourReward, RewardSet, build_rewards,  # noqa: F401
                                    check_images, check_reward_arguments, colours_in, load_adapters,
                                    register_reward, resolve_reward, reward_defaults)
