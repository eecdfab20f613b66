"""Original Janus layout <-> transformers layout: names, round trips, loading and export."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from egrpo.checkpoints import (EXTRAS_FILE, convert_checkpoint, export_model, is_original_dir,
                               read_state_dict)
from egrpo.errors import CheckpointFormatError
from egrpo.trainer.model import ModelConfig, build_model

# Original Janus module names (DeepSeek's MultiModalityCausalLM), written out by hand, with the tiny model's shapes.
EXPECTED_ORIGINAL = {
    "language_model.model.embed_tokens.weight": None,
    "language_model.model.layers.0.self_attn.q_proj.weight": (64, 64),
    "language_model.lm_head.weight": None,
    "vision_model.vision_tower.pos_embed": (1, 64, 32),
    "vision_model.vision_tower.patch_embed.proj.weight": (32, 3, 8, 8),
    "vision_model.vision_tower.blocks.0.attn.qkv.weight": (96, 32),
    "vision_model.vision_tower.blocks.0.attn.qkv.bias": (96,),
    "vision_model.vision_tower.blocks.0.attn.proj.weight": (32, 32),
    "vision_model.vision_tower.blocks.0.norm1.weight": (32,),
    "vision_model.vision_tower.blocks.0.mlp.fc2.weight": (32, 128),
    "vision_model.vision_tower.norm.bias": (32,),
    "aligner.layers.0.weight": (64, 32),
    "aligner.layers.2.weight": (64, 64),
    "gen_vision_model.encoder.conv_blocks.0.res.0.conv1.weight": (32, 32, 3, 3),
    "gen_vision_model.encoder.mid.1.q.weight": (64, 64, 1, 1),
    "gen_vision_model.decoder.mid.2.conv2.weight": None,
    "gen_vision_model.decoder.conv_blocks.0.res.0.norm1.weight": None,
    "gen_vision_model.quantize.embedding.weight": (256, 8),
    "gen_aligner.layers.0.weight": (64, 8),
    "gen_aligner.layers.2.bias": (64,),
    "gen_head.output_mlp_projector.weight": (64, 64),
    "gen_head.vision_head.weight": (256, 64),
    "gen_embed.weight": (256, 8),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model, tokenizer = build_model(ModelConfig(tiny={}, dtype="fp32", seed=3), "cpu")
    hf = str(root / "hf")
    model.save_pretrained(hf, safe_serialization=True)
    tokenizer.save_pretrained(hf)
    original = str(root / "original")
    assert convert_checkpoint(hf, original) == "original"
    # What a released checkpoint also carries and transformers has no place for.
    state = read_state_dict(original)
    state["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, 32)
    state["gen_vision_model.quantize.codebook_used"] = torch.arange(5.0)
    for f in os.listdir(original):
        if f.startswith("model") and ".safetensors" in f:
            os.remove(os.path.join(original, f))
    save_file(state, os.path.join(original, "model.safetensors"))
    return model, tokenizer, hf, original, root


def test_original_names(dirs):
    _, _, _, original, _ = dirs
    assert is_original_dir(original)
    state = read_state_dict(original)
    for key, shape in EXPECTED_ORIGINAL.items():
        assert key in state, key
        if shape is not None:
            assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("model.") for k in state)
    # Where each original tensor comes from, stated by hand (timm's fused qkv = [q; k; v] rows).
    hf = dirs[0].state_dict()
    vis = "model.vision_model.encoder.layers.0.self_attn."
    assert torch.equal(state["vision_model.vision_tower.blocks.0.attn.qkv.weight"],
                       torch.cat([hf[vis + "q_proj.weight"], hf[vis + "k_proj.weight"], hf[vis + "v_proj.weight"]]))
    assert torch.equal(state["vision_model.vision_tower.pos_embed"][0],
                       hf["model.vision_model.embeddings.position_embedding.weight"])
    pairs = {
        "gen_vision_model.decoder.conv_blocks.0.res.0.conv1.weight": "model.vqmodel.decoder.up.0.block.0.conv1.weight",
        "gen_vision_model.encoder.mid.1.q.weight": "model.vqmodel.encoder.mid.attn_1.q.weight",
        "gen_vision_model.decoder.mid.2.conv2.weight": "model.vqmodel.decoder.mid.block_2.conv2.weight",
        "gen_aligner.layers.2.weight": "model.generation_aligner.hidden_layers.0.weight",
        "gen_head.output_mlp_projector.weight": "model.generation_head.proj_out.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "vision_model.vision_tower.blocks.0.attn.proj.weight": vis + "projection_layer.weight",
    }
    for original, transformers_name in pairs.items():
        assert torch.equal(state[original], hf[transformers_name]), original


def test_load_original_dir_matches_hf_model_and_exports_byte_identical(dirs, caplog):
    model, _, _, original, root = dirs
    with caplog.at_level(logging.INFO):
        loaded, tokenizer = build_model(ModelConfig(path=original, dtype="fp32"), "cpu")
    assert any("original Janus layout" in r.getMessage() for r in caplog.records)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        img = torch.tensor([[4, 200, 17]])
        ref_img = model.model.generation_head(model.model.language_model(
            inputs_embeds=model.model.generation_aligner(model.model.generation_embeddings(img))).last_hidden_state)
        got_img = loaded.model.generation_head(loaded.model.language_model(
            inputs_embeds=loaded.model.generation_aligner(loaded.model.generation_embeddings(img))).last_hidden_state)
    assert torch.equal(ref, got) and torch.equal(ref_img, got_img)

    out = str(root / "exported_original")
    export_model(loaded, tokenizer, out, "original")
    a, b = read_state_dict(original), read_state_dict(out)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key
    assert is_original_dir(out) and os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_convert_to_hf_sharded_and_back(dirs):
    model, _, hf, original, root = dirs
    hf2 = str(root / "hf_sharded")
    assert convert_checkpoint(original, hf2, max_shard_size="50KB") == "hf"
    assert os.path.isfile(os.path.join(hf2, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(hf2, EXTRAS_FILE))
    assert os.path.isfile(os.path.join(hf2, "tokenizer_config.json"))
    a, b = read_state_dict(hf), read_state_dict(hf2)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = str(root / "original_again")
    convert_checkpoint(hf2, back)
    a, b = read_state_dict(original), read_state_dict(back)
    assert sorted(a) == sorted(b) and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    loaded, _ = build_model(ModelConfig(path=hf2, dtype="fp32"), "cpu")
    ids = torch.tensor([[2, 8, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_hf_export_of_original_model(dirs):
    model, tokenizer, hf, _, root = dirs
    out = export_model(model, tokenizer, str(root / "hf_export"), "hf")
    assert not is_original_dir(out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == "janus"


def test_errors(dirs, tmp_path):
    _, tokenizer, hf, original, _ = dirs
    with pytest.raises(CheckpointFormatError, match="no model"):
        read_state_dict(str(tmp_path))
    with pytest.raises(CheckpointFormatError, match="config.json"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "x"), to="hf")
    with pytest.raises(CheckpointFormatError, match="already in the original"):
        convert_checkpoint(original, str(tmp_path / "y"), to="original")
    with pytest.raises(CheckpointFormatError, match="not empty"):
        convert_checkpoint(original, hf)
    with pytest.raises(CheckpointFormatError, match="export_format"):
        export_model(None, tokenizer, str(tmp_path / "z"), "gguf")


def test_cli_convert(dirs, tmp_path, capsys):
    import argparse

    from egrpo.tools.cli import add_tool_subcommands

    _, _, hf, original, _ = dirs
    parser = argparse.ArgumentParser()
    add_tool_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", original, str(tmp_path / "out")])
    assert args.func(args) == 0 and "transformers layout" in capsys.readouterr().out
    # errors: the egrpo command's one line (exit 2)
    from egrpo.cli import main

    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out2")]) == 2
    assert "no config.json" in capsys.readouterr().err
    # A bad shard size names the option, and nothing is written (it used to fail in huggingface_hub's writer with
    # "Unit 'NA' not supported", after config.json was already in the output directory).
    rc = main(["convert", original, str(tmp_path / "out3"), "--max-shard-size", "banana"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-shard-size" in err and "'banana'" in err and not (tmp_path / "out3").exists()


def test_training_exports_original_layout(tmp_path):
    from egrpo.trainer.config import ConfigError
    from egrpo.trainer.train import train
    from tests.trainer._helpers import small_config

    with pytest.raises(ConfigError, match="export_format"):
        small_config(tmp_path / "bad", "train.export_format=gguf").validate()
    cfg = small_config(tmp_path / "run", "train.steps=1", "train.export_hf=true", "train.export_format=original",
                       "model.dtype=fp32")
    summary = train(cfg)
    assert is_original_dir(summary["export"])
    state = read_state_dict(summary["export"])
    assert "language_model.lm_head.weight" in state and "gen_head.vision_head.weight" in state
    loaded, _ = build_model(ModelConfig(path=summary["export"], dtype="fp32"), "cpu")
    assert torch.equal(loaded.lm_head.weight, state["language_model.lm_head.weight"])


def test_config_from_a_deepseek_style_original_config():
    from egrpo.checkpoints import original_config_to_hf

    # The shape of DeepSeek's Janus-Pro-7B config.json (no embedded transformers config).
    config = {
        "model_type": "multi_modality",
        "language_config": {"hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 16384,
                            "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 30,
                            "num_key_value_heads": 32, "torch_dtype": "bfloat16", "vocab_size": 102400,
                            "_attn_implementation": "flash_attention_2"},
        "vision_config": {"cls": "CLIPVisionTower", "params": {"image_size": 384}},
        "aligner_config": {"params": {"depth": 2, "input_dim": 1024, "n_embed": 4096}},
        "gen_vision_config": {"params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {"params": {"depth": 2, "input_dim": 8, "n_embed": 4096}},
        "gen_head_config": {"params": {"image_token_embed": 4096, "image_token_size": 16384, "n_embed": 4096}},
    }
    hf = original_config_to_hf(config, {"image_token_id": 100581, "pad_token_id": 100002, "bos_token_id": 100000,
                                        "eos_token_id": 100001})
    text = hf.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.max_position_embeddings) == \
        (4096, 30, 102400, 16384)
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (100002, 100000, 100001)
    assert hf.image_token_id == 100581
    assert (hf.vision_config.image_size, hf.vision_config.projection_dim) == (384, 4096)
    assert (hf.vq_config.num_embeddings, hf.vq_config.embed_dim, hf.vq_config.projection_dim,
            hf.vq_config.image_token_embed_dim) == (16384, 8, 4096, 4096)
    with pytest.raises(CheckpointFormatError, match="gen_head_config"):
        original_config_to_hf({k: v for k, v in config.items() if k != "gen_head_config"}, {"image_token_id": 1})


def test_original_export_of_parameters_that_are_views_into_one_flat_buffer(dirs, tmp_path):
    """DeepSpeed ZeRO-1/2/3 keep the parameters as views into flat buffers, and on CPU the trainer's ``.cpu()``
    hands those views to the export: the original-layout writer used to fail on them with safetensors' "None is
    covering the entire storage" (after the whole run had trained)."""
    model, tokenizer, _, _, _ = dirs
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flat = torch.cat([v.reshape(-1) for v in state.values()])          # one buffer, as ZeRO flattens them
    views, offset = {}, 0
    for key, value in state.items():
        views[key] = flat[offset:offset + value.numel()].view_as(value)
        offset += value.numel()
    out = export_model(model, tokenizer, str(tmp_path / "original"), "original", state=views)
    reference = export_model(model, tokenizer, str(tmp_path / "reference"), "original", state=state)
    a, b = read_state_dict(reference), read_state_dict(out)
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_training_under_zero_exports_original_layout(tmp_path, stage):
    from egrpo.trainer.train import train
    from tests.trainer._helpers import small_config

    cfg = small_config(tmp_path / "run", "train.steps=1", "train.export_hf=true", "train.export_format=original",
                       f"deepspeed.zero_stage={stage}", "data.prompts_per_step=1")
    summary = train(cfg)
    assert is_original_dir(summary["export"])
    assert "gen_head.vision_head.weight" in read_state_dict(summary["export"])


def test_cli_load_of_original_dir_says_so_without_a_model_type_warning(dirs, tmp_path, capfd):
    """docs/data-and-checkpoints.md: loading an original-layout directory logs `model.path ... is in the original
    Janus layout: converting it to the transformers layout on load`. Through the CLI that line must reach the
    user, and transformers' "model of type `multi_modality` ... can yield errors" warning (raised by its
    AutoTokenizer reading the original config.json) must not."""
    from egrpo.cli import main

    _, _, _, original, _ = dirs
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\n")
    capfd.readouterr()
    assert main(["generate", "--model", original, "--prompts", str(prompts), "--out", str(tmp_path / "gen"),
                 "--dtype", "fp32", "--device", "cpu", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert f"egrpo: model.path {original} is in the original Janus layout" in err
    assert "multi_modality` to instantiate" not in err
