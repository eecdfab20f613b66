import pytest
import torch

from egrpo.kernels import linear_logprob_entropy
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.rollout import RolloutConfig, codebook_vectors, filter_logits, head_inputs, rollout
from egrpo.trainer.tokenizer import encode_prompt, janus_tokens

TINY = dict(image_size=32, patch_size=8, vq_channel_multiplier=(1, 1, 2, 2), initializer_range=0.2)  # 16 tokens, 32 px
PROMPTS = ["a red square", "blue"]  # different lengths: left padding is exercised


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _cot_rollout(model, tokenizer, seed=0, max_tokens=12):
    """CoT rollout with the EOS logit raised during sampling so that most rows stop early."""
    eos = janus_tokens(tokenizer).eos

    def raise_eos(module, inputs, output):
        output = output.clone()
        output[..., eos] += 3.0
        return output

    hook = model.lm_head.register_forward_hook(raise_eos)
    try:
        cfg = RolloutConfig(group_size=4, cot=True, cot_max_tokens=max_tokens, cot_top_k=50, cot_top_p=0.95,
                            image_tokens=16)
        return rollout(model, tokenizer, PROMPTS, cfg, _generator(seed))
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def cot_rollout(tiny_model):
    return _cot_rollout(*tiny_model)


def _naive_cfg_sampling(model, tokenizer, sequences, cfg, generator):
    """Reference: per step, recompute the whole cond and uncond sequences without a KV cache, one row at a time."""
    tokens = janus_tokens(tokenizer)
    embed = model.get_input_embeddings()
    head = model.model.generation_head
    sampled = [[] for _ in sequences]
    kls = []
    for _ in range(cfg.image_tokens):
        cond_logits, uncond_logits = [], []
        for row, seq in enumerate(sequences):
            uncond = [t if t in (tokens.bos, tokens.image_start) else tokens.pad for t in seq]
            for ids, out in ((seq, cond_logits), (uncond, uncond_logits)):
                prefix = embed(torch.tensor([ids]))
                if sampled[row]:
                    images = model.prepare_embeddings_for_image_generation(torch.tensor([sampled[row]]))
                    prefix = torch.cat([prefix, images], dim=1)
                hidden = model.model.language_model(inputs_embeds=prefix, use_cache=False).last_hidden_state
                out.append(head(hidden[0, -1]).float())
        cond, uncond = torch.stack(cond_logits), torch.stack(uncond_logits)
        guided = (uncond + cfg.cfg_scale * (cond - uncond)) / cfg.temperature
        if cfg.top_k is not None:
            kth = guided.topk(cfg.top_k, dim=-1).values[:, -1:]
            guided = guided.masked_fill(guided < kth, float("-inf"))
        probs = guided.softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        log_ratio = guided.log_softmax(-1) - cond.log_softmax(-1)
        kls.append(torch.where(probs > 0, probs * log_ratio, torch.zeros_like(probs)).sum(-1))
        for row in range(len(sequences)):
            sampled[row].append(int(token[row]))
    return torch.tensor(sampled), torch.stack(kls, 1)


@torch.no_grad()
def test_cfg_sampling_matches_naive_reference(tiny_model):
    model, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    cfg = RolloutConfig(group_size=2, cfg_scale=3.0, temperature=0.9, top_k=100, image_tokens=16)
    out = rollout(model, tokenizer, PROMPTS, cfg, _generator(7))
    sequences = [encode_prompt(tokenizer, p, tokens) + [tokens.image_start] for p in PROMPTS for _ in range(2)]
    expected, kl = _naive_cfg_sampling(model, tokenizer, sequences, cfg, _generator(7))
    assert torch.equal(out.image_tokens, expected)
    assert out.metrics["rollout/cfg_kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert out.metrics["rollout/cfg_kl"] > 0
    # The conditioning sequences are the Janus prompts, left-padded.
    for row, seq in enumerate(sequences):
        n = int(out.attention_mask[row].sum())
        assert out.sequence_ids[row, -n:].tolist() == seq
        assert not out.attention_mask[row, :-n].any()


def test_cfg_scale_one_samples_the_conditional_distribution(tiny_model):
    model, tokenizer = tiny_model
    cfg = RolloutConfig(group_size=2, cfg_scale=1.0, image_tokens=16)
    out = rollout(model, tokenizer, PROMPTS, cfg, _generator(0))
    assert out.metrics["rollout/cfg_kl"] == pytest.approx(0.0, abs=1e-6)


def test_rollout_is_seeded(tiny_model):
    model, tokenizer = tiny_model
    cfg = RolloutConfig(group_size=2, image_tokens=16)
    a = rollout(model, tokenizer, PROMPTS, cfg, _generator(1))
    b = rollout(model, tokenizer, PROMPTS, cfg, _generator(1))
    c = rollout(model, tokenizer, PROMPTS, cfg, _generator(2))
    assert torch.equal(a.image_tokens, b.image_tokens)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.image_tokens, c.image_tokens)
    # Samples of one group differ from each other.
    assert not torch.equal(a.image_tokens[0], a.image_tokens[1])


def test_cot_rollout_is_seeded(tiny_model, cot_rollout):
    model, tokenizer = tiny_model
    again = _cot_rollout(model, tokenizer, seed=0)
    other = _cot_rollout(model, tokenizer, seed=1)
    assert torch.equal(again.cot_ids, cot_rollout.cot_ids)
    assert torch.equal(again.image_tokens, cot_rollout.image_tokens)
    assert again.cot_texts == cot_rollout.cot_texts
    assert other.cot_texts != cot_rollout.cot_texts
    assert not torch.equal(other.image_tokens, cot_rollout.image_tokens)


def test_images_decode_to_unit_range(tiny_model):
    model, tokenizer = tiny_model
    out = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=3, image_tokens=16), _generator(3))
    assert out.images.shape == (6, 3, 32, 32)
    assert out.images.dtype == torch.float32
    assert out.images.min() >= 0 and out.images.max() <= 1
    pixels = model.decode_image_tokens(out.image_tokens).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.images, ((pixels + 1) / 2).clamp(0, 1))
    assert out.prompts == ["a red square"] * 3 + ["blue"] * 3
    assert out.group_size == 3


def test_cot_stops_at_eos_and_masks_after_it(tiny_model, cot_rollout):
    _, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    out = cot_rollout
    ids, mask = out.cot_ids, out.cot_mask
    max_tokens = ids.shape[1]
    stopped = 0
    for row in range(ids.shape[0]):
        row_ids = ids[row].tolist()
        if tokens.eos in row_ids:
            end = row_ids.index(tokens.eos) + 1
            stopped += 1
        else:
            end = max_tokens
        assert mask[row, :end].eq(1).all() and mask[row, end:].eq(0).all()
        assert all(t == tokens.pad for t in row_ids[end:])
        # The image is conditioned on prompt + CoT without its EOS + image start.
        cot = row_ids[:end]
        cot = cot[:-1] if cot and cot[-1] == tokens.eos else cot
        seq = encode_prompt(tokenizer, out.prompts[row], tokens) + cot + [tokens.image_start]
        n = int(out.attention_mask[row].sum())
        assert out.sequence_ids[row, -n:].tolist() == seq
        assert out.cot_texts[row] == tokenizer.decode(cot, skip_special_tokens=True)
    assert stopped >= 1
    assert int(mask.sum(1).min()) < max_tokens  # at least one row stopped early and is masked after its EOS
    assert out.metrics["rollout/cot_tokens"] == pytest.approx(float(mask.sum(1).mean()))


def _eager_row_logprobs(model, tokenizer, out, row):
    """Log-probs/entropies of one row recomputed alone (no padding) from full eager logits of both heads."""
    tokens = janus_tokens(tokenizer)
    prompt = encode_prompt(tokenizer, out.prompts[row], tokens)
    n = int(out.attention_mask[row].sum())
    seq = out.sequence_ids[row, -n:]
    images = out.image_tokens[row]
    embeds = torch.cat([model.get_input_embeddings()(seq[None]),
                        model.prepare_embeddings_for_image_generation(images[None, :-1])], dim=1)
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
    image_logits = model.model.generation_head(hidden).double()[n - 1:]
    image_logp_all = image_logits.log_softmax(-1)
    image_logp = image_logp_all.gather(-1, images[:, None]).squeeze(-1)
    image_entropy = -(image_logp_all.exp() * image_logp_all).sum(-1)
    if out.cot_ids is None:
        return image_logp, image_entropy, None, None
    text_logp_all = model.lm_head(hidden).double().log_softmax(-1)
    length = int(out.cot_mask[row].sum())
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + length)
    cot = out.cot_ids[row, :length]
    text_logp = text_logp_all[positions].gather(-1, cot[:, None]).squeeze(-1)
    text_entropy = -(text_logp_all[positions].exp() * text_logp_all[positions]).sum(-1)
    return image_logp, image_entropy, text_logp, text_entropy


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_inputs_logprobs_match_eager_full_logits(tiny_model, cot_rollout, backend):
    model, tokenizer = tiny_model
    out = cot_rollout
    with torch.no_grad():
        image, text = head_inputs(model, out)
        image_logp, image_entropy = linear_logprob_entropy(
            image.hidden, image.weight, image.targets, image.bias, backend=backend)
        text_logp, text_entropy = linear_logprob_entropy(
            text.hidden, text.weight, text.targets, text.bias, backend=backend)
    assert image.mask.eq(1).all() and torch.equal(text.mask, out.cot_mask)
    assert image.weight is model.model.generation_head.vision_head.weight and text.bias is None
    assert text.weight is model.lm_head.weight
    with torch.no_grad():
        for row in range(out.image_tokens.shape[0]):
            ref_il, ref_ie, ref_tl, ref_te = _eager_row_logprobs(model, tokenizer, out, row)
            torch.testing.assert_close(image_logp[row].double(), ref_il, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(image_entropy[row].double(), ref_ie, rtol=1e-4, atol=1e-4)
            length = ref_tl.shape[0]
            torch.testing.assert_close(text_logp[row, :length].double(), ref_tl, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(text_entropy[row, :length].double(), ref_te, rtol=1e-4, atol=1e-4)


def test_head_inputs_without_cot_and_gradients_reach_trainable_only(tiny_model):
    model, tokenizer = tiny_model
    out = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=2, image_tokens=16), _generator(5))
    model.zero_grad(set_to_none=True)
    image, text = head_inputs(model, out)
    assert text is None
    assert image.hidden.shape == (4, 16, 64) and image.hidden.requires_grad
    assert torch.equal(image.targets, out.image_tokens)
    logp, entropy = linear_logprob_entropy(image.hidden, image.weight, image.targets, image.bias, backend="torch")
    (logp.sum() + entropy.sum()).backward()
    lm_grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert lm_grad is not None and lm_grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    model.zero_grad(set_to_none=True)


def test_head_inputs_is_padding_invariant(tiny_model):
    # A row's hidden states must not depend on how much left padding its batch needed.
    model, tokenizer = tiny_model
    cfg = RolloutConfig(group_size=1, image_tokens=16)
    out = rollout(model, tokenizer, PROMPTS, cfg, _generator(9))
    with torch.no_grad():
        batched, _ = head_inputs(model, out)
        short = rollout(model, tokenizer, PROMPTS[1:], cfg, _generator(9))
        short.image_tokens = out.image_tokens[1:]
        alone, _ = head_inputs(model, short)
    assert out.attention_mask[1].eq(0).any()
    torch.testing.assert_close(batched.hidden[1:], alone.hidden, rtol=1e-4, atol=1e-5)


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
    assert int(kept[1].sum()) == 3  # uniform row: any 3 of the 4 ties
    kept = filter_logits(logits[:1], top_k=1).isfinite()
    assert kept.tolist() == [[True, False, False, False]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()


def test_rollout_rejects_bad_config(tiny_model):
    model, tokenizer = tiny_model
    g = _generator(0)
    with pytest.raises(ValueError, match="image_tokens"):
        rollout(model, tokenizer, PROMPTS, RolloutConfig(image_tokens=576), g)
    with pytest.raises(ValueError, match="temperature"):
        rollout(model, tokenizer, PROMPTS, RolloutConfig(image_tokens=16, temperature=0.0), g)
    with pytest.raises(ValueError, match="prompts"):
        rollout(model, tokenizer, [], RolloutConfig(image_tokens=16), g)
    with pytest.raises(TypeError, match="generator"):
        rollout(model, tokenizer, PROMPTS, RolloutConfig(image_tokens=16), 0)


def test_bf16_rollout_and_head_inputs():
    model, tokenizer = build_model(ModelConfig(tiny=TINY, dtype="bf16"), "cpu")
    cfg = RolloutConfig(group_size=2, cot=True, cot_max_tokens=4, image_tokens=16)
    out = rollout(model, tokenizer, PROMPTS, cfg, _generator(0))
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
            assert logp.isfinite().all()
            torch.testing.assert_close(logp.double(), truth, rtol=0, atol=2e-2)


@torch.no_grad()
def test_cot_sampling_matches_naive_reference(tiny_model):
    from egrpo.trainer.rollout import sample_cot

    model, tokenizer = tiny_model
    tokens = janus_tokens(tokenizer)
    rows = [encode_prompt(tokenizer, p, tokens) for p in PROMPTS for _ in range(2)]
    cfg = RolloutConfig(cot=True, cot_max_tokens=6, cot_temperature=0.8)
    ids, mask = sample_cot(model, rows, tokens, cfg, _generator(11))
    # Reference: recompute every row alone from scratch at each step; finished rows keep drawing (and get pad).
    generator = _generator(11)
    sampled = [list(r) for r in rows]
    expected = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(cfg.cot_max_tokens):
        logits = torch.stack([
            model.lm_head(model.model.language_model(input_ids=torch.tensor([seq]), use_cache=False)
                          .last_hidden_state[0, -1]) for seq in sampled])
        token = torch.multinomial((logits / cfg.cot_temperature).softmax(-1), 1, generator=generator).squeeze(-1)
        for i, t in enumerate(token.tolist()):
            expected[i].append(tokens.pad if done[i] else t)
            sampled[i].append(t)
            done[i] = done[i] or t == tokens.eos
        if all(done):
            break
    assert ids.tolist() == expected
    assert mask.shape == ids.shape
