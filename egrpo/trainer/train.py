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
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from egrpo.objectives import build_objective
from egrpo.rewards.base import mask_failed_rewards

from .config import Config, ConfigError, load_prompts, save_config
from .metrics import MetricLogger, peak_memory_mb, plot_curves, read_metrics, save_sample_grid
from .model import build_model, num_image_tokens
from .rewards import build_rewards
from .rollout import codebook_vectors, head_inputs, rollout

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
    micro_samples = micro_prompts * cfg.rollout.group_size
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


def head_logp_entropy(model, ro, backend: str, chunk_size) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per part ("image", "text"): (logp, entropy) [B, T] float32 of the sampled tokens, no grad, fused head."""
    with torch.no_grad():
        image, text = head_inputs(model, ro)
        return {name: tuple(t.float() for t in batch.logp_entropy(backend, chunk_size))
                for name, batch in (("image", image), ("text", text)) if batch is not None}


def needs_reference(objective) -> bool:
    """Whether the objective needs a frozen reference model (KL term, reference entropies); it says so itself."""
    return objective.needs.reference_model


def micro_loss(model, objective, mb: MicroBatch, group_size: int, reward_weights: torch.Tensor,
               head_impl: str = "fused"):
    """Policy forward + objective for one micro-batch -> (loss, metrics). Grad enabled. ``head_impl``: the
    objective's token loss through the fused kernels or through full logits (``train.head_impl``)."""
    image, text = head_inputs(model, mb.rollout)
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


def resolve_checkpoint(path: str) -> Tuple[str, str]:
    """``(load_dir, tag)`` from a run directory, its ``checkpoints`` directory, or one checkpoint's directory."""
    for load_dir in (os.path.join(path, "checkpoints"), path):
        latest = os.path.join(load_dir, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                return load_dir, f.read().strip()
    if os.path.isfile(os.path.join(path, "trainer_state.pt")):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    raise FileNotFoundError(f"--resume {path!r}: no checkpoint found (expected a run directory, its checkpoints/ "
                            "directory with a 'latest' file, or a checkpoint directory)")


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


def save_checkpoint(engine, ckpt_root: str, step: int, data_position: int, rank: int) -> str:
    """DeepSpeed checkpoint (model, optimizer, LR scheduler) plus trainer state and per-rank RNG states.
    The rollout generators need no state: they are re-seeded from (seed, step, micro-batch) every step."""
    import torch.distributed as dist

    tag = f"step_{step:06d}"
    engine.save_checkpoint(ckpt_root, tag=tag, client_state={"step": step, "data_position": data_position})
    tag_dir = os.path.join(ckpt_root, tag)
    torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{rank:03d}.pt"))
    if rank == 0:
        torch.save({"step": step, "data_position": data_position}, os.path.join(tag_dir, "trainer_state.pt"))
    dist.barrier()
    return tag_dir


def load_checkpoint(engine, path: str, rank: int) -> Tuple[int, int]:
    load_dir, tag = resolve_checkpoint(path)
    _, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise FileNotFoundError(f"--resume: DeepSpeed could not load {os.path.join(load_dir, tag)}")
    rng_file = os.path.join(load_dir, tag, f"rng_rank{rank:03d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return int(client["step"]), int(client["data_position"])


def trainable_state(engine, model, zero3: bool) -> Dict[str, torch.Tensor]:
    """Full copies (CPU, fp32) of the trainable parameters, gathered under ZeRO-3."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with zero3_gather([p for _, p in params], zero3):
        return {n: p.detach().float().cpu().clone() for n, p in params}


def export_hf(engine, model, tokenizer, out: str, zero3: bool, rank: int) -> Optional[str]:
    """HF-format directory (config + model.safetensors + tokenizer) of the trained model, written by rank 0."""
    import torch.distributed as dist

    with zero3_gather(list(model.parameters()), zero3):
        if rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(out)
    dist.barrier()
    return out if rank == 0 else None


# ---------------------------------------------------------------------------------------------- train


def train(cfg: Config, resume: Optional[str] = None, *, stop_after: Optional[int] = None,
          return_params: bool = False) -> Dict[str, Any]:
    """Run (or resume) training as configured. ``stop_after`` ends the run after that many steps of THIS
    invocation, as if killed (checkpoints follow ``train.save_every``; no final checkpoint or export).

    Returns a summary: paths of the outputs, per-step metric records (rank 0), and with ``return_params``
    the final trainable parameters (CPU copies)."""
    import deepspeed
    import torch.distributed as dist

    device_type = "cuda" if (cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())) else "cpu"
    rank, world, local_rank = init_distributed(device_type)
    cfg.validate(world_size=world)
    device = pick_device(cfg, local_rank)
    t = cfg.train
    seed_everything(derived_seed(t.seed, rank))
    is_main = rank == 0
    out_dir = t.out_dir
    ckpt_root = os.path.join(out_dir, "checkpoints")
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))

    # ---- objective, model, reference, rewards, data
    objective = build_objective(cfg.objective.name, cfg.objective.settings)
    if objective.needs.sampling_logp:
        raise ConfigError("objective.tis_clip_max needs the log-probs of the sampling (CFG) distribution, which the "
                          "rollout does not record yet; leave objective.tis_clip_max null")
    model, tokenizer = build_model(cfg.model, device)
    if cfg.rollout.image_tokens != num_image_tokens(model):
        raise ConfigError(f"rollout.image_tokens={cfg.rollout.image_tokens} but the model makes "
                          f"{num_image_tokens(model)} image tokens per image")
    ref_model = None
    if needs_reference(objective):
        ref_model, _ = build_model(cfg.model, device)   # the initial policy, frozen
        ref_model.requires_grad_(False)
    reward_set = build_rewards(cfg.rewards)
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
    zero3 = cfg.deepspeed.zero_stage == 3
    if ref_model is not None and zero3:
        ref_model = partitioned_reference(ref_model, cfg, world)
    trainable = [p for p in module.parameters() if p.requires_grad]

    step, data_position = 0, 0
    if resume is not None:
        step, data_position = load_checkpoint(engine, resume, rank)
    logger = MetricLogger(out_dir, enabled=is_main, tensorboard=t.tensorboard,
                          resume_step=step if resume is not None else None)

    G = cfg.rollout.group_size
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

    steps_this_run = 0
    while step < t.steps:
        if stop_after is not None and steps_this_run >= stop_after:
            break
        t_step = time.perf_counter()
        timers = dict.fromkeys(("rollout", "reward", "ref", "loss", "update"), 0.0)
        batch_start = data_position + rank * local_prompts

        # ---- rollout, rewards, reference (no grad)
        micro_batches: List[MicroBatch] = []
        rollout_metrics = []
        for j in range(cfg.optim.grad_accum):
            p_list, m_list = stream.take(batch_start + j * micro_prompts, micro_prompts)
            generator = torch.Generator(device=device).manual_seed(derived_seed(t.seed, step, rank * cfg.optim.grad_accum + j))
            t0 = time.perf_counter()
            with zero3_gather(module.parameters(), zero3):
                ro = rollout(module, tokenizer, p_list, cfg.rollout, generator)
                codes = codebook_vectors(module, ro.image_tokens) if objective.needs.codebook_vectors else None
            timers["rollout"] += time.perf_counter() - t0
            rollout_metrics.append(ro.metrics)
            t0 = time.perf_counter()
            meta = [m for m in m_list for _ in range(G)]
            rewards = reward_set(ro.images, ro.prompts, meta)
            rewards, reward_ok = mask_failed_rewards(rewards, G)   # NaN only from rewards with on_failure: mask
            ro.metrics["reward/masked_frac"] = float((~reward_ok).float().mean())
            timers["reward"] += time.perf_counter() - t0
            mb = MicroBatch(rollout=ro, metadata=meta, rewards=rewards, codes=codes)
            t0 = time.perf_counter()
            if ref_model is not None:
                with zero3_gather(head_weights(ref_model), zero3):
                    mb.ref = head_logp_entropy(ref_model, ro, backend, chunk_size)
            if t.updates_per_rollout > 1:   # PPO-style reuse: the ratio is taken against the sampling policy
                with zero3_gather(head_weights(module), zero3):
                    mb.old = {k: v[0] for k, v in head_logp_entropy(module, ro, backend, chunk_size).items()}
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
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
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
        step += 1
        steps_this_run += 1

        # ---- metrics: mean over micro-batches, then over processes; rewards gathered for exact stats
        local = {**mean_dicts(loss_metrics), **mean_dicts(rollout_metrics)}
        local["grad_norm"] = float(np.mean(grad_norms))
        local["lr"] = float(lrs[-1])
        all_rewards = torch.cat([mb.rewards for mb in micro_batches]).cpu()
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, (local, all_rewards))
        record = mean_dicts([g[0] for g in gathered])
        rewards_all = torch.cat([g[1] for g in gathered])
        combined = reward_set.combine(rewards_all)
        record["reward/mean"], record["reward/std"] = float(combined.mean()), float(combined.std())
        for k, name in enumerate(reward_set.names):
            record[f"reward/{name}/mean"] = float(rewards_all[:, k].mean())
            record[f"reward/{name}/std"] = float(rewards_all[:, k].std())
        record.update({f"time/{k}": v for k, v in timers.items()})
        record["time/step"] = time.perf_counter() - t_step
        record["memory/peak_mb"] = peak_memory_mb(device)
        if is_main:
            history.append({"step": step, **record})
            if step % t.log_every == 0 or step == t.steps:
                logger.log(step, record)
            if t.sample_every and (step % t.sample_every == 0 or step == t.steps):
                mb = micro_batches[0]
                grids.append(save_sample_grid(
                    os.path.join(out_dir, "samples", f"step_{step:06d}.png"), mb.rollout.images, mb.rollout.prompts,
                    reward_set.combine(mb.rewards), ncols=G, title=f"step {step}"))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{record['reward/mean']:.4f}", loss=f"{record.get('loss', float('nan')):.4f}")

        # ---- checkpoint
        if t.save_every and step % t.save_every == 0 and step < t.steps:
            save_checkpoint(engine, ckpt_root, step, data_position, rank)

    if progress is not None:
        progress.close()
    finished = step >= t.steps
    summary: Dict[str, Any] = {"out_dir": out_dir, "metrics": logger.path, "history": history, "step": step,
                               "samples": grids, "finished": finished}
    if finished:
        summary["checkpoint"] = save_checkpoint(engine, ckpt_root, step, data_position, rank)
        if t.export_hf:
            summary["export"] = export_hf(engine, module, tokenizer, os.path.join(out_dir, "hf"), zero3, rank)
        if is_main and os.path.exists(logger.path) and read_metrics(logger.path):
            summary["plot"] = plot_curves(logger.path, os.path.join(out_dir, "curves.png"))
    if return_params:
        summary["params"] = trainable_state(engine, module, zero3)
    logger.close()
    return summary
