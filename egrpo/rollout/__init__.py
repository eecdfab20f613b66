"""Fast rollouts: static KV cache, one decode step per token, fused CFG sampling, batched VQ decode.

See docs/rollout.md ("Engine"). Protocol-agnostic: callers hand padded tensors (`Prefill`).
"""

from .engine import (
    EngineConfig,
    ImageOutput,
    Prefill,
    RolloutEngine,
    TextOutput,
    cfg_prefill,
    seeds_from_generator,
    text_prefill,
)
from .sampling import SamplingParams, sample, validate_sampling
from .vq import decode_images

__all__ = [
    "EngineConfig", "ImageOutput", "Prefill", "RolloutEngine", "SamplingParams", "TextOutput", "cfg_prefill",
    "decode_images", "sample", "seeds_from_generator", "text_prefill", "validate_sampling",
]
