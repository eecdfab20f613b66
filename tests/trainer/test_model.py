import pytest
import torch

from egrpo.trainer.model import ModelConfig, build_model, set_trainable, tiny_janus_config
from egrpo.trainer.rollout import codebook_vectors
from egrpo.trainer.protocol import image_prompt_text
from egrpo.trainer.tokenizer import build_char_tokenizer, encode_with_bos, janus_tokens

TINY = dict(image_size=32, patch_size=8, vq_channel_multiplier=(1, 1, 2, 2), initializer_range=0.2)  # 16 tokens, 32 px


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")


def test_tiny_model_shapes_follow_config(tiny_model):
    model, tokenizer = tiny_model
    assert model.config.vision_config.num_image_tokens == 16
    assert model.lm_head.weight.shape == (len(tokenizer), 64)
    assert model.model.generation_head.vision_head.weight.shape == (256, 64)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    pixels = model.decode_image_tokens(torch.randint(0, 256, (2, 16)))
    assert pixels.shape == (2, 32, 32, 3)


def test_tiny_model_is_seeded():
    a, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32", seed=1), "cpu")
    b, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32", seed=1), "cpu")
    c, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32", seed=2), "cpu")
    wa, wb, wc = (m.model.language_model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert a.lm_head.weight.dtype == torch.float32


def test_default_trainable_is_language_model_only(tiny_model):
    model, _ = tiny_model
    for name, param in model.named_parameters():
        expected = name.startswith("model.language_model.") or name.startswith("lm_head.")
        assert param.requires_grad == expected, name
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()


def test_set_trainable_prefixes_and_count():
    model, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")
    count = set_trainable(model, ["model.generation_head"])
    head = model.model.generation_head
    assert count == sum(p.numel() for p in head.parameters())
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in model.model.language_model.parameters())
    assert not model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="model.trainable"):
        set_trainable(model, ["model.langauge_model"])


def test_config_errors_are_clear():
    tokenizer = build_char_tokenizer()
    with pytest.raises(ValueError, match="unknown keys"):
        tiny_janus_config(tokenizer, hiden_size=32)
    with pytest.raises(ValueError, match="VQ decoder"):
        tiny_janus_config(tokenizer, image_size=32, patch_size=8, vq_channel_multiplier=(1, 2))
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_janus_config(tokenizer, vq_base_channels=48)
    with pytest.raises(ValueError, match="exactly one"):
        build_model(ModelConfig(), "cpu")
    with pytest.raises(ValueError, match="dtype"):
        build_model(ModelConfig(tiny=TINY, dtype="fp8"), "cpu")


def test_char_tokenizer_roundtrip_and_janus_format():
    tokenizer = build_char_tokenizer()
    tokens = janus_tokens(tokenizer)
    ids = encode_with_bos(tokenizer, image_prompt_text("a red\tcat!"), tokens)
    assert ids[0] == tokens.bos
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<｜begin▁of▁sentence｜>User: a red\tcat!\n\nAssistant:"
    )
    assert tokenizer.convert_ids_to_tokens(ids[1]) == "U"   # released roles are plain words, one token per char
    assert len({tokens.bos, tokens.eos, tokens.pad, tokens.image_start}) == 4


def test_codebook_vectors_match_vq_model(tiny_model):
    model, _ = tiny_model
    image_tokens = torch.randint(0, 256, (3, 16))
    vectors = codebook_vectors(model, image_tokens)
    reference = model.model.vqmodel.quantize.get_codebook_entry(image_tokens)  # [B, C, h, w]
    reference = reference.flatten(2).transpose(1, 2)
    assert vectors.shape == (3, 16, 8)
    torch.testing.assert_close(vectors, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3, 16))


def test_liger_is_a_noop_without_gpu(caplog):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    model, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32", liger=True), "cpu")
    assert "Liger" in caplog.text
    assert type(model.model.language_model.norm).__name__ == "LlamaRMSNorm"


@pytest.mark.gpu
def test_liger_patches_keep_values_and_gradients(monkeypatch):
    """On CUDA, model.liger=True swaps in Liger's RMSNorm / SwiGLU / RoPE kernels: the teacher-forced hidden
    states and the language model's gradients must match the unpatched model's."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    from egrpo.trainer.rollout import RolloutConfig, head_inputs, rollout

    # Liger also replaces module-level names of transformers' Llama code (RoPE for every model): restore them
    # after the test, and run the unpatched model before patching.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))

    def hidden_and_grads(model, out):
        image, _ = head_inputs(model, out)
        (image.hidden.float() ** 2).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.model.language_model.named_parameters()
                 if p.grad is not None}
        return image.hidden.detach(), grads

    plain, tokenizer = build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cuda")
    out = rollout(plain, tokenizer, ["red", "a blue car"], RolloutConfig(group_size=2, image_tokens=16),
                  torch.Generator(device="cuda").manual_seed(0))
    h_plain, g_plain = hidden_and_grads(plain, out)
    patched, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32", liger=True), "cuda")
    # Liger patches the model's norms in place (the class stays; forward and the module name change)
    assert patched.model.language_model.norm._get_name() == "LigerRMSNorm"
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    h_liger, g_liger = hidden_and_grads(patched, out)

    torch.testing.assert_close(h_liger, h_plain, rtol=1e-4, atol=1e-5)
    assert g_plain.keys() == g_liger.keys() and g_plain
    for name in g_plain:
        rel = (g_liger[name] - g_plain[name]).norm() / g_plain[name].norm().clamp_min(1e-30)
        assert rel < 1e-4, (name, float(rel))


def test_gradient_checkpointing_gives_same_gradients():
    from egrpo.trainer.rollout import RolloutConfig, head_inputs, rollout

    plain, tokenizer = build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")
    ckpt, _ = build_model(ModelConfig(tiny=TINY, dtype="fp32", gradient_checkpointing=True), "cpu")
    cfg = RolloutConfig(group_size=2, image_tokens=16)
    out = rollout(plain, tokenizer, ["red"], cfg, torch.Generator().manual_seed(0))
    # In training mode HF checkpointing would drop the KV cache; the rollout must be unaffected.
    ckpt.train()
    again = rollout(ckpt, tokenizer, ["red"], cfg, torch.Generator().manual_seed(0))
    assert ckpt.training
    assert torch.equal(out.image_tokens, again.image_tokens)
    grads = []
    for model in (plain, ckpt):
        model.train()
        image, _ = head_inputs(model, out)
        image.hidden.square().mean().backward()
        grads.append(model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone())
        model.eval()
    assert ckpt.model.language_model.gradient_checkpointing
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_build_model_from_local_checkpoint(tmp_path, tiny_model):
    from egrpo.trainer.rollout import RolloutConfig, rollout

    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = build_model(ModelConfig(path=str(tmp_path), dtype="bf16"), "cpu")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())
    assert janus_tokens(loaded_tokenizer) == janus_tokens(tokenizer)
    assert loaded_tokenizer.padding_side == "left"
    assert not loaded.model.generation_head.vision_head.weight.requires_grad
    out = rollout(loaded, loaded_tokenizer, ["red"], RolloutConfig(group_size=2, image_tokens=16),
                  torch.Generator().manual_seed(0))
    assert out.images.dtype == torch.float32 and out.images.isfinite().all()
    # Values: an fp32 load of the same directory reproduces the in-memory model's rollout exactly.
    loaded32, _ = build_model(ModelConfig(path=str(tmp_path), dtype="fp32"), "cpu")
    for name, p in model.state_dict().items():
        assert torch.equal(loaded32.state_dict()[name], p), name
    a = rollout(loaded32, loaded_tokenizer, ["red"], RolloutConfig(group_size=2, image_tokens=16),
                torch.Generator().manual_seed(0))
    b = rollout(model, tokenizer, ["red"], RolloutConfig(group_size=2, image_tokens=16), torch.Generator().manual_seed(0))
    assert torch.equal(a.image_tokens, b.image_tokens) and torch.equal(a.images, b.images)
