"""Producing the images an evaluator reads: a generator callable and a resumable "fill these paths" loop.

An image generator is ``generate_images(prompts, images_per_prompt, seed) -> [len(prompts) * n, 3, H, W]`` in
[0, 1], prompt-major. The trainer passes its own (see `egrpo.eval.training`); ``egrpo eval --model`` builds one
with the project's generation function (`egrpo.tools.eval_cli`).
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .io import EvalError, progress

# Written into an image folder by ``egrpo eval --model``: the settings its images were generated with.
SETTINGS_FILE = "generation_settings.json"

ImageGenerator = Callable[[Sequence[str], int, int], torch.Tensor]


def save_png(image: torch.Tensor, path: str) -> None:
    """Write ``[3, H, W]`` in [0, 1] as PNG atomically (a crash never leaves a half-written image behind)."""
    from egrpo.rewards.base import to_pil

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".partial.png"
    to_pil(image[None])[0].save(partial)
    os.replace(partial, path)


def generate_missing(jobs: Sequence[Tuple[str, List[str]]], generator: ImageGenerator, seed: int = 0,
                     show_progress: bool = True) -> int:
    """For each ``(prompt, output paths)`` job whose paths are not all present, generate ``len(paths)`` images
    (seed ``seed + job index``, so a resumed run draws the same images) and write them. Returns images written."""
    written = 0
    for index, (prompt, paths) in enumerate(progress(jobs, "generate", enabled=show_progress)):
        if all(os.path.exists(p) for p in paths):
            continue
        images = generator([prompt], len(paths), seed + index)
        if images.shape[0] != len(paths):
            raise RuntimeError(f"image generator returned {images.shape[0]} images for {len(paths)} requested")
        for image, path in zip(images, paths):
            save_png(image, path)
            written += 1
    return written


def prompts_digest(jobs: Sequence[Tuple[str, List[str]]]) -> str:
    """A short hash of the jobs' prompts, in order (which prompt each image shows)."""
    import hashlib

    text = json.dumps([prompt for prompt, _ in jobs])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _show(value) -> str:
    return "(none)" if value is None else json.dumps(value)


def check_generation_settings(folder: str, settings: dict, jobs: Sequence[Tuple[str, List[str]]],
                              flag: str = "--images", what_to_do: Optional[str] = None) -> None:
    """Refuse to add images to ``folder`` (by `generate_missing`, which keeps the images already there) when
    they would not all come from the same ``settings``: `EvalError` when the folder's `SETTINGS_FILE` records
    other settings (the message names each), or when the folder is not empty (some job's image already exists,
    or any other file) without such a record.

    ``settings``: plain JSON values (model path, seed, sampling options, ``prompts``: `prompts_digest`, ...).
    ``what_to_do``: the advice ending each message (default: the evaluation commands')."""
    path = os.path.join(folder, SETTINGS_FILE)
    what_to_do = what_to_do or (f"use a new {flag} folder (or delete {folder}) to generate with these settings, or "
                                "leave out --model/--tiny to score the images as they are")
    if not os.path.exists(path):
        if any(os.path.exists(p) for _, paths in jobs for p in paths):
            raise EvalError(f"{flag} {folder} already holds images but no {SETTINGS_FILE} saying how they were "
                            f"generated, so they cannot be resumed safely; {what_to_do}")
        entries = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if entries:   # (a training run's samples/, a folder of other files: new images would mix with them)
            raise EvalError(f"{flag} {folder} is not empty (e.g. {entries[0]}) and has no {SETTINGS_FILE} saying how "
                            f"its content was generated, so no images are generated into it; {what_to_do}")
        return
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise EvalError(f"{path} is not readable ({type(e).__name__}: {e}); {what_to_do}") from None
    settings = json.loads(json.dumps(settings))          # tuples -> lists, as read back from the file
    if isinstance(recorded.get("tiny"), str):   # recorded as typed before --tiny was compared as JSON
        recorded["tiny"] = canonical_tiny(recorded["tiny"])
    changed = []
    for key in sorted(set(recorded) | set(settings)):
        if recorded.get(key) != settings.get(key):
            if key == "prompts":
                changed.append("prompts (a different --prompts list)")
            else:
                changed.append(f"{key} ({_show(recorded.get(key))} -> {_show(settings.get(key))})")
    if changed:
        raise EvalError(f"{flag} {folder} holds images generated with other settings: {'; '.join(changed)}; "
                        f"{what_to_do}")


def canonical_tiny(tiny):
    """``--tiny`` JSON as recorded in generation settings: parsed and re-serialised with sorted keys, so that
    ``{ }`` and ``{}`` (or keys in another order) are the same setting. Text that is not JSON stays as given (it
    is refused where the model is built)."""
    if tiny is None:
        return None
    try:
        return json.dumps(json.loads(tiny), sort_keys=True)
    except ValueError:
        return tiny


def write_generation_settings(folder: str, settings: dict) -> str:
    """Record ``settings`` in ``folder/SETTINGS_FILE`` (atomically); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SETTINGS_FILE)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".partial", path)
    return path
