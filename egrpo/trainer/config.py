"""Training configuration: one dataclass per section, loaded from YAML with dotted command-line overrides.

A config file has the sections ``model``, ``rollout``, ``objective``, ``rewards``, ``data``, ``optim``,
``deepspeed`` and ``train``; any section may be left out (its defaults apply). Overrides such as
``train.steps=20 optim.lr=1e-5 rewards.0.weight=2`` are applied to the parsed YAML before the dataclasses
are built, so they are type-checked and validated exactly like the file itself.

    cfg = load_config("configs/demo.yaml", ["train.steps=4"])
    cfg.validate(world_size=1)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from egrpo.objectives import OBJECTIVES, ObjectiveSettings, objective_class

from .model import ModelConfig
from .rollout import RolloutConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


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
    """One reward function: ``name`` in the reward registry, its ``weight`` in the sum, and any other keys
    passed to the reward's constructor."""

    name: str = "colour"
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Prompts: an inline list (strings, or dicts with a ``prompt`` key plus metadata for the rewards) or a
    file (``.txt`` one prompt per line, ``.json`` list, ``.jsonl`` one object per line)."""

    prompts: Optional[List[Any]] = None
    prompts_file: Optional[str] = None
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
    zero_stage: int = 0            # 0, 2 or 3
    bf16: Optional[bool] = None    # None = follow model.dtype
    extra: Dict[str, Any] = field(default_factory=dict)   # merged into the DeepSpeed JSON config as is


@dataclass
class TrainConfig:
    steps: int = 10                # rollouts; each is followed by updates_per_rollout optimizer steps
    updates_per_rollout: int = 1   # > 1: PPO-style reuse of a rollout, old_logp from the sampling policy
    seed: int = 0
    out_dir: str = "runs/run"
    save_every: int = 0            # checkpoint every N steps (0: only at the end)
    log_every: int = 1
    sample_every: int = 0          # write a sample image grid every K steps (0: never)
    device: str = "auto"           # "auto" | "cpu" | "cuda"
    head_impl: str = "fused"       # "fused" (chunked kernels) | "eager" (full logits, for comparison)
    export_hf: bool = True         # write HF-format safetensors of the trained model at the end
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

    # ------------------------------------------------------------------ checks
    def validate(self, world_size: int = 1) -> "Config":
        """Raise ConfigError with the offending key on any inconsistency; returns self."""
        m, r, d, o, ds, t = self.model, self.rollout, self.data, self.optim, self.deepspeed, self.train
        if not m.path and m.tiny is None:
            raise ConfigError("model.path is required (a local HF-format directory or a hub id) "
                              "unless a model.tiny section builds a random model")
        if m.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"model.dtype must be 'bf16' or 'fp32', got {m.dtype!r}")
        if r.group_size < 2:
            raise ConfigError(f"rollout.group_size must be >= 2 (advantages are normalised within a group), "
                              f"got {r.group_size}")
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
            raise ConfigError("data: give data.prompts or data.prompts_file, not both")
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
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.bf16 is False and m.dtype == "bf16":
            raise ConfigError("deepspeed.bf16 is false but model.dtype is 'bf16': training bf16 weights needs "
                              "DeepSpeed's bf16 mode (fp32 master weights); set model.dtype=fp32 or deepspeed.bf16=true")
        if ds.bf16 and m.dtype == "fp32":
            raise ConfigError("deepspeed.bf16 is true but model.dtype is 'fp32'; set model.dtype=bf16")
        if t.steps < 1 or t.updates_per_rollout < 1:
            raise ConfigError("train.steps and train.updates_per_rollout must be >= 1")
        if t.save_every < 0 or t.sample_every < 0 or t.log_every < 1:
            raise ConfigError("train.save_every / train.sample_every must be >= 0 and train.log_every >= 1")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be 'auto', 'cpu' or 'cuda', got {t.device!r}")
        if t.head_impl not in ("fused", "eager"):
            raise ConfigError(f"train.head_impl must be 'fused' or 'eager', got {t.head_impl!r}")
        if not self.rewards:
            raise ConfigError("rewards: at least one reward function is required")
        from .rewards import REWARDS, load_adapters  # noqa: late import keeps config importable on its own

        load_adapters()

        for i, rc in enumerate(self.rewards):
            if rc.name not in REWARDS and ":" not in rc.name:
                raise ConfigError(f"rewards[{i}].name={rc.name!r} is not a registered reward (known: "
                                  f"{sorted(REWARDS)}; or give 'package.module:Class'); adapters to reward "
                                  "models register themselves when their module is imported")
        ObjectiveConfig(self.objective.name, self.objective.settings)   # name and settings agree
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The config in the same shape as the YAML it came from (objective settings with their effective values,
        reward kwargs inlined)."""
        out = dataclasses.asdict(self)
        out["objective"] = self.objective.to_dict()
        out["rewards"] = [{"name": r["name"], "weight": r["weight"], **r["kwargs"]} for r in out["rewards"]]
        out["optim"]["betas"] = list(out["optim"]["betas"])
        return out


SECTIONS = {
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "objective": ObjectiveConfig,
    "rewards": RewardConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "deepspeed": DeepSpeedConfig,
    "train": TrainConfig,
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
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {override!r}: {'.'.join(keys[:-1])} is not a section")


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
    A relative ``data.prompts_file`` is resolved against the config file's directory when it exists there."""
    raw: Dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = copy.deepcopy(raw)
    for override in overrides:
        apply_override(raw, override)
    cfg = config_from_dict(raw)
    pf = cfg.data.prompts_file
    if path is not None and pf and not os.path.isabs(pf) and not os.path.exists(pf):
        candidate = os.path.join(os.path.dirname(os.path.abspath(path)), pf)
        if os.path.exists(candidate):
            cfg.data.prompts_file = candidate
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# ---------------------------------------------------------------------- prompts
def load_prompts(data: DataConfig) -> Tuple[List[str], List[Dict[str, Any]]]:
    """The prompt texts and a metadata dict per prompt (empty for plain strings)."""
    if data.prompts:
        items = list(data.prompts)
        source = "data.prompts"
    else:
        source = data.prompts_file
        with open(data.prompts_file, encoding="utf-8") as f:
            if data.prompts_file.endswith(".jsonl"):
                items = [json.loads(line) for line in f if line.strip()]
            elif data.prompts_file.endswith(".json"):
                items = json.load(f)
            elif data.prompts_file.endswith((".yaml", ".yml")):
                items = yaml.safe_load(f)
            else:
                items = [line.rstrip("\n") for line in f if line.strip()]
    prompts, metadata = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            prompts.append(item)
            metadata.append({})
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
            metadata.append({k: v for k, v in item.items() if k != "prompt"})
        else:
            raise ConfigError(f"{source}[{i}]: expected a string or a mapping with a 'prompt' string, got {item!r}")
    if not prompts:
        raise ConfigError(f"{source}: no prompts")
    return prompts, metadata
