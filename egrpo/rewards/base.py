"""Shared machinery of the reward adapters: batching, device placement, offloading, the failure policy.

Every adapter is a callable ``reward(images [B, 3, H, W] in [0, 1], prompts, metadata) -> FloatTensor [B]``
(the interface of `egrpo.rewards.registry`). Adapters around a neural reward model derive from `ModelReward`:

* weights come from a LOCAL path only (``local_files_only=True``; a missing path is a `FileNotFoundError`
  before anything tries the network);
* the model is loaded once, put in eval mode, frozen, and run under ``torch.no_grad`` in chunks of
  ``batch_size`` images on ``device``;
* ``offload()`` moves it to the CPU between steps, ``to(device)`` brings it back; with
  ``offload_between_calls=True`` the adapter does this itself around every call;
* ``on_failure="error"`` (default) raises when scoring a chunk fails or yields NaN/inf; ``"mask"`` returns NaN
  for those samples instead, so that the caller can mask them (see `mask_failed_rewards`), and counts them
  in ``metrics()``.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FAILURE_POLICIES = ("error", "mask")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MissingDependencyError(ImportError):
    """An optional package an adapter needs is not installed."""


def require(module: str, package: Optional[str] = None, reward: str = "this reward"):
    """Import ``module`` or raise `MissingDependencyError` naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = package or module
        raise MissingDependencyError(
            f"{reward} needs the package {package!r} ({e}); install it with `pip install {package}` "
            f"or `pip install -e \".[rewards]\"`"
        ) from None


def local_path(path, what: str) -> str:
    """``path`` as a string, checked to exist on disk: reward weights are never downloaded at run time."""
    if path is None or str(path) == "":
        raise ValueError(f"{what}: a local path to the weights is required (nothing is downloaded at run time)")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path!r} does not exist (weights must be downloaded beforehand)")
    return path


def load_image_processor(path: str, reward: str):
    """``AutoImageProcessor`` from a local directory, also where torchvision is missing: some transformers 5.x
    releases (5.17, for one) gate the Auto class on torchvision, while the concrete class named in the saved
    config still falls back to its PIL implementation."""
    transformers = require("transformers", reward=reward)
    try:
        return transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except ImportError as auto_error:
        config, _ = transformers.ImageProcessingMixin.get_image_processor_dict(path, local_files_only=True)
        name = str(config.get("image_processor_type") or "")
        cls = getattr(transformers, name.removesuffix("Fast"), None) if name else None
        if cls is None:
            raise ImportError(f"{reward}: cannot load the image processor in {path} ({name or 'no image_processor_type'})"
                              f" without torchvision: {auto_error}") from auto_error
        return cls.from_pretrained(path, local_files_only=True)


def check_policy(on_failure: str) -> str:
    if on_failure not in FAILURE_POLICIES:
        raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
    return on_failure


def check_images(images, prompts: Sequence[str], metadata: Optional[Sequence[dict]]) -> List[dict]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, H, W] tensor in [0, 1], got {getattr(images, 'shape', type(images))}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor in [0, 1], got {images.dtype}")
    metadata = [dict(m or {}) for m in metadata] if metadata is not None else [{} for _ in range(images.shape[0])]
    if len(prompts) != images.shape[0] or len(metadata) != images.shape[0]:
        raise ValueError(f"images ({images.shape[0]}), prompts ({len(prompts)}) and metadata ({len(metadata)}) "
                         "must have one entry per image")
    return metadata


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``uint8(clamp(x, 0, 1) * 255)``, truncated as released (see `to_pil`); same shape and device."""
    return (images.detach().float().clamp(0, 1) * 255).to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in [0, 1] -> list of RGB ``PIL.Image``: ``uint8(clamp(x, 0, 1) * 255)``, TRUNCATED.

    Truncation, not rounding, is the released behaviour: the released code turns the VQ decoder output ``x`` into
    pixels with ``np.clip((x + 1) / 2 * 255, 0, 255)`` converted to uint8 by truncation (``astype(np.uint8)``),
    and its saved images and rewards see those pixels; `egrpo.rollout.vq.decode_images` gives ``(x + 1) / 2``
    clamped, so this yields the same pixels. ``v / 255 * 255`` is exact in float32 for every uint8 ``v``, so an
    image read back from PNG (`egrpo.eval.io.load_image`) converts to the same pixels again.
    """
    from PIL import Image

    arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]


class Reward:
    """Base of every adapter: input checks, chunking, the failure policy and per-reward metrics.

    Subclasses implement ``score(images, prompts, metadata) -> sequence of B floats`` for one chunk.
    """

    name = "reward"
    # Constructor arguments that name local weight files or folders (`missing_weights` checks them up front).
    weight_arguments: Tuple[str, ...] = ()

    def __init__(self, batch_size: int = 8, on_failure: str = "error"):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.on_failure = check_policy(on_failure)
        self._failed = 0
        self._scored = 0

    def score(self, images: torch.Tensor, prompts: List[str], metadata: List[dict]):
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None):
        metadata = check_images(images, prompts, metadata)
        prompts = list(prompts)
        out = torch.empty(images.shape[0], dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                stop = min(start + self.batch_size, images.shape[0])
                out[start:stop] = self._score_chunk(images[start:stop], prompts[start:stop], metadata[start:stop], start)
        self._scored += images.shape[0]
        return out.to(images.device)

    def _score_chunk(self, images, prompts, metadata, offset) -> torch.Tensor:
        try:
            values = torch.as_tensor(self.score(images, prompts, metadata), dtype=torch.float32).reshape(-1).cpu()
            if values.shape[0] != images.shape[0]:
                raise ValueError(f"scored {values.shape[0]} values for {images.shape[0]} images")
        except Exception as e:
            if self.on_failure == "error":
                raise RuntimeError(f"reward {self.name!r} failed on samples {offset}..{offset + images.shape[0] - 1}: "
                                   f"{type(e).__name__}: {e}") from e
            self._failed += images.shape[0]
            return torch.full((images.shape[0],), float("nan"))
        bad = ~torch.isfinite(values)
        if bad.any():
            if self.on_failure == "error":
                rows = (bad.nonzero().flatten() + offset).tolist()
                raise RuntimeError(f"reward {self.name!r} gave non-finite values for samples {rows}: {values.tolist()} "
                                   "(set on_failure='mask' to mask such samples instead)")
            self._failed += int(bad.sum())
            values = values.masked_fill(bad, float("nan"))
        return values

    def metrics(self, reset: bool = True) -> Dict[str, float]:
        """Counters since the last reset: ``masked`` samples (failures or non-finite scores) and ``scored``."""
        out = {"masked": float(self._failed), "scored": float(self._scored)}
        if reset:
            self._failed = self._scored = 0
        return out


class ModelReward(Reward):
    """A `Reward` around torch modules loaded once from a local path (see the module docstring)."""

    def __init__(self, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8, on_failure: str = "error",
                 offload_between_calls: bool = False):
        super().__init__(batch_size=batch_size, on_failure=on_failure)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.offload_between_calls = bool(offload_between_calls)

    def modules(self) -> List[torch.nn.Module]:
        """The torch modules of this reward (moved by ``to`` / ``offload``)."""
        return [self.model]

    def _prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(device=self.device, dtype=self.dtype)
        module.eval()
        module.requires_grad_(False)
        return module

    def to(self, device) -> "ModelReward":
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    def offload(self) -> "ModelReward":
        """Move the weights to the CPU (``to(device)`` brings them back); frees accelerator memory between steps."""
        for module in self.modules():
            module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self

    def __call__(self, images, prompts, metadata=None):
        if self.offload_between_calls:
            self.to(self.device)
        try:
            return super().__call__(images, prompts, metadata)
        finally:
            if self.offload_between_calls:
                self.offload()


def mask_failed_rewards(rewards: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace NaN rewards (masked samples) by the mean of the finite rewards of the same group and function.

    ``rewards`` ``[B, R]`` or ``[B]``, groups of ``group_size`` consecutive rows. A filled sample then gets no
    advantage from that function (its value is the group mean). Returns ``(filled, valid [B] bool)``, valid =
    no function was masked for that row. A group in which every sample is masked for some function raises:
    there is nothing to learn from and silently zero-filling would hide a broken reward.
    """
    squeeze = rewards.dim() == 1
    r = rewards[:, None] if squeeze else rewards
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
    grouped = r.reshape(-1, group_size, r.shape[1]).float()
    finite = torch.isfinite(grouped)
    counts = finite.sum(1, keepdim=True)
    if (counts == 0).any():
        groups = sorted(set((counts == 0).any(-1).flatten().nonzero().flatten().tolist()))
        raise RuntimeError(f"every sample of group(s) {groups} has a failed reward; cannot mask a whole group")
    means = torch.where(finite, grouped, torch.zeros_like(grouped)).sum(1, keepdim=True) / counts
    filled = torch.where(finite, grouped, means.expand_as(grouped)).reshape(r.shape).to(rewards.dtype)
    valid = finite.all(-1).reshape(-1)
    return (filled[:, 0] if squeeze else filled), valid


def as_float(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else float("nan")
