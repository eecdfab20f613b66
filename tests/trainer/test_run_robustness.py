"""Pieces of the run-robustness code without a training run: the resume policy table, applying changed optimizer
settings to a restored scheduler, the signal handler, a failed save that must not move `latest` or lose `best`,
moving earlier outputs aside (egrpo.outputs), and metrics.jsonl / tensorboard across a resume."""

import json
import os
import signal

import pytest
import torch

from egrpo.errors import ResumeError
from egrpo.outputs import move_contents_aside, stamped_path
from egrpo.trainer import train as T
from egrpo.trainer.config import load_config
from egrpo.trainer.metrics import MetricLogger, read_metrics

from ._helpers import DEMO
from .test_checkpoints import tiny_engine, train_step

# ----------------------------------------------------------------------------------------- resume policy


def _config(**changes):
    cfg = {"train": {"steps": 4, "save_every": 2, "out_dir": "a", "export_format": "hf"}, "optim": {"lr": 1e-3},
           "model": {"dtype": "fp32"}, "deepspeed": {"zero_stage": 0},
           "rollout": {"group_size": 4, "engine": True, "compile": False},
           "objective": {"chunk_size": None}, "rewards": [{"name": "colour", "weight": 1.0, "retries": 0}]}
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return cfg


@pytest.mark.parametrize("key, value, policy", [
    ("train.save_every", 5, "free"), ("train.out_dir", "b", "free"), ("objective.chunk_size", 64, "free"),
    ("rewards.0.retries", 2, "free"), ("train.export_format", "original", "free"), ("rollout.compile", True, "free"),
    ("optim.lr", 2e-3, "explicit"), ("rollout.group_size", 8, "explicit"), ("rewards.0.weight", 2.0, "explicit"),
    ("rollout.engine", False, "explicit"),
    ("model.dtype", "bf16", "never"), ("deepspeed.zero_stage", 2, "never"),
])
def test_each_resume_policy_class(key, value, policy):
    """docs/training.md's table: free keys are applied and logged; keys that change the math need
    --allow-changes; model and DeepSpeed keys are refused even with it (the checkpoint's layout depends on them)."""
    old, new = _config(), _config(**{key: value})
    for allow in (False, True):
        if policy == "free" or (policy == "explicit" and allow):
            lines = T.check_resume_changes(old, new, 2, allow_changes=allow)
            assert len(lines) == 1 and lines[0].startswith(f"{key}: ")
        else:
            with pytest.raises(ResumeError, match="start a new run" if policy == "never" else "--allow-changes") as e:
                T.check_resume_changes(old, new, 2, allow_changes=allow)
            assert key in str(e.value)


def test_the_same_out_dir_spelled_another_way_is_no_change():
    old = _config()   # train.out_dir "a", relative to the working directory
    assert T.check_resume_changes(old, _config(**{"train.out_dir": os.path.abspath("a")}), 2, allow_changes=False) == []


def test_resume_needs_steps_beyond_the_checkpoint():
    old = _config()
    assert T.check_resume_changes(old, _config(**{"train.steps": 5}), 4, allow_changes=False)[0].startswith(
        "train.steps: 4 -> 5")
    for steps in (3, 4):
        with pytest.raises(ResumeError, match=f"train.steps > 4"):
            T.check_resume_changes(old, _config(**{"train.steps": steps}), 4, allow_changes=True)


# ----------------------------------------------------------------------------------- changed optimizer settings


def test_apply_optim_settings_overrides_what_the_checkpoint_restored():
    """After a resume with changed optimizer settings (or a longer run), the restored scheduler / optimizer follow
    the new config from the current update on: schedule length, base LR, Adam betas / eps, weight decay (group 0
    only: group 1 holds biases and norm scales)."""
    cfg = load_config(DEMO, ["optim.lr=1e-3", "optim.schedule=linear", "optim.warmup_steps=0", "optim.min_lr_ratio=0",
                             "optim.weight_decay=0.1", "train.steps=4"])
    model = torch.nn.Linear(3, 2)
    optimizer = T.build_optimizer(cfg, model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, T.WarmupSchedule(0, 4, "linear", 0.0))
    for _ in range(2):   # 2 of 4 updates done (no gradients: the weights stay): lr = 1e-3 * (1 - 2/4)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)

    new = load_config(DEMO, ["optim.lr=2e-3", "optim.schedule=linear", "optim.warmup_steps=0", "optim.min_lr_ratio=0",
                             "optim.weight_decay=0.2", "optim.betas=[0.8,0.95]", "optim.eps=1e-6", "train.steps=8"])
    T.apply_optim_settings(scheduler, new, total_updates=8)
    for i, group in enumerate(optimizer.param_groups):
        assert group["lr"] == pytest.approx(2e-3 * (1 - 2 / 8)), i
        assert group["initial_lr"] == 2e-3
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
        assert group["weight_decay"] == (0.2 if i == 0 else 0.0)
    assert scheduler.get_last_lr() == pytest.approx([1.5e-3, 1.5e-3])
    optimizer.step()
    scheduler.step()   # the next update follows the new schedule and base LR
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-3 * (1 - 3 / 8)] * 2)


# ----------------------------------------------------------------------------------------------- signals


def test_stop_on_signal_flags_once_then_interrupts_and_restores_handlers():
    """Inside: the first SIGINT / SIGTERM only sets ``signum``; a second one gets the previous handler (Ctrl-C
    twice interrupts at once); leaving the block restores the handlers that were there before."""
    class Previous(Exception):
        pass

    def previous(signum, frame):
        raise Previous(signum)

    saved = {sig: signal.signal(sig, previous) for sig in T.StopOnSignal.SIGNALS}
    try:
        for sig in T.StopOnSignal.SIGNALS:
            with T.StopOnSignal() as stopper:
                os.kill(os.getpid(), sig)
                assert stopper.signum == sig
                with pytest.raises(Previous):
                    os.kill(os.getpid(), sig)
            assert all(signal.getsignal(s) is previous for s in T.StopOnSignal.SIGNALS)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_interrupt_at_once_raises_remembers_and_restores_handlers():
    """Around train(): SIGINT raises KeyboardInterrupt at once and is remembered; SIGTERM keeps its own handler (by
    default it ends the process, also one blocked in a collective); leaving restores the handlers."""
    before = {sig: signal.getsignal(sig) for sig in T.StopOnSignal.SIGNALS}
    assert T.InterruptAtOnce.SIGNALS == (signal.SIGINT,)
    for sig in T.InterruptAtOnce.SIGNALS:
        with T.InterruptAtOnce() as interrupts:
            assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
            interrupts.raise_if_dropped()   # nothing received: no-op
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
            assert interrupts.signum == sig
            with pytest.raises(KeyboardInterrupt):
                interrupts.raise_if_dropped()
        assert {s: signal.getsignal(s) for s in T.StopOnSignal.SIGNALS} == before


class _SignalsInDel:
    """Sends SIGINT to this process from its __del__: Python prints and drops the KeyboardInterrupt raised there."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one
def test_a_signal_dropped_during_the_start_still_stops_the_run_before_its_first_step(tmp_path):
    """Ctrl-C while the model loads can land in a __del__, where Python drops the KeyboardInterrupt: the run must
    not train on. train() stops before its first step: no step, no checkpoint, no metrics."""
    from egrpo.trainer.model import build_model

    from ._helpers import small_config

    def builder(model_config, device):
        built = build_model(model_config, device)
        _SignalsInDel()   # collected at once: the signal arrives inside __del__
        return built

    with pytest.raises(KeyboardInterrupt):
        T.train(small_config(str(tmp_path / "run"), "train.steps=2"), model_builder=builder)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(str(tmp_path / "run" / "metrics.jsonl"))


def test_the_run_lock_waits_out_another_commands_brief_check(tmp_path, monkeypatch):
    """run_lock_owner (`--resume` / `--dry-run` of another command) holds a shared lock for an instant: a training
    starting then must not read it as "in use by another training"."""
    import fcntl

    real, calls = fcntl.flock, []

    def busy_once(handle, op):
        calls.append(op)
        if len(calls) == 1 and op & fcntl.LOCK_EX:
            raise BlockingIOError("held by a shared check")
        return real(handle, op)

    monkeypatch.setattr(fcntl, "flock", busy_once)
    out = str(tmp_path / "run")
    try:
        T.acquire_run_lock(out)
        assert len(calls) == 2 and T.run_lock_owner(out) is None   # (our own lock is no other owner)
    finally:
        T.release_run_lock(out)


# ----------------------------------------------------------------------------------------- failed saves


def test_write_atomic_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    """`latest`, the manifest and config.yaml are written with `write_atomic`: a write that fails before it is on
    disk (disk full, killed) leaves the previous content, never an empty or partial file."""
    target = tmp_path / "latest"
    T.write_atomic(str(target), "step_000001")
    assert target.read_text() == "step_000001"

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        T.write_atomic(str(target), "step_000002")
    assert target.read_text() == "step_000001"
    monkeypatch.undo()
    T.write_atomic(str(target), "step_000002")
    assert target.read_text() == "step_000002"


def _fail_manifest(monkeypatch):
    def broken(tag_dir, step):
        raise OSError("disk full")

    monkeypatch.setattr(T, "write_manifest", broken)


def test_a_failed_save_leaves_latest_and_best_as_they_were(tmp_path, monkeypatch):
    """`latest` is written only after the manifest, and `best` is replaced only once the new one is complete:
    a save that fails half-way (disk full, killed) leaves both pointing at complete checkpoints."""
    engine = tiny_engine()
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        train_step(engine)
        T.save_checkpoint(engine, str(root), step, data_position=step, rank=0, keep_last=0)
    T.save_best(engine, str(root), 2, data_position=2, rank=0)
    assert (root / "latest").read_text() == "step_000002"   # `best` does not move `latest`
    best_weight = engine.module.weight.detach().clone()

    train_step(engine)
    with monkeypatch.context() as m:
        _fail_manifest(m)
        with pytest.raises(OSError, match="disk full"):
            T.save_checkpoint(engine, str(root), 3, data_position=3, rank=0, keep_last=0)
        with pytest.raises(OSError, match="disk full"):
            T.save_best(engine, str(root), 3, data_position=3, rank=0)
    assert (root / "latest").read_text() == "step_000002"
    _, tag, problems = T.find_checkpoint(str(tmp_path))
    assert tag == "step_000002" and len(problems) == 1 and "step_000003" in problems[0]   # named, not used
    assert T.verify_checkpoint(str(root / "best")) is None
    fresh = tiny_engine(seed=1)
    load_dir, tag, _ = T.find_checkpoint(str(root / "best"))
    assert T.load_checkpoint(fresh, load_dir, tag, rank=0)[0] == 2
    assert torch.equal(fresh.module.weight, best_weight)


# ------------------------------------------------------------------------------------- earlier outputs


def test_move_contents_aside_keeps_earlier_runs_and_the_kept_names(tmp_path):
    """Everything but earlier ``previous-*`` folders and the kept names moves into a new ``previous-<time>/``;
    two moves in the same second get two folders side by side (nothing nested, nothing overwritten)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("first\n")
    (run / "lock").write_text("held")
    first = move_contents_aside(str(run), keep=("lock",))
    (run / "metrics.jsonl").write_text("second\n")
    second = move_contents_aside(str(run), keep=("lock",))
    assert first != second
    assert sorted(os.listdir(run)) == sorted(["lock", os.path.basename(first), os.path.basename(second)])
    assert os.listdir(first) == ["metrics.jsonl"] and os.listdir(second) == ["metrics.jsonl"]
    assert open(os.path.join(first, "metrics.jsonl")).read() == "first\n"
    assert open(os.path.join(second, "metrics.jsonl")).read() == "second\n"


def test_stamped_path_never_names_an_existing_path(tmp_path):
    stem = str(tmp_path / "out")
    taken = set()
    for _ in range(3):
        path = stamped_path(stem, ".jsonl")
        assert path not in taken and not os.path.exists(path) and path.endswith(".jsonl")
        open(path, "w").close()
        taken.add(path)


# ------------------------------------------------------------------------------------------ metrics.jsonl


def _steps(path):
    return [(r["step"], r["x"]) for r in read_metrics(path)]


def test_metric_logger_resume_keeps_history_until_the_resumed_run_records(tmp_path):
    """A fresh start begins an empty file; a resume appends after the checkpoint's step and drops the interrupted
    run's later records, but only once the resumed run writes (a resume that fails first changes nothing)."""
    first = MetricLogger(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        first.log(step, {"x": float(step)})
    first.close()
    path = str(tmp_path / "metrics.jsonl")
    before = open(path).read()

    failed = MetricLogger(str(tmp_path), tensorboard=False, resume_step=1)   # fails before its first step
    assert open(path).read() == before
    del failed

    resumed = MetricLogger(str(tmp_path), tensorboard=False, resume_step=2)
    assert open(path).read() == before
    resumed.log(3, {"x": 30.0})
    resumed.log(4, {"x": 40.0})
    resumed.close()
    assert _steps(path) == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]

    quiet = MetricLogger(str(tmp_path), tensorboard=False, resume_step=3)   # ran steps but logged none
    quiet.close()
    assert _steps(path) == [(1, 1.0), (2, 2.0), (3, 30.0)]

    MetricLogger(str(tmp_path), tensorboard=False).close()   # a new run (the old one was moved aside first)
    assert read_metrics(path) == []
    MetricLogger(str(tmp_path), enabled=False, resume_step=0).close()   # other processes write nothing
    assert read_metrics(path) == []


def test_metric_records_are_strict_json(tmp_path):
    """Non-finite values (a diverging metric) are written as text: every line stays valid JSON for other readers."""
    logger = MetricLogger(str(tmp_path), tensorboard=False)
    logger.log(1, {"x": float("nan"), "y": torch.tensor(float("inf")), "z": torch.tensor(0.5)})
    logger.close()

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=reject) == {"step": 1, "x": "nan", "y": "inf", "z": 0.5}


def test_metric_logger_resume_purges_tensorboard_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricLogger(str(tmp_path), tensorboard=True)
    for step in (1, 2, 3):
        first.log(step, {"x": float(step)})
    first.close()
    resumed = MetricLogger(str(tmp_path), tensorboard=True, resume_step=2)
    for step in (3, 4):
        resumed.log(step, {"x": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_resume_with_another_process_count():
    """Recorded in the checkpoint: the same count resumes; another one changes the run (each process samples its
    share of the images from its own stream), so it needs --allow-changes; under ZeRO-3 it is refused outright
    (the optimizer state is partitioned per process); checkpoints from before the count was recorded pass."""
    assert T.check_process_count(2, 2, 0, allow_changes=False) == []
    assert T.check_process_count(None, 2, 3, allow_changes=False) == []
    with pytest.raises(ResumeError, match="written by 2 processes and this run has 1.*--nproc_per_node 2.*--allow-changes"):
        T.check_process_count(2, 1, 0, allow_changes=False)
    assert T.check_process_count(2, 1, 2, allow_changes=True) == ["processes: 2 -> 1 (applied: --allow-changes)"]
    with pytest.raises(ResumeError, match="ZeRO-3 partitions its optimizer state per process"):
        T.check_process_count(2, 1, 3, allow_changes=True)


def test_an_export_cut_short_after_the_final_checkpoint_is_recognised(tmp_path):
    from types import SimpleNamespace

    run = tmp_path / "run"
    final = run / "checkpoints" / "step_000003"
    final.mkdir(parents=True)
    (final / "manifest.json").write_text('{"step": 3, "files": {}}')
    (run / "checkpoints" / "latest").write_text("step_000003")
    t = SimpleNamespace(steps=3, export_hf=True)
    assert T.final_export_cut_short(str(run), t)                            # no hf/
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    assert T.final_export_cut_short(str(run), t)                            # not known to be the final one's
    T.write_export_record(str(run / "hf"), str(final))
    assert not T.final_export_cut_short(str(run), t)                        # exported
    (final / "manifest.json").write_text('{"step": 3, "files": {"x": {}}}')
    assert T.final_export_cut_short(str(run), t)                            # of another save of step 3
    T.write_export_record(str(run / "hf"), str(final))
    (run / ".hf.egrpo-partial").mkdir()
    assert T.final_export_cut_short(str(run), t)                            # a new export was being written
    assert not T.final_export_cut_short(str(run), SimpleNamespace(steps=5, export_hf=True))   # not the final step
    assert not T.final_export_cut_short(str(run), SimpleNamespace(steps=3, export_hf=False))
