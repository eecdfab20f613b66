"""The training loop: GRPO / EG-GRPO / STAGE on Janus-Pro with a DeepSpeed engine.

Read top to bottom, nanoGPT style. One *step* is:

    rollout     per micro-batch: sample group_size images (and CoTs) per prompt (no grad, KV-cached CFG)
    reward      per-function rewards [B, R] of the decoded images
    reference   reference-model log-probs / entropies of the sampled tokens (no grad, fused head kernel)
    update x updates_per_rollout:
        per micro-batch: one teacher-forced forward of the policy LM -> objective loss through the fused
        heads -> engine.backward; engine.step() after the last micro-batch (DeepSpeed accumulates)

Data and sampling are seeded from (seed, step, global micro-batch index), so the samples of a step do not
depend on how the global batch is split across processes or resumed runs. The global batch of a step is
``data.prompts_per_step`` prompts: each process takes a contiguous slice, cut into ``optim.grad_accum``
micro-batches.

Multi-process: launch with ``deepspeed`` or ``torchrun`` (they set RANK / WORLD_SIZE / MASTER_ADDR); a
plain ``egrpo train`` runs one process.

Nothing a user started is lost (docs/training.md): a run directory that holds a run is refused unless the
run is resumed or moved aside (``overwrite``); a resume may change only the settings its policy table allows
(``RESUME_POLICY``), each change logged and every config kept in ``config_history.jsonl``; checkpoints carry
a manifest of sizes and SHA-256 written last and are verified on load (a damaged one falls back to the newest
intact one); SIGTERM / Ctrl-C save at the end of the step; non-finite values stop the run before they reach
a checkpoint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from egrpo.errors import CheckpointError, ConfigError, DivergenceError, ResumeError, RunDirError
from egrpo.eval.io import EvalError
from egrpo.checkpoints import export_model
from egrpo.outputs import move_contents_aside, stamped_path, write_atomic
from egrpo.objectives import build_objective
from egrpo.rewards.base import mask_failed_rewards
from egrpo.rewards.registry import build_rewards

from .config import Config, load_prompts, save_config
from .metrics import MetricLogger, peak_memory_mb, plot_curves, read_metrics, save_sample_grid
from .model import build_model, num_image_tokens
from .rollout import codebook_vectors, head_inputs, make_engine, rollout, unconditional_image_hidden
from .tokenizer import janus_tokens

# ---------------------------------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str) -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; initialises torch.distributed (gloo on CPU, nccl on GPU).

    Without a launcher this is a one-process group on a free local port."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # registers the existing group with DeepSpeed
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def shutdown_distributed(keep_one_process: bool = True) -> None:
    """Tear a multi-process torch.distributed group down before the process exits. Left to the interpreter's
    exit, gloo can abort a finished run ("terminate called without an active exception", exit -6): the CLI calls
    this after `train`, and so should any script that runs `train` under a launcher. A one-process group stays
    (DeepSpeed keeps a handle on it, and `train` reuses it when called again in the same process) unless
    ``keep_one_process`` is False: the ``egrpo`` program does that at its exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1 or not keep_one_process):
        dist.destroy_process_group()


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs, processes and platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**32], dtype=np.uint64)) & np.uint64(2**63 - 1))


class WarmupSchedule:
    """LR multiplier: linear warm-up over ``warmup`` updates, then constant, linear or cosine decay to
    ``min_ratio`` at ``total`` updates. A class (not a lambda) so LambdaLR's state_dict round-trips."""

    def __init__(self, warmup: int, total: int, kind: str, min_ratio: float):
        self.warmup, self.total, self.kind, self.min_ratio = warmup, max(total, 1), kind, min_ratio

    def __call__(self, update: int) -> float:
        if self.warmup and update < self.warmup:
            return (update + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (update - self.warmup) / max(1, self.total - self.warmup))
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def deepspeed_config(cfg: Config, world_size: int) -> Dict[str, Any]:
    micro_prompts = cfg.data.prompts_per_step // world_size // cfg.optim.grad_accum
    micro_samples = micro_prompts * cfg.rollout.samples_per_prompt
    bf16 = cfg.model.dtype == "bf16" if cfg.deepspeed.bf16 is None else cfg.deepspeed.bf16
    ds = {
        "train_micro_batch_size_per_gpu": micro_samples,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": micro_samples * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The torch optimizer is passed in on purpose (DeepSpeed's own Adam compiles for minutes on CPU).
        "zero_allow_untested_optimizer": True,
    }
    if cfg.deepspeed.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in cfg.deepspeed.extra.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)   # no weight decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def zero3_gather(params, enabled: bool):
    """Full parameters on every rank inside the block under ZeRO-3 (generation, direct use of head weights)."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if p is not None], modifier_rank=None)


def partitioned_reference(ref_model: torch.nn.Module, cfg: Config, world_size: int) -> torch.nn.Module:
    """The frozen reference model under ZeRO-3, partitioned across processes like the policy (a DeepSpeed
    engine without an optimizer) instead of a full copy on every process: for a 7B reference on 8 GPUs, 1/8
    of its weights each. Its module forwards gather their parameters through ZeRO-3's hooks; the head
    weights the fused kernels read directly are gathered with :func:`zero3_gather`."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=ref_model, config=deepspeed_config(cfg, world_size))
    engine.module.eval()
    return engine.module


def head_weights(model) -> List[torch.nn.Parameter]:
    """Parameters the fused kernels read directly (outside any module forward)."""
    head = model.model.generation_head.vision_head
    return [head.weight, head.bias, model.lm_head.weight]


# ---------------------------------------------------------------------------------------------- data


class PromptStream:
    """Prompts in epoch-wise shuffled order; item ``k`` of the stream is a pure function of (seed, k)."""

    def __init__(self, prompts: List[str], metadata: List[dict], seed: int, shuffle: bool):
        self.prompts, self.metadata, self.seed, self.shuffle = prompts, metadata, seed, shuffle
        self._orders: Dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.prompts)
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                                   else np.arange(n))
        return self._orders[epoch]

    def take(self, start: int, count: int) -> Tuple[List[str], List[dict]]:
        n = len(self.prompts)
        idx = [int(self._order(k // n)[k % n]) for k in range(start, start + count)]
        return [self.prompts[i] for i in idx], [self.metadata[i] for i in idx]


# ---------------------------------------------------------------------------------------------- pieces


@dataclass
class MicroBatch:
    """One micro-batch of a rollout, with everything the loss needs that does not change across updates."""

    rollout: Any
    metadata: List[dict]
    rewards: torch.Tensor                       # [B, R] per reward function
    ref: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)   # part -> (logp, entropy)
    old: Dict[str, torch.Tensor] = field(default_factory=dict)                        # part -> old logp
    codes: Optional[torch.Tensor] = None       # [B, T, C] codebook vectors (STAGE)
    guidance: Optional[tuple] = None           # (JanusTokens, cfg_scale) when the objective wants guided log-probs


def guided_head_inputs(model, ro, guidance=None):
    """``head_inputs``, plus (when ``guidance = (JanusTokens, cfg_scale)`` is given: the objective asked for
    guided log-probs) the image part's unconditional hidden states and guidance scale."""
    image, text = head_inputs(model, ro)
    if guidance is not None:
        image.uncond_hidden = unconditional_image_hidden(model, ro, guidance[0])
        image.guidance_scale = guidance[1]
    return image, text


def head_logp_entropy(model, ro, backend: str, chunk_size, guidance=None) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per part ("image", "text"): (logp, entropy) [B, T] float32 of the sampled tokens, no grad, fused head."""
    with torch.no_grad():
        image, text = guided_head_inputs(model, ro, guidance)
        return {name: tuple(t.float() for t in batch.logp_entropy(backend, chunk_size))
                for name, batch in (("image", image), ("text", text)) if batch is not None}


def needs_reference(objective) -> bool:
    """Whether the objective needs a frozen reference model (KL term, reference entropies); it says so itself."""
    return objective.needs.reference_model


def micro_loss(model, objective, mb: MicroBatch, group_size: int, reward_weights: torch.Tensor,
               head_impl: str = "fused"):
    """Policy forward + objective for one micro-batch -> (loss, metrics). Grad enabled. ``head_impl``: the
    objective's token loss through the fused kernels or through full logits (``train.head_impl``)."""
    image, text = guided_head_inputs(model, mb.rollout, mb.guidance)
    if not objective.needs.text:
        text = None
    for name, batch in (("image", image), ("text", text)):
        if batch is None:
            continue
        if name in mb.ref:
            batch.ref_logp, batch.ref_entropy = mb.ref[name]
        batch.old_logp = mb.old.get(name)
    out = objective(mb.rewards, group_size, image, text, reward_weights=reward_weights, codes=mb.codes,
                    head=head_impl)
    return out.loss, dict(out.metrics)


def manual_grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def mean_dicts(dicts: Sequence[Dict[str, float]]) -> Dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}


# ---------------------------------------------------------------------------------------------- checkpoints


MANIFEST = "manifest.json"
STEP_TAG = re.compile(r"^step_(\d+)$")


def step_tag(step: int) -> str:
    return f"step_{step:06d}"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_step(tag_dir: str) -> Optional[int]:
    """The step a complete checkpoint holds, from its manifest (None: no checkpoint there, or not complete)."""
    try:
        with open(os.path.join(tag_dir, MANIFEST), encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(tag_dir: str, step: int) -> None:
    """Sizes and SHA-256 of every file of a checkpoint, written last: a checkpoint without it is incomplete."""
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, tag_dir)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                files[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
    write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps({"step": step, "files": files}, indent=1))


def verify_checkpoint(tag_dir: str) -> Optional[str]:
    """None when the checkpoint in ``tag_dir`` is intact, else what is wrong, naming the file."""
    manifest = os.path.join(tag_dir, MANIFEST)
    if not os.path.isdir(tag_dir):
        return f"{tag_dir} does not exist"
    if not os.path.isfile(manifest):
        return f"{manifest} is missing (the save did not finish)"
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{manifest} is damaged"
    for rel, meta in files.items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != meta["size"]:
            return f"{path} has {size} bytes, {meta['size']} expected (truncated or overwritten)"
        if sha256_file(path) != meta["sha256"]:
            return f"{path} does not match its SHA-256 (damaged)"
    return None


def _checkpoint_root(path: str) -> Optional[str]:
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isfile(os.path.join(root, "latest")) or any(
                STEP_TAG.match(n) for n in (os.listdir(root) if os.path.isdir(root) else ())):
            return root
    return None


def has_checkpoints(path: str) -> bool:
    """Whether ``path`` (a run directory or its ``checkpoints/``) has completed a checkpoint save: ``latest`` is
    written only once a checkpoint and its manifest are complete (nothing is hashed here)."""
    return any(os.path.isfile(os.path.join(root, "latest")) for root in (os.path.join(path, "checkpoints"), path))


# In a model directory written by the trainer or `egrpo export`: the checkpoint it holds the model of.
EXPORT_RECORD = "egrpo_export.json"


def write_export_record(folder: str, checkpoint: str) -> None:
    """Record in the export ``folder`` the checkpoint it was written from: its directory, step and the SHA-256 of
    its manifest (which holds every file's SHA-256, so another save of the same step differs)."""
    write_atomic(os.path.join(folder, EXPORT_RECORD), json.dumps(
        {"checkpoint": os.path.abspath(checkpoint), "step": manifest_step(checkpoint),
         "manifest_sha256": sha256_file(os.path.join(checkpoint, MANIFEST))}, indent=1))


def holds_export_of(folder: str, checkpoint: str) -> bool:
    """Whether ``folder`` is a complete export of the checkpoint ``checkpoint`` (by its record; an export without
    one, written before exports were recorded, is not known to be)."""
    try:
        with open(os.path.join(folder, EXPORT_RECORD), encoding="utf-8") as f:
            recorded = json.load(f)["manifest_sha256"]
        return (os.path.isfile(os.path.join(folder, "config.json"))
                and recorded == sha256_file(os.path.join(checkpoint, MANIFEST)))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def final_export_cut_short(out_dir: str, t) -> bool:
    """Whether the run in ``out_dir`` (train settings ``t``) saved its final checkpoint but not its export (a
    second signal during the export): ``latest`` names step ``t.steps``, and ``hf/`` is missing, a new one was
    being written, or it is not the export of that checkpoint (an older ``hf/``, e.g. of a run since extended,
    with the cut before the new export's folder was made)."""
    try:
        with open(os.path.join(out_dir, "checkpoints", "latest"), encoding="utf-8") as f:
            named = f.read(256).strip()
    except OSError:
        return False
    if named != step_tag(t.steps) or not t.export_hf:
        return False
    hf = os.path.join(out_dir, "hf")
    writing = os.path.isdir(work_dirs(hf)[0])
    return writing or not holds_export_of(hf, os.path.join(out_dir, "checkpoints", named))


def find_checkpoint(path: str, flag: str = "--resume") -> Tuple[str, str, List[str]]:
    """``(load_dir, tag, problems)`` for ``--resume path``: a run directory, its ``checkpoints`` directory,
    or one checkpoint's directory. Without a named checkpoint, the tag in ``latest`` is tried first, then the
    step checkpoints newest first; ``problems`` lists the damaged ones skipped. CheckpointError when none
    is intact (or when the one named explicitly is damaged)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{flag} {path}: no such file or directory")
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, "trainer_state.pt")):
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"{flag} {path}: the checkpoint is not usable: {problem}")
        return os.path.dirname(path), os.path.basename(path), []
    root = _checkpoint_root(path)
    if root is None:
        raise CheckpointError(f"{flag} {path}: no checkpoint found (expected a run directory, its checkpoints/ "
                              "directory or a checkpoint directory)")
    candidates, problems = [], []
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest, "rb") as f:
            named = f.read(256).decode("utf-8", "replace").strip()
        if named and "/" not in named and named not in (".", ".."):
            candidates.append(named)
        else:   # e.g. truncated by a full disk: say so, then fall back like any damaged checkpoint
            problems.append(f"{latest} names no checkpoint ({named[:40]!r})")
    steps = sorted((n for n in os.listdir(root) if STEP_TAG.match(n) and os.path.isdir(os.path.join(root, n))),
                   key=lambda n: int(STEP_TAG.match(n).group(1)), reverse=True)
    candidates += [n for n in steps if n not in candidates]
    for tag in candidates:
        problem = verify_checkpoint(os.path.join(root, tag))
        if problem is None:
            if STEP_TAG.match(tag):   # newer step checkpoints than the one used are named in the warnings (not
                # hashed: a resume moves them aside with the abandoned branch)
                tried = candidates[:candidates.index(tag)]
                for n in steps:
                    if int(STEP_TAG.match(n).group(1)) > int(STEP_TAG.match(tag).group(1)) and n not in tried:
                        manifest = os.path.join(root, n, MANIFEST)
                        problems.append(f"{manifest} is missing (the save did not finish)" if not os.path.isfile(manifest)
                                        else f"{os.path.join(root, n)} is newer than {tag}, which `latest` names "
                                             "(its save was cut short before `latest` moved)")
            return root, tag, problems
        problems.append(problem)
    if not problems:
        raise CheckpointError(f"{flag} {path}: no checkpoint in {root}")
    raise CheckpointError(f"{flag} {path}: no intact checkpoint: {problems[0]}"
                          + (f" (and {len(problems) - 1} older one(s) damaged too)" if len(problems) > 1 else ""))


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_root: str, step: int, data_position: int, rank: int, *,
                    config: Optional[Dict[str, Any]] = None, tag: Optional[str] = None, keep_last: int = 0,
                    extra_state: Optional[Dict[str, Any]] = None) -> str:
    """DeepSpeed checkpoint (model, optimizer, LR scheduler) plus trainer state, per-rank RNG states and the
    effective config, then the manifest (sizes + SHA-256) and only then ``latest``. ``tag=None`` writes the
    step checkpoint ``step_NNNNNN`` and keeps the newest ``keep_last`` of them (0: all); another tag (e.g.
    ``"best"``, see `save_best`) is written beside, replaced only once the new one is complete, and never
    pruned. ``extra_state`` is added to ``trainer_state.pt`` (the evaluator's best value). The rollout generators
    need no state: they are re-seeded from (seed, step, micro-batch)."""
    import torch.distributed as dist

    final_tag = tag or step_tag(step)
    write_tag = final_tag if tag is None else f"{final_tag}.partial"
    tag_dir = os.path.join(ckpt_root, write_tag)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        if os.path.isdir(tag_dir):   # a re-save (after a fallback, or a killed save): invalidate it first
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(tag_dir, MANIFEST))
    dist.barrier()
    engine.save_checkpoint(ckpt_root, tag=write_tag, client_state={"step": step, "data_position": data_position},
                           save_latest=False)
    torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{rank:03d}.pt"))
    if rank == 0:
        torch.save({"step": step, "data_position": data_position, **(extra_state or {})},
                   os.path.join(tag_dir, "trainer_state.pt"))
        if config is not None:
            write_atomic(os.path.join(tag_dir, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
    dist.barrier()
    final_dir = os.path.join(ckpt_root, final_tag)
    if rank == 0:
        write_manifest(tag_dir, step)
        if write_tag != final_tag:
            old = f"{final_dir}.old"
            if os.path.isdir(final_dir):
                os.replace(final_dir, old)
            os.replace(tag_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            write_atomic(os.path.join(ckpt_root, "latest"), final_tag)
            prune_checkpoints(ckpt_root, keep_last)
    dist.barrier()
    return final_dir


def save_best(engine, ckpt_root: str, step: int, data_position: int, rank: int,
              config: Optional[Dict[str, Any]] = None, extra_state: Optional[Dict[str, Any]] = None) -> str:
    """Save the current state under the tag ``best`` (the evaluation loop calls it on a new best score); the
    previous ``best`` is replaced only once the new one is complete, and ``latest`` is not moved (``--resume
    <out_dir>`` continues from the last step). Resume from it with ``--resume <out_dir>/checkpoints/best``."""
    return save_checkpoint(engine, ckpt_root, step, data_position, rank, config=config, tag="best",
                           extra_state=extra_state)


def prune_checkpoints(ckpt_root: str, keep_last: int) -> None:
    """Delete step checkpoints older than the newest ``keep_last`` (0: keep all). Other tags are kept."""
    if keep_last <= 0:
        return
    steps = sorted((n for n in os.listdir(ckpt_root) if STEP_TAG.match(n)),
                   key=lambda n: int(STEP_TAG.match(n).group(1)))
    for name in steps[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


def load_checkpoint(engine, load_dir: str, tag: str, rank: int) -> Tuple[int, int]:
    tag_dir = os.path.join(load_dir, tag)
    try:
        _, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except Exception as e:   # a checkpoint of another model / layout: one line, the traceback with --debug
        raise CheckpointError(f"cannot load the checkpoint {tag_dir}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    if client is None:
        raise CheckpointError(f"cannot load the checkpoint {tag_dir} (DeepSpeed found no model states)")
    rng_file = os.path.join(tag_dir, f"rng_rank{rank:03d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return int(client["step"]), int(client["data_position"])


# ---------------------------------------------------------------------------------------------- run directory

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "config.yaml", "config_history.jsonl")
# One training per run directory: process 0 holds an exclusive flock on this file for the whole run (the OS
# drops it when the process ends, however it ends). It is never moved aside or counted as part of a run.
LOCK_NAME = ".egrpo-train.lock"
_HELD_LOCKS: Dict[str, Any] = {}   # realpath(out_dir) -> open lock file of this process

# What a resume may change (docs/training.md, "Resuming"). First matching pattern wins:
#   free      applied and logged (bookkeeping and speed settings that do not change the run's math)
#   steps     train.steps: must stay above the checkpoint's step; the LR schedule is stretched to it, logged
#   explicit  changes what is optimised: refused unless allow_changes (--allow-changes), then applied, logged
#   never     the checkpoint's weights / optimizer layout depend on it: start a new run instead
RESUME_POLICY: List[Tuple[str, str]] = [
    ("train.steps", "steps"),
    ("train.out_dir", "free"), ("train.save_every", "free"), ("train.keep_last", "free"),
    ("train.log_every", "free"), ("train.sample_every", "free"), ("train.progress", "free"),
    ("train.tensorboard", "free"), ("train.export_hf", "free"), ("train.export_format", "free"),
    ("train.device", "free"), ("train.head_impl", "free"),
    # the same sampler on the same random numbers, compiled: only float rounding may differ (as with head_impl,
    # model.attn_implementation / liger); rollout.engine is another draw (other random numbers): explicit
    ("rollout.compile", "free"),
    ("rewards.*.retries", "free"), ("rewards.*.on_error", "free"),
    ("rewards.*.batch_size", "free"), ("rewards.*.device", "free"), ("rewards.*.offload_between_calls", "free"),
    ("model.gradient_checkpointing", "free"), ("model.attn_implementation", "free"), ("model.liger", "free"),
    ("objective.backend", "free"), ("objective.chunk_size", "free"),
    ("eval.*", "free"),   # evaluation only reads the weights; a changed selection starts a new best (logged)
    ("model.*", "never"), ("deepspeed.*", "never"),
    ("*", "explicit"),
]


def resume_policy(key: str) -> str:
    return next(policy for pattern, policy in RESUME_POLICY if fnmatch.fnmatchcase(key, pattern))


def flatten_config(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; list items of mappings (rewards) by index."""
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten_config(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def _short(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ABSENT = object()

# Settings added after runs had been saved without them, with the value that reproduces those runs: a checkpoint
# whose config lacks one is compared as if it held that value, so passing that value resumes it unchanged.
SETTINGS_ADDED_LATER: Dict[str, Any] = {
    "rollout.engine": False,                 # before the rollout engine, the plain loop sampled
    "rollout.cot_max_prompt_tokens": None,   # before the released 512-token cut, CoT prompts were never cut
}


def check_resume_changes(old: Dict[str, Any], new: Dict[str, Any], step: int, allow_changes: bool,
                         checkpoint_config: Optional[str] = None) -> List[str]:
    """Compare the checkpoint's effective config with this run's under `RESUME_POLICY`; returns one log line
    per applied change, raises ResumeError naming every refused key (and, given ``checkpoint_config``, the
    file that resumes with the checkpoint's own settings)."""
    a, b = flatten_config(old), flatten_config(new)
    lines, refused, never, added_later = [], [], [], []
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, SETTINGS_ADDED_LATER.get(key, _ABSENT)), b.get(key, _ABSENT)
        if before == after or (key == "train.out_dir" and isinstance(before, str) and isinstance(after, str)
                               and same_path(before, after)):   # `runs/a` and its absolute path: no change
            continue
        shown = f"(absent: {before!r})" if key not in a and key in SETTINGS_ADDED_LATER else _short(before)
        change = f"{key}: {shown} -> {_short(after)}"
        policy = resume_policy(key)
        if policy == "steps":
            lines.append(f"{change} (the LR schedule now ends at step {after})")
        elif policy == "free":
            lines.append(change)
        elif policy == "never":
            never.append(change)
        elif allow_changes:
            lines.append(f"{change} (applied: --allow-changes)")
        else:
            refused.append(change)
            if key not in a and key in SETTINGS_ADDED_LATER:   # the checkpoint's config.yaml cannot say it
                added_later.append(f"{key}={json.dumps(before)}")   # false / null / numbers: YAML reads them
    if never:
        raise ResumeError(f"cannot resume with {'; '.join(never)}: the checkpoint's weights and optimizer state "
                          "depend on it; start a new run (another train.out_dir) instead")
    if refused:
        # the changes may come from the run's own config.yaml (a changed resume that ran a step, then
        # stopped before its first checkpoint), not from this command: name the file that resumes as before
        before = (f"resume with the checkpoint's own settings: --config {checkpoint_config}" if checkpoint_config
                  else "drop them to resume as before")
        if added_later:   # absent from that file too: a --config of it alone would be refused the same way
            before += f" (plus {' '.join(added_later)}, settings that checkpoint predates)"
        raise ResumeError(f"resuming would change {'; '.join(refused)}: these change what the run optimises; pass "
                          f"--allow-changes to apply them (each is logged), or {before}")
    if b.get("train.steps", 0) <= step:
        raise ResumeError(f"the checkpoint is at step {step} and train.steps={b.get('train.steps')}: nothing to "
                          f"train; give train.steps > {step} to continue the run")
    return lines


def move_previous_run(out_dir: str) -> str:
    """Move everything in ``out_dir`` (but earlier ``previous-*`` folders and the lock) into
    ``out_dir/previous-<time>/``."""
    return move_contents_aside(out_dir, keep=(LOCK_NAME,))


def move_steps_after(folder: str, step: int) -> Optional[str]:
    """Move the ``step_*`` entries of ``folder`` for steps after ``step`` into ``folder/abandoned-<time>/``;
    returns it, or None when there are none (or no folder). Nothing is deleted."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    newer = [name for name in names if STEP_TAG.match(name) and int(STEP_TAG.match(name).group(1)) > step]
    if not newer:
        return None
    dest = stamped_path(os.path.join(folder, "abandoned"))
    os.makedirs(dest)
    for name in newer:
        os.replace(os.path.join(folder, name), os.path.join(dest, name))
    return dest


def set_aside_newer_evals(out_dir: str, resumed_step: int) -> Optional[str]:
    """Move the ``eval/step_*`` folders of steps after ``resumed_step`` (an interrupted run's, or another
    branch's) into ``eval/abandoned-<time>/`` (returned), so that the resumed run evaluates those steps afresh.
    Called once the resumed run has completed a step: a resume that fails earlier leaves them in place."""
    return move_steps_after(os.path.join(out_dir, "eval"), resumed_step)


def set_aside_newer_checkpoints(ckpt_root: str, resumed_tag: str, resumed_step: int) -> Optional[str]:
    """Move the step checkpoints after ``resumed_step`` into ``ckpt_root/abandoned-<time>/`` and point
    ``latest`` at ``resumed_tag``, so a later plain ``--resume`` cannot continue the abandoned branch. Returns
    the folder, or None when there was nothing newer."""
    dest = move_steps_after(ckpt_root, resumed_step)
    if dest is not None:
        write_atomic(os.path.join(ckpt_root, "latest"), resumed_tag)
    best = os.path.join(ckpt_root, "best")
    best_step = manifest_step(best)
    if best_step is not None and best_step > resumed_step:   # the abandoned branch's best: not this run's weights
        if dest is None:
            dest = stamped_path(os.path.join(ckpt_root, "abandoned"))
            os.makedirs(dest)
        os.replace(best, os.path.join(dest, "best"))
    return dest


def best_checkpoint(ckpt_root: str, best_step: Optional[int]) -> Optional[str]:
    """The checkpoint holding the weights of ``best_step``: ``best`` when it is that step's, else that step's own
    checkpoint if it is still there (a resume from an older step set the later ``best`` aside), else None."""
    if best_step is None:
        return None
    for tag in ("best", step_tag(best_step)):
        if manifest_step(os.path.join(ckpt_root, tag)) == best_step:
            return os.path.join(ckpt_root, tag)
    return None


def holds_run(out_dir: str) -> bool:
    """Whether ``out_dir`` holds something of a run worth keeping: a checkpoint, a metric record, or the
    config a run records after its first completed step. What a start that failed before its first step
    leaves (an empty ``metrics.jsonl``, ``tensorboard/``) does not count: the corrected command may reuse it."""
    def nonempty(name: str) -> bool:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            return bool(os.listdir(path))
        return os.path.isfile(path) and os.path.getsize(path) > 0

    return any(nonempty(m) for m in RUN_MARKERS)


def in_use_error(out_dir: str, owner: str) -> RunDirError:
    return RunDirError(f"train.out_dir {out_dir!r} is in use by another training ({owner}); wait for it to end or "
                       "stop it, or pick another train.out_dir")


def check_out_dir(out_dir: str, overwrite: bool, resumed_load_dir: Optional[str] = None) -> None:
    """RunDirError when starting a run in ``out_dir`` (or, with ``resumed_load_dir``, continuing the run whose
    checkpoints are there) would mix two runs in one directory; ``overwrite`` moves the old run aside instead."""
    if overwrite or not holds_run(out_dir):
        return
    if resumed_load_dir is not None:
        if not same_path(os.path.dirname(resumed_load_dir), out_dir):
            raise RunDirError(f"train.out_dir {out_dir!r} already holds another run; resume into the run's own "
                              "directory, pick a new train.out_dir, or pass --overwrite to move the old run aside")
        return
    if _checkpoint_root(out_dir) is None:   # e.g. stopped by a crash before its first checkpoint
        raise RunDirError(f"train.out_dir {out_dir!r} already holds a run without a checkpoint; pass --overwrite "
                          "to move it aside (into previous-<time>/), or pick a new train.out_dir")
    raise RunDirError(f"train.out_dir {out_dir!r} already holds a run; continue it with --resume {out_dir}, "
                      "or pass --overwrite to move it aside (into previous-<time>/), or pick a new train.out_dir")


def check_resume(load_dir: str, tag: str, out_dir: str, effective: Dict[str, Any], overwrite: bool,
                 allow_changes: bool, processes: int = 1) -> Tuple[Dict[str, Any], List[str]]:
    """The checkpoint ``load_dir/tag``'s trainer state and the settings a resume from it into ``out_dir`` with
    ``processes`` processes changes (log lines); ResumeError for changes its policy refuses
    (:func:`check_resume_changes`, :func:`check_process_count`), RunDirError when ``out_dir`` holds another run
    (:func:`check_out_dir`). The trainer's and ``--dry-run``'s one check."""
    resume_from = os.path.join(load_dir, tag)
    state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
    changes: List[str] = check_process_count(state.get("processes"), processes,
                                             effective["deepspeed"]["zero_stage"], allow_changes)
    saved_config = os.path.join(resume_from, "config.yaml")
    if os.path.isfile(saved_config):
        with open(saved_config, encoding="utf-8") as f:
            changes += check_resume_changes(yaml.safe_load(f), effective, int(state["step"]), allow_changes,
                                            checkpoint_config=saved_config)
    check_out_dir(out_dir, overwrite, load_dir)
    return state, changes


def check_process_count(saved: Optional[int], processes: int, zero_stage: int, allow_changes: bool) -> List[str]:
    """A resume with another number of processes than the checkpoint's (recorded since 2026-12-04; older ones say
    nothing): refused under ZeRO-3, whose optimizer state is partitioned per process; otherwise it changes the run
    (each process samples its own share of the images from its own random stream), so it needs --allow-changes,
    like any setting that changes what the run optimises. Returns the log line of an allowed change."""
    if saved is None or int(saved) == processes:
        return []
    count = f"{saved} process{'es' if int(saved) != 1 else ''}"
    launch = f"launch it with {count} (e.g. torchrun --nproc_per_node {saved} -m egrpo.cli train ...)"
    if zero_stage == 3:
        raise ResumeError(f"the checkpoint was written by {count} and this run has {processes}: ZeRO-3 "
                          f"partitions its optimizer state per process; {launch}")
    if not allow_changes:
        raise ResumeError(f"the checkpoint was written by {count} and this run has {processes}, which "
                          f"changes the images each step samples; {launch}, or pass --allow-changes")
    return [f"processes: {saved} -> {processes} (applied: --allow-changes)"]


def run_lock_owner(out_dir: str) -> Optional[str]:
    """Who holds ``out_dir``'s run lock (the line it wrote: pid, host, start time), or None when no other process
    trains there."""
    try:
        import fcntl
    except ImportError:
        return None
    if os.path.realpath(out_dir) in _HELD_LOCKS:
        return None
    try:
        handle = open(os.path.join(out_dir, LOCK_NAME), encoding="utf-8")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read(300).strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def acquire_run_lock(out_dir: str) -> None:
    """Refuse (RunDirError) when another process trains in ``out_dir``; otherwise hold its lock until
    :func:`release_run_lock` or the end of this process. A second call from this process (an earlier
    ``train()`` that raised) keeps the lock it already holds."""
    try:
        import fcntl
    except ImportError:   # no flock (Windows): no protection, as before
        return
    key = os.path.realpath(out_dir)
    if key in _HELD_LOCKS:
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        handle = open(os.path.join(out_dir, LOCK_NAME), "a+", encoding="utf-8")
    except OSError as e:
        from egrpo.outputs import cannot_create

        raise RunDirError(f"train.out_dir {out_dir!r} cannot be created or written: {cannot_create(out_dir, e)}; "
                          "pick another train.out_dir") from e
    for attempt in range(3):   # (run_lock_owner's brief shared lock, taken by another command, is no owner)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if attempt < 2:
                time.sleep(0.05)
    else:
        handle.seek(0)
        owner = handle.read(300).strip() or "unknown"
        handle.close()
        raise in_use_error(out_dir, owner) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _HELD_LOCKS[key] = handle


def release_run_lock(out_dir: str) -> None:
    handle = _HELD_LOCKS.pop(os.path.realpath(out_dir), None)
    if handle is not None:
        handle.close()   # closing the file drops the flock


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def apply_optim_settings(scheduler, cfg: Config, total_updates: int) -> None:
    """After loading a checkpoint whose LR schedule / optimizer settings differ from ``cfg`` (a longer
    ``train.steps``, or changes allowed with --allow-changes): the schedule, base LR and Adam settings follow
    ``cfg`` from the current update on (the checkpoint restored its own)."""
    o = cfg.optim
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, WarmupSchedule):
            fn.__init__(o.warmup_steps, total_updates, o.schedule, o.min_lr_ratio)
    scheduler.base_lrs = [o.lr for _ in scheduler.base_lrs]
    for i, (group, fn) in enumerate(zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas)):
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * fn(scheduler.last_epoch)
        group["betas"], group["eps"] = tuple(o.betas), o.eps
        group["weight_decay"] = o.weight_decay if i == 0 else 0.0   # group 1 holds biases / norm scales
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


# ---------------------------------------------------------------------------------------------- stopping


class _OnSignals:
    """Inside the block, SIGINT / SIGTERM call ``_handle`` (main thread only); leaving restores the handlers that
    were there before."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class StopOnSignal(_OnSignals):
    """Inside: SIGTERM / SIGINT (Ctrl-C) only set ``signum``; the loop saves at the end of the step and
    returns. A second signal gets the previous handler (Ctrl-C twice interrupts at once)."""

    doing = "saving a checkpoint at the end of this step"

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        print(f"egrpo: {signal.Signals(signum).name} received: {self.doing} (send it again to stop at once)",
              file=sys.stderr, flush=True)


class FinishOnSignal(StopOnSignal):
    """Around the final checkpoint and export: a signal lets them complete (a scheduler's SIGTERM there used to
    leave a partial checkpoint and a half-written ``hf/``); a second one stops at once."""

    doing = "finishing the run's final save first"


class InterruptAtOnce(_OnSignals):
    """Around a whole ``train()``: SIGINT (Ctrl-C) interrupts at once (KeyboardInterrupt), as Python's own handler
    does and as before the first step there is nothing to save, and it is also remembered: Python drops an
    exception raised inside a ``__del__`` (model loading runs many), and :meth:`raise_if_dropped` then stops before
    the first step instead of training on. SIGTERM keeps its own handler (by default it ends the process at once,
    also a rank blocked in a collective). Inside the loop :class:`StopOnSignal` takes over; its "second signal"
    handler for SIGINT is this one."""

    SIGNALS = (signal.SIGINT,)

    def _handle(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt

    def raise_if_dropped(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt


def local_parameters_finite(params) -> bool:
    """All trainable parameters finite (under ZeRO-3 this process's partition); one sync."""
    checks = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in params]
    return bool(torch.stack(checks).all()) if checks else True


def say(message: str, enabled: bool = True) -> None:
    if enabled:
        print(f"egrpo: {message}", file=sys.stderr, flush=True)


def trainable_state(engine, model, zero3: bool) -> Dict[str, torch.Tensor]:
    """Full copies (CPU, fp32) of the trainable parameters, gathered under ZeRO-3."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with zero3_gather([p for _, p in params], zero3):
        return {n: p.detach().float().cpu().clone() for n, p in params}


def work_dirs(out: str) -> Tuple[str, str]:
    """The hidden siblings `replace_dir_atomically` writes ``out`` in (``.<name>.egrpo-partial``) and moves the
    previous ``out`` to (``.<name>.egrpo-old``)."""
    parent, name = os.path.split(os.path.normpath(out))
    return os.path.join(parent, f".{name}.egrpo-partial"), os.path.join(parent, f".{name}.egrpo-old")


def replace_dir_atomically(out: str, write: Callable[[str], Any], keep_previous_as: Optional[str] = None) -> None:
    """``write(partial)`` into a hidden sibling of ``out``, then swap it in: a reader (or a crash) never sees a
    half-written ``out``; the previous one stays intact until the new one is complete. Only the hidden
    ``.<name>.egrpo-partial`` / ``.egrpo-old`` directories this uses are ever removed. ``keep_previous_as``: the
    previous ``out`` is renamed to this path (once the new one is complete) instead of being removed."""
    out = os.path.normpath(out)
    partial, old = work_dirs(out)
    shutil.rmtree(partial, ignore_errors=True)   # left by a killed export
    write(partial)
    moved = os.path.isdir(out)
    if moved and keep_previous_as is not None:
        os.replace(out, keep_previous_as)
        moved = False
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(partial, out)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def export_hf(engine, model, tokenizer, out: str, zero3: bool, rank: int, export_format: str = "hf",
              checkpoint: Optional[str] = None) -> Optional[str]:
    """Directory (config + safetensors + tokenizer) of the trained model in the transformers (``"hf"``) or
    original Janus layout (``train.export_format``), written by rank 0; ``checkpoint``: the checkpoint of these
    weights, recorded in it (`write_export_record`)."""
    import torch.distributed as dist

    def write(partial: str) -> None:
        export_model(model, tokenizer, partial, export_format, state=state)
        if checkpoint is not None:
            write_export_record(partial, checkpoint)

    with zero3_gather(list(model.parameters()), zero3):
        if rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            replace_dir_atomically(out, write)
    dist.barrier()
    return out if rank == 0 else None


# ---------------------------------------------------------------------------------------------- train


def train(cfg: Config, resume: Optional[str] = None, *, overwrite: bool = False, allow_changes: bool = False,
          model_builder: Optional[Callable] = None, stop_after: Optional[int] = None,
          return_params: bool = False) -> Dict[str, Any]:
    """Run (or resume) training as configured.

    ``resume``: a run directory, its ``checkpoints`` directory or one checkpoint's directory (the newest
    intact checkpoint is used). ``overwrite``: an ``out_dir`` that already holds a run is moved aside to
    ``out_dir/previous-<time>/`` (otherwise refused). ``allow_changes``: a resume may change settings that
    change the run's math (`RESUME_POLICY`). ``model_builder(model_config, device) -> (model, tokenizer)``
    replaces :func:`egrpo.trainer.model.build_model` (benchmarks build models of other shapes).
    ``stop_after`` ends the run after that many steps of THIS invocation, as if killed (checkpoints follow
    ``train.save_every``; no final checkpoint or export).

    Returns a summary: paths of the outputs, per-step metric records of this invocation (rank 0),
    ``resumed_from`` (step), ``stopped_by`` (signal name, if any), and with ``return_params`` the final
    trainable parameters (CPU copies).

    Before the first step SIGINT (Ctrl-C) interrupts at once (KeyboardInterrupt: nothing to save yet) and SIGTERM
    keeps its own handler (by default the process ends); during the loop either saves a checkpoint at the end of
    the step and returns (a second one interrupts at once)."""
    with InterruptAtOnce() as interrupts:
        return _train(cfg, resume, interrupts, overwrite, allow_changes, model_builder, stop_after, return_params)


def _train(cfg: Config, resume: Optional[str], interrupts: InterruptAtOnce, overwrite: bool, allow_changes: bool,
           model_builder: Optional[Callable], stop_after: Optional[int], return_params: bool) -> Dict[str, Any]:
    import deepspeed
    import torch.distributed as dist

    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))   # before any process group (device=cuda)
    device_type = "cuda" if (cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())) else "cpu"
    rank, world, local_rank = init_distributed(device_type)
    cfg.validate(world_size=world)
    device = pick_device(cfg, local_rank)
    t = cfg.train
    seed_everything(derived_seed(t.seed, rank))
    is_main = rank == 0
    out_dir = t.out_dir
    ckpt_root = os.path.join(out_dir, "checkpoints")

    # ---- objective first: a setting the trainer cannot serve fails before any weights load
    objective = build_objective(cfg.objective.name, cfg.objective.settings)
    effective = cfg.effective_dict()

    # ---- run directory: one training at a time; never destroy a run; a resume may change only what its
    # policy allows
    lock_error: List[Any] = [None]
    if is_main:
        try:
            acquire_run_lock(out_dir)
        except RunDirError as e:
            lock_error[0] = e
    dist.broadcast_object_list(lock_error, src=0)
    if lock_error[0] is not None:
        raise lock_error[0]
    step, data_position, resume_from, changes = 0, 0, None, []
    if resume is not None:
        found: List[Any] = [None]
        if is_main:
            try:
                found[0] = find_checkpoint(resume)
            except CheckpointError as e:
                found[0] = e
        dist.broadcast_object_list(found, src=0)
        if isinstance(found[0], Exception):
            raise found[0]
        load_dir, tag, problems = found[0]
        resume_from = os.path.join(load_dir, tag)
        for problem in problems:
            say(f"warning: skipping a damaged checkpoint: {problem}", is_main)
        if problems:
            say(f"resuming from the newest intact checkpoint {resume_from}", is_main)
        state, changes = check_resume(load_dir, tag, out_dir, effective, overwrite, allow_changes, world)
    else:
        check_out_dir(out_dir, overwrite)
    dist.barrier()

    # ---- rewards first (a wrong checkpoint path fails before minutes of policy loading), model, reference, data
    try:
        reward_set = build_rewards(cfg.rewards)
    except (ValueError, ImportError, OSError) as e:   # bad arguments, missing package or weights
        message = str(e)   # (the registry's messages already name the entry: rewards[i] ...)
        raise ConfigError(message if message.startswith("rewards") else f"rewards: {message}") from e
    if is_main:   # (after the rewards: a reward that refuses its arguments leaves the previous run where it was)
        if overwrite and holds_run(out_dir) and not (resume_from and same_path(os.path.dirname(load_dir), out_dir)):
            say(f"moved the previous run to {move_previous_run(out_dir)}")
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    builder = model_builder or build_model
    model, tokenizer = load_model(builder, cfg.model, device)
    # guided log-probs (objective.logprob_source: guided) need the unconditional branch with the sampler's layout
    guidance = (janus_tokens(tokenizer), cfg.rollout.cfg_scale) if objective.needs.unconditional_hidden else None
    if cfg.rollout.image_tokens != num_image_tokens(model):
        raise ConfigError(f"rollout.image_tokens={cfg.rollout.image_tokens} but the model makes "
                          f"{num_image_tokens(model)} image tokens per image")
    ref_model = None
    if needs_reference(objective):
        ref_model, _ = load_model(builder, cfg.model, device)   # the initial policy, frozen
        ref_model.requires_grad_(False)
    prompts, metadata = load_prompts(cfg.data)
    stream = PromptStream(prompts, metadata, t.seed, cfg.data.shuffle)
    backend, chunk_size = objective.settings.backend, objective.settings.chunk_size

    # ---- DeepSpeed engine
    total_updates = t.steps * t.updates_per_rollout
    schedule = WarmupSchedule(cfg.optim.warmup_steps, total_updates, cfg.optim.schedule, cfg.optim.min_lr_ratio)
    optimizer = build_optimizer(cfg, model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    module = engine.module
    sampler = make_engine(module, cfg.rollout)   # the rollout engine (None: plain loop); built once for compile
    zero3 = cfg.deepspeed.zero_stage == 3
    if zero3 and sampler is not None and sampler.config.cuda_graph:
        # ZeRO-3 hooks every module the engine calls (parameter fetch / release bookkeeping, prefetch, stream
        # syncs): Python run per call, which a CUDA graph would record once and replay without, and a host sync
        # inside a capture fails it. No config switch for this: the engine's eager step is what ZeRO-3 gets.
        sampler.config = replace(sampler.config, cuda_graph=False)
        if torch.device(device).type == "cuda":
            say("rollout engine: CUDA graphs off under DeepSpeed ZeRO-3 (its parameter-fetch hooks cannot be "
                "captured); eager decode step", is_main)
    if ref_model is not None and zero3:
        ref_model = partitioned_reference(ref_model, cfg, world)
    trainable = [p for p in module.parameters() if p.requires_grad]

    last_good = None
    if resume_from is not None:
        step, data_position = load_checkpoint(engine, load_dir, tag, rank)
        last_good = resume_from
        if any(c.startswith(("optim.", "train.steps", "train.updates_per_rollout")) for c in changes):
            apply_optim_settings(scheduler, cfg, total_updates)
        say(f"resumed from step {step} ({resume_from})", is_main)
        for line in changes:
            say(f"resume changes {line}", is_main)
    started_at = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step}

    def record_config() -> None:
        """The run's config.yaml and its history line, written once this invocation has completed a step: a
        start or a changed resume that fails earlier leaves the run's recorded settings as they were. A resume
        from an older checkpoint of this run moves the newer ones (now another branch) aside at that point."""
        if is_main:
            if resume_from is not None and same_path(os.path.dirname(load_dir), out_dir):
                moved = set_aside_newer_checkpoints(load_dir, tag, int(state["step"]))
                if moved:
                    say(f"the checkpoints after step {int(state['step'])} of the run this resume continues belong to "
                        f"another branch now; moved to {moved}")
            if resume_from is not None:
                moved = set_aside_newer_evals(out_dir, int(state["step"]))
                if moved:
                    say(f"the evaluations after step {int(state['step'])} were of other weights; moved to {moved}")
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
            with open(os.path.join(out_dir, "config_history.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({**started_at, "event": "resume" if resume_from else "start",
                                    "resumed_from": resume_from, "changes": changes, "config": effective}) + "\n")
        dist.barrier()   # the eval folders are set aside before any process evaluates this run's first step

    logger = MetricLogger(out_dir, enabled=is_main, tensorboard=t.tensorboard,
                          resume_step=step if resume_from is not None else None)

    # ---- evaluation during training (docs/evaluation.md, "During training"): every process calls it
    evaluator = build_evaluator(cfg, out_dir, device, state if resume_from is not None else None, is_main)

    def generate_eval_images(prompts: Sequence[str], n: int, seed: int) -> torch.Tensor:
        """The policy's own sampling (the training rollout, its settings) with n images per prompt, seeded by
        the eval seed alone so every evaluation of the run draws with the same noise."""
        generator = torch.Generator(device=device).manual_seed(seed)
        with zero3_gather(module.parameters(), zero3):
            ro = rollout(module, tokenizer, list(prompts), replace(cfg.rollout, group_size=n, images_per_cot=1),
                         generator, engine=sampler)   # the training rollout's engine: its compiled steps, and no
                                                      # CUDA graphs under ZeRO-3
        return ro.images.float().cpu()

    def extra_state() -> Dict[str, Any]:   # the process count: a resume with another one is checked
        return {"processes": world, **({"eval": evaluator.state_dict()} if evaluator is not None else {})}

    G = cfg.rollout.samples_per_prompt   # rows per prompt: group_size CoTs (or images) x images_per_cot
    local_prompts = cfg.data.prompts_per_step // world
    micro_prompts = local_prompts // cfg.optim.grad_accum
    reward_weights = reward_set.weights
    history: List[Dict[str, float]] = []
    grids: List[str] = []
    progress = None
    if is_main and t.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def diverged(what: str) -> DivergenceError:
        return DivergenceError(
            f"training diverged at step {step + 1}: {what}; try a lower optim.lr (now {cfg.optim.lr:g}). Last good "
            f"checkpoint: {last_good or 'none yet (train.save_every)'}"
            + (f"; continue from it with --resume {out_dir} --allow-changes optim.lr=... (its weights are finite but "
               f"were already updated at this learning rate: if the resumed run diverges again at once, resume from "
               f"an earlier checkpoint, --resume {out_dir}/checkpoints/step_NNNNNN, or start afresh with --overwrite)"
               if last_good else ""))

    steps_this_run, saved_at, stop_signal, stopper = 0, None, 0, StopOnSignal()
    interrupts.raise_if_dropped()   # a signal during the start whose KeyboardInterrupt Python dropped
    with stopper:
        while step < t.steps:
            if stop_after is not None and steps_this_run >= stop_after:
                break
            t_step = time.perf_counter()
            timers = dict.fromkeys(("rollout", "reward", "ref", "loss", "update"), 0.0)
            batch_start = data_position + rank * local_prompts

            # ---- rollout, rewards, reference (no grad)
            micro_batches: List[MicroBatch] = []
            rollout_metrics = []
            skipped_rows: List[torch.Tensor] = []
            for j in range(cfg.optim.grad_accum):
                p_list, m_list = stream.take(batch_start + j * micro_prompts, micro_prompts)
                generator = torch.Generator(device=device).manual_seed(derived_seed(t.seed, step, rank * cfg.optim.grad_accum + j))
                t0 = time.perf_counter()
                with zero3_gather(module.parameters(), zero3):
                    try:
                        ro = rollout(module, tokenizer, p_list, cfg.rollout, generator, sampler)
                    except RuntimeError as e:   # sampling from NaN/inf probabilities: the weights have diverged
                        if "inf" in str(e) or "nan" in str(e):
                            raise diverged(f"non-finite sampling probabilities ({str(e).splitlines()[0]})") from e
                        raise
                    codes = codebook_vectors(module, ro.image_tokens) if objective.needs.codebook_vectors else None
                timers["rollout"] += time.perf_counter() - t0
                rollout_metrics.append(ro.metrics)
                t0 = time.perf_counter()
                meta = [m for m in m_list for _ in range(G)]
                rewards = reward_set(ro.images, ro.prompts, meta, group_size=G)
                skipped_rows.append(reward_set.last_skipped)
                for failure in reward_set.pop_failures():
                    say(f"warning: step {step + 1}: {failure}; group skipped ({reward_set.skipped} so far)")
                rewards, reward_ok = mask_failed_rewards(rewards, G)   # NaN only from rewards with on_failure: mask
                ro.metrics["reward/masked_frac"] = float((~reward_ok).float().mean())
                timers["reward"] += time.perf_counter() - t0
                mb = MicroBatch(rollout=ro, metadata=meta, rewards=rewards, codes=codes, guidance=guidance)
                t0 = time.perf_counter()
                if ref_model is not None:
                    with zero3_gather(head_weights(ref_model), zero3):
                        mb.ref = head_logp_entropy(ref_model, ro, backend, chunk_size, guidance)
                if t.updates_per_rollout > 1:   # PPO-style reuse: the ratio is taken against the sampling policy
                    with zero3_gather(head_weights(module), zero3):
                        mb.old = {k: v[0] for k, v in head_logp_entropy(module, ro, backend, chunk_size, guidance).items()}
                timers["ref"] += time.perf_counter() - t0
                micro_batches.append(mb)
            data_position += cfg.data.prompts_per_step

            # ---- updates
            loss_metrics, grad_norms, lrs = [], [], []
            for _ in range(t.updates_per_rollout):
                for j, mb in enumerate(micro_batches):
                    lrs_now = engine.get_lr()[0]
                    t0 = time.perf_counter()
                    with zero3_gather(head_weights(module), zero3):
                        loss, metrics = micro_loss(module, objective, mb, G, reward_weights, t.head_impl)
                        if not loss.requires_grad:   # DeepSpeed's backward would fail with "loss must be a scalar"
                            raise ConfigError(
                                f"model.trainable={list(cfg.model.trainable)}: no trainable parameter reaches the "
                                "loss (image tokens train model.language_model and the generation head, embeddings "
                                "and aligner; lm_head only with rollout.cot; the VQ model and the understanding "
                                "encoder never train)")
                        if not torch.isfinite(loss):
                            raise diverged(f"non-finite loss {loss.item()}")
                        t1 = time.perf_counter()
                        timers["loss"] += t1 - t0
                        engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    manual = manual_grad_norm(trainable) if boundary and cfg.deepspeed.zero_stage == 0 else None
                    engine.step()
                    timers["update"] += time.perf_counter() - t1
                    loss_metrics.append(metrics)
                norm = engine.get_global_grad_norm()
                grad_norms.append(float(norm) if norm is not None else float(manual or 0.0))
                lrs.append(lrs_now)

            # ---- one agreement per step: parameters finite everywhere, stop requested anywhere
            flags = torch.tensor([float(not local_parameters_finite(trainable)), float(stopper.signum or 0)],
                                 device=device)
            if world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0] > 0:
                raise diverged("non-finite parameters after the update")
            stop_signal = int(flags[1])
            step += 1
            steps_this_run += 1
            if steps_this_run == 1:
                record_config()

            # ---- metrics: mean over micro-batches, then over processes; rewards gathered for exact stats
            local = {**mean_dicts(loss_metrics), **mean_dicts(rollout_metrics)}
            local["grad_norm"] = float(np.mean(grad_norms))
            local["lr"] = float(lrs[-1])
            all_rewards = torch.cat([mb.rewards for mb in micro_batches]).cpu()
            kept_rows = ~torch.cat(skipped_rows).cpu()
            gathered: List[Any] = [None] * world
            dist.all_gather_object(gathered, (local, all_rewards, kept_rows))
            record = mean_dicts([g[0] for g in gathered])
            rewards_all = torch.cat([g[1] for g in gathered])
            kept_all = torch.cat([g[2] for g in gathered])
            if "skip_group" in reward_set.on_error:   # every step of a run that can skip, 0 included (plots)
                record["reward/skipped_groups"] = float((~kept_all).sum()) / G
            if not kept_all.all():
                rewards_all = rewards_all[kept_all]
            combined = reward_set.combine(rewards_all)
            record["reward/mean"], record["reward/std"] = float(combined.mean()), float(combined.std())
            for k, name in enumerate(reward_set.names):
                record[f"reward/{name}/mean"] = float(rewards_all[:, k].mean())
                record[f"reward/{name}/std"] = float(rewards_all[:, k].std())
            record.update({f"time/{k}": v for k, v in timers.items()})
            record["time/step"] = time.perf_counter() - t_step
            record["memory/peak_mb"] = peak_memory_mb(device)

            # ---- evaluation when due (every process; process 0 scores); a new best is saved as `best`
            evaluated = evaluator is not None and evaluator.due(step)
            if evaluated:
                t0 = time.perf_counter()
                try:
                    result = evaluator.evaluate(step, generate_eval_images, show_progress=t.progress)
                except EvalError as e:
                    raise ConfigError(f"{e} (evaluation after step {step}; last checkpoint: "
                                      f"{last_good or 'none yet'})") from e
                record.update(result.metrics)
                record["time/eval"] = time.perf_counter() - t0
                if result.is_best:
                    best_dir = save_best(engine, ckpt_root, step, data_position, rank, config=effective,
                                         extra_state=extra_state())
                    say(f"step {step}: new best eval/{cfg.eval.metric} = {result.value:.6g}, saved {best_dir}",
                        is_main)
            if is_main:
                history.append({"step": step, **record})
                if step % t.log_every == 0 or step == t.steps or evaluated:
                    logger.log(step, record)
                if t.sample_every and (step % t.sample_every == 0 or step == t.steps):
                    mb = micro_batches[0]
                    grids.append(save_sample_grid(
                        os.path.join(out_dir, "samples", f"step_{step:06d}.png"), mb.rollout.images, mb.rollout.prompts,
                        reward_set.combine(mb.rewards), ncols=G, title=f"step {step}"))
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(reward=f"{record['reward/mean']:.4f}", loss=f"{record.get('loss', float('nan')):.4f}")

            # ---- checkpoint (on schedule, or now when a signal asked to stop)
            if (t.save_every and step % t.save_every == 0 and step < t.steps) or (stop_signal and step < t.steps):
                last_good = save_checkpoint(engine, ckpt_root, step, data_position, rank, config=effective,
                                            keep_last=t.keep_last, extra_state=extra_state())
                saved_at = step
            if stop_signal:
                break

    if progress is not None:
        progress.close()
    finished = step >= t.steps
    summary: Dict[str, Any] = {"out_dir": out_dir, "metrics": logger.path, "history": history, "step": step,
                               "samples": grids, "finished": finished, "resumed_from": resume_from,
                               "stopped_by": (signal.Signals(stop_signal).name
                                              if steps_this_run and stop_signal and not finished else None),
                               "tensorboard": os.path.join(out_dir, "tensorboard") if t.tensorboard else None}
    if summary["stopped_by"]:
        summary["checkpoint"] = last_good
    if finished:   # (a signal received in the last step already armed "a second one stops at once")
        with FinishOnSignal() if not stop_signal else contextlib.nullcontext():
            summary["checkpoint"] = (last_good if saved_at == step else
                                     save_checkpoint(engine, ckpt_root, step, data_position, rank, config=effective,
                                                     keep_last=t.keep_last, extra_state=extra_state()))
            if t.export_hf:
                summary["export"] = export_hf(engine, module, tokenizer, os.path.join(out_dir, "hf"), zero3, rank,
                                              t.export_format, checkpoint=summary["checkpoint"])
        if is_main and os.path.exists(logger.path) and read_metrics(logger.path):
            summary["plot"] = plot_curves(logger.path, os.path.join(out_dir, "curves.png"))
    if evaluator is not None:   # after the final save, whose pruning (train.keep_last) may remove a step checkpoint
        summary["best"] = {"value": evaluator.best_value, "step": evaluator.best_step, "metric": cfg.eval.metric,
                           "checkpoint": best_checkpoint(ckpt_root, evaluator.best_step) if is_main else None}
    if return_params:
        summary["params"] = trainable_state(engine, module, zero3)
    logger.close()
    if is_main:
        release_run_lock(out_dir)
    return summary


def build_evaluator(cfg: Config, out_dir: str, device: torch.device, resumed_state: Optional[Dict[str, Any]],
                    is_main: bool):
    """The `TrainingEvaluator` of ``cfg.eval`` (None when off), with the best value of the checkpoint resumed
    from, its prompts read and its scoring models loaded (a bad setting stops the run before its first step).
    On resume, eval folders of steps after the checkpoint are set aside once the resumed run has completed a
    step (`set_aside_newer_evals`): they are evaluated again, from the resumed weights. Call it on every
    process."""
    if not cfg.eval.every_steps:
        return None
    from egrpo.eval.training import TrainingEvaluator

    evaluator = TrainingEvaluator(cfg.eval, out_dir, device=str(device))
    if resumed_state is not None:
        if not evaluator.load_state_dict(resumed_state.get("eval") or {}):
            say("eval settings that define the best value changed since the checkpoint: the best value starts "
                "afresh (checkpoints/best is replaced at the next evaluation)", is_main)
    try:
        evaluator.prepare()
    except (ValueError, OSError, ImportError) as e:   # EvalError, bad or missing weights, a missing package
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(message if message.startswith("eval.") else f"eval: {message}") from e
    return evaluator


def load_model(builder: Callable, model_cfg, device):
    """``builder(model_cfg, device)`` with a missing or unloadable ``model.path`` as one ConfigError line."""
    try:
        return builder(model_cfg, device)
    except (OSError, ValueError) as e:   # transformers: OSError for a missing repo/dir, ValueError for a bad config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if model_cfg.path:
            raise ConfigError(f"model.path {model_cfg.path!r} could not be loaded (not a local HF-format directory, "
                              f"and not a model id that could be fetched): {first}") from e
        raise ConfigError(f"model: {first}") from e
