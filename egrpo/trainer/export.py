"""``egrpo export``: a model directory from any checkpoint of a run (``checkpoints/best``, an older step), not only
the final one that training writes to ``<run>/hf``.

The checkpoint's own ``config.yaml`` says how to build the model (``model.path`` or ``model.tiny``, dtype); its
DeepSpeed model states give the weights. ZeRO 0-2 checkpoints hold the whole module state (every parameter,
frozen ones included); ZeRO-3 ones hold fp32 partitions of the trained parameters, which DeepSpeed's
``zero_to_fp32`` joins, and the frozen ones come from ``model.path`` (they never change in training).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from egrpo.errors import CheckpointError

from .config import load_config, model_path_missing
from .model import build_model
from .train import find_checkpoint, replace_dir_atomically, write_export_record


def checkpoint_state(load_dir: str, tag: str, zero_stage: int) -> dict:
    """The model's weights in the checkpoint ``load_dir/tag`` (names as ``model.state_dict()``)."""
    tag_dir = os.path.join(load_dir, tag)
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        raise CheckpointError(f"{tag_dir}: no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint of this trainer)")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def export_checkpoint(path: str, out: str, export_format: Optional[str] = None, model_path: Optional[str] = None,
                      warn: Callable[[str], None] = lambda message: None,
                      keep_previous_as: Optional[str] = None) -> str:
    """Write the model of the checkpoint at ``path`` (a run directory: its newest intact checkpoint; its
    ``checkpoints/`` directory; or one checkpoint, e.g. ``<run>/checkpoints/best``) to ``out`` in the transformers
    (``"hf"``) or original Janus layout (None: the run's ``train.export_format``). ``model_path`` replaces the
    config's ``model.path`` (the base model the run started from: a relative one is read from the current
    directory). ``warn`` receives the damaged checkpoints skipped. An existing ``out`` is replaced once the new
    export is complete, renamed to ``keep_previous_as`` when given (else removed). The export records the checkpoint
    it holds (`egrpo.trainer.train.write_export_record`). Returns the checkpoint used."""
    from egrpo.checkpoints import export_model

    load_dir, tag, problems = find_checkpoint(path, flag="checkpoint")
    for problem in problems:
        warn(f"skipping a damaged checkpoint: {problem}")
    tag_dir = os.path.join(load_dir, tag)
    config_file = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{tag_dir}: no config.yaml (a checkpoint written before the trainer recorded it)")
    cfg = load_config(config_file)
    if model_path is not None:
        cfg.model.path = model_path
    if model_path_missing(cfg.model.path):
        raise CheckpointError(f"the run's model.path {cfg.model.path!r} does not exist from here (a relative path "
                              "is read from the current directory); give the base model with --model-path")
    model, tokenizer = build_model(cfg.model, torch.device("cpu"))
    state = checkpoint_state(load_dir, tag, cfg.deepspeed.zero_stage)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(f"{tag_dir}: weights the model of its config.yaml does not have: {unknown[:3]}")
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    if missing:
        raise CheckpointError(f"{tag_dir}: trained weights missing from the checkpoint: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
    fmt = export_format or cfg.train.export_format

    def write(partial: str) -> None:
        export_model(model, tokenizer, partial, fmt)
        write_export_record(partial, tag_dir)

    replace_dir_atomically(out, write, keep_previous_as=keep_previous_as)
    return tag_dir
