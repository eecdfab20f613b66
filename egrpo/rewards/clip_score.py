"""CLIP-style image-text scores with transformers' `CLIPModel`: PickScore-style reward (this module) and the
shared pieces HPS v2.1 uses (`egrpo.rewards.hps`).

PickScore: ``logit_scale.exp() * cos(image, prompt)`` (PickScore's inference; ``use_logit_scale=False`` gives the
plain cosine, ``scale`` divides, e.g. 26 as in Flow-GRPO). Weights: a local transformers CLIP directory
(``yuvalkirstain/PickScore_v1`` with the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor files).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from egrpo.rewards.registry import register_reward

from .base import ModelReward, local_path, require

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_MEAN,
                    std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """CLIP's eval transform on a tensor: bicubic resize of the shorter side to ``size``, centre crop, normalise.

    ``images`` ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, size, size]``.
    """
    _, _, height, width = images.shape
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = images.float()
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0, 1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean_t) / std_t


def image_stats(path: str) -> Tuple[Optional[Sequence[float]], Optional[Sequence[float]]]:
    """``image_mean``/``image_std`` of a saved image processor, or (None, None)."""
    config = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else None
    if config and os.path.exists(config):
        with open(config) as f:
            data = json.load(f)
        data = data.get("image_processor", data)
        return data.get("image_mean"), data.get("image_std")
    return None, None


def clip_features(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None, pool_at_argmax: bool = False):
    """L2-normalised image and text embeddings of a transformers `CLIPModel` ([B, E] each).

    ``pool_at_argmax`` pools text at the highest token id (open_clip's rule: the end-of-text token has the
    largest id in CLIP's vocabulary) instead of transformers' first-EOS rule.
    """
    vision = model.vision_model(pixel_values=pixel_values)
    image = model.visual_projection(vision.pooler_output)
    if pool_at_argmax:
        hidden = model.text_model(input_ids=input_ids).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(-1)]
    else:
        pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    text = model.text_projection(pooled)
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


@register_reward("clip_score")
class ClipScoreReward(ModelReward):
    """PickScore-style reward from a local transformers `CLIPModel` directory (tokenizer files included)."""

    name = "clip_score"
    weight_arguments = ("path", "tokenizer_path")   # checked to exist by `egrpo train --dry-run`

    def __init__(self, path: str, use_logit_scale: bool = True, scale: float = 1.0, device: str = "cpu",
                 dtype: str = "fp32", batch_size: int = 8, on_failure: str = "error",
                 offload_between_calls: bool = False, tokenizer_path: Optional[str] = None):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, on_failure=on_failure,
                         offload_between_calls=offload_between_calls)
        transformers = require("transformers", reward="clip_score")
        path = local_path(path, "clip_score")
        tokenizer_path = local_path(tokenizer_path, "clip_score tokenizer") if tokenizer_path else path
        self.model = self._prepare(transformers.CLIPModel.from_pretrained(path, local_files_only=True))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        mean, std = image_stats(tokenizer_path)
        self.mean, self.std = mean or OPENAI_MEAN, std or OPENAI_STD
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.use_logit_scale, self.scale = bool(use_logit_scale), float(scale)

    def score(self, images, prompts, metadata):
        pixels = clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std).to(self.dtype)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        image, text = clip_features(self.model, pixels, tokens["input_ids"], tokens.get("attention_mask"))
        cos = (image * text).sum(-1)
        if self.use_logit_scale:
            cos = cos * self.model.logit_scale.float().exp()
        return (cos / self.scale).cpu()
