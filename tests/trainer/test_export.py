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
