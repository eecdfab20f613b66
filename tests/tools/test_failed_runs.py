"""A tool run that fails leaves nothing that blocks the next one: bad sampling flags are refused by name before
any output exists, and a run that dies before its first image leaves no generations file behind."""

import json
import os

import pytest

from egrpo.cli import main

from tests.tools._cli import TINY, one_line_error


@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--temperature", "0"), ("--cfg-scale", "-1"),
                                         ("--cot-temperature", "-0.5")])
def test_generate_bad_sampling_flag_is_named_and_writes_nothing(tmp_path, prompts, capsys, flag, value):
    out = tmp_path / "gen"
    cot = ["--cot"] if flag.startswith("--cot") else []
    assert main(["generate", "--prompts", prompts, "--out", str(out), *cot, flag, value, *TINY]) == 2
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


def _interrupting_rollout(monkeypatch, after):
    """The real rollout for the first ``after`` calls, then Ctrl-C."""
    import egrpo.trainer.rollout as rollout_module

    real, calls = rollout_module.rollout, []

    def rollout(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "rollout", rollout)


def test_an_interrupted_generate_resumes_with_the_images_of_one_uninterrupted_run(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na red car\na red rose\n")
    common = ["generate", "--prompts", str(prompts), "--images-per-prompt", "2", "--seed", "5", *TINY]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    out = tmp_path / "gen"
    with monkeypatch.context() as m:
        _interrupting_rollout(m, after=2)
        assert main([*common, "--out", str(out)]) == 130
    err = one_line_error(capsys)
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert sorted(p.name for p in out.glob("*.png")) == [f"0000{k}_0{j}.png" for k in (0, 1) for j in (0, 1)]
    # a torn last line (killed while writing) is ignored
    with open(out / "generations.jsonl", "a", encoding="utf-8") as f:
        f.write('{"file": "00002_00.png", "prom')
    with monkeypatch.context() as m:
        _interrupting_rollout(m, after=1)   # only the third prompt is left
        assert main([*common, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote 2 images" in said and "(resumed: 4 kept)" in said
    whole = (tmp_path / "whole" / "generations.jsonl").read_text()
    assert (out / "generations.jsonl").read_text() == whole
    for png in (tmp_path / "whole").glob("*.png"):
        assert (out / png.name).read_bytes() == png.read_bytes(), png.name


def test_generate_into_a_folder_of_other_settings_is_refused_by_name(tmp_path, prompts, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--seed", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--seed", "2", *TINY]) == 2
    err = one_line_error(capsys)
    assert "other settings: seed (1 -> 2)" in err and "--overwrite" in err
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--seed", "2", "--overwrite", *TINY]) == 0
    assert len(list(out.glob("previous-*/00000_00.png"))) == 1


@pytest.mark.parametrize("first, second, named", [
    (["--temperature", "1.0"], ["--temperature", "0.7"], "temperature (1.0 -> 0.7)"),
    (["--cfg-scale", "5"], ["--cfg-scale", "3"], "cfg_scale (5.0 -> 3.0)"),
    ([], ["--top-k", "50"], "top_k ((none) -> 50)"),
    (["--images-per-prompt", "1"], ["--images-per-prompt", "2"], "images_per_prompt (1 -> 2)"),
    ([], "edit", "prompts ("),
])
def test_each_generation_setting_decides_whether_a_folder_resumes(tmp_path, prompts, capsys, first, second, named):
    """A rerun into the same --out resumes only with the same settings: a changed sampling setting, image count or
    prompt file (text or metadata) is refused by name rather than mixed into the folder."""
    out = tmp_path / "gen"
    assert main(["generate", "--prompts", prompts, "--out", str(out), *first, *TINY]) == 0
    capsys.readouterr()
    if second == "edit":
        with open(prompts, "a", encoding="utf-8") as f:
            f.write("a red car\n")
        second = first
    assert main(["generate", "--prompts", prompts, "--out", str(out), *second, *TINY]) == 2
    err = one_line_error(capsys)
    assert f"other settings: {named}" in err and "--overwrite" in err, err


def test_generate_that_failed_before_its_first_image_takes_other_settings(tmp_path, prompts, capsys, monkeypatch):
    out = tmp_path / "gen"
    with monkeypatch.context() as m:
        _interrupting_rollout(m, after=0)
        assert main(["generate", "--prompts", prompts, "--out", str(out), "--seed", "1", *TINY]) == 130
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--seed", "2", *TINY]) == 0


def test_an_interrupted_generate_with_overwrite_says_how_to_resume(tmp_path, prompts, capsys, monkeypatch):
    out = tmp_path / "gen"
    assert main(["generate", "--prompts", prompts, "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        _interrupting_rollout(m, after=0)
        assert main(["generate", "--prompts", prompts, "--out", str(out), "--overwrite", *TINY]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("moved the earlier generations") and "Traceback" not in "".join(err)
    assert err[-1].startswith("egrpo generate: interrupted") and "rerun it without --overwrite to resume" in err[-1]


def test_a_prompt_stopped_between_its_images_is_generated_again_whole(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first of a prompt's two images: that prompt's image and record are not kept, and the
    resumed folder equals an uninterrupted run's byte for byte."""
    import egrpo.eval.generation as generation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na red car\n")
    common = ["generate", "--prompts", str(prompts), "--images-per-prompt", "2", "--seed", "3", *TINY]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "gen"
    real, saved = generation.save_png, []

    def save_png(*args, **kwargs):
        if len(saved) == 3:    # prompt 0's two images and prompt 1's first are on disk
            raise KeyboardInterrupt
        saved.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(generation, "save_png", save_png)
        assert main([*common, "--out", str(out)]) == 130
    assert (out / "00001_00.png").exists() and '"prompt_index": 1' in (out / "generations.jsonl").read_text()
    capsys.readouterr()
    assert main([*common, "--out", str(out)]) == 0
    assert "wrote 2 images" in capsys.readouterr().out    # prompt 1 again, both images
    assert (out / "generations.jsonl").read_text() == (tmp_path / "whole" / "generations.jsonl").read_text()
    for png in (tmp_path / "whole").glob("*.png"):
        assert (out / png.name).read_bytes() == png.read_bytes(), png.name


def _library_setup():
    import argparse

    from egrpo.tools.cli import rollout_config
    from egrpo.trainer.model import ModelConfig, build_model

    model, tokenizer = build_model(ModelConfig(tiny={"image_size": 32, "num_layers": 1}, dtype="fp32"), "cpu")
    cfg = rollout_config(argparse.Namespace(cfg_scale=5.0, temperature=1.0, top_k=None, cot_max_tokens=8,
                                            cot_temperature=1.0, cot_template=None), 16)
    return model, tokenizer, cfg


def _counting_rollout(monkeypatch):
    import egrpo.trainer.rollout as rollout_module

    calls, real = [], rollout_module.rollout
    monkeypatch.setattr(rollout_module, "rollout", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    return calls


def test_a_library_resume_keeps_only_what_is_still_true(tmp_path, monkeypatch):
    """resume=True keeps a prompt only if its images are on disk and its records name the same prompt text: a
    deleted PNG is drawn again (the same bytes: prompt k's seed is seed + k), a changed prompt is generated anew,
    foreign jsonl lines are ignored, and the records come back in prompt order."""
    import json

    from egrpo.tools.generate import generate

    model, tokenizer, cfg = _library_setup()
    out = tmp_path / "gen"
    first = generate(model, tokenizer, ["a", "b", "c"], str(out), cfg, seed=1, progress=False)
    kept_png = (out / "00001_00.png").read_bytes()
    calls = _counting_rollout(monkeypatch)
    (out / "00001_00.png").unlink()
    assert generate(model, tokenizer, ["a", "b", "c"], str(out), cfg, seed=1, progress=False, resume=True) == first
    assert calls == [["b"]] and (out / "00001_00.png").read_bytes() == kept_png
    calls.clear()
    again = generate(model, tokenizer, ["a", "x", "c"], str(out), cfg, seed=1, progress=False, resume=True)
    assert calls == [["x"]] and [r["prompt"] for r in again] == ["a", "x", "c"]
    assert [r["prompt_index"] for r in again] == [0, 1, 2]
    calls.clear()
    lines = (out / "generations.jsonl").read_text()
    (out / "generations.jsonl").write_text(json.dumps({"prompt_index": 0}) + "\n" + lines)   # not one of ours
    assert generate(model, tokenizer, ["a", "x", "c"], str(out), cfg, seed=1, progress=False, resume=True) == again
    assert calls == [["a"], ["x"], ["c"]]   # nothing after a foreign line is trusted


def test_the_library_generate_resumes_only_when_asked(tmp_path, monkeypatch):
    """egrpo.tools.generate.generate() keeps an earlier run's prompts only with resume=True (the CLI checks the
    settings first); a second call into the same folder otherwise generates everything again."""
    import json

    import egrpo.trainer.rollout as rollout_module
    from egrpo.tools.cli import rollout_config
    from egrpo.tools.generate import generate
    from egrpo.trainer.model import ModelConfig, build_model

    model, tokenizer = build_model(ModelConfig(tiny={"image_size": 32, "num_layers": 1}, dtype="fp32"), "cpu")
    import argparse
    cfg = rollout_config(argparse.Namespace(cfg_scale=5.0, temperature=1.0, top_k=None, cot_max_tokens=8,
                                            cot_temperature=1.0, cot_template=None), 16)
    out = str(tmp_path / "gen")
    first = generate(model, tokenizer, ["a", "b"], out, cfg, seed=1, progress=False)
    calls = []
    real = rollout_module.rollout
    monkeypatch.setattr(rollout_module, "rollout", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert generate(model, tokenizer, ["a", "b"], out, cfg, seed=1, progress=False, resume=True) == first
    assert not calls
    again = generate(model, tokenizer, ["a", "b"], out, cfg, seed=2, progress=False)
    assert len(calls) == 2 and [r["seed"] for r in again] == [2, 3]
    with open(f"{out}/generations.jsonl", encoding="utf-8") as f:
        assert [json.loads(line)["seed"] for line in f] == [2, 3]


def test_ctrl_c_in_any_other_command_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """Scripts see an interrupted command as failed (130, the shell's code for SIGINT), whatever the command."""
    import egrpo.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(egrpo.data, "load_prompt_file", interrupted)
    (tmp_path / "p.txt").write_text("a red apple\n")
    assert main(["data", "check", str(tmp_path / "p.txt")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "egrpo data check: interrupted"


@pytest.mark.parametrize("command, flags, named, switch", [
    ("generate", ["--cot-max-tokens", "5"], "--cot-max-tokens only applies", "--cot"),
    ("generate", ["--cot-temperature", "0.5", "--cot-template", "t.txt"], "--cot-template, --cot-temperature", "--cot"),
    ("analyze", ["--cots", "0", "--cot-max-tokens", "5", "--reward", "colour"], "--cot-max-tokens", "--cots >= 1"),
])
def test_cot_flags_without_a_cot_phase_are_refused(tmp_path, prompts, capsys, command, flags, named, switch):
    out = str(tmp_path / ("gen" if command == "generate" else "a.jsonl"))
    assert main([command, "--prompts", prompts, "--out", out, *flags, *TINY]) == 2
    err = one_line_error(capsys)
    assert "CoT phase, which is off" in err and f"give {switch} or" in err and named in err, err
    assert not (tmp_path / "gen").exists() and not (tmp_path / "a.jsonl").exists()


def test_the_cot_flags_default_to_the_rollout_settings():
    """Every command's CoT flags default to the rollout's own settings (what training samples with): a flag counts
    as given when it differs from its default, so another default would change the CoT of a plain `--cot` and
    refuse the training value typed without --cot."""
    import argparse

    from egrpo.cli import build_parser
    from egrpo.tools.validate import COT_FLAG_DEFAULTS
    from egrpo.trainer.rollout import RolloutConfig

    def commands(parser, name=""):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    yield from commands(child, f"{name} {sub}".strip())

    defaults = {name: {a.dest: a.default for a in parser._actions if a.dest in COT_FLAG_DEFAULTS}
                for name, parser in commands(build_parser())}
    defaults = {name: d for name, d in defaults.items() if d}
    assert {"generate", "analyze", "eval geneval", "eval compbench", "eval prefs", "eval ocr", "eval wise"} <= set(defaults)
    rollout = {name: getattr(RolloutConfig(), name) for name in COT_FLAG_DEFAULTS}
    assert COT_FLAG_DEFAULTS == rollout == {"cot_max_tokens": 1024, "cot_template": None, "cot_temperature": 1.0}
    assert all(d == rollout for d in defaults.values()), defaults


def test_tiny_settings_compare_as_json_not_as_text(tmp_path, prompts, capsys):
    out = tmp_path / "gen"
    tiny = ["--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--tiny",
                 '{"image_size": 32, "num_layers": 1}', *tiny]) == 0
    capsys.readouterr()
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--tiny",
                 '{ "num_layers": 1,  "image_size": 32 }', *tiny]) == 0   # the same model: resumes, nothing to do
    assert "wrote 0 images" in capsys.readouterr().out
    # a folder whose settings recorded --tiny as typed (before it was compared as JSON) resumes too
    import json

    settings = json.loads((out / "generation_settings.json").read_text())
    settings["tiny"] = '{"num_layers":1,"image_size":32}'
    (out / "generation_settings.json").write_text(json.dumps(settings))
    assert main(["generate", "--prompts", prompts, "--out", str(out), "--tiny",
                 '{"image_size": 32, "num_layers": 1}', *tiny]) == 0
    assert "wrote 0 images" in capsys.readouterr().out


def test_analyze_makes_its_folder_and_an_interrupted_run_keeps_its_records_aside(tmp_path, prompts, capsys,
                                                                                  monkeypatch):
    import egrpo.tools.analyze as analyze_module

    out = tmp_path / "new" / "a.jsonl"
    common = ["analyze", "--prompts", prompts, "--reward", "colour", "--cots", "0", "--images", "2", *TINY]
    real = analyze_module.analyze

    def interrupted(*args, out=None, **kwargs):
        out.write('{"record": 1}\n')
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(analyze_module, "analyze", interrupted)
        assert main([*common, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"egrpo analyze: interrupted; the 1 records written so far are in {out}.partial (a rerun starts afresh)"
    assert not out.exists()
    assert real is analyze_module.analyze
    assert main([*common, "--out", str(out)]) == 0            # not blocked; the interrupted records moved aside
    assert len(out.read_text().splitlines()) == 2 and not (tmp_path / "new" / "a.jsonl.partial").exists()
    (aside,) = (tmp_path / "new").glob("a.jsonl.previous-*")
    assert aside.read_text() == '{"record": 1}\n'


def test_analyze_writes_to_a_stream_in_place(tmp_path, prompts, capsys):
    """--out /dev/stdout or a named pipe: written directly (no <out>.partial beside it, nothing moved aside), the
    summary line on stderr so the stream holds only records."""
    import threading

    fifo = tmp_path / "records.pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main(["analyze", "--prompts", prompts, "--reward", "colour", "--cots", "0", "--images", "2", *TINY,
                 "--out", str(fifo)]) == 0
    reader.join(timeout=60)
    records = [json.loads(line) for line in received[0].splitlines()]
    assert len(records) == 2 and all("reward" in r or "rewards" in r for r in records), records[0].keys()
    captured = capsys.readouterr()
    assert f"wrote 2 records to {fifo}" in captured.err and "wrote" not in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "records.pipe"]


def test_a_resumed_generate_counts_only_the_prompts_it_generates(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na red car\na red rose\n")
    common = ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "gen"), *TINY]
    with monkeypatch.context() as m:
        _interrupting_rollout(m, after=2)
        assert main(common) == 130
    capsys.readouterr()
    assert main([c for c in common if c != "--no-progress"]) == 0    # the bar shown: 1 prompt left of 3
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "1/1" in bar and "2 prompts done before" in bar and "3/3" not in bar, bar


def test_only_the_standard_streams_and_special_files_are_streams(tmp_path):
    """A regular file under /dev (tmpfs /dev/shm) keeps the existing-file refusal; /dev/stdout and pipes do not."""
    from egrpo.tools.validate import is_stream, prepare_output_file

    assert is_stream("/dev/stdout") and is_stream("/dev/stderr") and is_stream("/dev/fd/1")
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    assert is_stream(str(fifo)) and not is_stream(str(tmp_path / "a.jsonl"))
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        import tempfile

        with tempfile.NamedTemporaryFile("w", dir="/dev/shm", suffix=".jsonl") as f:
            f.write("old\n")
            f.flush()
            assert not is_stream(f.name)
            with pytest.raises(Exception, match="already exists"):
                prepare_output_file(f.name, overwrite=False)
