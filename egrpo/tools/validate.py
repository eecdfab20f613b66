"""Checks the tools run before any model loads, and moving earlier outputs aside (``--overwrite``).

Each check raises `egrpo.errors.UserError` with a one-line message naming the argument and what to do; the
``egrpo`` entry point prints it and exits with code 2.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from egrpo.errors import UserError
from egrpo.outputs import move_contents_aside, nearest_folder, stamped_path


def resolve_device(device: Optional[str], flag: str = "--device") -> str:
    """``device`` checked against this machine (None: ``cuda`` when available, else ``cpu``): ``cpu``, ``cuda``
    or ``cuda:N``. Same rule as ``train.device`` (egrpo/trainer/config.py), for the command-line tools."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    name, _, index = device.partition(":")
    if name == "cpu" and not index:
        return "cpu"
    if name != "cuda" or (index and not index.isdigit()):
        raise UserError(f"{flag} {device!r}: not a device; use cpu, cuda or cuda:N (or leave it out: cuda if "
                        "available, else cpu)")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: no CUDA device is available on this machine (or this torch has no CUDA "
                        "support); use --device cpu or leave it out")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def check_at_least(value: Optional[int], flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{flag} must be >= {minimum}, got {value}")


def move_file_aside(path: str) -> str:
    """Rename ``path`` to ``<stem>.previous-<time><ext>`` next to it; returns the new name."""
    stem, ext = os.path.splitext(path)
    dest = stamped_path(f"{stem}.previous", ext)
    os.replace(path, dest)
    return dest


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def holds_generations(out_dir: str) -> bool:
    """True when ``out_dir`` holds a non-empty ``generations.jsonl`` or images (outside earlier ``previous-*``
    folders)."""
    if not os.path.isdir(out_dir):
        return False
    def holds(name: str) -> bool:
        if name == "generations.jsonl":   # an empty one (a run that failed before its first image) holds nothing
            return os.path.getsize(os.path.join(out_dir, name)) > 0
        return name.lower().endswith(IMAGE_EXTENSIONS)

    return any(holds(name) for name in os.listdir(out_dir))


def training_run_of(path: str):
    """The training run (``config.yaml`` + ``checkpoints/``) that ``path`` is, or whose ``checkpoints/`` or one
    checkpoint ``path`` is; None when it is none of them."""
    here = os.path.abspath(path)
    for run in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isdir(os.path.join(run, "checkpoints")) and os.path.isfile(os.path.join(run, "config.yaml")):
            return run
    return None


def other_kind_of_folder(path: str) -> Optional[str]:
    """What ``path`` holds when it is a training run or a model directory (None otherwise)."""
    def has(name: str) -> bool:
        return os.path.exists(os.path.join(path, name))

    if has("config.yaml") and any(has(n) for n in ("checkpoints", "metrics.jsonl", "config_history.jsonl")):
        return "a training run directory"
    if has("config.json") and any(n.endswith((".safetensors", ".bin", ".pth"))
                                  for n in (os.listdir(path) if os.path.isdir(path) else [])):
        return "a model directory"
    return None


def prepare_generation_dir(out_dir: str, overwrite: bool, flag: str = "--out") -> Optional[str]:
    """Refuse an ``out_dir`` that already holds generations unless ``overwrite``; with ``overwrite``, its content
    is moved to ``out_dir/previous-<time>/`` (returned). A path that is a file is refused."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{flag} {out_dir} is a file; give a directory")
    kind = other_kind_of_folder(out_dir)
    if kind:   # (--overwrite would move a run's checkpoints or a model's weights aside)
        raise UserError(f"{flag} {out_dir} is {kind}, not a folder of generations; give a folder of its own, e.g. "
                        f"{os.path.join(out_dir, 'generations')}")
    if not holds_generations(out_dir):
        return None
    if not overwrite:
        raise UserError(f"{flag} {out_dir} already holds generations (generations.jsonl / images); give a new "
                        f"{flag}, or pass --overwrite to move them into {os.path.join(out_dir, 'previous-<time>')}/")
    return move_contents_aside(out_dir)


def is_stream(path: str) -> bool:
    """An existing path that is neither a regular file nor a directory (a terminal, a named pipe), or one of the
    standard streams by name (/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N): redirected to a file they
    are a regular file, which must still be written in place. Other files under /dev (/dev/shm) are files."""
    special = os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)
    here = os.path.abspath(path)
    return special or here in ("/dev/stdout", "/dev/stderr") or re.fullmatch(r"/(dev|proc/self)/fd/\d+", here) is not None


def prepare_output_file(path: str, overwrite: bool, flag: str = "--out",
                        example: str = "analysis.jsonl") -> Optional[str]:
    """Refuse an existing, non-empty file ``path`` unless ``overwrite``; with ``overwrite`` it is renamed to
    ``<stem>.previous-<time><ext>`` (returned). A directory is refused (``example``: the file name the message
    suggests instead). The folder ``path`` goes in is created when missing (a path in it that is a file is
    refused), so that a long run never fails only when it writes its output."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name such as "
                        f"{os.path.join(path, example)}")
    if is_stream(path):   # /dev/stdout, a named pipe: written in place, nothing to keep
        return None
    make_parent_dir(path, flag)
    if not os.path.exists(path) or os.path.getsize(path) == 0:   # an empty file (a failed run's) holds nothing
        return None
    if not overwrite:
        raise UserError(f"{flag} {path} already exists; give a new {flag}, or pass --overwrite to keep the old "
                        "file as <name>.previous-<time><ext> and write a new one")
    return move_file_aside(path)


def check_output_dir(path: str, flag: str = "--out") -> None:
    """``path`` can be (or already is) an output folder: neither it nor a folder above it is a file (it is
    created when written)."""
    blocker = nearest_folder(path)[1]
    if blocker == os.path.abspath(path):
        raise UserError(f"{flag} {path} is a file; give a folder")
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder; give another {flag}")


def make_parent_dir(path: str, flag: str = "--out") -> None:
    """Create the folder the output file ``path`` goes in (and its parents) when missing; a path on the way that
    is a file, or a folder that cannot be created, is a one-line error naming ``flag``."""
    parent = os.path.dirname(os.path.abspath(path))
    blocker = nearest_folder(parent)[1]
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder; give another {flag}")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder {parent} ({e.strerror}); give another "
                        f"{flag}") from None


# The CoT phase's flags (egrpo generate / analyze / eval) and their defaults: given without a CoT phase, refused.
COT_FLAG_DEFAULTS = {"cot_max_tokens": 1024, "cot_template": None, "cot_temperature": 1.0}


def check_cot_flags(args, cot: bool, needs: str) -> None:
    """CoT-only flags given without a CoT phase are refused (not silently ignored)."""
    given = [f"--{name.replace('_', '-')}" for name, default in COT_FLAG_DEFAULTS.items()
             if getattr(args, name, default) != default]
    if given and not cot:
        many = len(given) > 1
        raise UserError(f"{', '.join(given)} only appl{'y' if many else 'ies'} to the CoT phase, which is off; give "
                        f"{needs} or leave {'them' if many else 'it'} out")

