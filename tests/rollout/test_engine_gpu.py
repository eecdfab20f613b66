"""CUDA only (skipped on CPU): the CUDA-graph step and the compiled Triton sampler draw the tokens of the eager
engine with the torch sampler, for the image and the text phase."""

import pytest
import torch

from egrpo.rollout.engine import EngineConfig, RolloutEngine, cfg_prefill, text_prefill
from egrpo.rollout.sampling import SamplingParams
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.tokenizer import janus_tokens

pytestmark = pytest.mark.gpu


def _tiny_model_and_prompts():
    """A 2-layer tiny Janus on CUDA and 6 prompts of 9 ids (BOS ... image start), all attended."""
    model, tokenizer = build_model(
        ModelConfig(tiny=dict(image_size=32, num_layers=2, initializer_range=0.2), dtype="fp32"), "cuda")
    tokens = janus_tokens(tokenizer)
    ids = torch.randint(10, 100, (6, 9), device="cuda")
    ids[:, 0], ids[:, -1] = tokens.bos, tokens.image_start
    return model, tokens, ids, torch.ones_like(ids)


@pytest.mark.parametrize("params", [SamplingParams(cfg_scale=5.0), SamplingParams(cfg_scale=2.0, top_k=20, top_p=0.9)])
def test_graph_and_triton_match_eager_torch(params):
    """The defaults on CUDA (graph step, Triton attention and sampler) draw the tokens of the all-torch eager step."""
    model, tokens, ids, mask = _tiny_model_and_prompts()
    mask[:2, :3] = 0
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "left", keep_ids=(tokens.bos, tokens.image_start))
    # all torch (SDPA attention, torch sampler) against the defaults: graph, Triton attention, Triton sampler
    eager = RolloutEngine(model, EngineConfig(cuda_graph=False, sampler="torch", attention="torch"))
    graph = RolloutEngine(model, EngineConfig(cuda_graph=True, sampler="triton"))
    assert graph._triton_attention(ids.device)
    a = eager.generate_image_tokens(prefill, 16, params, seed=4)
    b = graph.generate_image_tokens(prefill, 16, params, seed=4)
    # rows 0-1 are left-padded: a fully masked pad slot must not turn into NaN keys/values on CUDA's attention
    # (the prefill mask lets a pad slot see itself; CPU attention returns zeros for a fully masked row anyway)
    for out in (a, b):
        assert torch.isfinite(out.kl).all() and torch.isfinite(out.logp).all()
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-3, atol=1e-4)
    text = text_prefill(model, ids, mask)
    text_params = SamplingParams(top_k=params.top_k, top_p=params.top_p)
    a = eager.generate_text(text, 24, tokens.eos, tokens.pad, text_params, seed=9)
    b = graph.generate_text(text, 24, tokens.eos, tokens.pad, text_params, seed=9)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    assert torch.isfinite(a.logp).all() and torch.isfinite(b.logp).all()


@pytest.mark.parametrize("prompt_len", [9, 300])   # 300: > 256 keys for 12 rows x the tiny model's heads: key splits
def test_compiled_graph_step_with_triton_attention_matches_eager_torch(prompt_len):
    """engine.compile on CUDA (inductor, default mode) with the engine's CUDA graph and the Triton attention as an
    opaque operator (the defaults once compiled): the all-torch eager step's tokens, image and text phases; with a
    long prompt the kernel splits the keys (temporaries and torch ops inside the captured graph)."""
    from egrpo.rollout.attention import key_splits

    torch._dynamo.reset()
    model, tokens, ids, mask = _tiny_model_and_prompts()
    if prompt_len > ids.shape[1]:
        body = torch.randint(10, 100, (ids.shape[0], prompt_len - ids.shape[1]), device="cuda")
        ids, mask = torch.cat([ids[:, :1], body, ids[:, 1:]], 1), torch.ones(ids.shape[0], prompt_len, device="cuda",
                                                                             dtype=mask.dtype)
        heads = model.config.text_config.num_attention_heads
        assert key_splits(2 * ids.shape[0] * heads, prompt_len + 16) > 1
    mask[:2, :3] = 0
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "left", keep_ids=(tokens.bos, tokens.image_start))
    params = SamplingParams(cfg_scale=5.0)
    eager = RolloutEngine(model, EngineConfig(cuda_graph=False, sampler="torch", attention="torch"))
    compiled = RolloutEngine(model, EngineConfig(compile=True, cuda_graph=True, sampler="triton", prompt_bucket=0))
    assert compiled._triton_attention(ids.device)
    a = eager.generate_image_tokens(prefill, 16, params, seed=4)
    b = compiled.generate_image_tokens(prefill, 16, params, seed=4)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-3, atol=1e-4)
    text = text_prefill(model, ids, mask)
    a = eager.generate_text(text, 12, tokens.eos, tokens.pad, SamplingParams(top_k=20), seed=9)
    b = compiled.generate_text(text, 12, tokens.eos, tokens.pad, SamplingParams(top_k=20), seed=9)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("new_tokens,key_buckets", [(2, 1), (9, 2)])
def test_graph_captured_on_the_last_step_matches_eager(new_tokens, key_buckets):
    """A graph captured on a phase's last decode step (a 2-token phase; with a 9-slot prompt and 2 spans of 16
    slots, the second span starts on the last step): its warm-up must not step past the buffers (it once did: a
    device-side assert). tests/rollout/test_engine_graph.py checks the same on CPU with a stand-in graph API."""
    model, tokens, ids, mask = _tiny_model_and_prompts()
    eager = RolloutEngine(model, EngineConfig(cuda_graph=False, sampler="torch"))
    graph = RolloutEngine(model, EngineConfig(cuda_graph=True, key_buckets=key_buckets, sampler="torch"))
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "left", keep_ids=(tokens.bos, tokens.image_start))
    params = SamplingParams(cfg_scale=5.0)
    a = eager.generate_image_tokens(prefill, new_tokens, params, seed=4)
    b = graph.generate_image_tokens(prefill, new_tokens, params, seed=4)
    assert torch.equal(a.tokens, b.tokens)
    text = text_prefill(model, ids, mask)
    a = eager.generate_text(text, new_tokens, tokens.eos, tokens.pad, SamplingParams(top_k=20), seed=9)
    b = graph.generate_text(text, new_tokens, tokens.eos, tokens.pad, SamplingParams(top_k=20), seed=9)
    assert torch.equal(a.ids, b.ids)


@pytest.mark.parametrize("rows,limit", [(256, 300), (8, 650)])  # 7B image-phase shape (one split); few rows: splits
def test_decode_attention_kernel_at_7b_shape(rows, limit):
    """The compiled decode-attention kernel at Janus-Pro-7B's head shape (32 heads of 128) in bf16, over a view of a
    700-slot cache with padded slots and a device limit: within torch's own bf16 error of float64 attention."""
    import math

    from egrpo.rollout.attention import decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, 32, 1, 128, device="cuda", generator=g).bfloat16()
    cache = torch.randn(2, rows, 32, 700, 128, device="cuda", generator=g).bfloat16()
    valid = torch.rand(rows, 700, device="cuda", generator=g) > 0.2
    valid[:, 0] = True
    keys, values = cache[0][:, :, :680], cache[1][:, :, :680]
    out = decode_attention(q, keys, values, valid[:, :680], 1 / math.sqrt(128), torch.tensor([limit], device="cuda"))
    allowed = valid[:, None, None, :limit]

    def attend(dtype):
        scores = (q.to(dtype) @ keys[:, :, :limit].to(dtype).transpose(-1, -2)) / math.sqrt(128)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values[:, :, :limit].to(dtype)
    exact = attend(torch.float64)
    ours = (out.double() - exact).abs().max().item()
    theirs = (attend(torch.bfloat16).double() - exact).abs().max().item()
    assert ours <= theirs + 2 ** -8, (ours, theirs)
