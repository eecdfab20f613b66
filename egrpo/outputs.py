"""Keeping earlier outputs: atomic rewrites, timestamped names that never overwrite, and moving a folder's
contents aside.

Used by ``egrpo train --overwrite`` (a run moved into ``previous-<time>/``), by a resume that abandons newer
checkpoints, and by the tools' ``--overwrite`` (generate / analyze / score)."""

from __future__ import annotations

import errno
import os
import time
from typing import Iterable, Optional, Tuple


def stamped_path(stem: str, ext: str = "") -> str:
    """``<stem>-<YYYYmmdd-HHMMSS><ext>``, or with ``-1``, ``-2``, ... appended to the stamp when that exists."""
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base + ext, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}{ext}", n + 1
    return path


def move_contents_aside(folder: str, keep: Iterable[str] = ()) -> str:
    """Move everything in ``folder`` except earlier ``previous-*`` folders and the names in ``keep`` into a new
    ``folder/previous-<time>/``; returns it. Nothing is deleted."""
    keep = set(keep)
    dest = stamped_path(os.path.join(folder, "previous"))
    os.makedirs(dest)
    for name in os.listdir(folder):
        if not name.startswith("previous-") and name not in keep and name != os.path.basename(dest):
            os.replace(os.path.join(folder, name), os.path.join(dest, name))
    return dest


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old content or the new, never a
    partial file: written to ``<path>.tmp``, flushed to disk, then renamed over ``path``."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def nearest_folder(path: str) -> Tuple[str, Optional[str]]:
    """``(folder, blocker)``: the nearest existing folder at or above ``path``, and the path on the way there that
    exists but is not a folder (a file where a folder must be made; None when there is none)."""
    probe, blocker = os.path.abspath(path), None
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        if os.path.exists(probe):
            blocker = probe
        probe = os.path.dirname(probe)
    return probe, blocker


def cannot_create(path: str, error: OSError) -> str:
    """Why nothing could be made at ``path``, for a message: ``cannot create files in <its nearest existing
    folder> (<reason>)``. The reason is the error's text, except for "No such file or directory" from a folder
    that exists (/proc and other special file systems refuse new entries that way)."""
    where = nearest_folder(path)[0]
    reason = error.strerror or str(error)
    if error.errno == errno.ENOENT:
        reason = "the folder exists but takes no new entries"
    return f"cannot create files in {where} ({reason})"
