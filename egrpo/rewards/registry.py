"""Reward functions: a small interface, a registry, the built-in colour reward (no weights), and `RewardSet`.

A reward is any callable

    reward(images, prompts, metadata) -> FloatTensor [B]

with ``images`` a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` (decoded samples), ``prompts`` the ``B`` prompt
strings (one per image) and ``metadata`` one dict per image (the extra fields of the prompt's data record,
e.g. ``nouns`` or ``task_type`` for the published reward models). Rewards are registered by name with
``@register_reward("name")`` on a class whose constructor takes the config's extra keys; a config may also
name ``"package.module:Class"`` to use a class from anywhere, the working directory included. Adapters to
real reward models (HPS, GIT, GroundingDINO, ORM, GenEval, OCR) register themselves when the package
`egrpo.rewards` is imported. This module imports nothing of the trainer: the trainer builds on it.

Failure options (per reward, see docs/training.md): ``retries`` calls a raising reward again up to that many
times; ``on_error="skip_group"`` then scores the batch group by group and skips the groups that still fail
(their rewards are set equal, so they carry no advantage; `RewardSet.skipped` counts them); the default
``on_error="stop"`` raises `egrpo.errors.RewardError`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from egrpo.errors import RewardError

ON_ERROR = ("stop", "skip_group")

REWARDS: Dict[str, Callable] = {}


def register_reward(name: str):
    """Class decorator: make ``name`` usable in a config's ``rewards`` list."""

    def wrap(cls):
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward {name!r} is already registered by {REWARDS[name]!r}")
        REWARDS[name] = cls
        return cls

    return wrap


def load_adapters() -> None:
    """Import the reward-model adapters (``egrpo.rewards``) so they register themselves."""
    importlib.import_module("egrpo.rewards")


def resolve_reward(name: str) -> Callable:
    if name not in REWARDS:
        load_adapters()
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        # `egrpo` is a console script, so the working directory is not on sys.path as it is for `python -m`;
        # appended (not prepended) so that a local file never shadows an installed package.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module!r} ({e})") from None
    raise ValueError(f"unknown reward {name!r} (registered: {sorted(REWARDS)}; or give 'package.module:Class')")


def check_images(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if len(prompts) != images.shape[0] or len(metadata) != images.shape[0]:
        raise ValueError(f"images ({images.shape[0]}), prompts ({len(prompts)}) and metadata ({len(metadata)}) "
                         "must have one entry per image")


# ---------------------------------------------------------------------- colour reward
COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "purple": (0.5, 0.0, 0.5),
    "orange": (1.0, 0.5, 0.0),
    "pink": (1.0, 0.6, 0.8),
    "brown": (0.55, 0.3, 0.1),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}


def colours_in(prompt: str, palette: Dict[str, Tuple[float, float, float]] = COLOURS) -> List[str]:
    """Colour names of ``palette`` found as whole words in ``prompt`` (case-insensitive), in order."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return [w for w in dict.fromkeys(words) if w in palette]


@register_reward("colour")
class ColourReward:
    """Fraction of pixels near a colour the prompt names (``"a red apple"`` -> red).

    A pixel's nearness to a colour is ``clamp(1 - ||pixel - colour||_2 / tolerance, 0, 1)`` in RGB ([0, 1] per
    channel), or its hard version ``||pixel - colour||_2 <= tolerance`` with ``soft=False``; with several
    colours named, the nearest counts. The reward is the mean nearness over pixels, in ``[0, 1]``; prompts that
    name no known colour score 0. ``metadata[i]["colours"]`` (a list of names) overrides parsing the prompt.
    The soft version gives a signal even when few pixels are within the tolerance, which a random model needs.
    """

    def __init__(self, tolerance: float = 0.5, soft: bool = True, palette: Optional[Dict[str, Sequence[float]]] = None):
        if tolerance <= 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}")
        self.tolerance = float(tolerance)
        self.soft = bool(soft)
        self.palette = {k: tuple(float(c) for c in v) for k, v in (palette or COLOURS).items()}
        for name, rgb in self.palette.items():
            if len(rgb) != 3:
                raise ValueError(f"palette[{name!r}] must be an RGB triple, got {rgb}")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        check_images(images, prompts, metadata)
        pixels = images.detach().float().clamp(0, 1).flatten(2).transpose(1, 2)   # [B, HW, 3]
        out = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            names = meta.get("colours") if meta else None
            names = list(names) if names else colours_in(prompt, self.palette)
            unknown = [n for n in names if n not in self.palette]
            if unknown:
                raise ValueError(f"metadata[{i}]['colours'] names unknown colours {unknown}")
            if not names:
                continue
            targets = torch.tensor([self.palette[n] for n in names], dtype=torch.float32, device=images.device)
            dist = torch.cdist(pixels[i], targets).min(dim=-1).values                # [HW]
            if self.soft:
                near = (1.0 - dist / self.tolerance).clamp(0.0, 1.0)
            else:
                near = (dist <= self.tolerance).float()
            out[i] = near.mean()
        return out


# ---------------------------------------------------------------------- combination
class RewardSet:
    """Several reward functions with weights. ``__call__`` returns the per-function rewards ``[B, R]``;
    ``combine`` gives the weighted sum ``[B]`` (what the objectives use when given ``[B, R]`` and the weights).

    ``retries[k]`` / ``on_error[k]`` are function ``k``'s failure options (module docstring). After a call,
    ``last_skipped`` ``[B]`` marks the rows of skipped groups and ``skipped`` counts skipped groups so far."""

    def __init__(self, functions: Sequence[Callable], names: Sequence[str], weights: Sequence[float],
                 retries: Optional[Sequence[int]] = None, on_error: Optional[Sequence[str]] = None):
        if not (len(functions) == len(names) == len(weights)) or not functions:
            raise ValueError("RewardSet needs one name and weight per reward function, and at least one function")
        self.functions = list(functions)
        self.names = list(names)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.retries = [int(r) for r in retries] if retries is not None else [0] * len(self.functions)
        self.on_error = list(on_error) if on_error is not None else ["stop"] * len(self.functions)
        for k, policy in enumerate(self.on_error):
            if policy not in ON_ERROR:
                raise ValueError(f"rewards[{k}].on_error must be one of {ON_ERROR}, got {policy!r}")
        self.skipped = 0
        self.failures: List[str] = []      # one line per skipped group since the last `pop_failures`
        self.last_skipped: Optional[torch.Tensor] = None

    def _score(self, k: int, images, prompts, metadata, group_size: Optional[int] = None) -> torch.Tensor:
        """Function ``k`` on one batch, retried; raises the last error after ``1 + retries[k]`` attempts. With
        ``group_size``, an ``on_failure: mask`` function that masked every sample of a group counts as failing:
        a whole group cannot be filled with its own mean, so the failure options decide (retry, skip, stop)."""
        fn = self.functions[k]
        error: Optional[Exception] = None
        for _ in range(1 + self.retries[k]):
            try:
                r = fn(images, list(prompts), list(metadata))
                r = torch.as_tensor(r, dtype=torch.float32).to(images.device).reshape(-1)
                if r.shape[0] != images.shape[0]:
                    raise ValueError(f"returned {r.shape[0]} values for {images.shape[0]} images")
                if not torch.isfinite(r).all() and getattr(fn, "on_failure", "error") != "mask":
                    raise ValueError(f"returned non-finite values {r.tolist()} (an adapter's on_failure: mask "
                                     "masks such samples instead)")
                if group_size and r.shape[0] % group_size == 0:
                    whole = (~torch.isfinite(r)).reshape(-1, group_size).all(1)
                    if whole.any():
                        which = ("the group" if r.shape[0] == group_size   # scored group by group (skip_group)
                                 else f"group(s) {whole.nonzero().flatten().tolist()}")
                        raise ValueError(f"could not score any sample of {which} (on_failure: mask fills a failed "
                                         "sample with its group's mean, which needs one scored sample)")
                return r
            except Exception as e:   # any failure of user code counts; the policy decides what happens
                error = e
        raise error

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict],
                 group_size: Optional[int] = None) -> torch.Tensor:
        check_images(images, prompts, metadata)
        B = images.shape[0]
        skipped = torch.zeros(B, dtype=torch.bool)
        columns = []
        for k, name in enumerate(self.names):
            try:
                columns.append(self._score(k, images, prompts, metadata, group_size))
                continue
            except Exception as e:
                if self.on_error[k] != "skip_group" or not group_size:
                    raise RewardError(
                        f"reward {name!r} failed after {1 + self.retries[k]} attempt(s): {type(e).__name__}: {e} "
                        f"(options: rewards[{k}].retries: N, rewards[{k}].on_error: skip_group)") from e
            column = torch.zeros(B, dtype=torch.float32, device=images.device)
            for start in range(0, B, group_size):   # group by group: skip only the groups that still fail
                rows = slice(start, start + group_size)
                try:
                    column[rows] = self._score(k, images[rows], prompts[rows], metadata[rows], group_size)
                except Exception as e:
                    skipped[rows] = True
                    self.failures.append(f"reward {name!r} failed on group {start // group_size}: "
                                         f"{type(e).__name__}: {e}")
            columns.append(column)
        out = torch.stack(columns, dim=1)
        if skipped.any():
            if skipped.all():
                raise RewardError(f"every group of the batch failed a reward ({self.failures[-1]}); nothing to "
                                  "train on")
            out[skipped.to(out.device)] = 0.0   # equal rewards within the group: zero advantage, no signal
            self.skipped += int(skipped.sum()) // group_size
        self.last_skipped = skipped
        return out

    def pop_failures(self) -> List[str]:
        out, self.failures = self.failures, []
        return out

    def combine(self, per_function: torch.Tensor) -> torch.Tensor:
        return per_function @ self.weights.to(per_function.device)


def build_rewards(configs) -> RewardSet:
    """From ``RewardConfig``s (or dicts ``{name, weight, **kwargs}``) to a ``RewardSet``."""
    functions, names, weights, retries, on_error = [], [], [], [], []
    for i, rc in enumerate(configs):
        if isinstance(rc, dict):
            rc = dict(rc)
            name, weight = rc.pop("name"), rc.pop("weight", 1.0)
            retries.append(rc.pop("retries", 0))
            on_error.append(rc.pop("on_error", "stop"))
            kwargs = rc
        else:
            name, weight, kwargs = rc.name, rc.weight, rc.kwargs
            retries.append(getattr(rc, "retries", 0))
            on_error.append(getattr(rc, "on_error", "stop"))
        cls = resolve_reward(name)
        check_reward_arguments(cls, kwargs, f"rewards[{i}] ({name!r})")
        try:
            functions.append(cls(**kwargs))
        except (TypeError, ValueError) as e:   # a value of the wrong type no annotation declared, or out of range
            raise ValueError(f"rewards[{i}] ({name!r}): {e}") from e
        label = name.rsplit(":", 1)[-1]
        if label in names:
            label = f"{label}_{i}"
        names.append(label)
        weights.append(weight)
    return RewardSet(functions, names, weights, retries=retries, on_error=on_error)


def check_reward_arguments(cls: Callable, kwargs: Dict, where: str) -> None:
    """Raise ValueError naming ``where`` when ``kwargs`` do not fit ``cls``'s constructor (a misspelled
    argument, a missing required one), without building it (no weights are loaded)."""
    import inspect

    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):   # a builtin or C callable: nothing to check up front
        return
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        accepted = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        hint = getattr(cls, "arguments_hint", "")   # e.g. a reward whose arguments changed
        raise ValueError(f"{where}: bad arguments: {e} (accepted arguments: {', '.join(accepted) or 'none'})"
                         f"{'; ' + hint if hint else ''}") from None
    # A value of the wrong plain type (YAML reads `tolerance=abc` as a string) would otherwise fail deep in
    # the constructor or the first reward call; numbers may be given for floats, not bools or strings.
    expected = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    for name, value in kwargs.items():
        param = signature.parameters.get(name)
        kind = _plain_annotation(param.annotation) if param is not None else None
        if kind is None or value is None:
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, kind))
        if not ok:
            raise ValueError(f"{where}: {name} must be {expected[kind]}, got {value!r}")


def missing_weights(cls: Callable, kwargs: Dict, where: str) -> List[str]:
    """``"<where>.<argument>: <path>"`` for each of ``cls.weight_arguments`` given in ``kwargs`` whose path does not
    exist on this machine (nothing is loaded; `egrpo train --dry-run` reports them before a real run would
    load the policy first)."""
    missing = []
    for name in getattr(cls, "weight_arguments", ()):
        value = kwargs.get(name)
        if value not in (None, "") and not os.path.exists(os.path.expanduser(str(value))):
            missing.append(f"{where}.{name}: {value}")
    return missing


def _plain_annotation(annotation) -> Optional[type]:
    """``float``/``int``/``bool``/``str`` when ``annotation`` is that type (or ``Optional`` of it, or its name as
    a string under postponed evaluation); None otherwise."""
    import typing

    names = {"float": float, "int": int, "bool": bool, "str": str}
    if isinstance(annotation, str):
        annotation = names.get(annotation.replace("Optional[", "").rstrip("]").strip(), annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in names.values() else None


def reward_defaults(cls: Callable) -> Dict:
    """The constructor defaults of a reward class that are plain YAML values (for the effective config)."""
    import inspect

    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return {}
    plain = (bool, int, float, str, type(None))
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not p.empty and isinstance(p.default, plain)}
