"""Janus-Pro through transformers: load a checkpoint or build a tiny random one, choose what trains.

`build_model` returns ``(JanusForConditionalGeneration, tokenizer)``. A real checkpoint comes from a
local HF-format directory (or a hub id when there is network); a tiny random model is built from a
`tiny` dict of overrides of `TINY_DEFAULTS` together with a character-level tokenizer, for tests and
the CPU demo.
"""

from dataclasses import dataclass, field
import importlib.util
import logging
from typing import List, Optional, Tuple

import torch

from .tokenizer import build_char_tokenizer, janus_tokens

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# Shapes of the tiny random model. Janus-Pro-1B for comparison: text hidden 2048, 24 layers, 16 heads,
# image 384 px / patch 16 = 576 image tokens, image vocab 16384, codebook dim 8.
TINY_DEFAULTS = dict(
    hidden_size=64,             # LM hidden; also the generation embeddings' aligner output and proj_out width
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    max_position_embeddings=1024,
    image_size=64,              # pixels; num_image_tokens = (image_size / patch_size)^2
    patch_size=8,
    image_vocab_size=256,       # VQ codebook size = generation head width
    codebook_dim=8,
    vq_base_channels=32,        # must be divisible by 32 (GroupNorm)
    vq_channel_multiplier=(1, 1, 2, 2),   # len - 1 upsamplings: patch grid * 2^(len-1) = image_size
    vq_num_res_blocks=1,
    vq_latent_channels=32,
    vision_hidden_size=32,      # SigLIP understanding encoder, unused by generation
    vision_layers=1,
    vision_heads=2,
    initializer_range=0.02,     # std of the random init; larger gives peakier, more context-dependent logits
)

# transformers' attention implementations the trainer accepts (model.attn_implementation)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class ModelConfig:
    path: Optional[str] = None            # local dir (transformers or original Janus layout) or hub id
    tiny: Optional[dict] = None           # build a tiny random JanusConfig from these overrides instead
    dtype: str = "bf16"                   # "bf16" | "fp32"
    attn_implementation: str = "sdpa"     # "flash_attention_2" used only when flash_attn is importable
    gradient_checkpointing: bool = False
    trainable: List[str] = field(default_factory=lambda: ["model.language_model", "lm_head"])
    liger: bool = False                   # Liger-Kernel Llama patches (RMSNorm, SwiGLU, RoPE) on the LM; needs CUDA
    seed: int = 0                         # init seed of the tiny model


def tiny_patch_grid(tiny: dict) -> int:
    """Patches per side of the tiny model built from ``tiny`` (overrides of `TINY_DEFAULTS`): its image tokens
    per image are this squared."""
    c = {**TINY_DEFAULTS, **tiny}
    return int(c["image_size"]) // int(c["patch_size"])


def tiny_janus_config(tokenizer, **overrides):
    """A small random `JanusConfig` whose text vocabulary and special ids match ``tokenizer``."""
    from transformers import JanusConfig

    unknown = sorted(set(overrides) - set(TINY_DEFAULTS))
    if unknown:
        raise ValueError(f"model.tiny: unknown keys {unknown}; known: {sorted(TINY_DEFAULTS)}")
    c = {**TINY_DEFAULTS, **overrides}
    if c["image_size"] % c["patch_size"]:
        raise ValueError(f"model.tiny: image_size {c['image_size']} not divisible by patch_size {c['patch_size']}")
    grid = tiny_patch_grid(c)
    upsampled = grid * 2 ** (len(c["vq_channel_multiplier"]) - 1)
    if upsampled != c["image_size"]:
        raise ValueError(
            f"model.tiny: the VQ decoder turns the {grid}x{grid} token grid into {upsampled} px, not image_size "
            f"{c['image_size']}; use len(vq_channel_multiplier) - 1 = log2(patch_size)"
        )
    for key in ("vq_base_channels", "vq_latent_channels"):
        if c[key] % 32:
            raise ValueError(f"model.tiny: {key} must be divisible by 32 (GroupNorm), got {c[key]}")
    if c["hidden_size"] % c["num_heads"]:
        raise ValueError("model.tiny: hidden_size must be divisible by num_heads")
    tokens = janus_tokens(tokenizer)
    text_config = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        bos_token_id=tokens.bos,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
        tie_word_embeddings=False,
        initializer_range=c["initializer_range"],
    )
    vision_config = dict(
        hidden_size=c["vision_hidden_size"],
        num_hidden_layers=c["vision_layers"],
        num_attention_heads=c["vision_heads"],
        image_size=c["image_size"],
        patch_size=c["patch_size"],
        projection_dim=c["hidden_size"],
        num_image_tokens=grid * grid,
    )
    vq_config = dict(
        embed_dim=c["codebook_dim"],
        num_embeddings=c["image_vocab_size"],
        latent_channels=c["vq_latent_channels"],
        base_channels=c["vq_base_channels"],
        channel_multiplier=list(c["vq_channel_multiplier"]),
        num_res_blocks=c["vq_num_res_blocks"],
        projection_dim=c["hidden_size"],
        image_token_embed_dim=c["hidden_size"],
        initializer_range=c["initializer_range"],
    )
    placeholder = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    return JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=int(placeholder),
        tie_word_embeddings=False,
    )


def set_trainable(model, prefixes) -> int:
    """Freeze every parameter whose name starts with none of ``prefixes``; return the trainable count.

    Names are those of ``JanusForConditionalGeneration.named_parameters()``, e.g. ``model.language_model``,
    ``lm_head``, ``model.generation_head``. A prefix matching nothing is an error (likely a typo).
    """
    prefixes = list(prefixes)
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_has_prefix(name, prefix) for name in names):
            raise ValueError(f"model.trainable: prefix {prefix!r} matches no parameter")
    count = 0
    for name, param in model.named_parameters():
        train = any(_has_prefix(name, prefix) for prefix in prefixes)
        param.requires_grad_(train)
        count += param.numel() if train else 0
    return count


def _has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def _attn_implementation(requested: str) -> str:
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        log.warning("flash_attn is not installed; using sdpa attention")
        return "sdpa"
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {requested!r}")
    return requested


def apply_liger(model) -> bool:
    """Liger-Kernel's Llama patches (RMSNorm, SwiGLU, RoPE) on the language model; GPU only.

    The fused linear cross-entropy patch stays off: the LM head is never applied over all positions here.
    Returns whether the patches were applied.
    """
    if not torch.cuda.is_available():
        log.warning("model.liger=True ignored: Liger kernels need a GPU")
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        log.warning("model.liger=True ignored: liger-kernel is not installed")
        return False
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
        model=model.model.language_model,
    )
    return True


def build_model(cfg: ModelConfig, device) -> Tuple[torch.nn.Module, object]:
    """Return ``(model, tokenizer)``: a `JanusForConditionalGeneration` on ``device`` in eval mode with
    ``cfg.trainable`` prefixes trainable and the rest frozen."""
    from transformers import JanusForConditionalGeneration

    if (cfg.path is None) == (cfg.tiny is None):
        raise ValueError("model: give exactly one of `path` (a checkpoint) or `tiny` (a random tiny model)")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    dtype = DTYPES[cfg.dtype]
    attn = _attn_implementation(cfg.attn_implementation)

    if cfg.tiny is not None:
        tokenizer = build_char_tokenizer()
        config = tiny_janus_config(tokenizer, **cfg.tiny)
        config._attn_implementation = attn
        config.text_config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = JanusForConditionalGeneration(config)
        model = model.to(dtype)
    else:
        from ..checkpoints import is_original_dir, load_original_checkpoint, load_tokenizer

        if is_original_dir(cfg.path):  # DeepSeek / T2I-R1 / EG-GRPO / STAGE layout: converted in memory
            model = load_original_checkpoint(cfg.path, dtype=dtype, attn_implementation=attn)
        else:
            model = JanusForConditionalGeneration.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn)
        tokenizer = load_tokenizer(cfg.path)
        tokenizer.padding_side = "left"
    janus_tokens(tokenizer)  # fail early on a tokenizer without the Janus special tokens

    model.to(device)
    model.eval()  # no dropout in rollout or loss forward; training mode is not needed for gradients
    if cfg.liger:
        apply_liger(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant: inputs_embeds of frozen embeddings carry no grad, which reentrant checkpointing needs.
        # HF checkpoints only while the module is in training mode (model.train()).
        lm = model.model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_trainable(model, cfg.trainable)
    return model, tokenizer


def num_image_tokens(model) -> int:
    return int(model.config.vision_config.num_image_tokens)
