"""The decode step's per-phase GEMMs (egrpo/rollout/linear.py): oneDNN-packed weights compute x W^T + b to the
accuracy of an fp32 (bf16) GEMM against float64, eager and under torch.compile; the engine refuses a packing it
cannot do with a one-line error."""

import pytest
import torch

from egrpo.rollout.engine import EngineConfig, RolloutEngine, cfg_prefill
from egrpo.rollout.linear import PackedLinear, PlainLinear, can_pack
from egrpo.rollout.sampling import SamplingParams
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.tokenizer import janus_tokens

needs_onednn = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="no oneDNN linears here")


@needs_onednn
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(32, 1, 96), (7, 96), (3, 40, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_float64(dtype, tol, shape, bias):
    torch.manual_seed(0)
    w = torch.randn(200, 96).to(dtype)
    b = torch.randn(200).to(dtype) if bias else None
    x = torch.randn(*shape).to(dtype)
    truth = x.double() @ w.double().t() + (b.double() if bias else 0)
    scale = truth.abs().max().item()
    for linear in (PackedLinear(w, b, rows=32), PlainLinear(w, b)):
        out = linear(x)
        assert out.dtype == dtype and out.shape == (*shape[:-1], 200)
        assert (out.double() - truth).abs().max().item() <= tol * scale


@needs_onednn
def test_packed_linear_under_inductor():
    """Inductor's own lowering of the oneDNN linear only takes frozen weights: ours goes through a custom op."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    w, b, x = torch.randn(200, 96), torch.randn(200), torch.randn(32, 1, 96)
    packed = PackedLinear(w, b, rows=32)
    compiled = torch.compile(lambda t: torch.relu(packed(t)) * 2, backend="inductor", fullgraph=True)
    expected = torch.relu(x.double() @ w.double().t() + b.double()) * 2
    assert (compiled(x).double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


def _image_case():
    """A tiny random Janus (2 layers) and a CFG prefill of two identical prompts."""
    model, tokenizer = build_model(ModelConfig(tiny=dict(image_size=32, num_layers=2, initializer_range=0.2),
                                               dtype="fp32"), "cpu")
    tokens = janus_tokens(tokenizer)
    ids = torch.tensor([[tokens.bos, 10, 11, 12, tokens.image_start]] * 2)
    return model, cfg_prefill(model, ids, torch.ones_like(ids), tokens.pad, "right")


@needs_onednn
def test_engine_packed_and_unpacked_draw_the_same_tokens():
    model, prefill = _image_case()
    params = SamplingParams(cfg_scale=4.0)
    outs = [RolloutEngine(model, EngineConfig(pack_weights=pack)).generate_image_tokens(prefill, 12, params, seed=2)
            for pack in (True, False)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.allclose(outs[0].kl, outs[1].kl, rtol=1e-4, atol=1e-6)


def test_engine_refuses_a_packing_it_cannot_do():
    model, tokenizer = build_model(ModelConfig(tiny=dict(image_size=32, num_layers=1), dtype="fp32"), "cpu")
    model = model.double()
    tokens = janus_tokens(tokenizer)
    ids = torch.tensor([[tokens.bos, 10, tokens.image_start]])
    prefill = cfg_prefill(model, ids, torch.ones_like(ids), tokens.pad, "right")
    with pytest.raises(ValueError, match="engine.pack_weights=true needs oneDNN linears for torch.float64"):
        RolloutEngine(model, EngineConfig(pack_weights=True)).generate_image_tokens(
            prefill, 2, SamplingParams(cfg_scale=2.0), seed=0)


def test_hooked_layers_are_called_not_packed():
    """A forward hook (or any wrapper) on a projection or head must keep taking effect: such layers are called as
    modules, and the hooks run at every step."""
    model, prefill = _image_case()
    params = SamplingParams(cfg_scale=4.0)
    calls = {"head": 0, "o_proj": 0}

    def favour_token_7(module, args, out):
        calls["head"] += 1
        out = out.clone()
        out[..., 7] += 50.0
        return out

    def count(module, args, out):
        calls["o_proj"] += 1

    handles = [model.model.generation_head.vision_head.register_forward_hook(favour_token_7),
               model.model.language_model.layers[0].self_attn.o_proj.register_forward_hook(count)]
    try:
        out = RolloutEngine(model, EngineConfig()).generate_image_tokens(prefill, 6, params, seed=0)
    finally:
        for h in handles:
            h.remove()
    assert (out.tokens[:, 1:] == 7).all()   # the hook decided every sampled token
    assert calls["head"] >= 6 and calls["o_proj"] >= 6
