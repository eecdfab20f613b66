"""VQ decode under a ZeRO-3-like parameter lifecycle: the codebook weight exists only inside the embedding's
module call (DeepSpeed ZeRO-3's post-forward hook re-partitions it after each call, even inside
``GatheredParameters``), so every chunk of a decode must reach it through the call, never through
``embedding.weight.shape`` (transformers' ``get_codebook_entry``)."""

import pytest
import torch

from egrpo.rollout import vq as vq_module
from egrpo.trainer import rollout as trainer_rollout
from egrpo.trainer.model import ModelConfig, build_model

IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_model(ModelConfig(tiny=dict(image_size=32, num_layers=1), dtype="fp32"), "cpu")
    return model


def _released_after_each_call(embedding):
    """Hooks that imitate ZeRO-3: the weight is gathered by the module's pre-forward hook and released (0-sized)
    by its post-forward hook. Returns the hook handles and the full weight."""
    full = embedding.weight.data.clone()

    def gather(module, args):
        module.weight.data = full

    def release(module, args, output):
        module.weight.data = torch.empty(0, dtype=full.dtype)

    return [embedding.register_forward_pre_hook(gather), embedding.register_forward_hook(release)], full


def test_codebook_entry_matches_transformers(tiny):
    tokens = torch.randint(0, tiny.config.vq_config.num_embeddings, (3, IMAGE_TOKENS))
    quantize = tiny.model.vqmodel.quantize
    torch.testing.assert_close(vq_module.codebook_entry(tiny.model.vqmodel, tokens), quantize.get_codebook_entry(tokens),
                               rtol=0, atol=0)


@pytest.mark.parametrize("decode", [
    lambda model, tokens: vq_module.decode_images(model, tokens, batch_size=2),          # the rollout engine's decoder
    lambda model, tokens: trainer_rollout.decode_images(model, tokens, batch_size=2),   # the plain loop's
], ids=["engine", "plain-loop"])
def test_decode_reaches_the_codebook_through_the_module_call_in_every_chunk(tiny, decode):
    tokens = torch.randint(0, tiny.config.vq_config.num_embeddings, (5, IMAGE_TOKENS))   # 3 chunks of <= 2 rows
    expected = ((tiny.decode_image_tokens(tokens).float() + 1) / 2).clamp(0, 1).permute(0, 3, 1, 2)
    embedding = tiny.model.vqmodel.quantize.embedding
    handles, full = _released_after_each_call(embedding)
    try:
        embedding(tokens[:1])   # as after any earlier call under ZeRO-3: the weight is released
        got = decode(tiny, tokens)
    finally:
        for h in handles:
            h.remove()
        embedding.weight.data = full
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
