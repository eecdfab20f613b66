"""HPS v2.1 (open_clip checkpoint converted to transformers CLIP) against an eager open_clip-format forward, and
the PickScore-style CLIP score against CLIPModel's own logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.rewards._tiny import word_level_tokenizer

WIDTH, TEXT_WIDTH, EMBED, PATCH, GRID, CONTEXT, HEADS = 32, 24, 16, 8, 3, 12, 2


def tiny_open_clip_state(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s
    state = {
        "visual.class_embedding": r(WIDTH), "visual.positional_embedding": r(GRID * GRID + 1, WIDTH),
        "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH, s=0.05), "visual.ln_pre.weight": 1 + r(WIDTH),
        "visual.ln_pre.bias": r(WIDTH), "visual.ln_post.weight": 1 + r(WIDTH), "visual.ln_post.bias": r(WIDTH),
        "visual.proj": r(WIDTH, EMBED), "token_embedding.weight": r(vocab, TEXT_WIDTH),
        "positional_embedding": r(CONTEXT, TEXT_WIDTH), "ln_final.weight": 1 + r(TEXT_WIDTH),
        "ln_final.bias": r(TEXT_WIDTH), "text_projection": r(TEXT_WIDTH, EMBED), "logit_scale": torch.tensor(math.log(50.0)),
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1),
    }
    for prefix, width, layers in (("visual.transformer", WIDTH, 2), ("transformer", TEXT_WIDTH, 1)):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            state.update({
                f"{p}.ln_1.weight": 1 + r(width), f"{p}.ln_1.bias": r(width), f"{p}.ln_2.weight": 1 + r(width),
                f"{p}.ln_2.bias": r(width), f"{p}.attn.in_proj_weight": r(3 * width, width),
                f"{p}.attn.in_proj_bias": r(3 * width), f"{p}.attn.out_proj.weight": r(width, width),
                f"{p}.attn.out_proj.bias": r(width), f"{p}.mlp.c_fc.weight": r(4 * width, width),
                f"{p}.mlp.c_fc.bias": r(4 * width), f"{p}.mlp.c_proj.weight": r(width, 4 * width),
                f"{p}.mlp.c_proj.bias": r(width),
            })
    return state


def eager_open_clip(state, pixels, ids):
    """open_clip's ViT CLIP forward written out from its state dict (float64), normalised features."""
    s = {k: v.double() for k, v in state.items()}

    def block(x, p, causal):
        h = F.layer_norm(x, x.shape[-1:], s[f"{p}.ln_1.weight"], s[f"{p}.ln_1.bias"], 1e-5)
        q, k, v = F.linear(h, s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"]).chunk(3, -1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores + s["attn_mask"][:x.shape[1], :x.shape[1]]
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(a, s[f"{p}.attn.out_proj.weight"], s[f"{p}.attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], s[f"{p}.ln_2.weight"], s[f"{p}.ln_2.bias"], 1e-5)
        h = F.linear(F.gelu(F.linear(h, s[f"{p}.mlp.c_fc.weight"], s[f"{p}.mlp.c_fc.bias"])),
                     s[f"{p}.mlp.c_proj.weight"], s[f"{p}.mlp.c_proj.bias"])
        return x + h

    x = F.conv2d(pixels.double(), s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], 1e-5)
    for i in range(2):
        x = block(x, f"visual.transformer.resblocks.{i}", False)
    image = F.layer_norm(x[:, 0], x.shape[-1:], s["visual.ln_post.weight"], s["visual.ln_post.bias"], 1e-5) @ s["visual.proj"]
    t = s["token_embedding.weight"][ids] + s["positional_embedding"]
    t = block(t, "transformer.resblocks.0", True)
    t = F.layer_norm(t, t.shape[-1:], s["ln_final.weight"], s["ln_final.bias"], 1e-5)
    text = t[torch.arange(ids.shape[0]), ids.argmax(-1)] @ s["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    # open_clip pools text at the largest token id: end-of-text must be the last id of the vocabulary, as in CLIP's
    tokenizer = word_level_tokenizer(bos="<start_of_text>", eos="!", pad="!")
    tokenizer.add_special_tokens({"eos_token": "<end_of_text>"})
    from tokenizers import processors

    start, end = tokenizer.convert_tokens_to_ids("<start_of_text>"), tokenizer.convert_tokens_to_ids("<end_of_text>")
    assert end == len(tokenizer) - 1
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", special_tokens=[("<start_of_text>", start), ("<end_of_text>", end)])
    tokenizer.save_pretrained(str(root / "tokenizer"))
    vocab = len(tokenizer)
    state = tiny_open_clip_state(vocab)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, str(root / "hps.pt"))
    return str(root / "hps.pt"), str(root / "tokenizer"), state


def test_open_clip_conversion_matches_eager_forward(hps_files):
    from egrpo.rewards.hps import load_open_clip_as_hf
    from egrpo.rewards.clip_score import clip_features

    checkpoint, _, state = hps_files
    model = load_open_clip_as_hf(checkpoint).eval()
    assert model.config.vision_config.num_attention_heads == 1      # 32 // 80 -> at least 1 head by default
    model = load_open_clip_as_hf(checkpoint, vision_heads=HEADS, text_heads=HEADS).eval()
    pixels = torch.randn(3, 3, PATCH * GRID, PATCH * GRID)
    ids = torch.randint(1, 40, (3, CONTEXT))
    ids[0, 5], ids[1, -1], ids[2, 2] = 70, 71, 72                 # the pooled (largest-id) positions
    with torch.no_grad():
        image, text = clip_features(model, pixels, ids, pool_at_argmax=True)
    ref_image, ref_text = eager_open_clip(state, pixels, ids)
    torch.testing.assert_close(image.double(), ref_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text.double(), ref_text, rtol=1e-4, atol=1e-5)
    bad = dict(state, **{"visual.extra.weight": torch.zeros(1)})
    from egrpo.rewards.hps import open_clip_to_hf
    with pytest.raises(ValueError, match="does not know"):
        open_clip_to_hf(bad)


def test_hps_reward_from_files_equals_reference_cosine(hps_files):
    from transformers import AutoTokenizer

    from egrpo.rewards.clip_score import OPENAI_MEAN, OPENAI_STD, clip_preprocess
    from egrpo.rewards.hps import HPSReward

    checkpoint, tokenizer_dir, state = hps_files
    reward = HPSReward(checkpoint=checkpoint, tokenizer=tokenizer_dir, vision_heads=HEADS, text_heads=HEADS,
                       batch_size=2)
    images = torch.rand(3, 3, 40, 30)
    prompts = ["a red cat", "two dogs on the left of a blue car", "a photo"]
    got = reward(images, prompts, [{}] * 3)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(prompts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")["input_ids"]
    assert (ids.argmax(-1) == (ids == tok.eos_token_id).int().argmax(-1)).all()   # pooled at end-of-text
    pixels = clip_preprocess(images, PATCH * GRID, OPENAI_MEAN, OPENAI_STD)
    assert pixels.shape == (3, 3, 24, 24)
    ref_image, ref_text = eager_open_clip(state, pixels, ids)
    torch.testing.assert_close(got.double(), (ref_image * ref_text).sum(-1), rtol=1e-4, atol=1e-5)


def test_clip_score_equals_clip_model_logits(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from egrpo.rewards.clip_score import ClipScoreReward, clip_preprocess

    tokenizer = word_level_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    images, prompts = torch.rand(2, 3, 36, 36), ["a red cat </s>", "a dog on the left of a car </s>"]
    got = ClipScoreReward(path=str(tmp_path))(images, prompts, None)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=clip_preprocess(images, 28)).logits_per_image
    torch.testing.assert_close(got, logits.diagonal(), rtol=1e-4, atol=1e-4)
    plain = ClipScoreReward(path=str(tmp_path), use_logit_scale=False)(images, prompts, None)
    torch.testing.assert_close(plain * model.logit_scale.exp(), got, rtol=1e-4, atol=1e-4)
