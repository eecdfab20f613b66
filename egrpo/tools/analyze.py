"""The EG-GRPO entropy analysis (paper's findings 1-3): per prompt, N CoTs x M images, with rewards and entropies.

For each prompt, `rollout` samples N CoTs and M images per CoT (``rollout.images_per_cot``). The teacher-forced
forwards of `head_inputs` give the per-token entropies:

* CoT tokens: entropy of the LM head's distribution (temperature 1), over the valid CoT tokens;
* image tokens: entropy of the conditional distribution (``logits="conditional"``, what training uses) or of the
  CFG-guided sampling distribution ``(u + w (c - u)) / temperature`` (``logits="cfg"``, what the authors'
  analysis used; the unconditional branch comes from a second teacher-forced pass on the unconditional prompt).

Text entropy (``text_entropy``): ``"masked"`` (default) = over the valid CoT tokens only; ``"released"`` = as
the authors' analysis script: LM-head entropy at every position of the whole ``[CoT-phase context | CoT]`` row
(prompt, CoT and the post-EOS positions, which hold EOS as in the released rollout; no mask), from a forward
with the attention mask ``[context mask | CoT mask]``; it needs the released CoT protocol (the rollout's
``text_ids``).

Entropies are normalised by ``ln V`` of their vocabulary (text or image), so they lie in [0, 1]; the std is the
unbiased std over the tokens of one sample. With ``entropy_bins > 0`` each record also carries histograms of
its per-token entropies over [0, 1] (``image_entropy_hist``, ``cot_entropy_hist``: counts in equal bins), for
token-entropy distribution plots (the EG-GRPO paper's Figure 5). One JSON line per image.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import torch

ENTROPY_SOURCES = ("conditional", "cfg")
TEXT_ENTROPY_MODES = ("masked", "released")


def entropy_histogram(values: torch.Tensor, bins: int) -> List[int]:
    """Counts of normalised entropies in ``bins`` equal bins over [0, 1] (values outside are clamped in)."""
    return [int(c) for c in torch.histc(values.double().clamp(0.0, 1.0), bins=bins, min=0.0, max=1.0).tolist()]


@torch.no_grad()
def released_text_entropy(model, context_ids: torch.Tensor, context_mask: torch.Tensor, cot_ids: torch.Tensor,
                          cot_mask: torch.Tensor) -> torch.Tensor:
    """Normalised LM-head entropy ``[B, P + Lc]`` at every position of ``[context | CoT]``, as the released
    analysis computes it: one forward with attention mask ``[context_mask | cot_mask]``, no position ids, no
    masking of the result (the prompt, the CoT and the post-EOS positions all count; `rollout` fills the latter
    with EOS, as the released rollout does)."""
    ids = torch.cat([context_ids, cot_ids], 1)
    mask = torch.cat([context_mask.long(), cot_mask.long()], 1)
    hidden = model.model.language_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    weight = model.lm_head.weight
    return head_entropy(hidden, weight) / math.log(weight.shape[0])


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dim; ``-inf`` logits contribute 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def head_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 rows_per_chunk: int = 1) -> torch.Tensor:
    """Per-token entropy ``[B, T]`` of ``hidden [B, T, D] @ weight.T (+ bias)``, a few rows at a time."""
    out = []
    for start in range(0, hidden.shape[0], rows_per_chunk):
        logits = hidden[start:start + rows_per_chunk].float() @ weight.float().T
        if bias is not None:
            logits = logits + bias.float()
        out.append(entropy_from_logits(logits))
    return torch.cat(out, 0)


def _stats(values: torch.Tensor) -> Dict[str, float]:
    values = values.double()
    if values.numel() == 0:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(values.mean()), "std": float(values.std()) if values.numel() > 1 else 0.0}


@torch.no_grad()
def analyze_prompt(model, tokenizer, prompt: str, metadata: dict, reward_set, cots: int, images: int,
                   rollout_cfg, generator: torch.Generator, logits: str = "conditional",
                   text_entropy: str = "masked", entropy_bins: int = 0, engine=None) -> List[dict]:
    """Records (one per image, CoT-major order) for one prompt; see the module docstring. ``engine``: a
    `egrpo.trainer.rollout.make_engine` result to reuse across prompts (None: the rollout builds one)."""
    from egrpo.trainer.rollout import cfg_logits, head_inputs, rollout, unconditional_ids
    from egrpo.trainer.tokenizer import janus_tokens

    if logits not in ENTROPY_SOURCES:
        raise ValueError(f"logits must be one of {ENTROPY_SOURCES}, got {logits!r}")
    if text_entropy not in TEXT_ENTROPY_MODES:
        raise ValueError(f"text_entropy must be one of {TEXT_ENTROPY_MODES}, got {text_entropy!r}")
    if isinstance(entropy_bins, bool) or not isinstance(entropy_bins, int) or entropy_bins < 0:
        raise ValueError(f"entropy_bins must be an integer >= 0 (0: no histograms), got {entropy_bins!r}")
    if cots < 0 or images < 1:
        raise ValueError(f"need cots >= 0 and images >= 1, got cots={cots}, images={images}")
    # N CoTs x M images (rollout.images_per_cot); without CoT, M images of the prompt.
    cfg = replace(rollout_cfg, cot=cots > 0, group_size=cots if cots > 0 else images,
                  images_per_cot=images if cots > 0 else 1)
    ro = rollout(model, tokenizer, [prompt], cfg, generator, engine)
    image_batch, text_batch = head_inputs(model, ro)
    if logits == "conditional":
        image_entropy = head_entropy(image_batch.hidden, image_batch.weight, image_batch.bias)
    else:
        uncond_mask = torch.ones_like(ro.attention_mask) if ro.image_positions == "released" else ro.attention_mask
        uncond = replace(ro, sequence_ids=unconditional_ids(ro.sequence_ids, janus_tokens(tokenizer)),
                         attention_mask=uncond_mask, cot_ids=None, cot_mask=None)
        uncond_batch, _ = head_inputs(model, uncond)
        rows = []
        for i in range(image_batch.hidden.shape[0]):
            cond = image_batch.hidden[i].float() @ image_batch.weight.float().T + image_batch.bias.float()
            unc = uncond_batch.hidden[i].float() @ image_batch.weight.float().T + image_batch.bias.float()
            rows.append(entropy_from_logits(cfg_logits(cond, unc, cfg.cfg_scale, cfg.temperature, cfg.top_k)))
        image_entropy = torch.stack(rows)
    image_entropy = image_entropy / math.log(image_batch.weight.shape[0])
    text_rows = None  # per row: the text-token entropies that enter the statistics
    if text_batch is not None and text_entropy == "released":
        if getattr(ro, "text_ids", None) is None:
            raise ValueError("text_entropy='released' needs the released CoT protocol (a rollout with text_ids)")
        full = released_text_entropy(model, ro.text_ids, ro.text_mask, ro.cot_ids, ro.cot_mask)
        text_rows = list(full)
    elif text_batch is not None:
        masked = head_entropy(text_batch.hidden, text_batch.weight) / math.log(text_batch.weight.shape[0])
        text_rows = [masked[row][text_batch.mask[row].bool()] for row in range(masked.shape[0])]

    meta = [dict(metadata or {}) for _ in ro.prompts]
    per_function = reward_set(ro.images, ro.prompts, meta).float().cpu()
    total = reward_set.combine(per_function)
    records = []
    for row in range(per_function.shape[0]):
        record = {
            "prompt": prompt,
            "cot_index": row // images,
            "image_index": row % images,
            "cot": ro.cot_texts[row] if ro.cot_texts is not None else None,
            "rewards": {name: float(per_function[row, k]) for k, name in enumerate(reward_set.names)},
            "reward": float(total[row]),
            "entropy_logits": logits,
            "entropy_normalised": True,
            "text_entropy": text_entropy,
        }
        image_stats = _stats(image_entropy[row])
        record["image_entropy_mean"], record["image_entropy_std"] = image_stats["mean"], image_stats["std"]
        if entropy_bins:
            record["image_entropy_hist"] = entropy_histogram(image_entropy[row], entropy_bins)
        if text_rows is not None:
            text_stats = _stats(text_rows[row])
            record["cot_entropy_mean"], record["cot_entropy_std"] = text_stats["mean"], text_stats["std"]
            record["cot_tokens"] = int(text_batch.mask[row].sum())
            if entropy_bins:
                record["cot_entropy_hist"] = entropy_histogram(text_rows[row], entropy_bins)
        else:
            record["cot_entropy_mean"] = record["cot_entropy_std"] = None
        records.append(record)
    return records


def analyze(model, tokenizer, prompts: Sequence[str], metadata: Optional[Sequence[dict]], reward_set, cots: int,
            images: int, rollout_cfg, seed: int = 0, logits: str = "conditional", out=None,
            progress: bool = True, text_entropy: str = "masked", entropy_bins: int = 0) -> List[dict]:
    """`analyze_prompt` over ``prompts`` (prompt ``k`` seeded with ``seed + k``); writes JSON lines to the open
    file ``out`` as it goes when given."""
    from tqdm.auto import tqdm

    from egrpo.trainer.rollout import make_engine

    device = model.lm_head.weight.device
    engine = make_engine(model, rollout_cfg)   # one for all prompts (holds the compiled steps with rollout.compile)
    records = []
    for k, prompt in enumerate(tqdm(list(prompts), desc="analyze", disable=not progress)):
        generator = torch.Generator(device=device).manual_seed(seed + k)
        rows = analyze_prompt(model, tokenizer, prompt, (metadata or [{}] * len(prompts))[k], reward_set, cots,
                              images, rollout_cfg, generator, logits, text_entropy, entropy_bins, engine)
        for row in rows:
            row["prompt_index"] = k
            row["seed"] = seed + k
            if out is not None:
                out.write(json.dumps(row) + "\n")
                out.flush()
        records += rows
    return records


def load_prompts(path: str, flag: str = "--prompts") -> tuple:
    """Prompts and metadata from a ``.txt`` (one prompt a line), ``.jsonl``/``.json``/``.yaml`` (``{"prompt": ...,
    **metadata}`` records) file: the trainer's own prompt loader. Its errors name ``flag`` (the command's)."""
    from egrpo.data import load_prompt_file, prompts_and_metadata
    from egrpo.data.prompts import PromptFileError
    from egrpo.errors import UserError

    try:
        return prompts_and_metadata(load_prompt_file(path))
    except PromptFileError as e:
        raise UserError(f"{flag} {e}" if str(e).startswith(path) else f"{flag} {path}: {e}") from None
