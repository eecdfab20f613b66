"""``egrpo generate / analyze --model DIR``: what a user runs with a real checkpoint (the other tool tests use
``--tiny``). A tiny random Janus saved in the transformers layout and converted to DeepSeek's original layout
(accepted directly, converted on load): both generate, and the images match (same weights, same seed)."""

import json

import pytest

from egrpo.cli import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from egrpo.checkpoints import convert_checkpoint
    from egrpo.trainer.model import ModelConfig, build_model

    root = tmp_path_factory.mktemp("model_dir")
    model, tokenizer = build_model(ModelConfig(tiny={"image_size": 32, "num_layers": 1}, dtype="fp32", seed=3), "cpu")
    model.save_pretrained(str(root / "hf"), safe_serialization=True)
    tokenizer.save_pretrained(str(root / "hf"))
    assert convert_checkpoint(str(root / "hf"), str(root / "original")) == "original"
    return root


def test_generate_and_analyze_from_hf_and_original_dirs(model_dirs, tmp_path):
    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\n")
    pixels = {}
    for layout in ("hf", "original"):
        out = tmp_path / f"gen_{layout}"
        assert main(["generate", "--model", str(model_dirs / layout), "--dtype", "fp32", "--device", "cpu",
                     "--prompts", str(prompts), "--no-progress", "--seed", "1", "--out", str(out)]) == 0
        (row,) = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
        pixels[layout] = list(Image.open(out / row["file"]).getdata())
    assert pixels["hf"] == pixels["original"]
    out = tmp_path / "analysis.jsonl"
    assert main(["analyze", "--model", str(model_dirs / "original"), "--dtype", "fp32", "--device", "cpu",
                 "--prompts", str(prompts), "--no-progress", "--cots", "0", "--images", "2", "--reward", "colour",
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_convert_and_export_name_what_they_were_given(model_dirs, tmp_path, capsys):
    from tests.tools._cli import one_line_error

    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    err = one_line_error(capsys)
    assert "nope: no such directory" in err and "config.json" not in err
    run = tmp_path / "run"                                 # a training run and one of its checkpoints
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    for given in (run, run / "checkpoints" / "step_000002"):
        assert main(["convert", str(given), str(tmp_path / "x")]) == 2
        err = one_line_error(capsys)
        assert "is a training run" in err and f"egrpo export {given} --out" in err
    # a model directory (a run's hf/ export, a downloaded model) has nothing to export
    assert main(["export", str(model_dirs / "hf"), "--out", str(tmp_path / "y")]) == 2
    err = one_line_error(capsys)
    assert "already a model directory" in err and f"--model {model_dirs / 'hf'}" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_no_progress_silences_the_model_loading_bars_and_sets_them_back(model_dirs, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\n")
    common = ["generate", "--model", str(model_dirs / "hf"), "--dtype", "fp32", "--device", "cpu", "--prompts",
              str(prompts)]
    assert hf_logging.is_progress_bar_enabled()
    assert main([*common, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()                   # set back after the command
    assert main([*common, "--out", str(tmp_path / "shown")]) == 0
    assert "Loading weights" in capsys.readouterr().err
