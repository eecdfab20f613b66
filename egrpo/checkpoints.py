"""Janus-Pro checkpoints in both layouts: DeepSeek's original one and transformers'.

DeepSeek's Janus-Pro and the released T2I-R1 / EG-GRPO / STAGE checkpoints use the original Janus module
names (``MultiModalityCausalLM``, ``config.json`` with ``model_type: "multi_modality"``): the language model
under ``language_model.model.*`` / ``language_model.lm_head``, the SigLIP tower under
``vision_model.vision_tower.*`` (fused ``qkv``), ``aligner``, the VQ model under ``gen_vision_model``,
``gen_aligner``, ``gen_head`` and ``gen_embed``. transformers' ``JanusForConditionalGeneration`` names them
``model.language_model``, ``lm_head``, ``model.vision_model``, ``model.aligner``, ``model.vqmodel``,
``model.generation_aligner``, ``model.generation_head`` and ``model.generation_embeddings``. The renaming
follows transformers' own converter (which reads only ``.bin`` files); here it runs both ways, on
safetensors (single or sharded) and ``.bin`` files alike.

Two original tensors have no place in the transformers model (the SigLIP attention-pool head, unused by
Janus, and the VQ ``codebook_used`` statistics). They are kept aside as "extras" (a file
``janus_original_extras.safetensors`` next to a converted transformers checkpoint, or the model attribute
``janus_original_extras`` after loading an original directory) and written back on export to the original
layout, so original -> transformers -> original gives byte-identical tensors.

Public functions: `is_original_dir`, `convert_checkpoint` (the ``egrpo convert`` command),
`load_original_checkpoint` (used by `egrpo.trainer.model.build_model` for ``model.path``) and
`export_model` (``train.export_format``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Dict, Optional, Tuple

import torch

from egrpo.errors import CheckpointFormatError

log = logging.getLogger(__name__)

ORIGINAL_MODEL_TYPE = "multi_modality"
EXTRAS_FILE = "janus_original_extras.safetensors"
EXPORT_FORMATS = ("hf", "original")
# The full transformers config travels inside an original-layout config.json written by us, so that the
# reverse conversion is exact even for shapes the original config cannot describe (e.g. tiny test models).
EMBEDDED_HF_CONFIG_KEY = "egrpo_transformers_config"
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_SKIP_FILES = {"config.json", "generation_config.json", EXTRAS_FILE}


# ---------------------------------------------------------------------------------- key renaming
# (original prefix, transformers prefix), tried in order; the inner renames of the two vision towers follow.
_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_model.vision_tower.", "model.vision_model."),
    ("gen_vision_model.", "model.vqmodel."),
    ("gen_aligner.layers.0.", "model.generation_aligner.fc1."),
    ("gen_aligner.layers.2.", "model.generation_aligner.hidden_layers.0."),
    ("aligner.layers.0.", "model.aligner.fc1."),
    ("aligner.layers.2.", "model.aligner.hidden_layers.0."),
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.", "model.generation_head."),
    ("gen_embed.", "model.generation_embeddings."),
]
# SigLIP tower (after the prefix): (original, transformers) regex pairs; \1 keeps the layer index.
_VISION = [
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection_layer."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^patch_embed\.proj\.", r"embeddings.patch_embedding."),
    (r"^norm\.", r"post_layernorm."),
]
_VISION_BACK = [
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection_layer\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^embeddings\.patch_embedding\.", r"patch_embed.proj."),
    (r"^post_layernorm\.", r"norm."),
]
_POS_EMBED = ("pos_embed", "embeddings.position_embedding.weight")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")
# VQ model (after the prefix): original -> transformers component renames.
_VQ = [
    (r"(^|\.)decoder\.conv_blocks\.", r"\1decoder.up."),
    (r"(^|\.)encoder\.conv_blocks\.", r"\1encoder.down."),
    (r"\.res\.", r".block."),
    (r"\.mid\.0\.", r".mid.block_1."),
    (r"\.mid\.1\.", r".mid.attn_1."),
    (r"\.mid\.2\.", r".mid.block_2."),
]
_VQ_BACK = [
    (r"(^|\.)decoder\.up\.", r"\1decoder.conv_blocks."),
    (r"(^|\.)encoder\.down\.", r"\1encoder.conv_blocks."),
    (r"\.block\.", r".res."),
    (r"\.mid\.block_1\.", r".mid.0."),
    (r"\.mid\.attn_1\.", r".mid.1."),
    (r"\.mid\.block_2\.", r".mid.2."),
]


def _is_dropped(key: str) -> bool:
    return key.startswith("vision_model.vision_tower.attn_pool.") or key == "gen_vision_model.quantize.codebook_used"


def original_to_hf_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Rename an original-layout state dict; returns ``(transformers_state, extras)``."""
    out, extras = {}, {}
    for key, value in state.items():
        if _is_dropped(key):
            extras[key] = value
            continue
        for old, new in _PREFIXES:
            if key.startswith(old):
                rest = key[len(old):]
                break
        else:
            raise CheckpointFormatError(f"unknown original Janus tensor {key!r}: is this a Janus(-Pro) checkpoint?")
        if new == "model.vision_model.":
            qkv = _QKV.match(rest)
            if qkv:
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{new}encoder.layers.{qkv.group(1)}.self_attn.{name}_proj.{qkv.group(2)}"] = part.clone()
                continue
            if rest == _POS_EMBED[0]:
                out[new + _POS_EMBED[1]] = value.squeeze(0)
                continue
            for pattern, repl in _VISION:
                rest, n = re.subn(pattern, repl, rest)
                if n:
                    break
        elif new == "model.vqmodel.":
            rest = "." + rest
            for pattern, repl in _VQ:
                rest = re.sub(pattern, repl, rest)
            rest = rest[1:]
        out[new + rest] = value
    return out, extras


def hf_to_original_state(state: Dict[str, torch.Tensor],
                         extras: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Rename a transformers-layout state dict to the original layout (``extras`` are added back)."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for old, new in _PREFIXES:
            if key.startswith(new):
                rest = key[len(new):]
                break
        else:
            raise CheckpointFormatError(f"unknown transformers Janus tensor {key!r}")
        if new == "model.vision_model.":
            m = _HF_QKV.match(rest)
            if m:
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
                continue
            if rest == _POS_EMBED[1]:
                out[old + _POS_EMBED[0]] = value.unsqueeze(0)
                continue
            for pattern, repl in _VISION_BACK:
                rest, n = re.subn(pattern, repl, rest)
                if n:
                    break
        elif new == "model.vqmodel.":
            rest = "." + rest
            for pattern, repl in _VQ_BACK:
                rest = re.sub(pattern, repl, rest)
            rest = rest[1:]
        out[old + rest] = value
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointFormatError(f"vision layer {layer}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[c] for c in "qkv"], 0)
    out.update(extras or {})
    return out


# ----------------------------------------------------------------------------------- configs
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path} not found: a checkpoint directory needs its config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def is_original_dir(path: str) -> bool:
    """Whether ``path`` is a local directory holding an original-layout (``multi_modality``) checkpoint."""
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and _read_json(config).get("model_type") == ORIGINAL_MODEL_TYPE


# Language-model fields taken from an original config (transformers' converter reads the first eight).
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta")


def original_config_to_hf(config: dict, token_ids: Dict[str, int]):
    """A `JanusConfig` from an original ``config.json`` (the fields transformers' converter reads); ``token_ids``
    holds ``image_token_id`` and the text ``pad/bos/eos_token_id`` from the tokenizer."""
    from transformers import JanusConfig

    if EMBEDDED_HF_CONFIG_KEY in config:
        return JanusConfig(**config[EMBEDDED_HF_CONFIG_KEY])
    try:
        lang = {k: v for k, v in config["language_config"].items() if k in _TEXT_KEYS}
        lang.update({k: v for k, v in token_ids.items() if k != "image_token_id"})
        vision = {}
        if "image_size" in config["vision_config"].get("params", {}):
            vision["image_size"] = config["vision_config"]["params"]["image_size"]
        aligner = config.get("aligner_config", {}).get("params", {})
        if "n_embed" in aligner:
            vision["projection_dim"] = aligner["n_embed"]
        if "depth" in aligner:
            vision["depth"] = aligner["depth"]
        vq = dict(
            embed_dim=config["gen_vision_config"]["params"]["n_embed"],
            num_embeddings=config["gen_vision_config"]["params"]["image_token_size"],
            projection_dim=config["gen_aligner_config"]["params"]["n_embed"],
            num_hidden_layers=config["gen_aligner_config"]["params"]["depth"],  # the aligner depth
            image_token_embed_dim=config["gen_head_config"]["params"]["image_token_embed"],
        )
    except (KeyError, TypeError) as e:
        raise CheckpointFormatError(f"original config.json lacks {e}: not a Janus(-Pro) multi_modality config") from None
    lang["model_type"] = "llama"
    return JanusConfig(text_config=lang, vision_config=vision, vq_config=vq, image_token_id=token_ids["image_token_id"])


def hf_config_to_original(config) -> dict:
    """An original-layout ``config.json`` (as DeepSeek's Janus-Pro writes it) describing ``config``."""
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    lang = {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "max_position_embeddings",
                                          "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                                          "vocab_size")}
    lang["model_type"] = "llama"
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": ORIGINAL_MODEL_TYPE,
        "language_config": lang,
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                          "params": {"image_size": vision.image_size, "model_name": "siglip_large_patch16_384",
                                     "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"depth": vision.depth, "input_dim": vision.hidden_size,
                                      "n_embed": vision.projection_dim, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                              "params": {"image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim}},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                               "params": {"depth": vq.num_hidden_layers, "input_dim": vq.embed_dim,
                                          "n_embed": vq.projection_dim, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": vq.image_token_embed_dim,
                                       "image_token_size": vq.num_embeddings, "n_embed": vq.projection_dim}},
        EMBEDDED_HF_CONFIG_KEY: config.to_dict(),
    }


# ------------------------------------------------------------------------------- weight files
def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``model.safetensors``, sharded safetensors with an index, or
    ``pytorch_model*.bin`` (loaded with ``weights_only=True``)."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise CheckpointFormatError(f"{path} is not a directory")
    files = sorted(os.listdir(path))
    for ext in ("safetensors", "bin"):
        index = [f for f in files if f.endswith(f".{ext}.index.json")]
        if index:
            shards = sorted(set(_read_json(os.path.join(path, index[0]))["weight_map"].values()))
        else:
            shards = [f for f in files if _WEIGHT_FILE.match(f) and f.endswith("." + ext)]
        if not shards:
            continue
        state: Dict[str, torch.Tensor] = {}
        for shard in shards:
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise CheckpointFormatError(f"{file} is listed in the index but missing: re-download the checkpoint")
            state.update(load_file(file) if ext == "safetensors" else torch.load(file, map_location="cpu",
                                                                                weights_only=True))
        return state
    raise CheckpointFormatError(f"{path}: no model*.safetensors or pytorch_model*.bin weights found")


def write_state_dict(state: Dict[str, torch.Tensor], out: str, max_shard_size="5GB") -> None:
    """Safetensors, sharded with an index above ``max_shard_size`` (huggingface_hub's writer)."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict({k: _own_storage(v) for k, v in state.items()}, out, max_shard_size=max_shard_size)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous and, when it is a slice of a larger storage, copied into its own. DeepSpeed ZeRO-1/2/3
    keep parameters as views into flat buffers; on CPU ``.cpu()`` returns them as they are, and safetensors refuses
    a tensor that does not cover its whole storage ("None is covering the entire storage"). Tensors that cover
    theirs (tied weights included) are passed through."""
    tensor = tensor.contiguous()
    if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, processor and other small files, copied verbatim (weights and configs are rewritten)."""
    for name in os.listdir(src):
        file = os.path.join(src, name)
        if os.path.isfile(file) and name not in _SKIP_FILES and not _WEIGHT_FILE.match(name):
            shutil.copy2(file, os.path.join(dst, name))


def load_tokenizer(path: str):
    """``AutoTokenizer`` of a checkpoint directory in either layout. transformers' AutoTokenizer also reads
    ``config.json``; an original-layout one (``model_type: multi_modality``, unknown to transformers) made it
    warn that a checkpoint of another type "can yield errors", although only the tokenizer files are used."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not is_original_dir(path):
        return AutoTokenizer.from_pretrained(path)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(previous)


def _token_ids(path: str) -> Dict[str, int]:
    """``image_token_id`` and the text model's pad/bos/eos ids, from the tokenizer files in ``path``."""
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raise many types; the message says what to fix
        raise CheckpointFormatError(f"{path}: cannot load its tokenizer ({e}); the tokenizer files must sit next to "
                              "the weights") from None
    token = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    if token is None or token == tokenizer.unk_token_id:
        raise CheckpointFormatError(f"{path}: its tokenizer has no <image_placeholder> token; not a Janus tokenizer")
    ids = {"image_token_id": int(token)}
    for name in ("pad", "bos", "eos"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is not None:
            ids[f"{name}_token_id"] = int(value)
    return ids


# ------------------------------------------------------------------------------------ commands
def _check_shard_size(max_shard_size) -> None:
    """A shard size as huggingface_hub's writer reads it: bytes (int) or a number with KB / MB / GB / TB."""
    text = str(max_shard_size).strip()
    try:
        ok = int(text) > 0 if text.isdigit() else (text[-2:].upper() in ("KB", "MB", "GB", "TB")
                                                   and float(text[:-2]) > 0)
    except ValueError:
        ok = False
    if not ok:
        raise CheckpointFormatError(f"--max-shard-size: expected a size such as 5GB or 500MB, got {max_shard_size!r}")


def convert_checkpoint(src: str, dst: str, to: str = "auto", max_shard_size="5GB") -> str:
    """Convert the checkpoint directory ``src`` into ``dst`` (``to`` = "hf", "original" or "auto": the other
    layout). Weights are written as safetensors; tokenizer/processor files are copied. Returns the layout written."""
    if not os.path.isdir(src):
        what = " is a file" if os.path.exists(src) else ": no such directory"
        raise CheckpointFormatError(f"{src}{what}; give a Janus(-Pro) checkpoint directory")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise CheckpointFormatError(f"{src}: no config.json; give a Janus(-Pro) checkpoint directory")
    original = is_original_dir(src)
    if to == "auto":
        to = "hf" if original else "original"
    if to not in EXPORT_FORMATS:
        raise CheckpointFormatError(f"target layout must be 'hf' or 'original', got {to!r}")
    if (to == "hf") != original:
        raise CheckpointFormatError(f"{src} is already in the {'original' if original else 'transformers'} layout")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise CheckpointFormatError("the output directory must differ from the input directory")
    if os.path.isdir(dst) and os.listdir(dst):
        raise CheckpointFormatError(f"{dst} exists and is not empty; choose a new output directory")
    _check_shard_size(max_shard_size)     # before anything is written: a bad size must not leave a partial dst
    state = read_state_dict(src)
    config = _read_json(os.path.join(src, "config.json"))
    os.makedirs(dst, exist_ok=True)
    if to == "hf":
        hf_state, extras = original_to_hf_state(state)
        hf_config = original_config_to_hf(config, _token_ids(src))
        hf_config.save_pretrained(dst)
        write_state_dict(hf_state, dst, max_shard_size)
        if extras:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in extras.items()}, os.path.join(dst, EXTRAS_FILE))
    else:
        from transformers import JanusConfig

        extras_file = os.path.join(src, EXTRAS_FILE)
        extras = None
        if os.path.isfile(extras_file):
            from safetensors.torch import load_file
            extras = load_file(extras_file)
        with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_to_original(JanusConfig(**config)), f, indent=2)
        write_state_dict(hf_to_original_state(state, extras), dst, max_shard_size)
    _copy_side_files(src, dst)
    log.debug("converted %s -> %s (%s layout)", src, dst, to)   # `egrpo convert` prints its own line
    return to


def load_original_checkpoint(path: str, dtype=None, attn_implementation: Optional[str] = None):
    """``JanusForConditionalGeneration`` from an original-layout directory, converted in memory (nothing is
    written). The original-only tensors are kept on ``model.janus_original_extras`` for `export_model`."""
    from transformers import JanusForConditionalGeneration

    log.info("model.path %s is in the original Janus layout: converting it to the transformers layout on load",
             path)
    hf_state, extras = original_to_hf_state(read_state_dict(path))
    config = original_config_to_hf(_read_json(os.path.join(path, "config.json")), _token_ids(path))
    kwargs = {"config": config, "state_dict": hf_state}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = JanusForConditionalGeneration.from_pretrained(None, **kwargs)
    except (TypeError, ValueError, OSError):
        # transformers versions that need a directory: go through a temporary transformers-layout copy
        import tempfile

        with tempfile.TemporaryDirectory(prefix="egrpo-janus-") as tmp:
            config.save_pretrained(tmp)
            write_state_dict(hf_state, tmp)
            del kwargs["config"], kwargs["state_dict"]
            model = JanusForConditionalGeneration.from_pretrained(tmp, **kwargs)
    model.janus_original_extras = extras
    return model


def export_model(model, tokenizer, out: str, export_format: str = "hf",
                 state: Optional[Dict[str, torch.Tensor]] = None, max_shard_size="5GB") -> str:
    """Write ``model`` (a ``JanusForConditionalGeneration``; ``state`` overrides its state dict, e.g. gathered
    under ZeRO-3) with its tokenizer to ``out`` in the transformers (``"hf"``) or original layout."""
    if export_format not in EXPORT_FORMATS:
        raise CheckpointFormatError(f"train.export_format must be 'hf' or 'original', got {export_format!r}")
    if state is None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    if export_format == "hf":
        model.save_pretrained(out, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
    else:
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_to_original(model.config), f, indent=2)
        write_state_dict(hf_to_original_state(state, getattr(model, "janus_original_extras", None)), out,
                         max_shard_size)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return out
