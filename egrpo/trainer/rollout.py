"""Rollouts of Janus-Pro: optional semantic CoT, then images by a batched, KV-cached CFG sampling loop.

Layout of one rollout of B = len(prompts) * group_size rows (each prompt's rows consecutive):

    sequence_ids  [B, L]  left-padded  <bos><|User|>: prompt\\n\\n<|Assistant|>: [CoT] <begin_of_image>
    image_tokens  [B, T]  sampled with CFG from the conditional row and an unconditional twin

The unconditional twin (rows B..2B of the sampling batch) is the same sequence with every token
other than BOS and the image-start token replaced by the pad token, as Janus does. Position ids are
``cumsum(attention_mask) - 1`` everywhere (sampling and teacher-forced forward), as HF generate does,
so every row starts at position 0 whatever its left padding.

`head_inputs` then runs ONE teacher-forced forward of the base language model over
``sequence_ids + image_tokens[:, :-1]`` (conditional rows only, no LM head, last hidden state only)
and hands the positions that predict CoT and image tokens to the fused heads as `HeadBatch`es.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from egrpo.objectives import HeadBatch

from .model import num_image_tokens
from .tokenizer import JanusTokens, encode_prompt, janus_tokens



@dataclass
class RolloutConfig:
    group_size: int = 8
    cot: bool = False            # semantic CoT before the image (EG-GRPO); False = STAGE style
    cot_max_tokens: int = 256
    cot_temperature: float = 1.0
    cot_top_k: Optional[int] = None
    cot_top_p: Optional[float] = None
    cfg_scale: float = 5.0
    temperature: float = 1.0
    top_k: Optional[int] = None
    image_tokens: int = 576      # must equal the model's num_image_tokens


@dataclass
class Rollout:
    prompts: List[str]                   # [B], each prompt repeated group_size times, consecutive
    sequence_ids: torch.Tensor           # [B, L] int64, left-padded, everything before the image tokens
    attention_mask: torch.Tensor         # [B, L] int64
    image_tokens: torch.Tensor           # [B, T] int64
    images: torch.Tensor                 # [B, 3, H, W] float32 in [0, 1]
    metrics: Dict[str, float] = field(default_factory=dict)
    group_size: int = 1
    cot_ids: Optional[torch.Tensor] = None        # [B, Lc] sampled CoT ids (pad after EOS); None without CoT
    cot_mask: Optional[torch.Tensor] = None       # [B, Lc] float32, 1 up to and including the first EOS
    cot_positions: Optional[torch.Tensor] = None  # [B, Lc] index in sequence_ids whose hidden predicts cot_ids
    cot_texts: Optional[List[str]] = None         # decoded CoTs (EOS and padding stripped)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(rows: List[List[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids and attention mask, each row right-aligned."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row):] = 1
    return ids.to(device), mask.to(device)


def unconditional_ids(sequence_ids: torch.Tensor, tokens: JanusTokens) -> torch.Tensor:
    """Janus' unconditional prompt: every token except BOS and the image start becomes the pad token."""
    keep = sequence_ids == tokens.image_start
    if tokens.bos is not None:
        keep |= sequence_ids == tokens.bos
    return torch.where(keep, sequence_ids, torch.full_like(sequence_ids, tokens.pad))


def _language_model(model, embeds, attention_mask, cache=None):
    """Last hidden state [B, S, D] of the base LM over ``embeds`` (the last S positions of ``attention_mask``)."""
    positions = position_ids_from_mask(attention_mask)[:, -embeds.shape[1]:]
    out = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state, out.past_key_values


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.text_config)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; [N, V] float."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens strictly before it already reach top_p (the best token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, temperature: float,
               top_k: Optional[int]) -> torch.Tensor:
    """The logits Janus samples image tokens from: ``(u + w (c - u)) / temperature``, then top-k."""
    guided = uncond + cfg_scale * (cond - uncond)
    return filter_logits(guided / temperature, top_k=top_k)


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _kl(sample_logits: torch.Tensor, cond_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(sample_logits) || softmax(cond_logits)); -inf sample logits contribute 0."""
    logp_s = torch.log_softmax(sample_logits.float(), -1)
    logp_c = torch.log_softmax(cond_logits.float(), -1)
    p_s = logp_s.exp()
    return torch.where(p_s > 0, p_s * (logp_s - logp_c), torch.zeros_like(p_s)).sum(-1)


def sample_cot(model, prompt_rows: List[List[int]], tokens: JanusTokens, cfg: RolloutConfig,
               generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample a text CoT per row with the LM head (KV cache), stopping each row at its first EOS.

    Returns ``cot_ids [B, Lc]`` (pad after EOS) and ``cot_mask [B, Lc]`` (float, 1 up to and including EOS).
    """
    device = model.lm_head.weight.device
    ids, mask = left_pad(prompt_rows, tokens.pad, device)
    embed = model.get_input_embeddings()
    hidden, cache = _language_model(model, embed(ids), mask, _new_cache(model))
    batch = ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sampled, valid = [], []
    for step in range(cfg.cot_max_tokens):
        logits = model.lm_head(hidden[:, -1]).float() / cfg.cot_temperature
        logits = filter_logits(logits, cfg.cot_top_k, cfg.cot_top_p)
        token = _sample(logits, generator)
        token = torch.where(finished, torch.full_like(token, tokens.pad), token)
        valid.append(~finished)
        sampled.append(token)
        finished = finished | (token == tokens.eos)
        if bool(finished.all()) or step == cfg.cot_max_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        hidden, cache = _language_model(model, embed(token[:, None]), mask, cache)
    if not sampled:
        empty = torch.zeros((batch, 0), dtype=torch.long, device=device)
        return empty, empty.float()
    return torch.stack(sampled, 1), torch.stack(valid, 1).float()


def sample_image_tokens(model, sequence_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: JanusTokens,
                        cfg: RolloutConfig, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched, KV-cached CFG sampling of ``cfg.image_tokens`` image tokens per row.

    Rows 0..B-1 of the sampling batch are conditional, rows B..2B-1 their unconditional twins.
    Returns ``(image_tokens [B, T], kl [B, T])`` with ``kl`` = KL(CFG sampling dist || conditional dist).
    """
    batch = sequence_ids.shape[0]
    ids = torch.cat([sequence_ids, unconditional_ids(sequence_ids, tokens)], dim=0)
    mask = attention_mask.repeat(2, 1)
    hidden, cache = _language_model(model, model.get_input_embeddings()(ids), mask, _new_cache(model))
    head = model.model.generation_head
    image_tokens, kls = [], []
    for step in range(cfg.image_tokens):
        logits = head(hidden[:, -1]).float()
        cond, uncond = logits[:batch], logits[batch:]
        sample_logits = cfg_logits(cond, uncond, cfg.cfg_scale, cfg.temperature, cfg.top_k)
        token = _sample(sample_logits, generator)
        image_tokens.append(token)
        kls.append(_kl(sample_logits, cond))
        if step == cfg.image_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        embeds = model.prepare_embeddings_for_image_generation(token.repeat(2)[:, None])
        hidden, cache = _language_model(model, embeds, mask, cache)
    return torch.stack(image_tokens, 1), torch.stack(kls, 1)


def decode_images(model, image_tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VQ-decode ``[B, T]`` image tokens to ``[B, 3, H, W]`` float32 in [0, 1] (in chunks: the decoder is wide)."""
    chunks = []
    for start in range(0, image_tokens.shape[0], batch_size):
        pixels = model.decode_image_tokens(image_tokens[start:start + batch_size])  # [b, H, W, 3] in ~[-1, 1]
        chunks.append(((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 3, 1, 2))
    return torch.cat(chunks, 0).contiguous()


def _validate(model, prompts, cfg: RolloutConfig, generator):
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("rollout: prompts must be a non-empty list of strings")
    if cfg.group_size < 1:
        raise ValueError(f"rollout.group_size must be >= 1, got {cfg.group_size}")
    expected = num_image_tokens(model)
    if cfg.image_tokens != expected:
        raise ValueError(f"rollout.image_tokens={cfg.image_tokens} but the model generates {expected} image tokens")
    if cfg.temperature <= 0 or cfg.cot_temperature <= 0:
        raise ValueError("rollout.temperature and rollout.cot_temperature must be > 0")
    if cfg.cot and cfg.cot_max_tokens < 1:
        raise ValueError("rollout.cot_max_tokens must be >= 1 when cot=True")
    if cfg.cot_top_p is not None and not 0 < cfg.cot_top_p <= 1:
        raise ValueError(f"rollout.cot_top_p must be in (0, 1], got {cfg.cot_top_p}")
    for name in ("top_k", "cot_top_k"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"rollout.{name} must be >= 1 or None, got {value}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("rollout: generator must be a torch.Generator")
    if generator.device.type != model.lm_head.weight.device.type:
        raise ValueError(f"rollout: generator is on {generator.device}, model on {model.lm_head.weight.device}")


@torch.no_grad()
def rollout(model, tokenizer, prompts: List[str], cfg: RolloutConfig, generator: torch.Generator) -> Rollout:
    """Sample ``group_size`` (CoT +) images per prompt; seeded by ``generator`` alone.

    Runs in eval mode (restored afterwards): in training mode HF gradient checkpointing drops the KV cache.
    """
    _validate(model, prompts, cfg, generator)
    was_training = model.training
    model.eval()
    try:
        return _rollout(model, tokenizer, prompts, cfg, generator)
    finally:
        model.train(was_training)


def _rollout(model, tokenizer, prompts, cfg, generator) -> Rollout:
    tokens = janus_tokens(tokenizer)
    device = model.lm_head.weight.device
    rows = [p for p in prompts for _ in range(cfg.group_size)]
    prompt_rows = [encode_prompt(tokenizer, p, tokens) for p in rows]
    metrics: Dict[str, float] = {}

    cot_ids = cot_mask = cot_positions = cot_texts = None
    if cfg.cot:
        cot_ids, cot_mask = sample_cot(model, prompt_rows, tokens, cfg, generator)
        # The image is conditioned on prompt + CoT (without its EOS) + image start.
        lengths = cot_mask.sum(1).long().tolist()
        cot_lists = [cot_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        cot_lists = [c[:-1] if c and c[-1] == tokens.eos else c for c in cot_lists]
        cot_texts = [tokenizer.decode(c, skip_special_tokens=True) for c in cot_lists]
        seq_rows = [p + c + [tokens.image_start] for p, c in zip(prompt_rows, cot_lists)]
        sequence_ids, attention_mask = left_pad(seq_rows, tokens.pad, device)
        # CoT token j of row i sits at sequence index start_i + j, so the hidden predicting it is at start_i + j - 1.
        start = sequence_ids.shape[1] - torch.tensor([len(r) for r in seq_rows], device=device)
        start = start + torch.tensor([len(p) for p in prompt_rows], device=device)
        cot_positions = start[:, None] - 1 + torch.arange(cot_ids.shape[1], device=device)[None, :]
        cot_positions = torch.where(cot_mask.bool(), cot_positions, torch.zeros_like(cot_positions))
        metrics["rollout/cot_tokens"] = float(cot_mask.sum(1).mean())
        metrics["rollout/cot_eos_frac"] = float((cot_ids == tokens.eos).any(1).float().mean())
    else:
        sequence_ids, attention_mask = left_pad([p + [tokens.image_start] for p in prompt_rows], tokens.pad, device)

    image_tokens, kl = sample_image_tokens(model, sequence_ids, attention_mask, tokens, cfg, generator)
    metrics["rollout/cfg_kl"] = float(kl.mean())
    images = decode_images(model, image_tokens)
    return Rollout(
        prompts=rows, sequence_ids=sequence_ids, attention_mask=attention_mask, image_tokens=image_tokens,
        images=images, metrics=metrics, group_size=cfg.group_size, cot_ids=cot_ids, cot_mask=cot_mask,
        cot_positions=cot_positions, cot_texts=cot_texts,
    )


def head_inputs(model, rollout: Rollout, *, backend="auto", chunk_size=None) -> Tuple[HeadBatch, Optional[HeadBatch]]:
    """(image, text) `HeadBatch`es from ONE teacher-forced forward of the base language model.

    Conditional rows only, ``use_cache=False``, last hidden state only; no vocabulary projection happens here:
    image positions go through the generation head's ``proj_out`` + activation (width D', cheap), and the
    fused kernels apply ``vision_head`` [V_img, D'] (with bias) and ``lm_head`` [V_text, D] (no bias) later.

    image: hidden [B, T, D'], targets = image tokens, mask ones, temperature 1 (conditional distribution).
    text (None without CoT): hidden [B, Lc, D] at the positions predicting the CoT tokens, mask = cot_mask.

    Gradients flow to the language model when called with grad enabled. ``backend``/``chunk_size`` are
    accepted for symmetry with the kernels; nothing here projects onto a vocabulary.
    """
    del backend, chunk_size
    seq, image_tokens = rollout.sequence_ids, rollout.image_tokens
    batch, length = seq.shape
    n_image = image_tokens.shape[1]
    embeds = torch.cat(
        [model.get_input_embeddings()(seq), model.prepare_embeddings_for_image_generation(image_tokens[:, :-1])], dim=1
    )
    mask = torch.cat([rollout.attention_mask, rollout.attention_mask.new_ones(batch, n_image - 1)], dim=1)
    hidden, _ = _language_model(model, embeds, mask)
    head = model.model.generation_head
    image_hidden = head.activation_fn(head.proj_out(hidden[:, length - 1:]))
    image = HeadBatch(
        hidden=image_hidden, weight=head.vision_head.weight, bias=head.vision_head.bias, targets=image_tokens,
        mask=torch.ones(batch, n_image, dtype=torch.float32, device=seq.device), temperature=1.0,
    )
    text = None
    if rollout.cot_ids is not None and rollout.cot_ids.shape[1] > 0:
        index = rollout.cot_positions[..., None].expand(-1, -1, hidden.shape[-1])
        text = HeadBatch(
            hidden=hidden.gather(1, index), weight=model.lm_head.weight, bias=None, targets=rollout.cot_ids,
            mask=rollout.cot_mask, temperature=1.0,
        )
    return image, text


def codebook_vectors(model, image_tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised VQ codebook vectors of ``image_tokens`` [B, T] -> [B, T, C] float32 (STAGE similarity)."""
    # Through the module call (not .weight indexing) so that ZeRO-3 parameter hooks gather the codebook.
    vectors = model.model.vqmodel.quantize.embedding(image_tokens)
    return F.normalize(vectors.float(), p=2, dim=-1)
