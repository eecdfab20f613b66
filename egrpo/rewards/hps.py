"""HPS v2.1 reward: cosine of the image and prompt embeddings of an open_clip ViT-H-14 with the HPS checkpoint.

open_clip needs torchvision, which cannot be installed everywhere without pulling a CUDA torch, so the
open_clip-format checkpoint (``HPS_v2.1_compressed.pt``: ``{"state_dict": {...}}``) is converted on load into
transformers' `CLIPModel` (`open_clip_to_hf`): same computation (pre-LN transformer, exact GELU, class-token
pooling with ``ln_post`` for images, end-of-text pooling for text with a causal mask). The architecture is
read from the tensor shapes; attention heads follow ViT-H-14's head widths (80 vision, 64 text) unless given.
Tokenizer: a local CLIP BPE tokenizer directory (e.g. the files of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``),
texts padded/truncated to the 77-token context like open_clip's tokenizer.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional

import torch

from egrpo.rewards.registry import register_reward

from .base import ModelReward, local_path, require
from .clip_score import OPENAI_MEAN, OPENAI_STD, clip_features, clip_preprocess

IGNORED_KEYS = ("attn_mask", "visual.attn_mask")


def _count_layers(state: Dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state for m in [pattern.match(k)] if m)


def open_clip_config(state: Dict[str, torch.Tensor], vision_heads: Optional[int] = None,
                     text_heads: Optional[int] = None, vision_head_width: int = 80, text_head_width: int = 64):
    """A transformers `CLIPConfig` matching an open_clip ViT state dict (shapes -> sizes)."""
    from transformers import CLIPConfig

    width, _, patch, _ = state["visual.conv1.weight"].shape
    positions = state["visual.positional_embedding"].shape[0]
    grid = int(round(math.sqrt(positions - 1)))
    if grid * grid != positions - 1:
        raise ValueError(f"open_clip checkpoint: {positions} vision positions is not 1 + a square grid")
    vocab, text_width = state["token_embedding.weight"].shape
    embed = state["visual.proj"].shape[1]
    vision_heads = vision_heads or max(width // vision_head_width, 1)
    text_heads = text_heads or max(text_width // text_head_width, 1)
    if width % vision_heads or text_width % text_heads:
        raise ValueError(f"open_clip checkpoint: widths {width}/{text_width} not divisible by heads "
                         f"{vision_heads}/{text_heads}")
    return CLIPConfig(
        vision_config=dict(
            hidden_size=width, num_hidden_layers=_count_layers(state, "visual.transformer.resblocks."),
            num_attention_heads=vision_heads, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=embed,
        ),
        text_config=dict(
            vocab_size=vocab, hidden_size=text_width, num_hidden_layers=_count_layers(state, "transformer.resblocks."),
            num_attention_heads=text_heads, intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            max_position_embeddings=state["positional_embedding"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=embed, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
        ),
        projection_dim=embed,
    )


def _block(src: str, dst: str, state, out) -> None:
    q, k, v = state[f"{src}.attn.in_proj_weight"].chunk(3, dim=0)
    qb, kb, vb = state[f"{src}.attn.in_proj_bias"].chunk(3, dim=0)
    for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
        out[f"{dst}.self_attn.{name}.weight"], out[f"{dst}.self_attn.{name}.bias"] = w, b
    pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for a, b in pairs.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{b}.{p}"] = state[f"{src}.{a}.{p}"]


def open_clip_to_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename/split an open_clip ViT state dict into transformers `CLIPModel` keys (every key must be used)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    out: Dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    for i in range(_count_layers(state, "visual.transformer.resblocks.")):
        _block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", state, out)
    for i in range(_count_layers(state, "transformer.resblocks.")):
        _block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", state, out)
    used = set()
    for k in state:
        if k in IGNORED_KEYS:
            used.add(k)
    names = {"visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.weight",
             "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj",
             "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection",
             "logit_scale"}
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.\d+\.(attn\.in_proj_weight|attn\.in_proj_bias|"
                       r"attn\.out_proj\.(weight|bias)|ln_[12]\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias))$")
    unknown = [k for k in state if k not in names and k not in used and not block.match(k)]
    if unknown:
        raise ValueError(f"open_clip checkpoint has keys this converter does not know (not a plain ViT CLIP?): "
                         f"{unknown[:8]}")
    return out


def load_open_clip_as_hf(checkpoint: str, **config_kwargs):
    """transformers `CLIPModel` holding the weights of an open_clip ViT checkpoint file."""
    from transformers import CLIPModel

    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"hps: cannot read {checkpoint!r} as a tensor-only checkpoint ({e})") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = CLIPModel(open_clip_config(state, **config_kwargs))
    missing, unexpected = model.load_state_dict(open_clip_to_hf(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"hps: converted checkpoint does not fit CLIPModel (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model


@register_reward("hps")
class HPSReward(ModelReward):
    """HPS v2.1: ``cos(image, prompt)`` (x ``scale``) from ``checkpoint`` (open_clip format) + ``tokenizer`` dir."""

    name = "hps"
    weight_arguments = ("checkpoint", "tokenizer")   # checked to exist by `egrpo train --dry-run`

    def __init__(self, checkpoint: str, tokenizer: str, scale: float = 1.0, vision_heads: Optional[int] = None,
                 text_heads: Optional[int] = None, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                 on_failure: str = "error", offload_between_calls: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, on_failure=on_failure,
                         offload_between_calls=offload_between_calls)
        transformers = require("transformers", reward="hps")
        checkpoint = local_path(checkpoint, "hps checkpoint")
        tokenizer = local_path(tokenizer, "hps tokenizer")
        self.model = self._prepare(load_open_clip_as_hf(checkpoint, vision_heads=vision_heads, text_heads=text_heads))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.context = int(self.model.config.text_config.max_position_embeddings)
        self.scale = float(scale)

    def score(self, images, prompts, metadata):
        pixels = clip_preprocess(images.to(self.device), self.image_size, OPENAI_MEAN, OPENAI_STD).to(self.dtype)
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.context,
                             return_tensors="pt")["input_ids"].to(self.device)
        image, text = clip_features(self.model, pixels, ids, pool_at_argmax=True)
        return ((image * text).sum(-1) * self.scale).cpu()
