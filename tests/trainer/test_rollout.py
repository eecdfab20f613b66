"""The rollout against hand-built expectations of the released protocol (tiny random Janus, char tokenizer).

Expected token sequences are written here from the protocol's description (docs/rollout.md, "Protocol"): with the
character-level tokenizer every character is one token, so a prompt's ids are BOS followed by its characters.

Both samplers run: the engine (``rollout.engine: true``, default; its prefills are recorded at the engine's entry
points) and the plain transformers loop (``engine: false``; its language-model calls are recorded). Exact token
expectations feed the reference the sampler's own random numbers: ``torch.multinomial`` on the trainer's generator
for the loop, the engine's counter-based uniforms (``sample_torch`` with the seeds drawn from the generator) for
the engine.
"""

import json

import pytest
import torch

import egrpo.rollout.engine as engine_module
import egrpo.trainer.rollout as rollout_module
from egrpo.kernels import linear_logprob_entropy
from egrpo.rollout import RolloutEngine, SamplingParams, seeds_from_generator
from egrpo.rollout.sampling import phase_uniforms, sample_torch
from egrpo.trainer.config import ConfigError, load_config
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.protocol import (COT_SYSTEM_PROMPT, Prefill, cot_prompt_text, deepseek_conversation,
                                    load_cot_template, text_prefill)
from egrpo.trainer.rollout import (RolloutConfig, engine_prefill, codebook_vectors, filter_logits, head_inputs,
                                   rollout, sample_cot)
from egrpo.trainer.tokenizer import janus_tokens

from ._helpers import DEMO

TINY = dict(image_size=32, patch_size=8, vq_channel_multiplier=(1, 1, 2, 2), initializer_range=0.2)  # 16 tokens, 32 px
PROMPTS = ["a red square", "blue"]  # different lengths: padding is exercised
SYSTEM = "Sys."
TEMPLATE = ' Draw "{}" now: '      # leading/trailing spaces: the user turn is stripped


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "cot.txt"
    path.write_text(TEMPLATE, encoding="utf-8")
    return str(path)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ hand-built layouts
def chars(tokenizer, text):
    """The char tokenizer's ids of ``text``, one per character, looked up one by one."""
    ids = [tokenizer.convert_tokens_to_ids(c) for c in text]
    assert tokenizer.unk_token_id not in ids, text
    return ids


def hand_text_rows(tokenizer, prompts, system=SYSTEM, template=TEMPLATE):
    """CoT phase: BOS, system, blank line, "User: " + stripped filled template, blank line, "Assistant:"."""
    bos = janus_tokens(tokenizer).bos
    return [[bos] + chars(tokenizer, system + "\n\n" + "User: " + template.format(p).strip() + "\n\n" + "Assistant:")
            for p in prompts]


def hand_image_rows(tokenizer, prompts, cots=None):
    """Image phase: BOS, "User: " + prompt (or "{prompt}. {cot}", stripped), blank line, "Assistant:"."""
    bos = janus_tokens(tokenizer).bos
    contents = prompts if cots is None else [f"{p}. {c}".strip() for p, c in zip(prompts, cots)]
    return [[bos] + chars(tokenizer, "User: " + c + "\n\n" + "Assistant:") for c in contents]


def hand_left_pad(rows, pad):
    """Left padding; positions count valid tokens only (pads at 0)."""
    length = max(map(len, rows))
    ids = [[pad] * (length - len(r)) + r for r in rows]
    mask = [[0] * (length - len(r)) + [1] * len(r) for r in rows]
    positions = [[0] * (length - len(r)) + list(range(len(r))) for r in rows]
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(positions)


def hand_image_layout(rows, tokens, mode="released"):
    """Right padding, image start after the pads; unconditional twin = BOS, pads, image start."""
    length = max(map(len, rows)) + 1
    cond = [r + [tokens.pad] * (length - 1 - len(r)) + [tokens.image_start] for r in rows]
    cond_mask = [[1] * len(r) + [0] * (length - 1 - len(r)) + [1] for r in rows]
    uncond = [[tokens.bos] + [tokens.pad] * (length - 2) + [tokens.image_start] for _ in rows]
    uncond_mask = [[1] * length for _ in rows] if mode == "released" else cond_mask
    return torch.tensor(cond), torch.tensor(cond_mask), torch.tensor(uncond), torch.tensor(uncond_mask)


def hand_positions(mask, mode):
    if mode == "released":   # pads count: 0..L-1 on every row
        return torch.arange(mask.shape[1]).expand_as(mask)
    out = []
    for row in mask.tolist():
        count, pos = -1, []
        for m in row:
            count += m
            pos.append(max(count, 0))
        out.append(pos)
    return torch.tensor(out)


def hand_decode(tokenizer, ids):
    """A CoT as text: its characters, special tokens (EOS, pad, ...) skipped."""
    special = set(tokenizer.all_special_ids)
    return "".join(tokenizer.convert_ids_to_tokens(i) for i in ids if i not in special)


class LMCalls:
    """Records the inputs of every call of the base language model, and the prefill of every engine phase (the
    engine drives the layers itself, so only its prefills are visible: one per phase)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        keys = ("inputs_embeds", "attention_mask", "position_ids")

        def hook(module, args, kwargs):
            self.calls.append({k: kwargs[k].detach().clone() for k in keys})
        self.handle = self.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        self.saved = {}
        for name in ("generate_text", "generate_image_tokens"):
            original = self.saved[name] = getattr(RolloutEngine, name)

            def wrapped(engine, prefill, *args, _original=original, **kwargs):
                self.calls.append({k: getattr(prefill, k).detach().clone() for k in keys})
                return _original(engine, prefill, *args, **kwargs)
            setattr(RolloutEngine, name, wrapped)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        for name, original in self.saved.items():
            setattr(RolloutEngine, name, original)


def _raise_eos(model, tokenizer, amount=5.0):
    """Raise the EOS logit of the LM head so that CoTs stop at different lengths."""
    eos = janus_tokens(tokenizer).eos

    def hook(module, inputs, output):
        output = output.clone()
        output[..., eos] += amount
        return output

    return model.lm_head.register_forward_hook(hook)


def _cot_cfg(template_file, **kw):
    base = dict(group_size=2, images_per_cot=2, cot=True, cot_template=template_file, cot_system_prompt=SYSTEM,
                cot_max_tokens=8, image_tokens=16)
    return RolloutConfig(**{**base, **kw})


SAMPLERS = {"engine": True, "loop": False}


@pytest.fixture(scope="module", params=list(SAMPLERS))
def cot_case(request, tiny_model, template_file):
    """A CoT rollout (2 prompts x 2 CoTs x 2 images) and the language-model calls of sampling and teacher forcing,
    with either sampler (the last item names it)."""
    model, tokenizer = tiny_model
    handle = _raise_eos(model, tokenizer)
    try:
        with LMCalls(model) as sampling:
            out = rollout(model, tokenizer, PROMPTS, _cot_cfg(template_file, engine=SAMPLERS[request.param]),
                          _generator(0))
    finally:
        handle.remove()
    with torch.no_grad(), LMCalls(model) as forcing:
        image, text = head_inputs(model, out)
    return out, sampling.calls, forcing.calls, image, text, request.param


# ------------------------------------------------------------------------------------------ protocol text
def test_deepseek_conversation_format():
    eos = "<｜end▁of▁sentence｜>"
    assert deepseek_conversation([("User", "hi"), ("Assistant", "")]) == "User: hi\n\nAssistant:"
    assert deepseek_conversation([("User", "  hi \n"), ("Assistant", "")], "S") == "S\n\nUser: hi\n\nAssistant:"
    turns = [("User", "hi"), ("Assistant", " yo "), ("User", "q"), ("Assistant", "")]
    assert deepseek_conversation(turns, "S") == f"S\n\nUser: hi\n\nAssistant: yo{eos}User: q\n\nAssistant:"
    # The whole result is stripped too: a filled last turn loses its trailing blank line.
    assert deepseek_conversation([("User", "hi")]) == "User: hi"


def test_packaged_template_is_the_released_one():
    template = load_cot_template()
    lines = template.split("\n")
    assert lines[0] == 'You are asked to generate an image based on this prompt: "{}"'
    assert lines[-1] == "Do not miss objects. Output your visualization directly without explanation: "
    assert len(lines) == 9 and [line[:2] for line in lines[2:8]] == ["1.", "2.", "3.", "4.", "5.", "6."]
    assert COT_SYSTEM_PROMPT == ("You are a helpful assistant that receives an image prompt and generate a "
                                 "visualization of the prompt.")
    text = cot_prompt_text("a cat", template)
    assert text == (COT_SYSTEM_PROMPT + "\n\nUser: " + template.replace("{}", "a cat").strip() + "\n\nAssistant:")


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_default_cot_rollout_uses_the_packaged_template_and_system_prompt(tiny_model, sampler):
    model, tokenizer = tiny_model
    cfg = RolloutConfig(group_size=2, cot=True, cot_max_tokens=1, image_tokens=16, engine=SAMPLERS[sampler])
    with LMCalls(model) as lm:
        out = rollout(model, tokenizer, ["a cat"], cfg, _generator(0))
    expected = hand_text_rows(tokenizer, ["a cat"] * 2, COT_SYSTEM_PROMPT, load_cot_template())
    # With the character tokenizer the released prompt is longer than 512 tokens: as released, the last 512 stay
    # (BOS is cut with the rest of the front).
    assert len(expected[0]) > 512
    expected = [row[-512:] for row in expected]
    ids, mask, positions = hand_left_pad(expected, janus_tokens(tokenizer).pad)
    embed = model.get_input_embeddings()
    assert torch.equal(lm.calls[0]["inputs_embeds"], embed(ids))
    assert torch.equal(lm.calls[0]["attention_mask"], mask) and torch.equal(lm.calls[0]["position_ids"], positions)
    assert torch.equal(out.text_ids, ids)
    assert out.cot_ids.shape == (2, 1)


@pytest.mark.parametrize("keep", [None, 7, 10_000])
def test_cot_prompt_keeps_its_last_tokens(tiny_model, template_file, keep):
    """``rollout.cot_max_prompt_tokens``: each tokenized CoT prompt (BOS included) keeps its last ``keep`` tokens,
    shorter ones stay whole; None never cuts. The kept ids are what the loss is teacher-forced on."""
    model, tokenizer = tiny_model
    prompts = ["a cat", "two red apples on a table"]
    cfg = _cot_cfg(template_file, group_size=1, images_per_cot=1, cot_max_tokens=1, cot_max_prompt_tokens=keep)
    with LMCalls(model) as lm:
        out = rollout(model, tokenizer, prompts, cfg, _generator(0))
    rows = [row if keep is None else row[-keep:] for row in hand_text_rows(tokenizer, prompts)]
    assert (keep == 7) == any(len(row) < len(full) for row, full in zip(rows, hand_text_rows(tokenizer, prompts)))
    ids, mask, positions = hand_left_pad(rows, janus_tokens(tokenizer).pad)
    assert torch.equal(lm.calls[0]["inputs_embeds"], model.get_input_embeddings()(ids))
    assert torch.equal(out.text_ids, ids) and torch.equal(out.text_mask, mask)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_cot_max_prompt_tokens_is_named(value):
    with pytest.raises(ValueError, match="rollout.cot_max_prompt_tokens"):
        RolloutConfig(cot_max_prompt_tokens=value).validate()


# ------------------------------------------------------------------------------------------ exact layouts
def test_text_phase_prefill_is_the_released_layout(tiny_model, cot_case):
    model, tokenizer = tiny_model
    out, calls, _, _, _, sampler = cot_case
    tokens = janus_tokens(tokenizer)
    cot_prompts = [p for p in PROMPTS for _ in range(2)]
    ids, mask, positions = hand_left_pad(hand_text_rows(tokenizer, cot_prompts), tokens.pad)
    first = calls[0]
    assert torch.equal(first["inputs_embeds"], model.get_input_embeddings()(ids))
    assert torch.equal(first["attention_mask"], mask)
    assert torch.equal(first["position_ids"], positions)
    if sampler == "loop":
        # Decode steps continue each row's positions and attend to everything so far (the engine does the same
        # inside its static cache: tests/rollout/test_engine.py compares it token for token with this loop).
        second = calls[1]
        assert second["inputs_embeds"].shape[1] == 1
        assert torch.equal(second["position_ids"][:, 0], positions[:, -1] + 1)
        assert torch.equal(second["attention_mask"], torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1))
    else:
        assert len(calls) == 2   # one prefill per phase
    # Rollout keeps the context per image row (each CoT's rows consecutive).
    assert torch.equal(out.text_ids, ids.repeat_interleave(2, 0))
    assert torch.equal(out.text_mask, mask.repeat_interleave(2, 0))


def test_cot_stops_at_eos_and_is_decoded_without_special_tokens(tiny_model, cot_case):
    _, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    out = cot_case[0]
    ids, mask = out.cot_ids, out.cot_mask
    stopped = 0
    for row in range(ids.shape[0]):
        row_ids = ids[row].tolist()
        end = row_ids.index(tokens.eos) + 1 if tokens.eos in row_ids else len(row_ids)
        stopped += tokens.eos in row_ids
        assert mask[row, :end].eq(1).all() and mask[row, end:].eq(0).all()
        assert all(t == tokens.eos for t in row_ids[end:])          # EOS again after EOS, as released
        assert out.cot_texts[row] == hand_decode(tokenizer, row_ids[:end])
    assert 0 < stopped and int(mask.sum(1).min()) < ids.shape[1]
    assert out.metrics["rollout/cot_tokens"] == pytest.approx(float(mask[::2].sum(1).mean()))
    # N CoTs x M images: rows are prompt-major, then CoT, then image; a CoT's images share it.
    assert out.prompts == [p for p in PROMPTS for _ in range(4)]
    assert out.group_size == 4 and out.images_per_cot == 2
    for row in range(0, 8, 2):
        assert torch.equal(ids[row], ids[row + 1]) and out.cot_texts[row] == out.cot_texts[row + 1]
        assert not torch.equal(out.image_tokens[row], out.image_tokens[row + 1])


def test_image_phase_prefill_is_the_released_layout(tiny_model, cot_case):
    model, tokenizer = tiny_model
    out, calls, _, _, _, sampler = cot_case
    tokens = janus_tokens(tokenizer)
    prefills = [i for i, c in enumerate(calls) if c["inputs_embeds"].shape[1] > 1]
    assert len(prefills) == 2                   # text phase, then image phase
    image_call = calls[prefills[1]]
    rows = hand_image_rows(tokenizer, out.prompts, [hand_decode(tokenizer, r) for r in out.cot_ids.tolist()])
    cond, cond_mask, uncond, uncond_mask = hand_image_layout(rows, tokens)
    assert cond_mask.eq(0).any()                # CoTs of different lengths: some rows are padded
    embed = model.get_input_embeddings()
    assert torch.equal(image_call["inputs_embeds"], embed(torch.cat([cond, uncond])))
    assert torch.equal(image_call["attention_mask"], torch.cat([cond_mask, uncond_mask]))
    length = cond.shape[1]
    assert torch.equal(image_call["position_ids"], torch.arange(length).expand(16, length))
    assert torch.equal(out.sequence_ids, cond) and torch.equal(out.attention_mask, cond_mask)
    if sampler == "engine":
        return
    # First image decode step: the sampled token's generation embedding on both rows, position L, mask grows.
    step = calls[prefills[1] + 1]
    assert torch.equal(step["position_ids"], torch.full((16, 1), length))
    assert torch.equal(step["inputs_embeds"],
                       model.prepare_embeddings_for_image_generation(out.image_tokens[:, :1].repeat(2, 1)))
    assert step["attention_mask"].shape == (16, length + 1) and step["attention_mask"][:, -1].eq(1).all()


def test_teacher_forced_inputs_are_the_released_contexts(tiny_model, cot_case):
    model, tokenizer = tiny_model
    out, _, forcing, _, _, _ = cot_case
    tokens = janus_tokens(tokenizer)
    assert len(forcing) == 2
    image_call, text_call = forcing
    embed = model.get_input_embeddings()
    # Image: image-phase ids (pads, image start) + the image tokens' generation embeddings, conditional rows only.
    rows = hand_image_rows(tokenizer, out.prompts, [hand_decode(tokenizer, r) for r in out.cot_ids.tolist()])
    cond, cond_mask, _, _ = hand_image_layout(rows, tokens)
    images = out.image_tokens[:, :-1]
    assert torch.equal(image_call["inputs_embeds"],
                       torch.cat([embed(cond), model.prepare_embeddings_for_image_generation(images)], 1))
    full_mask = torch.cat([cond_mask, torch.ones_like(images)], 1)
    assert torch.equal(image_call["attention_mask"], full_mask)
    assert torch.equal(image_call["position_ids"], hand_positions(full_mask, "released"))
    # Text: BOS + system + template + CoT, once per CoT (not per image), mask = prompt mask then CoT mask.
    cot_prompts = [p for p in PROMPTS for _ in range(2)]
    ids, mask, _ = hand_left_pad(hand_text_rows(tokenizer, cot_prompts), tokens.pad)
    cot = out.cot_ids[::2]
    full_mask = torch.cat([mask, out.cot_mask[::2].long()], 1)
    assert torch.equal(text_call["inputs_embeds"], embed(torch.cat([ids, cot], 1)))
    assert torch.equal(text_call["attention_mask"], full_mask)
    assert torch.equal(text_call["position_ids"], hand_positions(full_mask, "packed"))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_no_cot_image_prefill_is_the_stage_layout(tiny_model, sampler):
    model, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    with LMCalls(model) as lm:
        out = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=2, image_tokens=16, engine=SAMPLERS[sampler]),
                      _generator(0))
    rows = hand_image_rows(tokenizer, [p for p in PROMPTS for _ in range(2)])
    cond, cond_mask, uncond, uncond_mask = hand_image_layout(rows, tokens)
    first = lm.calls[0]
    assert torch.equal(first["inputs_embeds"], model.get_input_embeddings()(torch.cat([cond, uncond])))
    assert torch.equal(first["attention_mask"], torch.cat([cond_mask, uncond_mask]))
    assert torch.equal(first["position_ids"], torch.arange(cond.shape[1]).expand(8, -1))
    assert out.text_ids is None and out.cot_ids is None and out.group_size == 2


# ------------------------------------------------------------------------------------------ sampling
def _multinomial(generator):
    """The plain loop's draw: torch.multinomial on the trainer's generator."""
    return lambda step, c, u, guided: torch.multinomial(guided.softmax(-1), 1, generator=generator).squeeze(-1)


def _engine_uniforms(seed, step, rows):
    """The engine's uniforms of draw ``step`` of a phase seeded ``seed`` (a prefix of its phase table)."""
    return phase_uniforms(seed, step + 1, rows, "cpu")[step]


def _engine_draw(seed, params):
    """The engine's draw: the same sampler function fed the engine's uniforms for (seed, step)."""
    return lambda step, c, u, guided: sample_torch(c, u, params, _engine_uniforms(seed, step, c.shape[0]),
                                                   want_kl=False)[0]


def _naive_cfg_sampling(model, cond, cond_mask, uncond, uncond_mask, mode, cfg, draw):
    """Reference: at every step recompute each row and branch from scratch (no KV cache), one row at a time.
    Returns the tokens, the CFG KL and the sampled tokens' log-probs under the guided distribution."""
    embed = model.get_input_embeddings()
    head = model.model.generation_head
    sampled = [[] for _ in range(cond.shape[0])]
    kls, logps = [], []
    for step in range(cfg.image_tokens):
        logits = {"c": [], "u": []}
        for row in range(cond.shape[0]):
            for branch, ids, mask in (("c", cond[row], cond_mask[row]), ("u", uncond[row], uncond_mask[row])):
                x = embed(ids[None])
                m = mask[None]
                if sampled[row]:
                    x = torch.cat([x, model.prepare_embeddings_for_image_generation(torch.tensor([sampled[row]]))], 1)
                    m = torch.cat([m, torch.ones(1, len(sampled[row]), dtype=m.dtype)], 1)
                hidden = model.model.language_model(inputs_embeds=x, attention_mask=m,
                                                    position_ids=hand_positions(m, mode), use_cache=False)
                logits[branch].append(head(hidden.last_hidden_state[0, -1]).float())
        c, u = torch.stack(logits["c"]), torch.stack(logits["u"])
        guided = (u + cfg.cfg_scale * (c - u)) / cfg.temperature
        if cfg.top_k is not None:
            kth = guided.topk(cfg.top_k, dim=-1).values[:, -1:]
            guided = guided.masked_fill(guided < kth, float("-inf"))
        probs = guided.softmax(-1)
        token = draw(step, c, u, guided)
        ratio = guided.log_softmax(-1) - c.log_softmax(-1)
        kls.append(torch.where(probs > 0, probs * ratio, torch.zeros_like(probs)).sum(-1))
        logps.append(guided.double().log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
        for row in range(cond.shape[0]):
            sampled[row].append(int(token[row]))
    return torch.tensor(sampled), torch.stack(kls, 1), torch.stack(logps, 1)


@torch.no_grad()
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("mode, temperature, top_k", [("released", 1.0, None), ("packed", 0.9, 100)])
def test_cfg_sampling_matches_naive_reference(tiny_model, mode, temperature, top_k, sampler):
    model, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    cfg = RolloutConfig(group_size=2, cfg_scale=3.0, temperature=temperature, top_k=top_k, image_tokens=16,
                        image_positions=mode, engine=SAMPLERS[sampler])
    out = rollout(model, tokenizer, PROMPTS, cfg, _generator(7))
    rows = hand_image_rows(tokenizer, [p for p in PROMPTS for _ in range(2)])
    layout = hand_image_layout(rows, tokens, mode)
    if sampler == "engine":
        draw = _engine_draw(seeds_from_generator(_generator(7))[1], SamplingParams(temperature, top_k, None, 3.0))
    else:
        draw = _multinomial(_generator(7))
    expected, kl, logp = _naive_cfg_sampling(model, *layout, mode, cfg, draw)
    assert torch.equal(out.image_tokens, expected)
    assert out.metrics["rollout/cfg_kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert out.metrics["rollout/cfg_kl"] > 0
    # The sampling log-probs (for tis_clip_max) are those of the guided, tempered, top-k distribution.
    assert out.sampling_logp.dtype == torch.float32 and out.sampling_logp.shape == expected.shape
    torch.testing.assert_close(out.sampling_logp.double(), logp, rtol=1e-4, atol=1e-4)


def _inverse_cdf_sampler():
    """Deterministic stand-in for multinomial: the same uniform number for every row at a step."""
    state = {"step": 0}

    def sample(logits, generator):
        u = (0.5 + 0.6180339887 * state["step"]) % 1.0
        state["step"] += 1
        cdf = torch.softmax(logits.double(), -1).cumsum(-1)
        return (cdf < u).sum(-1).clamp_max(logits.shape[-1] - 1)

    return sample


def _same_uniform_for_every_row(monkeypatch):
    """The engine's uniforms with row 0's number on every row (a row's draw no longer depends on its index)."""
    original = engine_module.phase_uniforms
    monkeypatch.setattr(engine_module, "phase_uniforms",
                        lambda seed, steps, rows, device: original(seed, steps, 1, device).expand(steps, rows))


@torch.no_grad()
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_packed_positions_make_a_row_independent_of_the_others_padding(tiny_model, monkeypatch, sampler):
    model, tokenizer = tiny_model
    cfg = RolloutConfig(group_size=1, image_tokens=16, image_positions="packed", engine=SAMPLERS[sampler])
    monkeypatch.setattr(rollout_module, "_sample", _inverse_cdf_sampler())
    _same_uniform_for_every_row(monkeypatch)
    batched = rollout(model, tokenizer, PROMPTS, cfg, _generator(0))
    assert batched.attention_mask[1].eq(0).any()      # "blue" is right-padded in the batch
    for row, prompt in enumerate(PROMPTS):
        monkeypatch.setattr(rollout_module, "_sample", _inverse_cdf_sampler())
        alone = rollout(model, tokenizer, [prompt], cfg, _generator(0))
        assert torch.equal(batched.image_tokens[row], alone.image_tokens[0]), prompt
    # And the teacher-forced hidden states of the padded row equal those of the row alone.
    image, _ = head_inputs(model, batched)
    alone_image, _ = head_inputs(model, alone)
    torch.testing.assert_close(image.hidden[1:], alone_image.hidden, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_cot_sampling_matches_naive_reference(tiny_model, sampler):
    model, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    rows = [[tokens.bos] + chars(tokenizer, p) for p in PROMPTS for _ in range(2)]
    cfg = RolloutConfig(cot=True, cot_max_tokens=6, cot_temperature=0.8, cot_top_k=20)
    prefill = text_prefill(rows, tokens.pad, "cpu")
    handle = _raise_eos(model, tokenizer, 3.0)   # rows stop at different steps
    try:
        if sampler == "loop":
            ids, mask, logp = sample_cot(model, prefill, tokens, cfg, _generator(11))
            generator = _generator(11)
            draw = lambda step, raw, logits: torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        else:
            params = SamplingParams(0.8, 20)
            cot = RolloutEngine(model).generate_text(engine_prefill(model, prefill), cfg.cot_max_tokens, tokens.eos,
                                                     tokens.eos, params, seed=11)    # the fill rollout() passes
            ids, mask, logp = cot.ids, cot.mask, cot.logp
            draw = lambda step, raw, logits: sample_torch(raw, None, params, _engine_uniforms(11, step, raw.shape[0]),
                                                          False)[0]
        # Reference: recompute every row alone from scratch at each step; finished rows keep drawing (and get EOS).
        sampled = [list(r) for r in rows]
        expected, expected_logp = [[] for _ in rows], [[] for _ in rows]
        done = [False] * len(rows)
        for step in range(cfg.cot_max_tokens):
            raw = torch.stack([
                model.lm_head(model.model.language_model(input_ids=torch.tensor([seq]), use_cache=False)
                              .last_hidden_state[0, -1]) for seq in sampled])
            logits = raw / cfg.cot_temperature
            kth = logits.topk(20, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
            token = draw(step, raw, logits)
            token_logp = logits.double().log_softmax(-1).gather(-1, token[:, None])[:, 0]
            for i, t in enumerate(token.tolist()):
                expected[i].append(tokens.eos if done[i] else t)
                expected_logp[i].append(0.0 if done[i] else float(token_logp[i]))
                sampled[i].append(t)
                done[i] = done[i] or t == tokens.eos
            if all(done):
                break
    finally:
        handle.remove()
    assert ids.tolist() == expected
    assert mask.shape == ids.shape and 0 < int(mask.sum(1).min()) < ids.shape[1]   # ragged stops exercised
    torch.testing.assert_close(logp.double(), torch.tensor(expected_logp, dtype=torch.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective, settings, same", [
    ("grpo", {}, True), ("eg_grpo", {}, True),
    ("eg_grpo", {"include_padding_in_text_percentiles": True}, False)])
def test_post_eos_fill_reaches_only_the_released_text_percentiles(tiny_model, template_file, objective, settings,
                                                                    same):
    """Training masks the CoT positions after EOS: loss and gradients are bit-identical whether they hold EOS (as
    released, what rollout() writes) or pad. Only the released text percentiles, which count those positions'
    entropies, see the difference (their entropies come from the token there)."""
    from dataclasses import replace

    from egrpo.objectives import build_objective
    from egrpo.trainer.train import MicroBatch, head_logp_entropy, micro_loss

    model, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    handle = _raise_eos(model, tokenizer, 4.0)
    try:
        out = rollout(model, tokenizer, PROMPTS, _cot_cfg(template_file, group_size=4, images_per_cot=1,
                                                          cot_max_tokens=10), _generator(3))
    finally:
        handle.remove()
    after = out.cot_mask == 0
    assert after.any() and (out.cot_ids[after] == tokens.eos).all()
    rewards = torch.randn(out.image_tokens.shape[0], 1, generator=_generator(1))
    results = []
    for fill in (tokens.eos, tokens.pad):
        ro = replace(out, cot_ids=out.cot_ids.masked_fill(after, fill))
        ref = head_logp_entropy(model, ro, "torch", None)
        batch = MicroBatch(rollout=ro, metadata=[{}] * rewards.shape[0], rewards=rewards, ref=ref,
                           old={part: values[0] for part, values in ref.items()})
        model.zero_grad(set_to_none=True)
        loss, _ = micro_loss(model, build_objective(objective, **settings), batch, 4, torch.ones(1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    (eos_loss, eos_grads), (pad_loss, pad_grads) = results
    identical = torch.equal(eos_loss, pad_loss) and all(torch.equal(a, b) for a, b in zip(eos_grads, pad_grads))
    assert identical == same


def test_rollout_is_seeded(tiny_model, template_file):
    model, tokenizer = tiny_model
    cfg = _cot_cfg(template_file, cot_max_tokens=4, images_per_cot=1)
    a = rollout(model, tokenizer, PROMPTS, cfg, _generator(1))
    b = rollout(model, tokenizer, PROMPTS, cfg, _generator(1))
    c = rollout(model, tokenizer, PROMPTS, cfg, _generator(2))
    assert torch.equal(a.image_tokens, b.image_tokens) and torch.equal(a.images, b.images)
    assert a.cot_texts == b.cot_texts and a.cot_texts != c.cot_texts
    assert not torch.equal(a.image_tokens, c.image_tokens)


def test_cfg_scale_one_samples_the_conditional_distribution(tiny_model):
    model, tokenizer = tiny_model
    out = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=2, cfg_scale=1.0, image_tokens=16),
                  _generator(0))
    assert out.metrics["rollout/cfg_kl"] == pytest.approx(0.0, abs=1e-6)


def test_images_decode_to_unit_range(tiny_model):
    model, tokenizer = tiny_model
    out = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=3, image_tokens=16), _generator(3))
    assert out.images.shape == (6, 3, 32, 32) and out.images.dtype == torch.float32
    pixels = model.decode_image_tokens(out.image_tokens).permute(0, 3, 1, 2)
    # The engine decodes on channels-last activations: the convolutions sum in another order (float32 rounding).
    torch.testing.assert_close(out.images, ((pixels + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)
    assert out.prompts == ["a red square"] * 3 + ["blue"] * 3


# ------------------------------------------------------------------------------------------ log-probs
def _eager_row(model, tokenizer, out, row):
    """Log-probs/entropies of one row from full eager logits, in hand-built contexts (no batch)."""
    tokens = janus_tokens(tokenizer)
    rows = hand_image_rows(tokenizer, out.prompts, [hand_decode(tokenizer, r) for r in out.cot_ids.tolist()])
    cond, cond_mask, _, _ = hand_image_layout(rows, tokens)      # the row keeps its pads: they count as positions
    images = out.image_tokens[row]
    embeds = torch.cat([model.get_input_embeddings()(cond[row:row + 1]),
                        model.prepare_embeddings_for_image_generation(images[None, :-1])], 1)
    mask = torch.cat([cond_mask[row:row + 1], torch.ones(1, images.shape[0] - 1, dtype=torch.long)], 1)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=hand_positions(mask, "released")).last_hidden_state[0]
    logp_all = model.model.generation_head(hidden).double()[cond.shape[1] - 1:].log_softmax(-1)
    image = (logp_all.gather(-1, images[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1))
    # Text: the row's CoT-phase prompt alone (no padding), then its CoT through EOS.
    prompt = hand_text_rows(tokenizer, [out.prompts[row]])[0]
    length = int(out.cot_mask[row].sum())
    cot = out.cot_ids[row, :length]
    hidden = model.model.language_model(input_ids=torch.tensor([prompt + cot.tolist()])).last_hidden_state[0]
    logp_all = model.lm_head(hidden).double()[len(prompt) - 1:len(prompt) - 1 + length].log_softmax(-1)
    text = (logp_all.gather(-1, cot[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1))
    return image, text


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trainer_logprobs_equal_eager_full_logits(tiny_model, cot_case, backend):
    model, tokenizer = tiny_model
    out, _, _, image, text, _ = cot_case
    assert image.mask.eq(1).all() and torch.equal(text.mask, out.cot_mask) and torch.equal(text.targets, out.cot_ids)
    assert image.weight is model.model.generation_head.vision_head.weight and text.weight is model.lm_head.weight
    assert text.bias is None and image.temperature == 1.0 and text.temperature == 1.0
    with torch.no_grad():
        image_logp, image_entropy = linear_logprob_entropy(image.hidden, image.weight, image.targets, image.bias,
                                                           backend=backend)
        text_logp, text_entropy = linear_logprob_entropy(text.hidden, text.weight, text.targets, backend=backend)
        for row in range(out.image_tokens.shape[0]):
            (il, ie), (tl, te) = _eager_row(model, tokenizer, out, row)
            torch.testing.assert_close(image_logp[row].double(), il, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(image_entropy[row].double(), ie, rtol=1e-4, atol=1e-4)
            n = tl.shape[0]
            torch.testing.assert_close(text_logp[row, :n].double(), tl, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(text_entropy[row, :n].double(), te, rtol=1e-4, atol=1e-4)


def test_text_gradients_sum_over_the_images_of_a_cot(tiny_model, template_file):
    """images_per_cot rows share one text forward; its gradient equals that of M separate copies."""
    model, tokenizer = tiny_model
    out = rollout(model, tokenizer, ["a red square"], _cot_cfg(template_file, group_size=1, cot_max_tokens=3),
                  _generator(2))
    weights = torch.tensor([[0.3], [-1.7]])          # per-image "advantages"
    param = model.model.language_model.layers[0].self_attn.q_proj.weight
    model.zero_grad(set_to_none=True)
    _, text = head_inputs(model, out)
    logp, _ = linear_logprob_entropy(text.hidden, text.weight, text.targets, backend="torch")
    (weights * logp * text.mask).sum().backward()
    shared = param.grad.clone()
    model.zero_grad(set_to_none=True)
    single = rollout_module.Rollout(**{**out.__dict__, "images_per_cot": 1})   # each row its own forward
    _, text = head_inputs(model, single)
    logp, _ = linear_logprob_entropy(text.hidden, text.weight, text.targets, backend="torch")
    (weights * logp * text.mask).sum().backward()
    torch.testing.assert_close(shared, param.grad, rtol=1e-4, atol=1e-5 * float(shared.abs().max()))
    assert shared.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_head_inputs_gradients_reach_trainable_only(tiny_model):
    model, tokenizer = tiny_model
    out = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=2, image_tokens=16), _generator(5))
    model.zero_grad(set_to_none=True)
    image, text = head_inputs(model, out)
    assert text is None
    assert image.hidden.shape == (4, 16, 64) and image.hidden.requires_grad
    logp, entropy = linear_logprob_entropy(image.hidden, image.weight, image.targets, image.bias, backend="torch")
    (logp.sum() + entropy.sum()).backward()
    lm_grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert lm_grad is not None and lm_grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    model.zero_grad(set_to_none=True)


def test_bf16_rollout_and_head_inputs(template_file):
    model, tokenizer = build_model(ModelConfig(tiny=TINY, dtype="bf16"), "cpu")
    out = rollout(model, tokenizer, PROMPTS, _cot_cfg(template_file, cot_max_tokens=4), _generator(0))
    assert out.images.dtype == torch.float32 and out.images.min() >= 0 and out.images.max() <= 1
    image, text = head_inputs(model, out)
    assert image.hidden.dtype == torch.bfloat16 and text.hidden.dtype == torch.bfloat16
    with torch.no_grad():
        for batch in (image, text):
            logp, _ = linear_logprob_entropy(batch.hidden, batch.weight, batch.targets, batch.bias)
            logits = batch.hidden.double() @ batch.weight.double().T
            if batch.bias is not None:
                logits = logits + batch.bias.double()
            truth = logits.log_softmax(-1).gather(-1, batch.targets[..., None]).squeeze(-1)
            torch.testing.assert_close(logp.double(), truth, rtol=0, atol=2e-2)


def test_codebook_vectors_of_rollout(tiny_model):
    model, tokenizer = tiny_model
    out = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=2, image_tokens=16), _generator(4))
    vectors = codebook_vectors(model, out.image_tokens)
    assert vectors.shape == (4, 16, 8)
    torch.testing.assert_close(vectors[1, 3], torch.nn.functional.normalize(
        model.model.vqmodel.quantize.embedding.weight[out.image_tokens[1, 3]], dim=0))


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    kept = filter_logits(logits, top_p=0.75).isfinite()
    assert kept[0].tolist() == [True, False, True, False]  # 0.5 + 0.3 is the smallest set reaching 0.75
    assert kept[1].all()  # uniform row: no token has a strictly larger logit, so the tie group stays whole
    ties = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert filter_logits(ties, top_p=0.5).isfinite().all()  # 0.4 < 0.5: the 0.2 group stays, all of it
    assert filter_logits(ties, top_p=0.4).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(logits[:1], top_k=1).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()


def test_generate_writes_every_image_of_every_cot(tiny_model, template_file, tmp_path):
    from egrpo.tools.generate import generate

    model, tokenizer = tiny_model
    records = generate(model, tokenizer, ["a cat"], str(tmp_path), _cot_cfg(template_file, cot_max_tokens=3),
                       images_per_prompt=2, seed=4, progress=False)
    assert [(r["cot_index"], r["image_index"]) for r in records] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    again = rollout(model, tokenizer, ["a cat"], _cot_cfg(template_file, cot_max_tokens=3), _generator(4))
    assert [r["cot"] for r in records] == again.cot_texts
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == [f"00000_{j:02d}.png" for j in range(4)]


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("change, message", [
    ({"temperature": 0}, "rollout.temperature must be > 0, got 0"),
    ({"cot_temperature": -1.0}, "rollout.cot_temperature must be > 0, got -1.0"),
    ({"top_k": 0}, "rollout.top_k must be an integer >= 1 or null"),
    ({"cot_top_k": 0}, "rollout.cot_top_k must be an integer >= 1 or null"),
    ({"cot_top_p": 0.0}, "rollout.cot_top_p must be in (0, 1]"),
    ({"cot_top_p": 1.5}, "rollout.cot_top_p must be in (0, 1]"),
    ({"cfg_scale": -1.0}, "rollout.cfg_scale must be >= 0, got -1.0"),
    ({"group_size": 0}, "rollout.group_size must be an integer >= 1, got 0"),
    ({"images_per_cot": 0, "cot": True}, "rollout.images_per_cot must be an integer >= 1, got 0"),
    ({"cot_max_tokens": 0}, "rollout.cot_max_tokens must be an integer >= 1, got 0"),
    ({"image_positions": "left"}, "rollout.image_positions must be 'released' or 'packed', got 'left'"),
    ({"images_per_cot": 2}, "rollout.images_per_cot=2 needs rollout.cot=true"),
    ({"cot": True, "cot_template": "/nonexistent/cot.txt"}, "rollout.cot_template: cannot read '/nonexistent/cot.txt'"),
    ({"engine": "yes"}, "rollout.engine must be true or false, got 'yes'"),
    ({"compile": 1}, "rollout.compile must be true or false, got 1"),
    ({"engine": False, "compile": True}, "rollout.compile=true needs rollout.engine=true"),
])
def test_bad_settings_raise_one_line_errors(change, message):
    with pytest.raises(ValueError) as info:
        RolloutConfig(**change).validate()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["no placeholder", "{} and {}", "{prompt}", "unbalanced {"])
def test_template_needs_one_placeholder(tmp_path, text):
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"^rollout\.cot_template"):
        RolloutConfig(cot=True, cot_template=str(path)).validate()


def test_config_file_errors_name_the_setting():
    with pytest.raises(ConfigError, match=r"^rollout\.top_k must be an integer >= 1 or null"):
        load_config(DEMO, ["rollout.top_k=0"]).validate()
    with pytest.raises(ConfigError, match=r"^rollout\.group_size must be >= 2 .*got 1$"):
        load_config(DEMO, ["rollout.group_size=1"]).validate()
    with pytest.raises(ConfigError, match=r"^rollout\.group_size x rollout\.images_per_cot must be >= 2"):
        load_config(DEMO, ["rollout.group_size=1", "rollout.cot=true"]).validate()
    cfg = load_config(DEMO, ["rollout.group_size=1", "rollout.cot=true", "rollout.images_per_cot=3"]).validate()
    assert cfg.rollout.samples_per_prompt == 3


def test_rollout_rejects_bad_arguments(tiny_model):
    model, tokenizer = tiny_model
    g = _generator(0)
    with pytest.raises(ValueError, match="image_tokens"):
        rollout(model, tokenizer, PROMPTS, RolloutConfig(image_tokens=576), g)
    with pytest.raises(ValueError, match="rollout.temperature"):
        rollout(model, tokenizer, PROMPTS, RolloutConfig(image_tokens=16, temperature=0.0), g)
    with pytest.raises(ValueError, match="prompts"):
        rollout(model, tokenizer, [], RolloutConfig(image_tokens=16), g)
    with pytest.raises(TypeError, match="generator"):
        rollout(model, tokenizer, PROMPTS, RolloutConfig(image_tokens=16), 0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_diverged_weights_raise_instead_of_sampling_garbage(sampler):
    """torch.multinomial raises on NaN probabilities; the engine's sampler cannot, so the rollout checks the
    sampled log-probs and raises the same kind of error (the trainer turns it into its 'diverged' message)."""
    model, tokenizer = build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")
    with torch.no_grad():
        model.model.generation_head.vision_head.bias.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="nan"):
        rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=2, image_tokens=16, engine=SAMPLERS[sampler]),
                _generator(0))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_diverged_lm_head_raises_in_the_cot_phase(tiny_model, template_file, sampler):
    """The CoT phase is checked too: NaN text logits (the image head stays finite) raise, they do not go on to
    sample images from garbage CoTs."""
    model, tokenizer = tiny_model
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: torch.full_like(output, float("nan")))
    try:
        with pytest.raises(RuntimeError, match="nan"):
            rollout(model, tokenizer, PROMPTS, _cot_cfg(template_file, cot_max_tokens=3, engine=SAMPLERS[sampler]),
                    _generator(0))
    finally:
        handle.remove()


def test_cot_sampling_settings_reach_the_engine(tiny_model, template_file, monkeypatch):
    """rollout.cot_temperature / cot_top_k / cot_top_p are the text phase's SamplingParams (no CFG)."""
    model, tokenizer = tiny_model
    seen = []
    original = RolloutEngine.generate_text

    def recording(engine, prefill, max_new_tokens, eos_id, pad_id, params, seed):
        seen.append((max_new_tokens, params))
        return original(engine, prefill, max_new_tokens, eos_id, pad_id, params, seed)

    monkeypatch.setattr(RolloutEngine, "generate_text", recording)
    cfg = _cot_cfg(template_file, cot_max_tokens=3, cot_temperature=0.7, cot_top_p=0.3, cot_top_k=17)
    rollout(model, tokenizer, PROMPTS, cfg, _generator(0))
    assert seen == [(3, SamplingParams(temperature=0.7, top_k=17, top_p=0.3, cfg_scale=None))]


def test_make_engine_follows_rollout_compile(tiny_model):
    """rollout.compile reaches the engine (building it compiles nothing: that happens at the first decode step)."""
    model, _ = tiny_model
    assert rollout_module.make_engine(model, RolloutConfig(compile=True)).config.compile is True
    assert rollout_module.make_engine(model, RolloutConfig()).config.compile is False


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_cot_eos_frac_is_the_share_of_cots_that_reached_eos(tiny_model, template_file, sampler):
    """rollout/cot_eos_frac = share of CoTs holding an EOS (the others ran to cot_max_tokens). Even rows of the text
    phase are pushed to EOS at once, odd rows never reach it: 1/2."""
    model, tokenizer = tiny_model
    eos = janus_tokens(tokenizer).eos

    def hook(module, inputs, output):
        output = output.clone()
        output[0::2, ..., eos] += 100.0
        output[1::2, ..., eos] -= 100.0
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        out = rollout(model, tokenizer, PROMPTS, _cot_cfg(template_file, cot_max_tokens=4, engine=SAMPLERS[sampler]),
                      _generator(0))
    finally:
        handle.remove()
    reached = (out.cot_ids == eos).any(1).float()
    assert reached.tolist() == [1, 1, 0, 0] * 2      # images_per_cot=2: each CoT's rows are consecutive
    assert out.cot_mask.sum(1).tolist() == [1, 1, 4, 4] * 2
    assert out.metrics["rollout/cot_eos_frac"] == pytest.approx(float(reached.mean())) == 0.5


def test_rollout_reuses_a_given_engine_and_refuses_another_models(tiny_model):
    model, tokenizer = tiny_model
    cfg = RolloutConfig(group_size=2, image_tokens=16)
    engine = rollout_module.make_engine(model, cfg)
    a = rollout(model, tokenizer, PROMPTS, cfg, _generator(3), engine)
    b = rollout(model, tokenizer, PROMPTS, cfg, _generator(3))
    assert torch.equal(a.image_tokens, b.image_tokens)
    assert rollout_module.make_engine(model, RolloutConfig(engine=False)) is None
    other, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")
    with pytest.raises(ValueError, match="engine was built for another model"):
        rollout(model, tokenizer, PROMPTS, cfg, _generator(3), rollout_module.make_engine(other, cfg))


def test_prefill_cat_stacks_rows():
    a = Prefill(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None])
    both = Prefill.cat([a, a])
    assert both.rows == 2 and both.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
