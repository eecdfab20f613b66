"""OCR reward: ``1 - d / len(target)``, Flow-GRPO's OCR reward rule (its ``flow_grpo/ocr.py``).

Per image: target = ``metadata["text"]`` if given, else the text inside the FIRST pair of double quotes of the
prompt (``A sign "OPEN" next to "CLOSED"`` -> ``OPEN``); recognised = every text line the OCR engine reads,
joined. Both are lower-cased and their spaces removed; d = 0 when the target is a substring of the recognised
text (``SALE`` read as ``SALE 50% OFF`` scores 1), else the Levenshtein distance capped at ``len(target)``
(so the score lies in [0, 1]). These defaults are the released rule; `egrpo.eval.ocr` (the OCR accuracy
benchmark) scores with the same `ocr_score`.

Options that depart from it (all off by default): ``quoted_target="all"`` joins every quoted span, straight or
curly quotes, with one space (this project's earlier rule); ``substring_match=False`` drops the substring rule;
``ignore_case`` / ``ignore_spaces`` ``False`` keep case / spaces. ``upscale_to`` (ours, default 512) upscales
smaller images before reading; the released reward reads images at their own size (``upscale_to: null``).
Recognition uses RapidOCR (``pip install rapidocr-onnxruntime``: PP-OCR ONNX models ship inside the wheel,
nothing is downloaded; the released code runs PaddleOCR). A prompt without quoted text scores ``missing_text``
(0 by default; the released code fails on such a prompt).
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional

import numpy as np

from egrpo.rewards.registry import register_reward

from .base import Reward, require, to_pil

FIRST_QUOTED = re.compile(r'"([^"]*)"')
QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’')
QUOTED_TARGETS = ("first", "all")


def first_quoted_text(prompt: str) -> str:
    """The characters inside the first pair of straight double quotes of ``prompt`` ('' if there is none)."""
    match = FIRST_QUOTED.search(prompt)
    return match.group(1) if match else ""


def quoted_text(prompt: str) -> str:
    """The characters between double (or curly) quotes in ``prompt``; several parts joined by one space.

    Not the released rule (that is `first_quoted_text`); used with ``quoted_target="all"``."""
    parts = ["".join(groups) for groups in QUOTED.findall(prompt)]
    return " ".join(p for p in parts if p)


def target_text(prompt: str, quoted_target: str = "first") -> str:
    if quoted_target == "first":
        return first_quoted_text(prompt)
    if quoted_target == "all":
        return quoted_text(prompt)
    raise ValueError(f"ocr: quoted_target must be one of {QUOTED_TARGETS}, got {quoted_target!r}")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def normalise_text(text: str, ignore_case: bool, ignore_spaces: bool) -> str:
    if ignore_case:
        text = text.lower()
    if ignore_spaces:
        text = re.sub(r"\s+", "", text)
    return text


def ocr_score(recognised: str, target: str, ignore_case: bool = True, ignore_spaces: bool = True,
              substring_match: bool = True) -> float:
    """``1 - d / len(target)`` after normalising both strings; d = 0 when ``substring_match`` and the target occurs
    in the recognised text, else the edit distance capped at ``len(target)`` (module docstring)."""
    target = normalise_text(target, ignore_case, ignore_spaces)
    if not target:
        raise ValueError("ocr_score: empty target text")
    recognised = normalise_text(recognised, ignore_case, ignore_spaces)
    if substring_match and target in recognised:
        return 1.0
    return 1.0 - min(edit_distance(recognised, target), len(target)) / len(target)


def rapidocr_engine(min_confidence: float = 0.0, **kwargs) -> Callable:
    """A function ``PIL image -> recognised text`` (boxes in reading order: top to bottom, left to right)."""
    module = require("rapidocr_onnxruntime", "rapidocr-onnxruntime", reward="the OCR reward")
    engine = module.RapidOCR(**kwargs)

    def read(image) -> str:
        result, _ = engine(np.asarray(image))
        if not result:
            return ""
        lines = [(box, text) for box, text, conf in result if float(conf) >= min_confidence]
        lines.sort(key=lambda bt: (round(min(p[1] for p in bt[0]) / 10), min(p[0] for p in bt[0])))
        return " ".join(text for _, text in lines)

    return read


@register_reward("ocr")
class OCRReward(Reward):
    name = "ocr"

    def __init__(self, engine: str = "rapidocr", quoted_target: str = "first", substring_match: bool = True,
                 ignore_case: bool = True, ignore_spaces: bool = True, missing_text: float = 0.0,
                 min_confidence: float = 0.0, upscale_to: Optional[int] = 512, batch_size: int = 16,
                 on_failure: str = "error", reader: Optional[Callable] = None):
        super().__init__(batch_size=batch_size, on_failure=on_failure)
        if quoted_target not in QUOTED_TARGETS:
            raise ValueError(f"ocr: quoted_target must be one of {QUOTED_TARGETS}, got {quoted_target!r}")
        if reader is not None:
            self.read = reader
        elif engine == "rapidocr":
            self.read = rapidocr_engine(min_confidence=min_confidence)
        else:
            raise ValueError(f"ocr: unknown engine {engine!r} (supported: 'rapidocr', or pass reader=callable)")
        self.quoted_target, self.substring_match = quoted_target, bool(substring_match)
        self.ignore_case, self.ignore_spaces = bool(ignore_case), bool(ignore_spaces)
        self.missing_text = float(missing_text)
        self.upscale_to = upscale_to
        self.last_texts: List[str] = []

    def score(self, images, prompts, metadata):
        from PIL import Image

        scores = []
        for image, prompt, meta in zip(to_pil(images), prompts, metadata):
            target = meta.get("text") or target_text(prompt, self.quoted_target)
            if not normalise_text(target, self.ignore_case, self.ignore_spaces):
                scores.append(self.missing_text)
                continue
            # Detection models are tuned for images of a few hundred pixels; tiny images are read better upscaled.
            if self.upscale_to and max(image.size) < self.upscale_to:
                factor = self.upscale_to / max(image.size)
                image = image.resize((round(image.width * factor), round(image.height * factor)), Image.BICUBIC)
            text = self.read(image)
            self.last_texts.append(text)
            scores.append(ocr_score(text, target, self.ignore_case, self.ignore_spaces, self.substring_match))
        self.last_texts = self.last_texts[-len(prompts):]
        return scores
