"""Checkpoints on a tiny DeepSpeed engine: manifest written last and verified on load, fallback to the newest
intact checkpoint (truncated, zero-byte, random-byte files, a missing manifest, `latest` empty or naming a missing or
empty tag), one-line errors naming the file, `keep_last` pruning and the `best` slot."""

import json
import os

import pytest
import torch

from egrpo.errors import CheckpointError
from egrpo.trainer.train import (MANIFEST, find_checkpoint, init_distributed, load_checkpoint, save_best,
                                 save_checkpoint, verify_checkpoint)


def tiny_engine(seed=0):
    import deepspeed

    init_distributed("cpu")
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9})
    return engine


def train_step(engine):
    loss = engine(torch.randn(2, 4)).square().mean()
    engine.backward(loss)
    engine.step()


@pytest.fixture
def run(tmp_path):
    """A run directory with step checkpoints 1..3 (keep_last=3); returns (run_dir, engine, weights per step)."""
    engine = tiny_engine()
    root = tmp_path / "checkpoints"
    weights = {}
    for step in (1, 2, 3):
        train_step(engine)
        save_checkpoint(engine, str(root), step, data_position=10 * step, rank=0, config={"x": step}, keep_last=3)
        weights[step] = engine.module.weight.detach().clone()
    return tmp_path, engine, weights


def largest_file(tag_dir):
    files = [os.path.join(tag_dir, n) for n in os.listdir(tag_dir) if n != MANIFEST]
    return max(files, key=os.path.getsize)


def test_layout_manifest_and_roundtrip(run):
    run_dir, engine, weights = run
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_000003"
    for step in (1, 2, 3):
        tag_dir = root / f"step_{step:06d}"
        assert verify_checkpoint(str(tag_dir)) is None
        assert (tag_dir / "config.yaml").exists()
        # the manifest covers every file of the checkpoint (RNG states, trainer state and config included)
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
        on_disk = {os.path.relpath(os.path.join(d, n), tag_dir) for d, _, names in os.walk(tag_dir) for n in names}
        assert set(files) == on_disk - {MANIFEST}
        assert {"rng_rank000.pt", "trainer_state.pt", "config.yaml"} <= set(files)
    load_dir, tag, problems = find_checkpoint(str(run_dir))
    assert (tag, problems) == ("step_000003", [])
    fresh = tiny_engine(seed=1)
    assert not torch.equal(fresh.module.weight, weights[3])
    assert load_checkpoint(fresh, load_dir, tag, rank=0) == (3, 30)
    assert torch.equal(fresh.module.weight, weights[3])


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "random_bytes", "missing_file", "no_manifest",
                                    "latest_missing_tag", "latest_empty_tag", "latest_file_empty"])
def test_damaged_latest_falls_back_to_newest_intact(run, damage):
    run_dir, _, weights = run
    root = run_dir / "checkpoints"
    newest = root / "step_000003"
    victim = largest_file(str(newest))
    if damage == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    elif damage == "zero_bytes":
        open(victim, "wb").close()
    elif damage == "random_bytes":   # same size: only the hash can tell
        size = os.path.getsize(victim)
        with open(victim, "wb") as f:
            f.write(os.urandom(size))
    elif damage == "missing_file":   # e.g. deleted by hand, or lost with a node's local disk
        os.remove(victim)
    elif damage == "no_manifest":    # a save killed before its manifest
        os.remove(newest / MANIFEST)
    elif damage == "latest_missing_tag":
        (root / "latest").write_text("step_000009")
    elif damage == "latest_empty_tag":
        (root / "step_000009").mkdir()
        (root / "latest").write_text("step_000009")
    elif damage == "latest_file_empty":   # e.g. truncated by a full disk: said, not skipped silently
        (root / "latest").write_text("")
    load_dir, tag, problems = find_checkpoint(str(run_dir))
    expected = "step_000003" if damage.startswith("latest") else "step_000002"
    assert tag == expected
    assert len(problems) == 1
    named = {"truncated": victim, "zero_bytes": victim, "random_bytes": victim, "missing_file": victim,
             "no_manifest": MANIFEST,
             "latest_missing_tag": "step_000009", "latest_empty_tag": "step_000009",
             "latest_file_empty": "latest names no checkpoint"}[damage]
    assert named in problems[0] and "\n" not in problems[0]
    fresh = tiny_engine(seed=1)
    step, _ = load_checkpoint(fresh, load_dir, tag, rank=0)
    assert torch.equal(fresh.module.weight, weights[step])


def test_no_intact_checkpoint_is_one_line_naming_the_file(run):
    run_dir, _, _ = run
    root = run_dir / "checkpoints"
    for step in (1, 2, 3):
        open(largest_file(str(root / f"step_{step:06d}")), "wb").close()
    with pytest.raises(CheckpointError) as info:
        find_checkpoint(str(run_dir))
    message = str(info.value)
    assert "step_000003" in message and "0 bytes" in message and "\n" not in message
    # A checkpoint named explicitly is not replaced by another one.
    with pytest.raises(CheckpointError, match="step_000002"):
        find_checkpoint(str(root / "step_000002"))
    with pytest.raises(CheckpointError, match="nothing_here: no such file or directory"):
        find_checkpoint(str(run_dir / "nothing_here"))
    (run_dir / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        find_checkpoint(str(run_dir / "empty"))


def test_keep_last_prunes_old_step_checkpoints_and_best_is_separate(tmp_path):
    engine = tiny_engine()
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        train_step(engine)
        save_checkpoint(engine, str(root), step, data_position=step, rank=0, keep_last=2)
        if step in (2, 4):
            save_best(engine, str(root), step, data_position=step, rank=0)
            best_weight = engine.module.weight.detach().clone()
    assert sorted(os.listdir(root)) == ["best", "latest", "step_000004", "step_000005"]
    assert verify_checkpoint(str(root / "best")) is None
    assert find_checkpoint(str(tmp_path))[1] == "step_000005"   # `best` is not a resume candidate
    load_dir, tag, _ = find_checkpoint(str(root / "best"))
    fresh = tiny_engine(seed=1)
    assert load_checkpoint(fresh, load_dir, tag, rank=0)[0] == 4
    assert torch.equal(fresh.module.weight, best_weight)
