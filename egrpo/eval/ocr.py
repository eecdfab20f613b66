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

from typing import Callable, Optional

from egrpo.rewards.base import to_pil
from egrpo.rewards.ocr import first_quoted_text, normalise_text, ocr_score

from .io import EvalError, ResultStore, load_image, markdown_table, mean, score_items, write_summary
from .prefs import folder_items


def ocr_target(prompt: str) -> str:
    target = first_quoted_text(prompt)
    if not normalise_text(target, True, True):
        raise EvalError(f"prompt has no text in double quotes to read: {prompt!r}")
    return target


def ocr_accuracy(recognised: str, target: str) -> float:
    """1 - d / len(target) with the benchmark's substring rule and cap (module docstring): the OCR reward's own
    rule at its defaults (`egrpo.rewards.ocr.ocr_score`), so training and evaluation score alike."""
    return ocr_score(recognised, target)


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
