"""What every evaluator shares: reading images with clear errors, the resumable per-image results file, the
summary (JSON + markdown table) and the progress bar.

Per-image results live in ``<out>/results.jsonl``, one JSON object per scored image, appended and flushed as
soon as the image is scored, so an interrupted evaluation keeps everything it finished. Each record has a
``key`` (the image's path relative to the evaluated folder), ``status`` (``"ok"`` or ``"failed"``) and, when
failed, ``error``. A rerun skips every key whose latest record is ``"ok"`` for the same image file (size and
modification time, ``image_stamp``) and retries the failed ones and any image replaced since.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"


class EvalError(ValueError):
    """A user-facing evaluation error (bad folder, bad prompt file, bad option): printed as one line."""


def load_image(path: str) -> torch.Tensor:
    """``[3, H, W]`` float tensor in [0, 1]; a missing or unreadable file raises `EvalError` naming it."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise EvalError(f"missing image {path}")
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EvalError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


class ResultStore:
    """Append-only per-image results with resume: ``done(key)`` is true once an ``"ok"`` record was written."""

    def __init__(self, out_dir: str, filename: str = RESULTS_FILE):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, filename)
        self.records: Dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        # A line cut short by a crash mid-write: that image is simply scored again.
                        continue
                    if isinstance(record, dict) and "key" in record:
                        self.records[record["key"]] = record

    def done(self, key: str, stamp: Optional[list] = None) -> bool:
        """True once an ``"ok"`` record exists for ``key`` (and, when given, for the same image ``stamp``)."""
        record = self.records.get(key, {})
        return record.get("status") == "ok" and (stamp is None or record.get("image_stamp") == stamp)

    def add(self, record: dict) -> None:
        if "key" not in record or record.get("status") not in ("ok", "failed"):
            raise ValueError(f"a result record needs 'key' and status 'ok'/'failed': {record!r}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        self.records[record["key"]] = record

    def failed(self, key: str, error: BaseException, **fields) -> None:
        self.add({"key": key, "status": "failed", "error": f"{type(error).__name__}: {error}", **fields})

    def ok(self) -> List[dict]:
        return [r for r in self.records.values() if r["status"] == "ok"]

    def failures(self) -> List[dict]:
        return [r for r in self.records.values() if r["status"] == "failed"]


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="img", disable=not enabled)


def mean(values: Sequence[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def score_items(items: Sequence[dict], store: ResultStore, score_one: Callable[[dict], dict], desc: str,
                show_progress: bool = True, stop_after_same_error: int = 8) -> None:
    """Score every item not already done: ``score_one(item) -> fields`` is stored as an ``"ok"`` record, an
    exception as a ``"failed"`` record (the loop goes on). ``KeyboardInterrupt`` stops it with what is done kept.

    When the first ``stop_after_same_error`` images tried all fail with the same message (wrong weights, a device
    out of memory, a judge that refuses every request), the loop stops with that message instead of recording the
    same failure for every image.

    Each item is a dict with at least ``key``; its other plain fields (prompt, metadata, ...) are copied into the
    record so that the results file is self-describing.
    """
    todo = [item for item in items if not store.done(item["key"], image_stamp(item.get("path")))]
    same_errors, last_error, succeeded = 0, None, False
    for item in progress(todo, desc, enabled=show_progress):
        context = {k: v for k, v in item.items() if k != "key" and not k.startswith("_")}
        stamp = image_stamp(item.get("path"))
        if stamp is not None:
            context["image_stamp"] = stamp
        try:
            fields = score_one(item)
        except Exception as e:   # recorded per image: one bad image must not stop (or lose) the others
            store.failed(item["key"], e, **context)
            message = f"{type(e).__name__}: {e}"
            same_errors = same_errors + 1 if message == last_error else 1
            last_error = message
            if not succeeded and same_errors >= stop_after_same_error:
                raise EvalError(f"the first {same_errors} images all failed with {message} (recorded in "
                                f"{store.path}); fix the cause and rerun to resume") from None
            continue
        succeeded = True
        store.add({"key": item["key"], "status": "ok", **context, **fields})


def image_stamp(path: Optional[str]) -> Optional[list]:
    """``[size, mtime_ns]`` of an image file (None if absent): a replaced image is scored again on resume."""
    if not path or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def write_summary(out_dir: str, summary: dict, table: str) -> Dict[str, str]:
    """``summary.json`` + ``summary.md`` in ``out_dir``; returns their paths."""
    paths = {"json": os.path.join(out_dir, SUMMARY_FILE), "markdown": os.path.join(out_dir, TABLE_FILE)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(table.rstrip() + "\n")
    return paths


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def list_images(folder: str, extensions=(".png",)) -> List[str]:
    """Sorted image file names in ``folder``; `EvalError` when the folder is missing or holds none."""
    if not os.path.isdir(folder):
        raise EvalError(f"image folder {folder} does not exist")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(tuple(extensions)))
    if not names:
        raise EvalError(f"image folder {folder} holds no {'/'.join(extensions)} images")
    return names


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_folder(folder: str, prompt: Optional[str] = None) -> List[Tuple[str, str, dict]]:
    """``(file, prompt, metadata)`` per image: from ``generations.jsonl`` when the folder has one (as written by
    `generate`), else ``prompt`` for all, else the file name with ``_`` read as spaces."""
    index = os.path.join(folder, "generations.jsonl")
    if prompt is None and os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [(r["file"], r["prompt"], r.get("metadata") or {}) for r in rows]
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [(f, prompt if prompt is not None else os.path.splitext(f)[0].replace("_", " "), {}) for f in files]
