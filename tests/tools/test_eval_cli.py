"""Smoke runs of ``egrpo eval compbench / prefs / ocr / wise`` end to end through the command line: generate with a
tiny random Janus (``--tiny``), then score with tiny scorers (CLIP), RapidOCR and a fake judge on 127.0.0.1.
The scorers have their own tests (tests/eval); these check the CLI glue that joins generation, the benchmark's
folder layout, scoring and the summary (GenEval's: tests/eval/test_training_cli.py)."""

import json
import threading
from http.server import HTTPServer

import pytest

from egrpo.cli import main

GEN = ["--tiny", "{}", "--dtype", "fp32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tests.eval._tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("eval_cli") / "clip")


def summary_of(images, benchmark):
    return json.loads((images / "scores" / benchmark / "summary.json").read_text())


def test_compbench_generates_in_its_layout_then_scores(tmp_path, clip_dir, capsys):
    prompts = tmp_path / "non_spatial_val.txt"
    prompts.write_text("a red apple and a blue car\na green bench\n")
    images = tmp_path / "cb"
    assert main(["eval", "compbench", "--category", "non_spatial", "--images", str(images), "--prompts", str(prompts),
                 "--images-per-prompt", "2", "--clip", clip_dir, *GEN]) == 0
    assert len(list((images / "samples").glob("a green bench_*.png"))) == 2
    summary = summary_of(images, "compbench")
    assert summary["category"] == "non_spatial" and summary["scored"] == 4 and summary["failed"] == 0
    assert summary["settings"]["clip"] == clip_dir and summary["settings"]["images_per_prompt"] == 2
    assert "| non_spatial | clip | 4 |" in capsys.readouterr().out


def test_prefs_generates_then_scores(tmp_path, clip_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\na cat\n")
    images = tmp_path / "prefs"
    assert main(["eval", "prefs", "--metrics", "clipscore,pickscore", "--images", str(images), "--prompts",
                 str(prompts), "--clip", clip_dir, "--pickscore", clip_dir, *GEN]) == 0
    rows = [json.loads(line) for line in (images / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red apple", "a cat"]
    assert sorted(p.name for p in images.glob("*.png")) == ["00000_00.png", "00001_00.png"]
    summary = summary_of(images, "prefs")
    assert summary["scored"] == {"clipscore": 2, "pickscore": 2} and summary["failed"] == {"clipscore": 0, "pickscore": 0}
    assert (images / "scores" / "prefs" / "results.pickscore.jsonl").exists()


def test_ocr_generates_then_reads(tmp_path):
    prompts = tmp_path / "ocr.txt"
    prompts.write_text('a sign that says "hello"\n')
    images = tmp_path / "ocr"
    assert main(["eval", "ocr", "--images", str(images), "--prompts", str(prompts), *GEN]) == 0
    summary = summary_of(images, "ocr")
    assert summary["scored"] == 1 and 0.0 <= summary["accuracy"] <= 1.0
    (record,) = [json.loads(line) for line in (images / "scores" / "ocr" / "results.jsonl").read_text().splitlines()]
    assert record["target"] == "hello"


def test_wise_generates_then_asks_the_judge(tmp_path, monkeypatch):
    from egrpo.eval.wise import wiscore
    from tests.eval.test_wise import FakeJudge

    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeJudge.replies = {"a temple": "Consistency: 2\nRealism: 1\nAesthetic Quality: 2"}
    FakeJudge.requests = []
    monkeypatch.setenv("EGRPO_TEST_JUDGE_KEY", "secret")
    try:
        prompts = tmp_path / "wise.json"
        prompts.write_text(json.dumps([{"prompt_id": 1, "Prompt": "a temple", "Explanation": "a Chinese temple",
                                        "Category": "Cultural"}]))
        images = tmp_path / "wise"
        assert main(["eval", "wise", "--images", str(images), "--prompts", str(prompts), "--judge-url",
                     f"http://127.0.0.1:{server.server_address[1]}/v1", "--judge-key-env", "EGRPO_TEST_JUDGE_KEY",
                     *GEN]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert (images / "1.png").exists() and len(FakeJudge.requests) == 1
    assert FakeJudge.requests[0][1]["Authorization"] == "Bearer secret"
    summary = summary_of(images, "wise")
    assert summary["scored"] == 1 and summary["categories"]["Cultural"] == pytest.approx(wiscore(2, 1, 2))
    assert "secret" not in (images / "scores" / "wise" / "summary.json").read_text()


def test_generation_settings_are_checked_and_each_benchmark_keeps_its_summary(tmp_path, clip_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a sign that says "hi"\n')
    images = tmp_path / "shared"
    prefs = ["eval", "prefs", "--metrics", "clipscore", "--images", str(images), "--prompts", str(prompts),
             "--clip", clip_dir, *GEN]
    assert main(prefs) == 0
    image = images / "00000_00.png"
    stamp = image.stat().st_mtime_ns
    capsys.readouterr()
    # the same folder with another seed: refused before anything is generated or scored (images kept)
    assert main([*prefs, "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--images" in err and "seed (0 -> 7)" in err and "new --images folder" in err
    assert image.stat().st_mtime_ns == stamp and summary_of(images, "prefs")["settings"]["seed"] == 0
    assert main([*prefs[:-len(GEN)], "--tiny", '{"num_layers": 1}', *GEN[2:]]) == 2
    assert "tiny (" in capsys.readouterr().err
    assert main(prefs) == 0                       # same settings: resumes (nothing regenerated)
    assert image.stat().st_mtime_ns == stamp
    # another benchmark on the same folder writes its own summary next to the first one's
    assert main(["eval", "ocr", "--images", str(images), "--no-progress"]) == 0
    assert summary_of(images, "prefs")["scored"] == {"clipscore": 1}
    assert summary_of(images, "ocr")["scored"] == 1


def test_eval_refuses_generating_over_images_without_a_record(tmp_path, capsys):
    from tests.eval.conftest import write_png

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    images = tmp_path / "mine"
    write_png(images / "00000_00.png")
    assert main(["eval", "ocr", "--images", str(images), "--prompts", str(prompts), *GEN]) == 2
    assert "already holds images but no generation_settings.json" in capsys.readouterr().err
    assert not (images / "generations.jsonl").exists()


def test_eval_option_errors_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import torch

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    geneval = ["eval", "geneval", "--images", str(tmp_path / "g"), "--detector", "d", "--clip", "c",
               "--model", str(tmp_path / "no-model"), "--no-progress"]
    assert main([*geneval, "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--prompts" in err and "line 1" in err and "no-model" not in err
    assert main([*geneval, "--prompts", str(bad), "--device", "gpu"]) == 2
    assert "--device 'gpu'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*geneval, "--prompts", str(bad), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["eval", "ocr", "--images", str(tmp_path / "o"), "--prompts", str(prompts), "--images-per-prompt",
                 "0", "--model", str(tmp_path / "no-model")]) == 2
    assert "--images-per-prompt must be >= 1" in capsys.readouterr().err


def test_wise_needs_the_api_key_for_openai_and_warns_elsewhere(tmp_path, capsys, monkeypatch):
    import argparse

    from egrpo.tools.eval_cli import _judge_key

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = tmp_path / "wise.json"
    prompts.write_text(json.dumps([{"prompt_id": 1, "Prompt": "a temple", "Explanation": "x", "Category": "Cultural"}]))
    images = tmp_path / "wise"
    assert main(["eval", "wise", "--images", str(images), "--prompts", str(prompts), "--judge-url",
                 "https://api.openai.com/v1", *GEN]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "OPENAI_API_KEY is not set" in err
    assert not images.exists()                    # refused before generating
    args = argparse.Namespace(judge_key_env="OPENAI_API_KEY", judge_url="http://127.0.0.1:8000/v1")
    assert _judge_key(args) is None and "warning: OPENAI_API_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert _judge_key(args) == "k"


def test_wise_refuses_more_than_one_image_per_prompt(tmp_path, capsys):
    """WISE scores one image per prompt id: another --images-per-prompt is refused, not silently ignored."""
    prompts = tmp_path / "wise.json"
    prompts.write_text(json.dumps([{"prompt_id": 1, "Prompt": "a temple", "Explanation": "", "Category": "Cultural"}]))
    rc = main(["eval", "wise", "--images", str(tmp_path / "wise"), "--prompts", str(prompts), "--judge-url",
               "http://127.0.0.1:9/v1", "--images-per-prompt", "2", *GEN])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--images-per-prompt 2" in err and "\n" not in err, err
    assert not (tmp_path / "wise").exists()


def test_eval_refuses_a_file_for_its_folders_naming_the_flag(tmp_path, capsys):
    from tests.eval.conftest import write_png

    from tests.tools._cli import one_line_error

    images = tmp_path / "imgs"
    write_png(images / "a.png")
    readme = tmp_path / "README.md"
    readme.write_text("mine\n")
    assert main(["eval", "ocr", "--images", str(images), "--out", str(readme), "--prompt", '"hi"',
                 "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("egrpo eval ocr: error: --out") and "is a file; give a folder" in err
    assert main(["eval", "ocr", "--images", str(images), "--out", str(readme / "scores"), "--no-progress"]) == 2
    assert "is a file, not a folder; give another --out" in one_line_error(capsys)
    assert main(["eval", "ocr", "--images", str(readme), "--no-progress"]) == 2
    assert "--images" in one_line_error(capsys) and readme.read_text() == "mine\n"


@pytest.mark.parametrize("argv", [["eval", "ocr", "--images"], ["eval", "prefs", "--images"], ["generate", "--out"]])
def test_a_missing_prompt_file_names_the_command_and_the_flag(tmp_path, capsys, argv):
    from tests.tools._cli import one_line_error

    nope = tmp_path / "nope.txt"
    assert main([*argv, str(tmp_path / "imgs"), "--prompts", str(nope), *GEN]) == 2
    err = one_line_error(capsys)
    command = " ".join(argv[:-1])
    assert err.startswith(f"egrpo {command}: error: --prompts {nope}: no such prompt file"), err
    assert not (tmp_path / "imgs").exists()


def test_eval_where_every_image_failed_exits_2_with_the_reason_and_keeps_the_files(tmp_path, capsys):
    from tests.eval.conftest import write_png

    from tests.tools._cli import one_line_error

    images = tmp_path / "imgs"
    for name in ("a.png", "b.png"):
        write_png(images / name)
    # no prompt quotes any text: nothing to read
    assert main(["eval", "ocr", "--images", str(images), "--prompt", "a red apple", "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "no image was scored: all 2 failed" in err and "a.png" in err and "no text in double quotes" in err
    summary = summary_of(images, "ocr")
    assert summary["scored"] == 0 and summary["failed"] == 2
    assert len((images / "scores" / "ocr" / "results.jsonl").read_text().splitlines()) == 2


def test_eval_refuses_scoring_another_image_folder_into_a_scores_folder(tmp_path, capsys):
    from tests.eval.conftest import write_png

    from tests.tools._cli import one_line_error

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "scores"
    write_png(a / "1.png")
    write_png(b / "2.png", rgb=(0, 0, 255))
    common = ["eval", "ocr", "--out", str(out), "--prompt", 'a sign that says "hi"', "--no-progress"]
    assert main([*common, "--images", str(a)]) == 0
    assert json.loads((out / "image_folder.json").read_text()) == {"images": str(a.resolve())}
    results = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert main([*common, "--images", str(b)]) == 2
    err = one_line_error(capsys)
    assert f"--out {out} holds the scores of another image folder ({a.resolve()})" in err and "--overwrite" in err
    assert (out / "results.jsonl").read_text() == results                  # not appended to
    assert main([*common, "--images", str(a)]) == 0                         # the same folder: resumes
    assert main([*common, "--images", str(b), "--overwrite"]) == 0          # the earlier scores are moved aside
    (previous,) = out.glob("previous-*")
    assert (previous / "results.jsonl").read_text() == results
    assert [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()] == ["2.png"]
    # a folder moved with its own scores (the default --out inside it) still resumes there
    assert main(["eval", "ocr", "--images", str(b), "--prompt", 'a sign that says "hi"', "--no-progress"]) == 0
    b.rename(tmp_path / "b2")
    assert main(["eval", "ocr", "--images", str(tmp_path / "b2"), "--prompt", 'a sign that says "hi"',
                 "--no-progress"]) == 0


def test_ctrl_c_before_any_score_does_not_claim_scores_were_kept(tmp_path, capsys, monkeypatch):
    import egrpo.eval.ocr
    from tests.eval.conftest import write_png

    images = tmp_path / "imgs"
    write_png(images / "a.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(egrpo.eval.ocr, "evaluate_ocr", interrupted)     # e.g. while the OCR engine loads
    assert main(["eval", "ocr", "--images", str(images), "--prompt", '"hi"', "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; nothing was scored or written yet" in err and "kept" not in err
    monkeypatch.undo()
    assert main(["eval", "ocr", "--images", str(images), "--prompt", '"hi"', "--no-progress"]) == 0
    monkeypatch.setattr(egrpo.eval.ocr, "evaluate_ocr", interrupted)
    assert main(["eval", "ocr", "--images", str(images), "--prompt", '"hi"', "--no-progress"]) == 130
    assert f"finished scores are kept in {images / 'scores' / 'ocr'}" in capsys.readouterr().err


def test_eval_refuses_generating_into_a_non_empty_folder_without_a_record(tmp_path, capsys):
    from tests.eval.conftest import write_png

    prompts = tmp_path / "p.txt"
    prompts.write_text('a sign that says "hi"\n')
    samples = tmp_path / "run" / "samples"              # a training run's sample grids: not the eval's file names
    write_png(samples / "step_000002.png")
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "a.jsonl").write_text("{}\n")
    for folder in (samples, tmp_path / "analysis"):
        before = sorted(p.name for p in folder.iterdir())
        assert main(["eval", "ocr", "--images", str(folder), "--prompts", str(prompts), *GEN]) == 2
        err = capsys.readouterr().err
        assert "is not empty" in err and "generation_settings.json" in err and "leave out --model/--tiny" in err
        assert sorted(p.name for p in folder.iterdir()) == before                    # nothing written there
    # scoring the folder as it is stays allowed
    assert main(["eval", "ocr", "--images", str(samples), "--prompt", 'a sign that says "hi"', "--no-progress"]) == 0


def test_a_score_only_rerun_records_how_the_images_were_made_not_the_flag_defaults(tmp_path):
    prompts = tmp_path / "ocr.txt"
    prompts.write_text('a sign that says "hello"\n')
    images = tmp_path / "ocr"
    assert main(["eval", "ocr", "--images", str(images), "--prompts", str(prompts), "--seed", "3", "--cfg-scale", "2",
                 *GEN]) == 0
    settings = summary_of(images, "ocr")["settings"]
    assert settings["seed"] == 3 and settings["cfg_scale"] == 2.0 and settings["tiny"] == "{}"
    assert main(["eval", "ocr", "--images", str(images), "--no-progress"]) == 0        # scores again, no --model
    settings = summary_of(images, "ocr")["settings"]
    assert not set(settings) & {"model", "tiny", "seed", "cfg_scale", "dtype", "temperature"}, settings
    assert settings["generation"]["seed"] == 3 and settings["generation"]["cfg_scale"] == 2.0
    assert settings["generation"]["tiny"] == "{}"
    assert settings["generation_read_from"] == str(images / "generation_settings.json")


def test_eval_refuses_cot_flags_without_a_cot_phase(tmp_path, capsys):
    """As in generate / analyze: a CoT flag without --cot is refused before anything is generated, not ignored."""
    prompts = tmp_path / "p.txt"
    prompts.write_text('a sign that says "hi"\n')
    images = tmp_path / "ocr"
    assert main(["eval", "ocr", "--images", str(images), "--prompts", str(prompts), "--cot-max-tokens", "5",
                 *GEN]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cot-max-tokens only applies to the CoT phase, which is off; give --cot or" in err and "\n" not in err
    assert not images.exists()


def test_eval_compares_tiny_settings_as_json(tmp_path, capsys):
    """--tiny with its keys in another order (or other spacing) is the same model: the folder resumes, nothing is
    regenerated."""
    prompts = tmp_path / "p.txt"
    prompts.write_text('a sign that says "hi"\n')
    images = tmp_path / "ocr"
    ocr = ["eval", "ocr", "--images", str(images), "--prompts", str(prompts), *GEN[2:]]
    assert main([*ocr, "--tiny", '{"image_size": 32, "num_layers": 1}']) == 0
    stamp = (images / "00000_00.png").stat().st_mtime_ns
    assert main([*ocr, "--tiny", '{ "num_layers": 1,  "image_size": 32 }']) == 0
    assert (images / "00000_00.png").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main([*ocr, "--tiny", '{"image_size": 32, "num_layers": 2}']) == 2   # another model: refused
    assert "tiny (" in capsys.readouterr().err


def test_eval_refuses_an_out_that_is_or_holds_the_image_folder(tmp_path, capsys):
    """--overwrite moves a scores folder's content aside: with --out the image folder (or above it), that would
    take the images too."""
    from tests.eval.conftest import write_png

    from tests.tools._cli import one_line_error

    images = tmp_path / "imgs"
    write_png(images / "00000_00.png")
    for out in (images, tmp_path):
        assert main(["eval", "ocr", "--images", str(images), "--out", str(out), "--prompt", '"hi"', "--overwrite",
                     "--no-progress"]) == 2
        assert "is the image folder or holds it" in one_line_error(capsys)
        assert (images / "00000_00.png").exists() and not list(tmp_path.glob("**/previous-*"))
