"""Producing the images an evaluator reads: a generator callable and a resumable "fill these paths" loop.

An image generator is ``generate_images(prompts, images_per_prompt, seed) -> [len(prompts) * n, 3, H, W]`` in
[0, 1], prompt-major. The trainer passes its own (see `egrpo.eval.training`); ``egrpo eval --model`` builds one
with the project's generation function (`egrpo.tools.eval_cli`).
"""

from __future__ import annotations

import os
from typing import Callable, List, Sequence, Tuple

import torch

from .io import progress

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
