"""``egrpo export``: the model of any checkpoint of a run (``best``, an older step) as a model directory that
``egrpo generate`` loads, weight for weight the checkpoint's."""

import os

import pytest
import torch
from safetensors.torch import load_file

from egrpo.cli import main

from tests.trainer._helpers import DEMO, SMALL


def exported_weights(folder):
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, name)))
    return state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", "--config", DEMO, *SMALL, "train.steps=2", "train.save_every=1", "train.export_hf=true",
                 f"train.out_dir={out}"]) == 0
    return out


def test_the_newest_checkpoint_exports_the_final_model(run, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(tmp_path / "final")]) == 0
    assert "step_000002" in capsys.readouterr().out
    ours, final = exported_weights(tmp_path / "final"), exported_weights(run / "hf")
    assert ours.keys() == final.keys()
    assert all(torch.equal(ours[k], final[k]) for k in final)


def test_an_older_checkpoint_exports_its_own_weights_and_generates(run, tmp_path, capsys):
    step1 = run / "checkpoints" / "step_000001"
    assert main(["export", str(step1), "--out", str(tmp_path / "one")]) == 0
    ours = exported_weights(tmp_path / "one")
    saved = torch.load(step1 / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.equal(ours[k], saved[k]) for k in ours)
    final = exported_weights(run / "hf")
    assert any(not torch.equal(ours[k], final[k]) for k in ours)   # a step of training apart
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\n")
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "one"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "gen"), "--dtype", "fp32", "--device", "cpu"]) == 0
    assert (tmp_path / "gen" / "00000_00.png").is_file()


def test_the_original_layout_on_request(run, tmp_path, capsys):
    assert main(["export", str(run / "checkpoints" / "step_000002"), "--out", str(tmp_path / "orig") + "/",
                 "--format", "original"]) == 0
    from egrpo.checkpoints import is_original_dir

    assert is_original_dir(str(tmp_path / "orig"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orig"]   # no work directory left beside it


def test_generate_on_a_checkpoint_points_at_export_and_export_refuses_what_it_cannot_do(run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\n")
    best = run / "checkpoints" / "step_000001"
    assert main(["generate", "--model", str(best), "--prompts", str(prompts), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"egrpo export {best} --out <dir>" in err and "\n" not in err
    (tmp_path / "taken").mkdir()
    assert main(["export", str(run), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "taken"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no checkpoint found" in err and "\n" not in err and not (tmp_path / "x").exists()
    assert f"checkpoint {tmp_path / 'taken'}: no checkpoint found" in err and "--resume" not in err   # not train's flag


def edit_checkpoint(tag_dir, remove=None, **settings):
    """Change a saved checkpoint as an older trainer (or another machine) would have left it, its manifest kept
    consistent (so it is still intact): ``remove`` a file; ``settings`` ("section.key": value) in its config.yaml."""
    import json

    import yaml

    from egrpo.trainer.train import sha256_file

    manifest = json.loads((tag_dir / "manifest.json").read_text())
    if remove is not None:
        (tag_dir / remove).unlink()
        del manifest["files"][remove]
    if settings:
        config = yaml.safe_load((tag_dir / "config.yaml").read_text())
        for key, value in settings.items():
            section, name = key.split(".")
            config[section][name] = value
        (tag_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        manifest["files"]["config.yaml"] = {"size": os.path.getsize(tag_dir / "config.yaml"),
                                            "sha256": sha256_file(str(tag_dir / "config.yaml"))}
    (tag_dir / "manifest.json").write_text(json.dumps(manifest))


def copied_step(run, tmp_path, tag="step_000002"):
    import shutil

    shutil.copytree(run / "checkpoints" / tag, tmp_path / tag)
    return tmp_path / tag


def test_the_runs_export_format_is_the_default_layout(run, tmp_path, capsys):
    """No --format: the layout the run was configured to export (train.export_format), not always hf."""
    from egrpo.checkpoints import is_original_dir

    step = copied_step(run, tmp_path)
    edit_checkpoint(step, **{"train.export_format": "original"})
    assert main(["export", str(step), "--out", str(tmp_path / "out")]) == 0
    assert is_original_dir(str(tmp_path / "out"))
    assert main(["export", str(step), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert not is_original_dir(str(tmp_path / "hf"))


def test_a_base_model_that_moved_is_given_with_model_path(run, tmp_path, capsys):
    """The checkpoint's model.path no longer resolves (another machine, a moved folder): refused before anything
    loads, naming --model-path; with it, the export is the checkpoint's weights."""
    step = copied_step(run, tmp_path)
    edit_checkpoint(step, **{"model.tiny": None, "model.path": str(tmp_path / "moved-base")})
    assert main(["export", str(step), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "moved-base" in err and "does not exist from here" in err and "--model-path" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(step), "--out", str(tmp_path / "out"), "--model-path", str(run / "hf")]) == 0
    ours = exported_weights(tmp_path / "out")
    saved = torch.load(step / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert saved.keys() <= ours.keys() and all(torch.equal(ours[k], saved[k]) for k in saved)


@pytest.mark.parametrize("missing, message", [
    ("config.yaml", "no config.yaml (a checkpoint written before the trainer recorded it)"),
    ("mp_rank_00_model_states.pt", "no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint of this trainer)"),
])
def test_a_checkpoint_without_its_config_or_model_states_is_refused(run, tmp_path, capsys, missing, message):
    step = copied_step(run, tmp_path)
    edit_checkpoint(step, remove=missing)
    assert main(["export", str(step), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{step}: {message}" in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


@pytest.mark.parametrize("change, message", [
    ("drop", "trained weights missing from the checkpoint: ['model.language_model.norm.weight']"),
    ("add", "weights the model of its config.yaml does not have: ['bogus.weight']"),
])
def test_weights_that_do_not_match_the_model_are_refused(run, tmp_path, capsys, monkeypatch, change, message):
    """A checkpoint lacking a trained weight, or holding one the model of its config.yaml does not have (another
    model, a damaged save): refused, naming it, and nothing is written."""
    import egrpo.trainer.export as export_module

    real = export_module.checkpoint_state

    def altered(*args, **kwargs):
        state = dict(real(*args, **kwargs))
        if change == "drop":
            del state["model.language_model.norm.weight"]
        else:
            state["bogus.weight"] = torch.zeros(1)
        return state

    monkeypatch.setattr(export_module, "checkpoint_state", altered)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not os.listdir(tmp_path)


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step_000002" / "manifest.json").unlink()   # its save never finished
    assert main(["export", str(copy), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "egrpo: warning: skipping a damaged checkpoint: " in err
    assert str(copy / "checkpoints" / "step_000002" / "manifest.json") + " is missing" in err
    assert out.strip().endswith(f"from {copy / 'checkpoints' / 'step_000001'}")
    ours = exported_weights(tmp_path / "out")
    saved = torch.load(copy / "checkpoints" / "step_000001" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    assert all(torch.equal(ours[k], saved[k]) for k in saved)


def test_the_command_suggested_after_a_cut_short_final_export_works_over_an_older_export(run, tmp_path, capsys,
                                                                                           monkeypatch):
    """A second signal during the final export leaves the final checkpoint, and possibly an older hf/ (e.g. of a
    run since extended) beside the export being written. The interrupted run's message suggests an `egrpo
    export` command: run as printed, it writes the final checkpoint's model into hf/ and keeps the older one as
    hf.previous-<time> (plain --out <run>/hf is refused there: it exists)."""
    import shlex
    import shutil

    import egrpo.trainer.train as train_module
    from egrpo.trainer.config import load_config

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "hf" / "older.txt").write_text("an export of an earlier end of the run\n")
    (copy / ".hf.egrpo-partial").mkdir()   # the new export, cut short
    assert train_module.final_export_cut_short(str(copy), load_config(str(copy / "config.yaml")).train)

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", cut_short)
    capsys.readouterr()
    assert main(["train", "--resume", str(copy)]) == 130
    err = capsys.readouterr().err
    assert "its export did not finish: write it with egrpo export " in err
    command = shlex.split(err.split("write it with ", 1)[1].strip())
    assert command[0] == "egrpo" and "--overwrite" in command
    assert main([c for c in command[1:] if c != "--overwrite"]) == 2   # without it: --out exists
    assert "already exists" in capsys.readouterr().err
    assert main(command[1:]) == 0
    assert "kept the previous" in capsys.readouterr().out
    previous = [p for p in os.listdir(copy) if p.startswith("hf.previous-")]
    assert len(previous) == 1 and (copy / previous[0] / "older.txt").is_file()
    assert not (copy / "hf" / "older.txt").exists() and not (copy / ".hf.egrpo-partial").exists()
    ours, final = exported_weights(copy / "hf"), exported_weights(run / "hf")
    assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in final)
    assert not train_module.final_export_cut_short(str(copy), load_config(str(copy / "config.yaml")).train)


def test_a_zero3_checkpoint_exports_the_trained_weights(tmp_path):
    """ZeRO-3 checkpoints hold fp32 partitions of the trained weights (joined by DeepSpeed's zero_to_fp32); the
    frozen ones come from the model the config names. The result equals the run's own final export."""
    from egrpo.trainer.export import export_checkpoint

    from .test_zero import run_processes
    from ._helpers import ROOT

    out = tmp_path / "run"
    overrides = ["train.steps=1", "objective.name=grpo", "deepspeed.zero_stage=3", "train.export_hf=true"]
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from tests.trainer._helpers import small_config\nfrom egrpo.trainer.train import train\n"
            f"s = train(small_config({str(out)!r}, *{overrides!r}))\nprint('steps', s['step'])\n")
    run_processes(code, 1, expect="steps 1")
    export_checkpoint(str(out), str(tmp_path / "mine"))
    ours, final = exported_weights(tmp_path / "mine"), exported_weights(out / "hf")
    assert ours.keys() == final.keys()
    assert all(torch.equal(ours[k], final[k]) for k in final)
