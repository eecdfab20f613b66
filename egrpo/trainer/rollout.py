"""Rollouts of Janus-Pro as the released RL code makes them: optional CoT, then images by KV-cached CFG sampling.

With ``rollout.cot`` (T2I-R1 / EG-GRPO) each prompt gets ``group_size`` CoTs, sampled with the LM head from the
reasoning template in a conversation with the CoT system prompt; every CoT then gets ``images_per_cot`` images,
sampled in a *new* conversation ``"{prompt}. {cot}"`` with an empty system prompt. Without CoT (STAGE) each prompt
gets ``group_size`` images from ``User: {prompt}``. The layouts (and their padding and position ids) are in
`egrpo.trainer.protocol`; docs/rollout.md ("Protocol") describes them with their sources.

One rollout of B = len(prompts) * group_size * images_per_cot rows (a prompt's rows consecutive, CoT-major):

    sequence_ids  [B, L]   image-phase context: BOS, text, right pads, image start
    image_tokens  [B, T]   sampled with CFG from the conditional row and its unconditional twin
    text_ids      [B, P]   CoT-phase context: left pads, BOS, system + template (None without CoT)
    cot_ids       [B, Lc]  the row's CoT (EOS repeated after its EOS, as released), cot_mask 1 through the first EOS

`head_inputs` gives the teacher-forced hidden states the losses need, each in its own context: image tokens after
``sequence_ids`` (conditional branch only, no CFG), CoT tokens after ``text_ids`` (LM head).

Sampling runs through `egrpo.rollout.RolloutEngine` (``rollout.engine: true``, the default): it receives exactly
the prefills `egrpo.trainer.protocol` builds (ids embedded, same masks and position ids) and draws with uniforms
from one ``torch.Generator`` per row, seeded from two numbers of ``generator`` (`seeds_from_generator`).
``rollout.engine: false`` keeps the plain transformers loop below (`sample_cot`, `sample_image_tokens`:
``DynamicCache``, one HF forward per token, ``torch.multinomial``): the tests' reference for the prefills and
contexts, and the path to reproduce runs made before the engine.
"""

import functools
import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from egrpo.objectives import HeadBatch
from egrpo.rollout import EngineConfig, RolloutEngine, SamplingParams, seeds_from_generator
from egrpo.rollout import Prefill as EnginePrefill
from egrpo.rollout.sampling import keep_mask
from egrpo.rollout.vq import decode_images as decode_vq

from .model import num_image_tokens
from .protocol import (COT_SYSTEM_PROMPT, IMAGE_POSITIONS, Prefill, cot_prompt_text, image_positions, image_prefill,
                       image_prompt_text, load_cot_template, text_prefill, unconditional_ids, valid_positions)
from .tokenizer import JanusTokens, encode_with_bos, janus_tokens

__all__ = ["RolloutConfig", "Rollout", "rollout", "make_engine", "engine_prefill", "head_inputs", "sample_cot",
           "sample_image_tokens", "cfg_logits", "filter_logits", "decode_images", "codebook_vectors", "unconditional_ids"]


@dataclass
class RolloutConfig:
    """Sampling settings; defaults are the released ones (docs/rollout.md gives each source)."""

    group_size: int = 8              # CoTs per prompt (cot) or images per prompt (no cot); released: 8
    images_per_cot: int = 1          # images per CoT (cot only); advantage group = group_size * images_per_cot
    cot: bool = False                # CoT phase before the image (T2I-R1 / EG-GRPO); False = STAGE layout
    cot_template: Optional[str] = None   # reasoning template file with one "{}"; None = the released one (packaged)
    cot_system_prompt: str = COT_SYSTEM_PROMPT
    cot_max_tokens: int = 1024       # released training scripts (inference scripts: 512)
    cot_max_prompt_tokens: Optional[int] = 512  # released: the CoT-phase prompt keeps its last 512 tokens; None: all
    cot_temperature: float = 1.0     # transformers' generate defaults: nothing else is passed by the released code
    cot_top_k: Optional[int] = 50
    cot_top_p: Optional[float] = None
    cfg_scale: float = 5.0
    temperature: float = 1.0         # image tokens: released softmax at temperature 1, no top-k / top-p
    top_k: Optional[int] = None
    image_positions: str = "released"    # "released": pads count as positions; "packed": only valid tokens do
    image_tokens: int = 576          # must equal the model's num_image_tokens
    engine: bool = True              # sample with egrpo.rollout's engine; false: the plain transformers loop (ours)
    compile: bool = False            # engine only: torch.compile the decode step (minutes to compile on CPU; ours)

    @property
    def samples_per_prompt(self) -> int:
        """Rows (images) per prompt = the advantage group."""
        return self.group_size * (self.images_per_cot if self.cot else 1)

    def validate(self) -> "RolloutConfig":
        """Raise ValueError naming the first bad setting; returns self."""
        def bad(name, rule):
            raise ValueError(f"rollout.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("group_size", "images_per_cot", "cot_max_tokens", "image_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "an integer >= 1")
        for name in ("temperature", "cot_temperature"):
            if not getattr(self, name) > 0:
                bad(name, "> 0")
        if not self.cfg_scale >= 0:
            bad("cfg_scale", ">= 0")
        for name, off in (("top_k", "no top-k"), ("cot_top_k", "no top-k"), ("cot_max_prompt_tokens", "never cut")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                bad(name, f"an integer >= 1 or null ({off})")
        if self.cot_top_p is not None and not 0 < self.cot_top_p <= 1:
            bad("cot_top_p", "in (0, 1] or null")
        if self.image_positions not in IMAGE_POSITIONS:
            bad("image_positions", " or ".join(repr(m) for m in IMAGE_POSITIONS))
        if self.images_per_cot != 1 and not self.cot:
            raise ValueError(f"rollout.images_per_cot={self.images_per_cot} needs rollout.cot=true; without a CoT "
                             "set the images per prompt with rollout.group_size")
        for name in ("engine", "compile"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if self.compile and not self.engine:
            raise ValueError("rollout.compile=true needs rollout.engine=true (the plain loop is never compiled)")
        if self.cot:
            load_cot_template(self.cot_template)   # readable, exactly one "{}"
        return self


@dataclass
class Rollout:
    prompts: List[str]                   # [B], each prompt's rows consecutive (CoT-major, then image)
    sequence_ids: torch.Tensor           # [B, L] int64 image-phase context: BOS, text, right pads, image start
    attention_mask: torch.Tensor         # [B, L] int64, 0 on the pads
    image_tokens: torch.Tensor           # [B, T] int64
    images: torch.Tensor                 # [B, 3, H, W] float32 in [0, 1]
    metrics: Dict[str, float] = field(default_factory=dict)
    group_size: int = 1                  # rows per prompt (the advantage group)
    images_per_cot: int = 1              # consecutive rows sharing one CoT
    image_positions: str = "released"    # how sequence_ids are given position ids (protocol.image_positions)
    text_ids: Optional[torch.Tensor] = None       # [B, P] CoT-phase context, left-padded; None without CoT
    text_mask: Optional[torch.Tensor] = None      # [B, P] int64
    cot_ids: Optional[torch.Tensor] = None        # [B, Lc] sampled CoT ids (EOS after EOS); None without CoT
    cot_mask: Optional[torch.Tensor] = None       # [B, Lc] float32, 1 up to and including the first EOS
    cot_texts: Optional[List[str]] = None         # [B] decoded CoTs (special tokens skipped), as fed to the image
    sampling_logp: Optional[torch.Tensor] = None  # [B, T] float32 log-prob of each image token under the sampling
    #                                               (CFG-guided, tempered, top-k) distribution; tis_clip_max needs it
    cot_sampling_logp: Optional[torch.Tensor] = None  # [B, Lc] float32 the same for the CoT tokens (0 after EOS)


@functools.lru_cache(maxsize=None)
def _cache_argument(lm_class) -> str:
    """The name of the KV-cache argument of ``lm.forward``: ``cache`` from transformers 5.24 on, where
    ``past_key_values`` is deprecated (removal announced for 5.40); ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"


def _language_model(model, embeds, attention_mask, position_ids, cache=None):
    """Last hidden state [B, S, D] of the base LM over ``embeds`` (the last S positions of ``attention_mask``)."""
    lm = model.model.language_model
    name = _cache_argument(type(lm))
    out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
             use_cache=cache is not None, **{name: cache})
    return out.last_hidden_state, getattr(out, name)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.text_config)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; [N, V] float. The sampler's own rule
    (``egrpo.rollout.sampling.keep_mask``: ties at either threshold stay together)."""
    keep = keep_mask(logits, top_k, top_p)
    return logits if keep is None else logits.masked_fill(~keep, float("-inf"))


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


def _token_logp(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[N] float32 log-prob of ``token`` under softmax(``logits``) (filtered logits: -inf outside the kept set)."""
    logits = logits.float()
    return logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def sample_cot(model, prefill: Prefill, tokens: JanusTokens, cfg: RolloutConfig,
               generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a text CoT per row of ``prefill`` with the LM head (KV cache), stopping each row at its first EOS.

    Returns ``cot_ids [R, Lc]`` (EOS after EOS), ``cot_mask [R, Lc]`` (float, 1 up to and including EOS) and
    ``logp [R, Lc]`` (each token's log-prob under the sampling distribution, 0 after EOS).
    Finished rows keep drawing (their draws are replaced by EOS, and they feed EOS), as in the released rollout,
    whose CoT holds the EOS id (Janus-Pro: 100001) at every position after the first EOS, not the pad id. The
    training losses mask those positions (bit-identical either way, tested); what reads them is the released
    text entropy analysis (`egrpo.tools.analyze`, ``text_entropy="released"``) and the released text percentiles
    (``include_padding_in_text_percentiles``), whose post-EOS entropies depend on the token there.
    """
    device = prefill.input_ids.device
    embed = model.get_input_embeddings()
    mask, positions = prefill.attention_mask, prefill.position_ids[:, -1:]
    hidden, cache = _language_model(model, embed(prefill.input_ids), mask, prefill.position_ids, _new_cache(model))
    rows = prefill.rows
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    sampled, valid, logps = [], [], []
    for step in range(cfg.cot_max_tokens):
        logits = model.lm_head(hidden[:, -1]).float() / cfg.cot_temperature
        logits = filter_logits(logits, cfg.cot_top_k, cfg.cot_top_p)
        token = _sample(logits, generator)
        logps.append(torch.where(finished, torch.zeros_like(token, dtype=torch.float32), _token_logp(logits, token)))
        token = torch.where(finished, torch.full_like(token, tokens.eos), token)
        valid.append(~finished)
        sampled.append(token)
        finished = finished | (token == tokens.eos)
        if bool(finished.all()) or step == cfg.cot_max_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        hidden, cache = _language_model(model, embed(token[:, None]), mask, positions, cache)
    return torch.stack(sampled, 1), torch.stack(valid, 1).float(), torch.stack(logps, 1)


def sample_image_tokens(model, cond: Prefill, uncond: Prefill, cfg: RolloutConfig,
                        generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched, KV-cached CFG sampling of ``cfg.image_tokens`` image tokens per conditional row.

    Rows 0..B-1 of the sampling batch are ``cond``, rows B..2B-1 their twins ``uncond``; every step appends the
    sampled token's generation embedding to both. Returns ``(image_tokens [B, T], kl [B, T], logp [B, T])`` with
    ``kl`` = KL(CFG sampling distribution || conditional distribution) and ``logp`` the sampled tokens' log-probs
    under the CFG sampling distribution.
    """
    batch = cond.rows
    both = Prefill.cat([cond, uncond])
    mask, positions = both.attention_mask, both.position_ids[:, -1:]
    hidden, cache = _language_model(model, model.get_input_embeddings()(both.input_ids), mask, both.position_ids,
                                    _new_cache(model))
    head = model.model.generation_head
    image_tokens, kls, logps = [], [], []
    for step in range(cfg.image_tokens):
        logits = head(hidden[:, -1]).float()
        cond_logits, uncond_logits = logits[:batch], logits[batch:]
        sample_logits = cfg_logits(cond_logits, uncond_logits, cfg.cfg_scale, cfg.temperature, cfg.top_k)
        token = _sample(sample_logits, generator)
        image_tokens.append(token)
        kls.append(_kl(sample_logits, cond_logits))
        logps.append(_token_logp(sample_logits, token))
        if step == cfg.image_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        embeds = model.prepare_embeddings_for_image_generation(token.repeat(2)[:, None])
        hidden, cache = _language_model(model, embeds, mask, positions, cache)
    return torch.stack(image_tokens, 1), torch.stack(kls, 1), torch.stack(logps, 1)


def decode_images(model, image_tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VQ-decode ``[B, T]`` image tokens to ``[B, 3, H, W]`` float32 in [0, 1] as the old loop did: 8 rows per
    decoder call, NCHW activations (``model.decode_image_tokens``'s computation; its transformers codebook lookup
    fails under ZeRO-3 from the second chunk on, see ``egrpo.rollout.vq.codebook_entry``)."""
    return decode_vq(model, image_tokens, batch_size=batch_size, channels_last=False)


def _validate(model, prompts, cfg: RolloutConfig, generator):
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("rollout: prompts must be a non-empty list of strings")
    cfg.validate()
    expected = num_image_tokens(model)
    if cfg.image_tokens != expected:
        raise ValueError(f"rollout.image_tokens={cfg.image_tokens} but the model generates {expected} image tokens")
    if not isinstance(generator, torch.Generator):
        raise TypeError("rollout: generator must be a torch.Generator")
    if generator.device.type != model.lm_head.weight.device.type:
        raise ValueError(f"rollout: generator is on {generator.device}, model on {model.lm_head.weight.device}")


def make_engine(model, cfg: RolloutConfig) -> Optional[RolloutEngine]:
    """The `RolloutEngine` ``rollout`` samples with (None with ``rollout.engine: false``). Build it once per model
    and pass it to every `rollout` call: with ``rollout.compile`` it holds the compiled decode steps."""
    return RolloutEngine(model, EngineConfig(compile=cfg.compile)) if cfg.engine else None


@torch.no_grad()
def rollout(model, tokenizer, prompts: List[str], cfg: RolloutConfig, generator: torch.Generator,
            engine: Optional[RolloutEngine] = None) -> Rollout:
    """Sample ``cfg.samples_per_prompt`` images (after ``group_size`` CoTs with ``cfg.cot``) per prompt; seeded by
    ``generator`` alone.

    ``engine``: the `make_engine` result to reuse (with ``rollout.engine: true``; None builds a fresh one, which
    is free unless ``rollout.compile`` is on). Runs in eval mode (restored afterwards): in training mode HF
    gradient checkpointing drops the KV cache.
    """
    _validate(model, prompts, cfg, generator)
    if cfg.engine and engine is None:
        engine = make_engine(model, cfg)
    if engine is not None and engine.model is not model:
        raise ValueError("rollout: engine was built for another model (make_engine(model, cfg))")
    was_training = model.training
    model.eval()
    try:
        return _rollout(model, tokenizer, prompts, cfg, generator, engine if cfg.engine else None)
    finally:
        model.train(was_training)


def engine_prefill(model, prefill: Prefill) -> EnginePrefill:
    """The protocol's prefill as the engine takes it: the same ids embedded, the same mask and positions."""
    return EnginePrefill(model.get_input_embeddings()(prefill.input_ids), prefill.attention_mask,
                         prefill.position_ids)


def _check_finite(logp: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """The engine's sampler cannot raise on NaN/inf probabilities as ``torch.multinomial`` does: check the
    sampled tokens' log-probs once per phase (one host sync) and raise the same kind of error."""
    bad = ~torch.isfinite(logp)
    if mask is not None:
        bad &= mask.bool()
    if bool(bad.any()):
        raise RuntimeError("rollout: sampling probabilities contain inf or nan (the weights have diverged)")


def _rollout(model, tokenizer, prompts, cfg, generator, engine: Optional[RolloutEngine]) -> Rollout:
    tokens = janus_tokens(tokenizer)
    if engine is not None:   # one host op per rollout: keeps it seeded by ``generator`` alone
        seed_text, seed_image = seeds_from_generator(generator)
    device = model.lm_head.weight.device
    per_cot = cfg.images_per_cot if cfg.cot else 1
    metrics: Dict[str, float] = {}
    extra = {}
    if cfg.cot:
        template = load_cot_template(cfg.cot_template)
        cot_prompts = [p for p in prompts for _ in range(cfg.group_size)]
        # As released: the tokenized prompt (BOS included) keeps its last cot_max_prompt_tokens tokens.
        keep = -cfg.cot_max_prompt_tokens if cfg.cot_max_prompt_tokens else None
        text = text_prefill([encode_with_bos(tokenizer, cot_prompt_text(p, template, cfg.cot_system_prompt),
                                             tokens)[keep:] for p in cot_prompts], tokens.pad, device)
        if engine is None:
            cot_ids, cot_mask, cot_logp = sample_cot(model, text, tokens, cfg, generator)
        else:
            # after a row's EOS the released CoT holds EOS again (not pad): see sample_cot
            cot = engine.generate_text(engine_prefill(model, text), cfg.cot_max_tokens, tokens.eos, tokens.eos,
                                       SamplingParams(cfg.cot_temperature, cfg.cot_top_k, cfg.cot_top_p), seed_text)
            cot_ids, cot_mask, cot_logp = cot.ids, cot.mask, cot.logp
            _check_finite(cot_logp, cot_mask)
        lengths = cot_mask.sum(1).long().tolist()
        # The released code decodes the whole completion with special tokens skipped (EOS and pads go).
        cot_texts = [tokenizer.decode(cot_ids[i, :n].tolist(), skip_special_tokens=True) for i, n in enumerate(lengths)]
        image_texts = [image_prompt_text(p, c) for p, c in zip(cot_prompts, cot_texts)]
        metrics["rollout/cot_tokens"] = float(cot_mask.sum(1).mean())
        metrics["rollout/cot_eos_frac"] = float((cot_ids == tokens.eos).any(1).float().mean())
        rep = lambda t: t.repeat_interleave(per_cot, 0)
        extra = dict(text_ids=rep(text.input_ids), text_mask=rep(text.attention_mask), cot_ids=rep(cot_ids),
                     cot_mask=rep(cot_mask), cot_texts=[c for c in cot_texts for _ in range(per_cot)],
                     cot_sampling_logp=rep(cot_logp))
        rows = [p for p in cot_prompts for _ in range(per_cot)]
        image_texts = [t for t in image_texts for _ in range(per_cot)]
    else:
        rows = [p for p in prompts for _ in range(cfg.group_size)]
        image_texts = [image_prompt_text(p) for p in rows]

    cond, uncond = image_prefill([encode_with_bos(tokenizer, t, tokens) for t in image_texts], tokens, device,
                                 cfg.image_positions)
    if engine is None:
        image_tokens, kl, image_logp = sample_image_tokens(model, cond, uncond, cfg, generator)
        images = decode_images(model, image_tokens)
    else:
        # Conditional rows then their unconditional twins, exactly as the plain loop's Prefill.cat([cond, uncond]).
        out = engine.generate_image_tokens(engine_prefill(model, Prefill.cat([cond, uncond])), cfg.image_tokens,
                                           SamplingParams(cfg.temperature, cfg.top_k, None, cfg.cfg_scale), seed_image)
        image_tokens, kl, image_logp = out.tokens, out.kl, out.logp
        _check_finite(image_logp)
        images = engine.decode(image_tokens)
    metrics["rollout/cfg_kl"] = float(kl.mean())
    return Rollout(
        prompts=rows, sequence_ids=cond.input_ids, attention_mask=cond.attention_mask, image_tokens=image_tokens,
        images=images, metrics=metrics, group_size=cfg.samples_per_prompt, images_per_cot=per_cot,
        image_positions=cfg.image_positions, sampling_logp=image_logp, **extra,
    )


def head_inputs(model, rollout: Rollout, *, backend="auto", chunk_size=None) -> Tuple[HeadBatch, Optional[HeadBatch]]:
    """(image, text) `HeadBatch`es from teacher-forced forwards of the base language model, one per context.

    No vocabulary projection happens here: image positions go through the generation head's ``proj_out`` +
    activation (width D', cheap), and the fused kernels apply ``vision_head`` [V_img, D'] (with bias) and
    ``lm_head`` [V_text, D] (no bias) later.

    image: the image-phase context ``sequence_ids`` (pads, image start) then the generation embeddings of the
    image tokens, mask = prompt mask then ones, conditional branch only (no CFG), temperature 1; hidden [B, T, D'].
    text (None without CoT): the CoT-phase context ``text_ids`` then the CoT, mask = text mask then ``cot_mask``;
    hidden [B, Lc, D] at the positions predicting the CoT tokens. Rows sharing a CoT (``images_per_cot``) share
    one forward; their hidden states are repeated, so gradients sum over the images of a CoT.

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
    hidden, _ = _language_model(model, embeds, mask, image_positions(mask, rollout.image_positions))
    head = model.model.generation_head
    image_hidden = head.activation_fn(head.proj_out(hidden[:, length - 1:]))
    image = HeadBatch(
        hidden=image_hidden, weight=head.vision_head.weight, bias=head.vision_head.bias, targets=image_tokens,
        mask=torch.ones(batch, n_image, dtype=torch.float32, device=seq.device), temperature=1.0,
        sampling_logp=rollout.sampling_logp,
    )
    text = None
    if rollout.cot_ids is not None and rollout.cot_ids.shape[1] > 0:
        per_cot = rollout.images_per_cot
        text_ids, text_mask = rollout.text_ids[::per_cot], rollout.text_mask[::per_cot]
        cot_ids, cot_mask = rollout.cot_ids[::per_cot], rollout.cot_mask[::per_cot]
        ids = torch.cat([text_ids, cot_ids], dim=1)
        mask = torch.cat([text_mask, cot_mask.to(text_mask.dtype)], dim=1)
        hidden, _ = _language_model(model, model.get_input_embeddings()(ids), mask, valid_positions(mask))
        start = text_ids.shape[1] - 1     # the hidden state at the prompt's last token predicts the first CoT token
        text_hidden = hidden[:, start:start + cot_ids.shape[1]]
        if per_cot > 1:
            text_hidden = text_hidden.repeat_interleave(per_cot, 0)
        text = HeadBatch(
            hidden=text_hidden, weight=model.lm_head.weight, bias=None, targets=rollout.cot_ids,
            mask=rollout.cot_mask, temperature=1.0, sampling_logp=rollout.cot_sampling_logp,
        )
    return image, text


def unconditional_image_hidden(model, rollout: Rollout, tokens: JanusTokens) -> torch.Tensor:
    """Teacher-forced hidden states ``[B, T, D']`` of the unconditional (CFG) branch at the image positions.

    The context is the sampler's unconditional twin of ``rollout.sequence_ids`` (``protocol.unconditional_ids``: BOS
    and the image start kept, pads in between; mask all ones for ``image_positions="released"``, the conditional
    mask for ``"packed"``), followed by the sampled image tokens' generation embeddings, exactly as
    :func:`head_inputs` builds the conditional branch. Like it, this stops before the vision head: the guided
    logits ``u + w (c - u)`` equal ``vision_head((1 - w) h_u + w h_c)`` (the head is affine), so the objective
    mixes these with the conditional hidden states and runs the same fused head once. Gradients flow to the
    language model when called with grad enabled (one more LM forward/backward over B rows).
    """
    seq, image_tokens = rollout.sequence_ids, rollout.image_tokens
    batch, length = seq.shape
    n_image = image_tokens.shape[1]
    uncond_ids = unconditional_ids(seq, tokens)
    prompt_mask = (torch.ones_like(rollout.attention_mask) if rollout.image_positions == "released"
                   else rollout.attention_mask)
    embeds = torch.cat([model.get_input_embeddings()(uncond_ids),
                        model.prepare_embeddings_for_image_generation(image_tokens[:, :-1])], dim=1)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, n_image - 1)], dim=1)
    hidden, _ = _language_model(model, embeds, mask, image_positions(mask, rollout.image_positions))
    head = model.model.generation_head
    return head.activation_fn(head.proj_out(hidden[:, length - 1:]))


def codebook_vectors(model, image_tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised VQ codebook vectors of ``image_tokens`` [B, T] -> [B, T, C] float32 (STAGE similarity)."""
    # Through the module call (not .weight indexing) so that ZeRO-3 parameter hooks gather the codebook.
    vectors = model.model.vqmodel.quantize.embedding(image_tokens)
    return F.normalize(vectors.float(), p=2, dim=-1)
