"""OCR reward: ``max(1 - edit_distance(recognised, target) / len(target), 0)``.

The target is the text between quotes in the prompt (``A sign that says "OPEN 24h"`` -> ``OPEN 24h``; several
quoted parts are joined with a space) or ``metadata["text"]``. Recognition uses RapidOCR
(``pip install rapidocr-onnxruntime``: PP-OCR ONNX models ship inside the wheel, nothing is downloaded).
By default both strings are lower-cased and spaces are removed before comparing (as the Flow-GRPO OCR
reward does); ``N_ref`` is the length of the normalised target. A prompt without quoted text scores
``missing_text`` (0 by default).
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional

import numpy as np

from egrpo.rewards.registry import register_reward

from .base import Reward, require, to_pil

QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’')


def quoted_text(prompt: str) -> str:
    """The characters between double (or curly) quotes in ``prompt``; several parts joined by one space."""
    parts = ["".join(groups) for groups in QUOTED.findall(prompt)]
    return " ".join(p for p in parts if p)


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


def ocr_score(recognised: str, target: str, ignore_case: bool = True, ignore_spaces: bool = True) -> float:
    target = normalise_text(target, ignore_case, ignore_spaces)
    if not target:
        raise ValueError("ocr_score: empty target text")
    recognised = normalise_text(recognised, ignore_case, ignore_spaces)
    return max(1.0 - edit_distance(recognised, target) / len(target), 0.0)


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

    def __init__(self, engine: str = "rapidocr", ignore_case: bool = True, ignore_spaces: bool = True,
                 missing_text: float = 0.0, min_confidence: float = 0.0, upscale_to: Optional[int] = 512,
                 batch_size: int = 16, on_failure: str = "error", reader: Optional[Callable] = None):
        super().__init__(batch_size=batch_size, on_failure=on_failure)
        if reader is not None:
            self.read = reader
        elif engine == "rapidocr":
            self.read = rapidocr_engine(min_confidence=min_confidence)
        else:
            raise ValueError(f"ocr: unknown engine {engine!r} (supported: 'rapidocr', or pass reader=callable)")
        self.ignore_case, self.ignore_spaces = bool(ignore_case), bool(ignore_spaces)
        self.missing_text = float(missing_text)
        self.upscale_to = upscale_to
        self.last_texts: List[str] = []

    def score(self, images, prompts, metadata):
        from PIL import Image

        scores = []
        for image, prompt, meta in zip(to_pil(images), prompts, metadata):
            target = meta.get("text") or quoted_text(prompt)
            if not normalise_text(target, self.ignore_case, self.ignore_spaces):
                scores.append(self.missing_text)
                continue
            # Detection models are tuned for images of a few hundred pixels; tiny images are read better upscaled.
            if self.upscale_to and max(image.size) < self.upscale_to:
                factor = self.upscale_to / max(image.size)
                image = image.resize((round(image.width * factor), round(image.height * factor)), Image.BICUBIC)
            text = self.read(image)
            self.last_texts.append(text)
            scores.append(ocr_score(text, target, self.ignore_case, self.ignore_spaces))
        self.last_texts = self.last_texts[-len(prompts):]
        return scores
