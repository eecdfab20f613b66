"""User mistakes in ``egrpo generate / analyze / plot-analysis``: one-line errors (exit code 2) before any
model loads, and outputs that are never overwritten silently."""

import json

import pytest

from egrpo.cli import main

from tests.tools._cli import TINY, one_line_error


def test_generate_refuses_an_out_with_generations_and_overwrite_moves_them_aside(tmp_path, prompts, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "generations.jsonl").write_text('{"file": "00000_00.png"}\n')
    (out / "00000_00.png").write_bytes(b"old")
    (out / "00007_00.png").write_bytes(b"stale")
    assert main(["generate", "--prompts", prompts, "--out", str(out), *TINY]) == 2
    err = one_line_error(capsys)
    assert "--out" in err and "already holds generations" in err and "--overwrite" in err
    assert (out / "00000_00.png").read_bytes() == b"old"
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--overwrite", *TINY]) == 0
    (previous,) = out.glob("previous-*")
    assert (previous / "00000_00.png").read_bytes() == b"old" and (previous / "00007_00.png").exists()
    assert (previous / "generations.jsonl").exists()
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_00.png"]     # no stale image left next to new ones
    assert (out / "00000_00.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind, files", [
    ("a training run directory", {"config.yaml": "x: 1\n", "metrics.jsonl": "{}\n", "curves.png": "png"}),
    ("a model directory", {"config.json": "{}", "model.safetensors": "weights"}),
])
def test_generate_refuses_a_run_or_model_directory_as_out_even_with_overwrite(tmp_path, prompts, capsys, kind,
                                                                                files):
    """--overwrite moves an --out's content aside: a training run (its checkpoints, metrics) or a model's weights
    must not be, and --out is not called a folder of generations."""
    out = tmp_path / "target"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    for extra in ([], ["--overwrite"]):
        assert main(["generate", "--prompts", prompts, "--out", str(out), *extra, *TINY]) == 2
        err = one_line_error(capsys)
        assert f"--out {out} is {kind}, not a folder of generations" in err and str(out / "generations") in err
        assert sorted(p.name for p in out.iterdir()) == sorted(files)


def test_analyze_refuses_an_existing_out_unless_overwrite(tmp_path, prompts, capsys):
    out = tmp_path / "analysis.jsonl"
    out.write_text('{"old": 1}\n')
    common = ["analyze", "--prompts", prompts, "--reward", "jpeg_compressibility", "--cots", "0", "--images", "1",
              "--out", str(out)]
    assert main([*common, *TINY]) == 2
    assert "already exists" in one_line_error(capsys) and out.read_text() == '{"old": 1}\n'
    assert main([*common, "--overwrite", *TINY]) == 0
    (kept,) = tmp_path.glob("analysis.previous-*.jsonl")
    assert kept.read_text() == '{"old": 1}\n' and "reward" in json.loads(out.read_text().splitlines()[0])


def test_score_refuses_an_existing_out_unless_overwrite(tmp_path, capsys):
    from egrpo.eval.generation import save_png

    import torch

    images = tmp_path / "imgs"
    images.mkdir()
    save_png(torch.rand(3, 8, 8), str(images / "a.png"))
    out = tmp_path / "scores.jsonl"
    out.write_text('{"old": 1}\n')
    common = ["score", "--images", str(images), "--prompt", "a red apple", "--reward", "colour", "--out", str(out)]
    assert main(common) == 2
    assert "already exists" in one_line_error(capsys) and out.read_text() == '{"old": 1}\n'
    assert main([*common, "--overwrite"]) == 0
    (kept,) = tmp_path.glob("scores.previous-*.jsonl")
    assert kept.read_text() == '{"old": 1}\n' and "total" in json.loads(out.read_text().splitlines()[0])


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--images-per-cot", "2"], "--images-per-cot 2 needs --cot"),
    (["generate", "--images-per-prompt", "0"], "--images-per-prompt must be >= 1"),
    (["generate", "--cot", "--images-per-cot", "0"], "--images-per-cot must be >= 1"),
    (["analyze", "--cots", "-1", "--reward", "colour"], "--cots must be >= 0"),
    (["analyze", "--cots", "0", "--text-entropy", "released", "--reward", "colour"], "--text-entropy released needs"),
    (["generate", "--device", "gpu"], "--device 'gpu': not a device"),
])
def test_option_errors_come_before_the_model_loads(tmp_path, prompts, capsys, argv, expected):
    out = str(tmp_path / ("gen" if argv[0] == "generate" else "a.jsonl"))
    assert main([*argv, "--prompts", prompts, "--out", out, "--model", str(tmp_path / "no-model")]) == 2
    err = one_line_error(capsys)
    assert expected in err and "no-model" not in err


def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path, prompts, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--prompts", prompts, "--out", str(tmp_path / "g"), "--device", "cuda",
                 "--tiny", "{}"]) == 2
    err = one_line_error(capsys)
    assert "--device cuda: no CUDA device" in err and "--device cpu" in err


def test_plot_analysis_names_the_file_and_what_it_expects(tmp_path, capsys):
    scores = tmp_path / "score.jsonl"        # `egrpo score --out` rows, not analysis records
    scores.write_text(json.dumps({"file": "00000_00.png", "prompt": "a", "total": 0.5}) + "\n")
    assert main(["plot-analysis", str(scores), "--out", str(tmp_path / "plots")]) == 2
    err = one_line_error(capsys)
    assert str(scores) in err and "line 1" in err and "'reward'" in err and "egrpo analyze" in err
    text = tmp_path / "p.txt"
    text.write_text("a red apple\n")
    assert main(["plot-analysis", str(text), "--out", str(tmp_path / "plots")]) == 2
    err = one_line_error(capsys)
    assert str(text) in err and "line 1 is not JSON" in err


def test_generate_errors_speak_in_the_commands_flags(tmp_path, prompts, capsys):
    out = str(tmp_path / "gen")
    model_free = ["--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main(["generate", "--prompts", prompts, "--out", out, "--top-k", "0", *TINY]) == 2
    assert "--top-k must be an integer >= 1 (or leave the flag out: no top-k), got 0" in one_line_error(capsys)
    assert main(["generate", "--prompts", prompts, "--out", out, "--cot", "--cot-template", str(tmp_path / "no.txt"),
                 *TINY]) == 2
    assert "--cot-template: cannot read" in one_line_error(capsys)
    assert main(["generate", "--prompts", prompts, "--out", out, "--model", str(tmp_path / "nomodel"), *model_free]) == 2
    err = one_line_error(capsys)
    assert "--model" in err and "no such directory" in err and "FileNotFoundError" not in err
    # a training run (or one of its checkpoints) instead of its exported model
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}\n")
    for given, hint in ((run, f"--model {run / 'hf'}"), (run / "checkpoints", f"--model {run / 'hf'}"),
                        # one checkpoint (best, an older step): hf/ holds other weights; export that one
                        (run / "checkpoints" / "step_000002", f"egrpo export {run / 'checkpoints' / 'step_000002'}")):
        assert main(["generate", "--prompts", prompts, "--out", out, "--model", str(given), *model_free]) == 2
        err = one_line_error(capsys)
        assert "is a training run" in err and hint in err, err


def test_score_makes_the_folder_of_its_out_before_scoring(tmp_path, capsys):
    from egrpo.eval.generation import save_png

    import torch

    images = tmp_path / "imgs"
    save_png(torch.rand(3, 8, 8), str(images / "a.png"))
    common = ["score", "--images", str(images), "--prompt", "a red apple", "--reward", "colour"]
    out = tmp_path / "sc" / "s1.jsonl"                          # its folder does not exist yet
    assert main([*common, "--out", str(out)]) == 0
    assert "total" in json.loads(out.read_text().splitlines()[0])
    capsys.readouterr()
    # a file where the folder should be: refused before anything is scored (no table printed)
    assert main([*common, "--out", str(images / "a.png" / "s.jsonl")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--out" in captured.err and "is a file, not a folder" in captured.err
    # a directory: the example file name fits the command
    assert main([*common, "--out", str(tmp_path / "sc")]) == 2
    err = one_line_error(capsys)
    assert f"such as {tmp_path / 'sc' / 'scores.jsonl'}" in err and "analysis" not in err


def test_a_file_or_folder_flag_given_the_wrong_kind_names_the_flag(tmp_path, capsys):
    analysis = tmp_path / "a.jsonl"
    analysis.write_text(json.dumps({"prompt": "a", "reward": 0.5, "image_entropy_mean": 0.1}) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("mine\n")
    assert main(["plot-analysis", str(analysis), "--out", str(readme)]) == 2
    assert f"--out {readme} is a file; give a folder" in one_line_error(capsys)
    assert readme.read_text() == "mine\n"
    images = tmp_path / "imgs"
    images.mkdir()
    for config in (tmp_path / "nope.yaml", images):
        assert main(["score", "--images", str(images), "--rewards-config", str(config)]) == 2
        err = one_line_error(capsys)
        assert f"--rewards-config {config}:" in err and "FileNotFoundError" not in err and "Errno" not in err


def test_export_of_a_run_without_a_checkpoint_says_so(tmp_path, capsys):
    run = tmp_path / "run"                 # a run stopped before its first save: config.yaml, no checkpoint
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for given in (run, run / "checkpoints"):
        if given.name == "checkpoints":
            given.mkdir()
        assert main(["export", str(given), "--out", str(tmp_path / "m")]) == 2
        err = one_line_error(capsys)
        assert "the run has no checkpoint yet" in err and "train.save_every" in err and "expected a run" not in err
    assert not (tmp_path / "m").exists()
    # one checkpoint whose save was cut short (config.yaml, no manifest) is named as such by the checkpoint search
    cut = run / "checkpoints" / "step_000005"
    cut.mkdir()
    (cut / "config.yaml").write_text("{}\n")
    (cut / "trainer_state.pt").write_bytes(b"")
    assert main(["export", str(cut), "--out", str(tmp_path / "m")]) == 2
    err = one_line_error(capsys)
    assert "manifest.json is missing" in err and "no checkpoint yet" not in err


def test_export_refuses_a_training_run_as_out_also_with_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(tmp_path / "nothing"), "--out", str(run), *extra]) == 2
        err = one_line_error(capsys)
        assert f"--out {run} is a training run directory" in err and str(run / "hf") in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]
