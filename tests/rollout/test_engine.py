"""The engine emits exactly the tokens of a plain HF loop (DynamicCache, one HF forward per token) fed the
same sampler and seed: image phase (CFG) and text phase, both padding layouts, ragged prompts, G > 1."""

import pytest
import torch

from egrpo.rollout.engine import EngineConfig, RolloutEngine, cfg_prefill, text_prefill
from egrpo.rollout.sampling import SamplingParams
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.tokenizer import janus_tokens

from ._reference import reference_image_tokens, reference_text

IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_model(
        ModelConfig(tiny=dict(image_size=32, num_layers=2, initializer_range=0.2), dtype="fp32"), "cpu")
    return model, janus_tokens(tokenizer)


def _batch(tokens, layout, lengths=(5, 9, 3), group=2):
    """Ragged prompts ``[BOS text BOI]``, each repeated ``group`` times, padded per ``layout``."""
    rows = [[tokens.bos] + torch.randint(10, 100, (n,)).tolist() + [tokens.image_start]
            for n in lengths for _ in range(group)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokens.pad)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        if layout == "left":
            ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        else:  # released image prompt: [BOS text pads BOI]
            ids[i, :len(row) - 1], mask[i, :len(row) - 1] = torch.tensor(row[:-1]), 1
            ids[i, -1], mask[i, -1] = tokens.image_start, 1
    return ids, mask


ENGINES = [
    EngineConfig(),                                           # eager step over the filled prefix (CPU: fused q/k/v)
    EngineConfig(fuse_projections=False),                     # eager step, one GEMM per projection (packed)
    EngineConfig(pack_weights=False),                         # eager step, fused, F.linear on the weights as they are
    # The compiled-shape step over the full buffer + mask, and over spans of it. Without prompt padding: padded
    # (masked) slots change the prefill's float summation order, and with a uniform that lands ~1e-7 from a CDF
    # boundary one first token flips (seen once); the padding has its own test below.
    EngineConfig(compile=True, compile_backend="eager", key_buckets=1, prompt_bucket=0),
    EngineConfig(compile=True, compile_backend="eager", key_buckets=3, prompt_bucket=0),
    # The eager step with the CUDA decode-attention kernel (Triton interpreter on CPU)
    EngineConfig(attention="triton"),
]
ENGINE_IDS = ["eager", "eager-unfused", "eager-unpacked", "full-buffer", "key-spans", "triton-attention"]


@pytest.mark.parametrize("layout", ["left", "right"])
@pytest.mark.parametrize("params", [
    SamplingParams(cfg_scale=5.0),
    SamplingParams(cfg_scale=3.0, temperature=0.8, top_k=20),
    SamplingParams(cfg_scale=1.5, top_p=0.7),
])
@pytest.mark.parametrize("engine_config", ENGINES, ids=ENGINE_IDS)
def test_image_tokens_match_reference(tiny, layout, params, engine_config):
    model, tokens = tiny
    ids, mask = _batch(tokens, layout)
    prefill = cfg_prefill(model, ids, mask, tokens.pad, layout, keep_ids=(tokens.bos, tokens.image_start))
    out = RolloutEngine(model, engine_config).generate_image_tokens(prefill, IMAGE_TOKENS, params, seed=11)
    ref_tokens, ref_kl = reference_image_tokens(model, prefill, IMAGE_TOKENS, params, seed=11)
    assert torch.equal(out.tokens, ref_tokens)
    # The KL sums over the top-k / top-p set: a token at that set's boundary can fall on either side from float
    # rounding alone (engine and HF loop differ in summation order), which moves one step's KL a little.
    close = torch.isclose(out.kl, ref_kl, rtol=1e-4, atol=1e-5)
    assert close.float().mean() >= 0.97 and (out.kl - ref_kl).abs().max() < 0.05, (out.kl - ref_kl).abs().max()
    if params.top_k is None and params.top_p is None:
        assert close.all()
    assert out.tokens.unique().numel() > 4  # the draws vary


def test_bf16_cpu_eager_step_matches_full_buffer_step(tiny, monkeypatch):
    """On CPU in bf16 the eager step attends over the whole K/V buffer with a mask built on the host (bf16 matmuls
    would copy a prefix view; here forced at every step); the compiled-shape step does the same with the mask
    built from the device step counter, and that step matches the reference in fp32 above. Same tokens, KL and
    log-probs, bit for bit."""
    import copy

    import egrpo.rollout.engine as engine_module

    monkeypatch.setattr(engine_module, "_CPU_BF16_FULL_BUFFER_RATIO", 1e9)
    model, tokens = tiny
    model = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask = _batch(tokens, "right")
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "right", keep_ids=(tokens.bos, tokens.image_start))
    params = SamplingParams(cfg_scale=5.0)
    eager = RolloutEngine(model).generate_image_tokens(prefill, IMAGE_TOKENS, params, seed=5)
    full = RolloutEngine(model, EngineConfig(compile=True, compile_backend="eager", prompt_bucket=0)) \
        .generate_image_tokens(prefill, IMAGE_TOKENS, params, seed=5)
    assert torch.equal(eager.tokens, full.tokens) and eager.tokens.unique().numel() > 4
    torch.testing.assert_close(eager.logp, full.logp, rtol=0, atol=0)
    torch.testing.assert_close(eager.kl, full.kl, rtol=0, atol=0)
    # ... and the prefix variant (what the eager step uses early in a long phase) draws the same tokens.
    monkeypatch.setattr(engine_module, "_CPU_BF16_FULL_BUFFER_RATIO", 0.0)
    prefix = RolloutEngine(model).generate_image_tokens(prefill, IMAGE_TOKENS, params, seed=5)
    assert torch.equal(prefix.tokens, eager.tokens)
    torch.testing.assert_close(prefix.logp, eager.logp, rtol=1e-3, atol=1e-3)


def _eos_prone(model, tokens):
    """A copy of the model whose LM head has a bias towards EOS, so rows finish at different steps."""
    import copy

    model = copy.deepcopy(model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokens.eos] = 4.0
    model.lm_head = head
    return model


@pytest.mark.parametrize("layout", ["left", "right"])
@pytest.mark.parametrize("params", [SamplingParams(top_k=50), SamplingParams(temperature=0.7, top_p=0.9),
                                    SamplingParams(top_k=3)])
@pytest.mark.parametrize("engine_config", [EngineConfig(eos_check_every=4),
                                           EngineConfig(eos_check_every=1, compile=True, compile_backend="eager"),
                                           EngineConfig(eos_check_every=4, attention="triton")],
                         ids=["eager-k4", "full-buffer-k1", "triton-attention-k4"])
def test_text_matches_reference(tiny, layout, params, engine_config):
    model, tokens = tiny
    model = _eos_prone(model, tokens)
    ids, mask = _batch(tokens, layout)
    ids[:, -1] = tokens.pad if layout == "right" else ids[:, -1]
    prefill = text_prefill(model, ids, mask, layout)
    out = RolloutEngine(model, engine_config).generate_text(prefill, 60, tokens.eos, tokens.pad, params, seed=5)
    ref_ids, ref_mask = reference_text(model, prefill, 60, tokens.eos, tokens.pad, params, seed=5)
    assert torch.equal(out.ids, ref_ids)
    assert torch.equal(out.mask, ref_mask)


def test_text_rows_finish_at_different_steps(tiny):
    """The EOS-prone model really exercises early stopping: some rows end before others."""
    model, tokens = tiny
    model = _eos_prone(model, tokens)
    ids, mask = _batch(tokens, "left", group=4)
    out = RolloutEngine(model).generate_text(text_prefill(model, ids, mask), 60, tokens.eos, tokens.pad,
                                             SamplingParams(), seed=2)
    lengths = out.mask.sum(1)
    assert lengths.min() < lengths.max() < 60
    assert out.ids.shape[1] == int(lengths.max())
    for row, n in zip(out.ids, lengths.long().tolist()):
        assert row[n - 1] == tokens.eos and (row[n:] == tokens.pad).all()


@pytest.fixture(scope="module")
def tiny_gqa():
    """The tiny Janus with grouped-query attention: 4 query heads share 2 K/V heads (the tiny builder always gives
    one K/V head per query head, where any grouping of query heads onto K/V heads gives the same result)."""
    from transformers import JanusForConditionalGeneration

    from egrpo.trainer.model import tiny_janus_config
    from egrpo.trainer.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = tiny_janus_config(tokenizer, image_size=32, num_layers=2, initializer_range=0.2)
    config.text_config.num_key_value_heads = 2
    config._attn_implementation = config.text_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = JanusForConditionalGeneration(config).eval()
    attn = model.model.language_model.layers[0].self_attn
    assert attn.k_proj.out_features * 2 == attn.q_proj.out_features   # really grouped
    return model, janus_tokens(tokenizer)


@pytest.mark.parametrize("engine_config", ENGINES[:2] + ENGINES[-1:], ids=["eager", "eager-unfused", "triton-attention"])
def test_grouped_query_attention_matches_reference(tiny_gqa, engine_config):
    """With num_key_value_heads < num_heads the engine's decode attention (CPU: its own grouped matmuls) pairs each
    query head with the K/V head HF pairs it with: same image tokens and CoT tokens as the HF reference loop."""
    model, tokens = tiny_gqa
    engine = RolloutEngine(model, engine_config)
    ids, mask = _batch(tokens, "right", group=1)
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "right")
    params = SamplingParams(cfg_scale=5.0)
    out = engine.generate_image_tokens(prefill, IMAGE_TOKENS, params, seed=11)
    ref_tokens, ref_kl = reference_image_tokens(model, prefill, IMAGE_TOKENS, params, seed=11)
    assert torch.equal(out.tokens, ref_tokens) and out.tokens.unique().numel() > 4
    torch.testing.assert_close(out.kl, ref_kl, rtol=1e-4, atol=1e-5)
    ids, mask = _batch(tokens, "left", group=1)
    prefill = text_prefill(model, ids, mask)
    text = engine.generate_text(prefill, 12, tokens.eos, tokens.pad, SamplingParams(), seed=5)
    ref_ids, ref_mask = reference_text(model, prefill, 12, tokens.eos, tokens.pad, SamplingParams(), seed=5)
    assert torch.equal(text.ids, ref_ids) and torch.equal(text.mask, ref_mask)


def test_text_phase_stops_at_the_first_check_after_all_rows_finished(tiny, monkeypatch):
    """``eos_check_every=k``: once every row has emitted EOS the phase runs at most until the next step that is a
    multiple of k, not on to ``max_new_tokens`` (same tokens either way, so only the step count shows it)."""
    model, tokens = tiny
    model = _eos_prone(model, tokens)
    calls = []
    original = RolloutEngine._text_step

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("step"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RolloutEngine, "_text_step", counting)
    ids, mask = _batch(tokens, "left", group=4)
    max_new = 60
    out = RolloutEngine(model, EngineConfig(eos_check_every=4)).generate_text(
        text_prefill(model, ids, mask), max_new, tokens.eos, tokens.pad, SamplingParams(), seed=2)
    longest = out.ids.shape[1]                    # the last row finished with its token number `longest`
    assert (out.ids == tokens.eos).any(1).all() and longest < max_new - 8
    needed = longest - 1                          # decode steps after the prefill's token
    assert needed <= len(calls) <= -(-needed // 4) * 4, (longest, len(calls))
    assert calls == list(range(len(calls)))


def test_decode_matches_hf(tiny):
    model, tokens = tiny
    image_tokens = torch.randint(0, model.config.vq_config.num_embeddings, (3, IMAGE_TOKENS))
    expected = ((model.decode_image_tokens(image_tokens).float() + 1) / 2).clamp(0, 1).permute(0, 3, 1, 2)
    # fp32 convolutions in another memory format / chunk sum in another order: up to 1.4e-5 apart (measured,
    # EGRPO_TEST_SEED=12); 1e-4 is 1/40 of one 8-bit pixel level
    for config in (EngineConfig(), EngineConfig(vq_batch_size=0), EngineConfig(vq_batch_size=2, vq_channels_last=False)):
        torch.testing.assert_close(RolloutEngine(model, config).decode(image_tokens), expected, rtol=0, atol=1e-4)


def test_vq_decode_chunks_default_to_four_rows_on_cpu(tiny, monkeypatch):
    model, _ = tiny
    calls = []
    decoder = model.model.vqmodel.decoder
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    image_tokens = torch.randint(0, model.config.vq_config.num_embeddings, (9, IMAGE_TOKENS))
    RolloutEngine(model).decode(image_tokens)
    assert calls == [4, 4, 1]
    calls.clear()
    RolloutEngine(model, EngineConfig(vq_batch_size=0)).decode(image_tokens)
    assert calls == [9]


def test_key_spans_cover_every_filled_slot():
    """The compiled step's key span at each step holds that step's slot, stays inside the buffer, and takes at
    most ``key_buckets`` values over a phase (one compilation / CUDA graph each)."""
    class State:
        prompt_len, total = 37, 37 + 150
    for buckets in (1, 2, 3, 4, 7):
        spans = [RolloutEngine._key_span(State, buckets, step) for step in range(State.total - State.prompt_len)]
        assert all(State.prompt_len + step < span <= State.total for step, span in enumerate(spans))
        assert len(set(spans)) <= buckets and spans == sorted(spans) and spans[-1] == State.total


@pytest.mark.parametrize("field,value", [("sampler", "cuda"), ("eos_check_every", 0), ("vq_batch_size", -1),
                                         ("key_buckets", 0), ("fuse_projections", "yes"), ("pack_weights", "auto"),
                                         ("prompt_bucket", -1), ("attention", "flash")])
def test_bad_engine_config(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_bad_phase_arguments(tiny):
    model, tokens = tiny
    ids, mask = _batch(tokens, "left")
    engine = RolloutEngine(model)
    with pytest.raises(ValueError, match="cfg_scale"):
        engine.generate_image_tokens(text_prefill(model, ids, mask), 4, SamplingParams(), seed=0)
    with pytest.raises(ValueError, match="2B rows"):
        engine.generate_image_tokens(text_prefill(model, ids[:3], mask[:3]), 4, SamplingParams(cfg_scale=1.0), 0)
    with pytest.raises(ValueError, match="layout"):
        cfg_prefill(model, ids, mask, tokens.pad, "middle")


def test_seeds_follow_the_generator():
    from egrpo.rollout.engine import seeds_from_generator

    a = seeds_from_generator(torch.Generator().manual_seed(3))
    b = seeds_from_generator(torch.Generator().manual_seed(3))
    c = seeds_from_generator(torch.Generator().manual_seed(4))
    assert a == b and a != c and len(set(a)) == 2


def test_compiled_step_reuses_its_compilation_across_prompt_lengths(tiny):
    """With ``prompt_bucket`` the compiled step sees one prompt length per bucket: a second batch with other
    prompt lengths compiles nothing new, and both batches draw the eager engine's tokens. Without it, it does."""
    model, tokens = tiny
    params = SamplingParams(cfg_scale=5.0)
    batches = [_batch(tokens, "right", lengths=lengths) for lengths in ((5, 9, 3), (4, 7, 2))]
    for bucket in (64, 0):
        # dynamo caches compilations per code object across engines, and past its recompile limit (8) it runs
        # the step eagerly without compiling: earlier tests in this process must not decide the count
        torch._dynamo.reset()
        graphs = []

        def counting_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        engine = RolloutEngine(model, EngineConfig(compile=True, compile_backend=counting_backend, key_buckets=1,
                                                   prompt_bucket=bucket))
        counts = []
        for ids, mask in batches:
            prefill = cfg_prefill(model, ids, mask, tokens.pad, "right")
            out = engine.generate_image_tokens(prefill, IMAGE_TOKENS, params, seed=3)
            assert torch.equal(out.tokens, RolloutEngine(model).generate_image_tokens(prefill, IMAGE_TOKENS, params,
                                                                                      seed=3).tokens)
            counts.append(len(graphs))
        assert counts[0] >= 1
        assert (counts[1] == counts[0]) if bucket else (counts[1] > counts[0]), (bucket, counts)


def _image_phase_and_reference(tiny, engine):
    """The engine's image tokens for the right-padded test batch (CFG 5, seed 11) and the reference loop's."""
    model, tokens = tiny
    ids, mask = _batch(tokens, "right")
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "right", keep_ids=(tokens.bos, tokens.image_start))
    params = SamplingParams(cfg_scale=5.0)
    out = engine.generate_image_tokens(prefill, IMAGE_TOKENS, params, seed=11)
    return out, reference_image_tokens(model, prefill, IMAGE_TOKENS, params, seed=11)


def test_triton_attention_in_the_full_buffer_step_matches_reference(tiny, monkeypatch):
    """The step CUDA graphs capture (full buffer or key spans, step index on the device) with the Triton attention
    and its device limit, under the interpreter, without compiling (torch.compile replaced by the identity, as a
    captured graph runs the step as written): the reference's tokens. A limit one short (the current slot left
    out) changes them (checked by mutation); whether the limit saves reads is the kernel tests' business (NaN in
    slots past it), since masked slots are not read either."""
    model = tiny[0]
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    engine = RolloutEngine(model, EngineConfig(compile=True, key_buckets=3, prompt_bucket=0))
    engine.config.attention = "triton"
    assert engine._triton_attention(torch.device("cpu"))
    out, (ref_tokens, ref_kl) = _image_phase_and_reference(tiny, engine)
    assert torch.equal(out.tokens, ref_tokens)
    torch.testing.assert_close(out.kl, ref_kl, rtol=1e-4, atol=1e-5)


def test_triton_attention_in_a_compiled_step_is_an_opaque_operator(tiny):
    """engine.compile with the Triton attention (the CUDA default): dynamo traces the step with the kernel as the
    operator torch.ops.egrpo.decode_attention (no graph break, one graph per key span), and the tokens are the
    eager engine's. Run under the interpreter with the eager compile backend."""
    model = tiny[0]
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    engine = RolloutEngine(model, EngineConfig(compile=True, compile_backend=counting_backend, attention="triton",
                                               prompt_bucket=0))
    assert engine._triton_attention(torch.device("cpu"))
    out, (ref_tokens, _) = _image_phase_and_reference(tiny, engine)
    assert torch.equal(out.tokens, ref_tokens)
    assert len(graphs) == 1   # one key span, no graph break around the kernel
    called = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert called.count(torch.ops.egrpo.decode_attention.default) == len(model.model.language_model.layers)
    # auto: the kernel on CUDA, compiled or not; never on CPU
    assert RolloutEngine(tiny[0], EngineConfig(compile=True))._triton_attention(torch.device("cuda"))
    assert not RolloutEngine(tiny[0])._triton_attention(torch.device("cpu"))
    assert RolloutEngine(tiny[0])._triton_attention(torch.device("cuda"))


def test_inductor_compiled_step_with_the_triton_attention_matches_reference(tiny):
    """The same with inductor (what a CUDA run compiles; here for CPU, the kernel under the interpreter): inductor
    checks the operator's output strides against its fake, writes the K/V cache in place and calls the operator
    after the write. The reference's tokens, over three key spans (three compilations)."""
    torch._dynamo.reset()
    engine = RolloutEngine(tiny[0], EngineConfig(compile=True, attention="triton", prompt_bucket=0, key_buckets=3))
    out, (ref_tokens, ref_kl) = _image_phase_and_reference(tiny, engine)
    assert torch.equal(out.tokens, ref_tokens)
    torch.testing.assert_close(out.kl, ref_kl, rtol=1e-4, atol=1e-4)

