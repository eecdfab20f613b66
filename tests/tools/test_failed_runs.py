"""A tool run that fails leaves nothing that blocks the next one: bad sampling flags are refused by name before
any output exists, and a run that dies before its first image leaves no generations file behind."""

import pytest

from egrpo.cli import main

from tests.tools._cli import TINY, one_line_error


@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--temperature", "0"), ("--cfg-scale", "-1"),
                                         ("--cot-temperature", "-0.5")])
def test_generate_bad_sampling_flag_is_named_and_writes_nothing(tmp_path, prompts, capsys, flag, value):
    out = tmp_path / "gen"
    assert main(["generate", "--prompts", prompts, "--out", str(out), flag, value, *TINY]) == 2
    err = one_line_error(capsys)
    assert err.startswith("egrpo generate: error: " + flag + " must be"), err
    assert not out.exists()
    assert main(["generate", "--prompts", prompts, "--out", str(out), *TINY]) == 0   # no --overwrite needed
    assert (out / "00000_00.png").exists()


def test_generate_images_per_cot_is_checked_with_cot(tmp_path, prompts, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--cot", "--images-per-cot", "0", *TINY]) == 2
    assert "--images-per-cot" in one_line_error(capsys) and not out.exists()


def test_analyze_bad_sampling_flag_is_named_and_writes_nothing(tmp_path, prompts, capsys):
    out = tmp_path / "analysis.jsonl"
    common = ["analyze", "--prompts", prompts, "--reward", "jpeg_compressibility", "--cots", "0", "--images", "1",
              "--out", str(out)]
    assert main([*common, "--top-k", "0", *TINY]) == 2
    assert one_line_error(capsys).startswith("egrpo analyze: error: --top-k must be")
    assert not out.exists()


def test_generate_that_fails_before_its_first_image_leaves_no_generations(tmp_path, prompts, capsys, monkeypatch):
    import egrpo.trainer.rollout as rollout_module

    def broken_rollout(*args, **kwargs):
        raise RuntimeError("simulated failure in the first rollout")

    out = tmp_path / "gen"
    monkeypatch.setattr(rollout_module, "rollout", broken_rollout)
    with pytest.raises(RuntimeError, match="simulated failure"):
        main(["generate", "--prompts", prompts, "--out", str(out), *TINY])
    assert not (out / "generations.jsonl").exists()
    monkeypatch.undo()
    assert main(["generate", "--prompts", prompts, "--out", str(out), *TINY]) == 0
    assert (out / "generations.jsonl").read_text().count("\n") == 1


def test_empty_outputs_of_a_failed_run_do_not_count_as_results(tmp_path):
    from egrpo.tools.validate import holds_generations, prepare_generation_dir, prepare_output_file

    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generations.jsonl").write_text("")
    assert not holds_generations(str(folder)) and prepare_generation_dir(str(folder), overwrite=False) is None
    (folder / "generations.jsonl").write_text('{"file": "00000_00.png"}\n')
    assert holds_generations(str(folder))
    empty = tmp_path / "analysis.jsonl"
    empty.write_text("")
    assert prepare_output_file(str(empty), overwrite=False) is None
    empty.write_text("{}\n")
    with pytest.raises(Exception, match="already exists"):
        prepare_output_file(str(empty), overwrite=False)


@pytest.mark.parametrize("argv, named", [
    (["score", "--images", "{tmp}/missing", "--reward", "colour"], "--images"),
    (["score", "--images", "{tmp}", "--reward", "colour", "--batch-size", "0"], "--batch-size"),
    (["plot-analysis", "{tmp}/missing.jsonl", "--out", "{tmp}/figs"], "missing.jsonl: no such file"),
])
def test_score_and_plot_mistakes_are_one_line_errors_naming_the_argument(tmp_path, capsys, argv, named):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = one_line_error(capsys)
    assert named in err and "Errno" not in err and "range()" not in err, err


def test_data_geneval_keeps_an_existing_prompt_file(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    out.write_text('{"prompt": "edited by hand", "tag": "counting"}\n')
    assert main(["data", "geneval", "--out", str(out), "--n", "4"]) == 2
    assert "already exists" in one_line_error(capsys) and "edited by hand" in out.read_text()
    assert main(["data", "geneval", "--out", str(out), "--n", "4", "--overwrite"]) == 0
    (kept,) = tmp_path.glob("train.previous-*.jsonl")
    assert "edited by hand" in kept.read_text() and out.read_text().count("\n") == 4
