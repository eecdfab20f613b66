"""JPEG (in)compressibility reward (DDPO's): the JPEG size of the image in kilobytes, negated by default."""

from __future__ import annotations

import io

from egrpo.rewards.registry import register_reward

from .base import Reward, to_pil


def jpeg_kilobytes(image, quality: int = 95) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


@register_reward("jpeg_compressibility")
class JpegCompressibilityReward(Reward):
    """``-size_kB`` of the image saved as JPEG at ``quality`` (``incompressible=True`` gives ``+size_kB``).

    Needs no weights. Smooth, flat images score higher; use it to check the plumbing of a training run.
    """

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95, incompressible: bool = False, scale: float = 1.0, batch_size: int = 64,
                 on_failure: str = "error"):
        super().__init__(batch_size=batch_size, on_failure=on_failure)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = int(quality)
        self.sign = 1.0 if incompressible else -1.0
        self.scale = float(scale)

    def score(self, images, prompts, metadata):
        return [self.sign * self.scale * jpeg_kilobytes(im, self.quality) for im in to_pil(images)]
