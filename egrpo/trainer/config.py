"""Training configuration: one dataclass per section, loaded from YAML with dotted command-line overrides.

A config file has the sections ``model``, ``rollout``, ``objective``, ``rewards``, ``data``, ``optim``,
``deepspeed``, ``train`` and ``eval`` (evaluation during training, `egrpo.eval.training.EvalConfig`); any section may be left out (its defaults apply). Overrides such as
``train.steps=20 optim.lr=1e-5 rewards.0.weight=2`` are applied to the parsed YAML before the dataclasses
are built, so they are type-checked and validated exactly like the file itself.

    cfg = load_config("configs/demo.yaml", ["train.steps=4"])
    cfg.validate(world_size=1)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from egrpo.errors import ConfigError  # noqa: F401  (re-exported: `from egrpo.trainer.config import ConfigError`)
from egrpo.eval.training import EvalConfig
from egrpo.objectives import OBJECTIVES, ObjectiveSettings, objective_class

from .model import ATTN_IMPLEMENTATIONS, TINY_DEFAULTS, ModelConfig
from .rollout import RolloutConfig


@dataclass
class ObjectiveConfig:
    """The ``objective`` section, ``{name: ..., <settings>}``: ``name`` picks the objective (``grpo``, ``eg_grpo``,
    ``stage``) and every other key is one of its typed settings (``egrpo.objectives``: ``GRPOSettings``,
    ``EGGRPOSettings``, ``STAGESettings``; each field documents its meaning, default and source, and
    docs/algorithms.md has the formulas). Unknown keys and out-of-range values are one-line errors."""

    name: str = "eg_grpo"
    settings: Optional[ObjectiveSettings] = None   # None = the objective's defaults
    given: Tuple[str, ...] = field(default=(), repr=False)   # the keys the config wrote (the rest are defaults)

    def __post_init__(self):
        try:
            cls = objective_class(self.name)
        except ValueError:
            raise ConfigError(f"objective.name={self.name!r} is unknown (known: {', '.join(sorted(OBJECTIVES))})") from None
        if self.settings is None:
            self.settings = cls.Settings()
        elif not isinstance(self.settings, cls.Settings):
            raise ConfigError(f"objective.settings must be {cls.Settings.__name__} for objective {self.name!r}, got "
                              f"{type(self.settings).__name__}")

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "objective") -> "ObjectiveConfig":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
        name = raw.get("name", cls.name)
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected a string, got {name!r}")
        try:
            settings_cls = objective_class(name).Settings
        except ValueError:
            raise ConfigError(f"{where}.name={name!r} is unknown (known: {', '.join(sorted(OBJECTIVES))})") from None
        hints = typing.get_type_hints(settings_cls)
        valid = [f.name for f in dataclasses.fields(settings_cls)]
        values: Dict[str, Any] = {}
        for key, value in raw.items():
            if key == "name":
                continue
            if key not in valid:
                raise ConfigError(f"unknown key {key!r} in section {where!r} for objective {name!r} "
                                  f"(valid keys: name, {', '.join(valid)})")
            values[key] = _coerce(value, hints[key], f"{where}.{key}")
        try:
            settings = settings_cls(**values)
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None
        return cls(name=name, settings=settings, given=tuple(values))

    @property
    def hparams(self) -> Dict[str, Any]:
        """The settings the config wrote, with their values (:meth:`effective` adds the defaults)."""
        return {k: getattr(self.settings, k) for k in self.given}

    def effective(self) -> Dict[str, Any]:
        """Every setting of the objective, defaults included."""
        return self.settings.to_dict()

    def to_dict(self) -> Dict[str, Any]:
        """The section as YAML writes it, with the EFFECTIVE settings: ``{name, <every setting>}``."""
        return {"name": self.name, **self.effective()}


@dataclass
class RewardConfig:
    """One reward function: ``name`` in the reward registry, its ``weight`` in the sum, its failure options,
    and any other keys passed to the reward's constructor. Overriding ``rewards.N.name`` from the command line
    starts that reward afresh (the old reward's constructor arguments are dropped; weight and failure options
    are kept)."""

    name: str = "colour"
    weight: float = 1.0
    retries: int = 0               # call a raising reward again up to N times (our choice: 0, fail fast)
    on_error: str = "stop"         # after the retries: "stop" the run, or "skip_group" (logged, counted)
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Prompts: an inline list (strings, or dicts with a ``prompt`` key plus metadata for the rewards) or a
    file (``.txt`` one prompt per line, ``.json`` list or JSON Lines, ``.jsonl`` one object per line), checked
    against ``schema`` by `egrpo.data` (docs/data-and-checkpoints.md)."""

    prompts: Optional[List[Any]] = None
    prompts_file: Optional[str] = None
    schema: str = "auto"           # prompt-record check: auto | t2i | geneval | ocr | plain (docs/data-and-checkpoints.md)
    prompts_per_step: int = 1      # prompts per optimizer step over all processes; each gets group_size samples
    shuffle: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"     # "constant" | "linear" | "cosine" (after warm-up, down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0         # 0 = no clipping
    grad_accum: int = 1            # micro-batches per optimizer step (per process)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0            # 0, 1, 2 or 3 (DeepSpeed ZeRO stage; 0 = plain data parallel; 1 untested here)
    bf16: Optional[bool] = None    # None = follow model.dtype
    extra: Dict[str, Any] = field(default_factory=dict)   # merged into the DeepSpeed JSON config as is


@dataclass
class TrainConfig:
    steps: int = 10                # rollouts; each is followed by updates_per_rollout optimizer steps
    updates_per_rollout: int = 1   # > 1: PPO-style reuse of a rollout, old_logp from the sampling policy
    seed: int = 0
    out_dir: str = "runs/run"
    save_every: int = 50           # checkpoint every N steps (0: only at the end, on SIGTERM/Ctrl-C and at exit)
    keep_last: int = 3             # step checkpoints kept (older ones deleted; 0: keep all); "best" is separate
    log_every: int = 1
    sample_every: int = 0          # write a sample image grid every K steps (0: never)
    device: str = "auto"           # "auto" | "cpu" | "cuda"
    head_impl: str = "fused"       # "fused" (chunked kernels) | "eager" (full logits, for comparison)
    export_hf: bool = True         # write safetensors of the trained model at the end (to <out_dir>/hf)
    export_format: str = "hf"      # "hf" (transformers layout) | "original" (Janus layout, as released checkpoints)
    tensorboard: bool = True
    progress: bool = True          # tqdm bar on rank 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rewards: List[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)   # evaluation during training; off by default

    # ------------------------------------------------------------------ checks
    def validate(self, world_size: int = 1) -> "Config":
        """Raise ConfigError with the offending key on any inconsistency; returns self."""
        m, r, d, o, ds, t = self.model, self.rollout, self.data, self.optim, self.deepspeed, self.train
        if isinstance(m.tiny, dict):   # a tiny model's token count is known before it is built (a path's is not)
            from .model import tiny_patch_grid

            tokens = tiny_patch_grid(m.tiny) ** 2
            if r.image_tokens != tokens:
                raise ConfigError(f"rollout.image_tokens={r.image_tokens} but the tiny model makes {tokens} "
                                  f"image tokens per image ((model.tiny.image_size / patch_size)^2); set "
                                  f"rollout.image_tokens={tokens}")
        if not m.path and m.tiny is None:
            raise ConfigError("model.path is required (a local directory in the transformers or original Janus "
                              "layout, or a hub id) "
                              "unless a model.tiny section builds a random model")
        if m.path and m.tiny is not None:
            raise ConfigError("model: give model.path or model.tiny, not both; to load model.path with a config "
                              "that has a model.tiny section (configs/demo.yaml), clear it with the override "
                              "model.tiny=null (or model.path=null to build the tiny model)")
        if model_path_missing(m.path):
            raise ConfigError(f"model.path {m.path!r} does not exist (give a local HF-format directory or a hub "
                              "id such as 'deepseek-ai/Janus-Pro-7B')")
        if m.tiny is not None:
            unknown = sorted(set(m.tiny) - set(TINY_DEFAULTS))
            if unknown:
                raise ConfigError(f"model.tiny: unknown key(s) {unknown} (known keys: {', '.join(sorted(TINY_DEFAULTS))})")
        if t.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
        from egrpo.data import SCHEMAS

        if d.schema not in SCHEMAS:
            raise ConfigError(f"data.schema must be one of {list(SCHEMAS)}, got {d.schema!r}")
        if t.export_format not in ("hf", "original"):
            raise ConfigError(f"train.export_format must be 'hf' or 'original', got {t.export_format!r}")
        if m.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"model.dtype must be 'bf16' or 'fp32', got {m.dtype!r}")
        try:
            r.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if r.samples_per_prompt < 2:
            name = "rollout.group_size x rollout.images_per_cot" if r.cot else "rollout.group_size"
            raise ConfigError(f"{name} must be >= 2 (advantages are normalised within a prompt's images), "
                              f"got {r.samples_per_prompt}")
        if d.prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step must be >= 1, got {d.prompts_per_step}")
        if d.prompts_per_step % world_size:
            raise ConfigError(f"data.prompts_per_step={d.prompts_per_step} is not divisible by the number of "
                              f"processes ({world_size})")
        if o.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
        if (d.prompts_per_step // world_size) % o.grad_accum:
            raise ConfigError(f"data.prompts_per_step / processes = {d.prompts_per_step // world_size} prompts per "
                              f"process is not divisible by optim.grad_accum={o.grad_accum}")
        if not d.prompts and not d.prompts_file:
            raise ConfigError("data: give either data.prompts (a list) or data.prompts_file")
        if d.prompts and d.prompts_file:
            raise ConfigError("data: give data.prompts or data.prompts_file, not both; to read data.prompts_file "
                              "with a config that lists data.prompts, clear the list with the override "
                              "data.prompts=null (or data.prompts_file=null to use the list)")
        if d.prompts_file and not os.path.exists(d.prompts_file):
            raise ConfigError(f"data.prompts_file {d.prompts_file!r} does not exist")
        if o.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        if o.schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"optim.schedule must be 'constant', 'linear' or 'cosine', got {o.schedule!r}")
        if o.warmup_steps < 0 or o.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")
        if len(o.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {o.betas}")
        if not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas must both be in [0, 1), got {list(o.betas)}")
        if o.eps <= 0 or o.weight_decay < 0:
            raise ConfigError(f"optim.eps must be > 0 and optim.weight_decay >= 0, got {o.eps} and {o.weight_decay}")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (a fraction of optim.lr), got {o.min_lr_ratio}")
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.bf16 is False and m.dtype == "bf16":
            raise ConfigError("deepspeed.bf16 is false but model.dtype is 'bf16': training bf16 weights needs "
                              "DeepSpeed's bf16 mode (fp32 master weights); set model.dtype=fp32 or deepspeed.bf16=true")
        if ds.bf16 and m.dtype == "fp32":
            raise ConfigError("deepspeed.bf16 is true but model.dtype is 'fp32'; set model.dtype=bf16")
        for name, minimum in (("steps", 1), ("updates_per_rollout", 1), ("save_every", 0), ("sample_every", 0),
                              ("keep_last", 0), ("log_every", 1)):
            if getattr(t, name) < minimum:
                raise ConfigError(f"train.{name} must be >= {minimum}, got {getattr(t, name)}")
        for name, value in (("train.seed", t.seed), ("model.seed", m.seed)):
            if not 0 <= value < 2**63:   # numpy's and torch's seeds are non-negative
                raise ConfigError(f"{name} must be a non-negative integer, got {value}")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be 'auto', 'cpu' or 'cuda', got {t.device!r}")
        if t.head_impl not in ("fused", "eager"):
            raise ConfigError(f"train.head_impl must be 'fused' or 'eager', got {t.head_impl!r}")
        from egrpo.kernels._common import check_environment
        try:  # the kernels' environment switches: checked here rather than at the first loss
            check_environment()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if m.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                              f"got {m.attn_implementation!r}")
        if m.liger:
            import importlib.util

            import torch

            if t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available()):
                raise ConfigError("model.liger=true needs a CUDA device (Liger-Kernel is GPU only); set "
                                  "model.liger=false on this machine")
            if importlib.util.find_spec("liger_kernel") is None:
                raise ConfigError("model.liger=true but liger-kernel is not installed; pip install liger-kernel "
                                  "or set model.liger=false")
        if not self.rewards:
            raise ConfigError("rewards: at least one reward function is required")
        from egrpo.rewards.registry import REWARDS, check_reward_arguments, load_adapters, resolve_reward

        load_adapters()

        for i, rc in enumerate(self.rewards):
            if rc.name not in REWARDS and ":" not in rc.name:
                raise ConfigError(f"rewards[{i}].name={rc.name!r} is not a registered reward (known: "
                                  f"{sorted(REWARDS)}; or give 'package.module:Class'); adapters to reward "
                                  "models register themselves when their module is imported")
            if rc.retries < 0:
                raise ConfigError(f"rewards[{i}].retries must be >= 0, got {rc.retries}")
            if rc.on_error not in ("stop", "skip_group"):
                raise ConfigError(f"rewards[{i}].on_error must be 'stop' or 'skip_group', got {rc.on_error!r}")
            try:
                check_reward_arguments(resolve_reward(rc.name), rc.kwargs, f"rewards[{i}] ({rc.name!r})")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        ObjectiveConfig(self.objective.name, self.objective.settings)   # name and settings agree
        self._validate_eval()
        return self

    def _validate_eval(self) -> None:
        """The ``eval`` section (docs/evaluation.md, "During training"): its own checks, then what needs the
        run's context (the prompt file exists; eval images use the rollout settings with their own count)."""
        from egrpo.eval.io import EvalError

        e = self.eval
        try:
            e.validate()
        except EvalError as err:
            raise ConfigError(str(err)) from None
        if e.every_steps and not os.path.isfile(os.path.expanduser(e.prompts)):
            raise ConfigError(f"eval.prompts {e.prompts!r} does not exist (the evaluator's prompt file)")
        from egrpo.eval.training import required_weights

        missing = [name for name in required_weights(e) if not e.models.get(name)] if e.every_steps else []
        if missing:   # found now, not after the model has loaded
            raise ConfigError(f"eval.models: evaluator {e.evaluator!r} needs local weight paths for "
                              f"{', '.join(missing)}; give eval.models.<name> (docs/evaluation.md)")

    def to_dict(self) -> Dict[str, Any]:
        """The config in the same shape as the YAML it came from (objective settings with their effective values,
        reward kwargs inlined)."""
        out = dataclasses.asdict(self)
        out["objective"] = self.objective.to_dict()
        out["rewards"] = [{"name": r["name"], "weight": r["weight"], "retries": r["retries"], "on_error": r["on_error"],
                           **r["kwargs"]} for r in out["rewards"]]
        out["optim"]["betas"] = list(out["optim"]["betas"])
        return out

    def effective_dict(self) -> Dict[str, Any]:
        """`to_dict` with every default spelled out: the objective's effective settings (already in `to_dict`) and
        each reward's constructor defaults. This is what ``config.yaml`` holds."""
        out = self.to_dict()
        out["objective"] = _plain(out["objective"])
        from egrpo.rewards.registry import resolve_reward, reward_defaults

        for entry, rc in zip(out["rewards"], self.rewards):
            try:
                defaults = reward_defaults(resolve_reward(rc.name))
            except ValueError:
                defaults = {}
            for key, value in defaults.items():
                entry.setdefault(key, value)
        return out


def _plain(value: Any) -> Any:
    """YAML-safe copy: tuples to lists, enums/other objects to their value or text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return _plain(getattr(value, "value", str(value)))


def model_path_missing(path: Optional[str]) -> bool:
    """``model.path`` is given but is neither a local path that exists nor a hub id."""
    return bool(path) and not os.path.exists(os.path.expanduser(path)) and not looks_like_hub_id(path)


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` with nothing that marks a local path (leading '/', '.', '~', more than one '/')."""
    return path.count("/") == 1 and not path.startswith(("/", ".", "~")) and not path.endswith("/") and " " not in path


SECTIONS = {
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "objective": ObjectiveConfig,
    "rewards": RewardConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "deepspeed": DeepSpeedConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


# ---------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    """An override's value: YAML scalars/lists/dicts, with '1e-5' read as a float (YAML 1.1 reads it as text)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: Dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to the nested dict ``raw`` in place; list items are addressed by index."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    path, text = override.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {override!r}: empty key in {path!r}")
    if keys[0] not in SECTIONS:
        raise ConfigError(f"override {override!r}: unknown section {keys[0]!r} (known: {sorted(SECTIONS)})")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, path)]
            continue
        if node.get(key) is None:
            node[key] = [] if key == "rewards" else {}
        node = node[key]
    last = keys[-1]
    value = parse_value(text)
    if (len(keys) == 3 and keys[0] == "rewards" and last == "name" and isinstance(node, dict)
            and node.get("name") not in (None, value)):
        # Another reward: the old one's constructor arguments mean nothing to it (keep weight and failure options).
        kept = {k: node[k] for k in ("weight", "retries", "on_error") if k in node}
        node.clear()
        node.update(kept)
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {override!r}: {'.'.join(keys[:-1])} is not a section")


def _is_reward_name(override: str) -> bool:
    keys = override.split("=", 1)[0].strip().split(".")
    return len(keys) == 3 and keys[0] == "rewards" and keys[2] == "name"


def _list_index(node: list, key: str, path: str) -> int:
    try:
        idx = int(key)
    except ValueError:
        raise ConfigError(f"override {path!r}: {key!r} must be a list index") from None
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"override {path!r}: index {idx} out of range (list has {len(node)} items)")
    return idx


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against the type annotation ``tp``; ConfigError naming ``where`` if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if value is None:
        raise ConfigError(f"{where}: a value is required, got null")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)}")
        item_types = [args[0]] * len(value) if (args and args[-1] is Ellipsis) else (args or [Any] * len(value))
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, item_types)))
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build_section(cls, raw: Any, where: str, extra_key: Optional[str] = None, fixed: Sequence[str] = ()):
    """Build dataclass ``cls`` from the mapping ``raw``. Unknown keys are an error, except that when ``extra_key``
    is given they are collected into that dict field (objective hyper-parameters, reward kwargs)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != extra_key]
    kwargs: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    for key, value in raw.items():
        if key in names:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
        elif extra_key is not None:
            extra[key] = value
        else:
            raise ConfigError(f"unknown key {key!r} in section {where!r} (known keys: {', '.join(sorted(names))})")
    if extra_key is not None:
        kwargs[extra_key] = extra
    return cls(**kwargs)


def config_from_dict(raw: Dict[str, Any]) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the config (known: {', '.join(SECTIONS)})")
    kwargs: Dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        if name not in raw:
            continue
        value = raw[name]
        if name == "rewards":
            if not isinstance(value, list):
                raise ConfigError(f"rewards: expected a list of {{name, weight, ...}}, got {value!r}")
            kwargs[name] = [_build_section(RewardConfig, v, f"rewards[{i}]", extra_key="kwargs")
                            for i, v in enumerate(value)]
        elif name == "objective":
            kwargs[name] = ObjectiveConfig.from_mapping(value)
        else:
            kwargs[name] = _build_section(cls, value, name)
    return Config(**kwargs)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML at ``path`` (or start from defaults), apply dotted ``overrides``, build the dataclasses.
    A relative ``data.prompts_file`` or ``eval.prompts`` is resolved against the config file's directory when it
    exists there."""
    raw: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist" if not os.path.exists(path)
                              else f"config file {path!r} is not a file")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = copy.deepcopy(raw)
    # A new reward name replaces that reward, so its name is applied before the arguments given with it.
    for override in sorted(overrides, key=lambda o: not _is_reward_name(o)):
        apply_override(raw, override)
    cfg = config_from_dict(raw)
    for section, key in ((cfg.data, "prompts_file"), (cfg.eval, "prompts")):
        pf = getattr(section, key)
        if path is not None and pf and not os.path.isabs(pf) and not os.path.exists(pf):
            candidate = os.path.join(os.path.dirname(os.path.abspath(path)), pf)
            if os.path.exists(candidate):
                setattr(section, key, candidate)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the effective config (every default spelled out, see `Config.effective_dict`), atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.effective_dict(), f, sort_keys=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- prompts
def load_prompts(data: DataConfig) -> Tuple[List[str], List[Dict[str, Any]]]:
    """The prompt texts and a metadata dict per prompt (empty for plain strings), validated by egrpo.data."""
    from egrpo.data import PromptFileError, prompts_and_metadata, read_prompts
    from egrpo.data.prompts import validate_records

    try:
        if data.prompts:
            located = [(f"data.prompts[{i}]", item) for i, item in enumerate(data.prompts)]
            records = validate_records(located, data.schema, source="data.prompts")
        else:
            records = validate_records(read_prompts(data.prompts_file), data.schema, source=data.prompts_file)
    except PromptFileError as e:
        key = "data.prompts" if data.prompts else "data.prompts_file"
        raise ConfigError(f"{key}: {e}") from None
    return prompts_and_metadata(records)
