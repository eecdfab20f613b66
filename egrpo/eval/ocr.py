"""STAGE's OCR accuracy (Flow-GRPO's OCR test protocol) over a folder of generated images.

Per image: target = the text inside the FIRST pair of double quotes of the prompt; recognised = every text line
the OCR engine reads, joined; both lower-cased with all spaces removed; d = 0 when the target is a substring of
the recognised text, else the Levenshtein distance capped at len(target); accuracy = 1 - d / len(target). The
reported number is the mean over images.

Engine: RapidOCR (PP-OCR models run through ONNX, bundled with the ``rapidocr-onnxruntime`` wheel, via
`egrpo.rewards.ocr.rapidocr_engine`). The benchmark used PaddleOCR 2.9.1 (English, no angle classifier): the
recognition models are of the same family but not the same files, so numbers can differ slightly.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from egrpo.rewards.base import to_pil
from egrpo.rewards.ocr import edit_distance, normalise_text

from .io import EvalError, ResultStore, load_image, markdown_table, mean, score_items, write_summary
from .prefs import folder_items

FIRST_QUOTED = re.compile(r'"([^"]*)"')


def ocr_target(prompt: str) -> str:
    match = FIRST_QUOTED.search(prompt)
    if match is None or not normalise_text(match.group(1), True, True):
        raise EvalError(f"prompt has no text in double quotes to read: {prompt!r}")
    return match.group(1)


def ocr_accuracy(recognised: str, target: str) -> float:
    """1 - d / len(target) with the benchmark's substring rule and cap (module docstring)."""
    target = normalise_text(target, True, True)
    if not target:
        raise ValueError("ocr_accuracy: empty target")
    recognised = normalise_text(recognised, True, True)
    distance = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1.0 - distance / len(target)


def evaluate_ocr(images_root: str, out_dir: str, reader: Optional[Callable] = None, prompt: Optional[str] = None,
                 show_progress: bool = True) -> dict:
    """``reader(PIL image) -> text``; default RapidOCR. Resumable; writes results.jsonl + summary."""
    if reader is None:
        from egrpo.rewards.ocr import rapidocr_engine

        reader = rapidocr_engine()
    items = folder_items(images_root, prompt)
    store = ResultStore(out_dir)

    def score_one(item):
        target = ocr_target(item["prompt"])
        text = reader(to_pil(load_image(item["path"])[None])[0])
        return {"target": target, "recognised": text, "accuracy": ocr_accuracy(text, target)}

    score_items(items, store, score_one, "ocr", show_progress)
    keys = {item["key"] for item in items}
    records = [r for r in store.ok() if r["key"] in keys]
    failed = sum(r["key"] in keys for r in store.failures())
    summary = {"benchmark": "ocr", "accuracy": mean(r["accuracy"] for r in records), "scored": len(records),
               "failed": failed, "complete": failed == 0}
    table = markdown_table(["metric", "images", "failed", "mean"], [["ocr accuracy", len(records), failed,
                                                                    summary["accuracy"]]])
    summary["files"] = write_summary(out_dir, summary, table)
    summary["files"]["results"] = store.path
    return summary
