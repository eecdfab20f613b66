"""Plain HF-style reference loops (DynamicCache, one full HF forward per token) fed the engine's sampler."""

import torch
from transformers import DynamicCache

from egrpo.rollout.sampling import phase_uniforms, sample_torch
from egrpo.trainer.rollout import _cache_argument


def _forward(model, embeds, mask, positions, cache):
    lm = model.model.language_model
    name = _cache_argument(type(lm))  # ``cache`` from transformers 5.24 on, ``past_key_values`` before
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
    return out.last_hidden_state[:, -1], getattr(out, name)


def reference_image_tokens(model, prefill, num_tokens, params, seed):
    """HF loop over the 2B prefill rows: grow the mask by one per step, continue positions per row."""
    rows = prefill.attention_mask.shape[0]
    batch = rows // 2
    uniforms = phase_uniforms(seed, num_tokens, batch, "cpu")  # the engine's numbers: one row per draw
    cache = DynamicCache(config=model.config.text_config)
    mask, positions = prefill.attention_mask, prefill.position_ids
    hidden, cache = _forward(model, prefill.inputs_embeds, mask, positions, cache)
    tokens, kls = [], []
    next_position = positions[:, -1:]
    for step in range(num_tokens):
        logits = model.model.generation_head(hidden)
        token, kl = sample_torch(logits[:batch], logits[batch:], params, uniforms[step])
        tokens.append(token)
        kls.append(kl)
        if step == num_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        next_position = next_position + 1
        embeds = model.prepare_embeddings_for_image_generation(token.repeat(2)[:, None])
        hidden, cache = _forward(model, embeds, mask, next_position, cache)
    return torch.stack(tokens, 1), torch.stack(kls, 1)


def reference_text(model, prefill, max_new_tokens, eos_id, pad_id, params, seed):
    """HF loop with the LM head; EOS checked every step; stops when all rows finished."""
    uniforms = phase_uniforms(seed, max_new_tokens, prefill.attention_mask.shape[0], "cpu")
    cache = DynamicCache(config=model.config.text_config)
    mask, positions = prefill.attention_mask, prefill.position_ids
    hidden, cache = _forward(model, prefill.inputs_embeds, mask, positions, cache)
    finished = torch.zeros(mask.shape[0], dtype=torch.bool)
    next_position = positions[:, -1:]
    ids, valid = [], []
    for step in range(max_new_tokens):
        token, _ = sample_torch(model.lm_head(hidden), None, params, uniforms[step], want_kl=False)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        valid.append(~finished)
        ids.append(token)
        finished = finished | (token == eos_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        next_position = next_position + 1
        hidden, cache = _forward(model, model.get_input_embeddings()(token[:, None]), mask, next_position, cache)
    return torch.stack(ids, 1), torch.stack(valid, 1).float()
