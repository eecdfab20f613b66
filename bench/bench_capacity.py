"""Training capacity: the most images per micro-batch that fit ONE training step, fused vs eager heads.

    python -m bench.bench_capacity                      # CUDA: Janus-Pro-1B and -7B shapes; CPU: tiny shapes
    python -m bench.bench_capacity --models janus-pro-1b --heads fused --cot off --time-budget 500
    python -m bench.bench_capacity --device cpu    # smoke run: tiny model, --max-images 8 --simulate-oom-above 5

One *trial* is one real step of :func:`egrpo.trainer.train.train` (rollout with KV-cached CFG, optional
CoT, reward, reference log-probs, teacher-forced loss through the heads, backward, optimizer step) on a
random-weight model of the given shape, with ``n_prompts`` prompts x ``group_size`` images in ONE
micro-batch (``optim.grad_accum=1``). The only thing that changes between the compared runs is
``train.head_impl``: ``fused`` (the chunked kernels) or ``eager`` (full ``[N, V]`` logits, as the
reference trainers do).

The search doubles ``n_prompts`` until a trial fails with CUDA OOM, then bisects between the last size
that fitted and the first that did not; a ``torch.cuda.OutOfMemoryError`` is caught, the memory freed,
and the search goes on. At the largest size that fits, the step's ``time/*`` metrics (rollout, reward,
ref, loss, update) and ``memory/peak_mb`` are recorded. If even one group of ``group_size`` images does
not fit, smaller groups (4, then 2 images) are tried, so that a model that fits only a few images still
gets a number.

Model shapes (docs/algorithms.md, Janus-Pro shapes), random init, bf16, built directly on the GPU:

- ``janus-pro-1b``: LM 2048 x 24 layers x 16 heads (MLP 5632), text vocab 102400, generation head
  2048 -> 2048 -> 16384, SigLIP-L-sized vision tower (frozen, unused by generation), VQ decoder of
  Janus (384 px). DeepSpeed ZeRO-0 with bf16 (fp32 master weights + AdamW states on the GPU).
- ``janus-pro-7b``: LM 4096 x 30 x 32 (MLP 11008). A full-parameter AdamW step on the 6.9 B LM
  parameters needs ~20 bytes/parameter under DeepSpeed bf16 (~138 GB) and does not fit in one 80 GB
  (or 141 GB) GPU, so this plan uses ZeRO-3 with the optimizer states offloaded to CPU RAM
  (``offload_optimizer: cpu``; torch AdamW on the CPU, ``zero_force_ds_cpu_optimizer: false``) and
  gradient checkpointing. That needs ~16 bytes/parameter of host RAM (~110 GB); when the host has
  less, the plan is recorded as "does not fit" with those numbers instead of being run.
- ``tiny``: the trainer tests' tiny model (CPU smoke test; nothing about it is a capacity claim).

What is NOT like a published run, on purpose: the reward is the offline colour reward (the published
runs load HPS / GIT / GroundingDINO / ORM reward models, whose memory and time are not included here);
the CoT is sampled from random weights (with a 102400-token vocabulary EOS is rare, so it runs to the
256-token cap almost always; the measured mean length is recorded).

Results: ``bench/results/capacity_<cpu|cuda>.json`` (device, versions, date, shapes, every trial), and
the "Training capacity" section of ``bench/README.md`` (rendered by :func:`bench.render.capacity_lines`, which
``bench/render.py`` calls).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
HEADS = ("fused", "eager")

# Janus-Pro VQ decoder / SigLIP-L understanding tower (frozen: they only cost weight memory and decode time).
_FULL_COMMON = dict(
    max_position_embeddings=4096, image_size=384, patch_size=16, image_vocab_size=16384, codebook_dim=8,
    vq_base_channels=128, vq_channel_multiplier=(1, 1, 2, 2, 4), vq_num_res_blocks=2, vq_latent_channels=256,
    vision_hidden_size=1024, vision_layers=24, vision_heads=16, initializer_range=0.02,
)


@dataclasses.dataclass
class ModelPlan:
    """A model shape plus how one GPU trains it."""

    name: str
    tiny: Dict[str, Any]                  # overrides of egrpo.trainer.model.TINY_DEFAULTS
    text_vocab: Optional[int]             # LM head width; None = the char tokenizer's size
    image_tokens: int
    cot_tokens: int                       # the CoT cap of the "with CoT" runs
    dtype: str = "bf16"
    zero_stage: int = 0
    offload_optimizer: bool = False       # ZeRO-3 optimizer states (and their AdamW step) in CPU RAM
    gradient_checkpointing: bool = False
    group_size: int = 8
    notes: str = ""

    def shape(self) -> Dict[str, Any]:
        return {"tiny_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in self.tiny.items()},
                "text_vocab": self.text_vocab, "image_tokens": self.image_tokens, "cot_tokens": self.cot_tokens,
                "dtype": self.dtype, "zero_stage": self.zero_stage, "offload_optimizer": self.offload_optimizer,
                "gradient_checkpointing": self.gradient_checkpointing, "group_size": self.group_size}


PLANS: Dict[str, ModelPlan] = {
    "janus-pro-1b": ModelPlan(
        "janus-pro-1b", dict(_FULL_COMMON, hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632),
        text_vocab=102400, image_tokens=576, cot_tokens=256, zero_stage=0,
        notes="full-parameter AdamW on the LM (embeddings, 24 layers, LM head); DeepSpeed bf16, ZeRO-0"),
    "janus-pro-7b": ModelPlan(
        "janus-pro-7b", dict(_FULL_COMMON, hidden_size=4096, num_layers=30, num_heads=32, intermediate_size=11008),
        text_vocab=102400, image_tokens=576, cot_tokens=256, zero_stage=3, offload_optimizer=True,
        gradient_checkpointing=True,
        notes="full-parameter AdamW on the LM; ZeRO-3 with optimizer states offloaded to CPU RAM (torch AdamW "
              "steps there) and gradient checkpointing: the only way this trainer fits it on one GPU"),
    "tiny": ModelPlan(
        "tiny", dict(image_size=32, num_layers=1), text_vocab=None, image_tokens=16, cot_tokens=8, dtype="fp32",
        group_size=2, notes="CPU smoke test only"),
}


# ------------------------------------------------------------------------------------------------
# Model building at full size
# ------------------------------------------------------------------------------------------------

def build_shaped_model(model_cfg, device, text_vocab: Optional[int] = None):
    """``build_model`` for a random model of any size: the config comes from ``tiny_janus_config`` (plus a
    text vocabulary of ``text_vocab``), and the weights are initialised directly on ``device`` in the
    model dtype (a 7B model initialised on the CPU in fp32 would take minutes and 30 GB per trial).
    Same freezing / gradient checkpointing as :func:`egrpo.trainer.model.build_model`."""
    import torch
    from transformers import JanusForConditionalGeneration

    from egrpo.trainer.model import DTYPES, _attn_implementation, set_trainable, tiny_janus_config
    from egrpo.trainer.tokenizer import build_char_tokenizer

    device = torch.device(device)
    tokenizer = build_char_tokenizer()
    config = tiny_janus_config(tokenizer, **model_cfg.tiny)
    if text_vocab is not None:
        config.text_config.vocab_size = int(text_vocab)
    attn = _attn_implementation(model_cfg.attn_implementation)
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(model_cfg.seed)   # policy and reference model start equal
        model = JanusForConditionalGeneration._from_config(config, dtype=DTYPES[model_cfg.dtype])
    model.to(device=device, dtype=DTYPES[model_cfg.dtype])
    model.eval()
    if model_cfg.gradient_checkpointing:
        lm = model.model.language_model
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_trainable(model, model_cfg.trainable)
    return model, tokenizer


def count_params(plan: ModelPlan) -> Dict[str, int]:
    """Total and trainable parameter counts of ``plan``'s model, built on the meta device (no memory)."""
    import torch
    from transformers import JanusForConditionalGeneration

    from egrpo.trainer.model import ModelConfig, set_trainable, tiny_janus_config
    from egrpo.trainer.tokenizer import build_char_tokenizer

    config = tiny_janus_config(build_char_tokenizer(), **plan.tiny)
    if plan.text_vocab is not None:
        config.text_config.vocab_size = plan.text_vocab
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    trainable = set_trainable(model, ModelConfig().trainable)
    return {"total": sum(p.numel() for p in model.parameters()), "trainable": trainable}


def static_memory_check(plan: ModelPlan, device_type: str, beta: float) -> Optional[str]:
    """A reason the plan cannot fit at any batch size (weights + optimizer alone), or None."""
    if device_type != "cuda":
        return None
    import torch

    counts = count_params(plan)
    gib = 2**30
    gpu_total = torch.cuda.get_device_properties(0).total_memory
    models = 2 if beta > 0 else 1   # policy + frozen reference
    if plan.offload_optimizer:
        # GPU: bf16 weights of policy (+ reference); host: fp32 master + Adam m, v + fp32 grads = 16 B/param.
        gpu_need = 2 * counts["total"] * models
        host_need = 16 * counts["trainable"]
        host_avail = _host_available_bytes()
        if host_avail is not None and host_need > 0.9 * host_avail:
            return (f"does not fit on one GPU: ZeRO-3 CPU offload needs ~{host_need / gib:.0f} GiB of host RAM for the "
                    f"fp32 master weights, AdamW states and grads of {counts['trainable'] / 1e9:.2f} B trainable "
                    f"parameters; this host has {host_avail / gib:.0f} GiB available")
    else:
        # DeepSpeed bf16 (ZeRO-0/1/2 on one GPU): bf16 weights + bf16 grads + fp32 master + fp32 grads + m, v.
        gpu_need = 2 * counts["total"] * models + 18 * counts["trainable"]
    if gpu_need > gpu_total:
        return (f"does not fit on one GPU: weights and optimizer state alone need ~{gpu_need / gib:.0f} GiB "
                f"({counts['trainable'] / 1e9:.2f} B trainable of {counts['total'] / 1e9:.2f} B parameters) "
                f"> {gpu_total / gib:.0f} GiB")
    return None


def _host_available_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------
# One trial = one training step
# ------------------------------------------------------------------------------------------------

PROMPTS = ["a red apple on a table", "a blue car in the street", "a green tree in a field", "a yellow house"]


def trial_config(plan: ModelPlan, head_impl: str, cot: bool, n_prompts: int, group_size: int, device_type: str,
                 out_dir: str, objective: Dict[str, Any]):
    from egrpo.trainer.config import config_from_dict

    extra: Dict[str, Any] = {}
    if plan.offload_optimizer:
        extra = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": False}},
                 "zero_force_ds_cpu_optimizer": False}
    raw = {
        "model": {"tiny": dict(plan.tiny), "dtype": plan.dtype, "seed": 0,
                  "gradient_checkpointing": plan.gradient_checkpointing},
        "rollout": {"group_size": group_size, "cot": cot, "cot_max_tokens": plan.cot_tokens,
                    "image_tokens": plan.image_tokens, "cfg_scale": 5.0},
        "objective": dict(objective),
        # tolerance 1 (as configs/demo.yaml): every pixel scores a little, so rewards differ within a group and the
        # backward carries a non-zero gradient (the default tolerance can score a random tiny VQ model's images 0).
        "rewards": [{"name": "colour", "weight": 1.0, "tolerance": 1.0}],
        "data": {"prompts": PROMPTS, "prompts_per_step": n_prompts, "shuffle": False},
        "optim": {"lr": 1e-6, "grad_accum": 1, "grad_clip": 1.0},
        "deepspeed": {"zero_stage": plan.zero_stage, "extra": extra},
        # stop_after=1 of 2 steps: one step, and no final checkpoint (optimizer states of a 7B are ~100 GB).
        "train": {"steps": 2, "seed": 0, "out_dir": out_dir, "save_every": 0, "sample_every": 0,
                  "device": device_type, "head_impl": head_impl, "export_hf": False, "tensorboard": False,
                  "progress": False},
    }
    raw["model"]["tiny"] = {k: list(v) if isinstance(v, tuple) else v for k, v in raw["model"]["tiny"].items()}
    return config_from_dict(raw)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free(device_type: str) -> Optional[float]:
    """Collect garbage and return the CUDA memory still allocated (MiB): a leak check between trials."""
    import torch

    gc.collect()
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**20
    return None


@contextlib.contextmanager
def _patched_trainer(plan: ModelPlan, simulate_oom_above: Optional[int]):
    """Inside: ``train`` builds ``plan``'s model with :func:`build_shaped_model`, and (smoke test only) a
    loss on more than ``simulate_oom_above`` images raises ``torch.cuda.OutOfMemoryError`` after the
    forward, the way a real OOM would surface mid-step with the engine and activations alive."""
    import torch

    import functools

    import egrpo.trainer.train as trainer

    saved = trainer.micro_loss
    if simulate_oom_above is not None:
        real_loss = saved

        def micro_loss(model, objective, mb, group_size, reward_weights, head_impl):
            out = real_loss(model, objective, mb, group_size, reward_weights, head_impl)
            if mb.rollout.image_tokens.shape[0] > simulate_oom_above:
                raise torch.cuda.OutOfMemoryError(
                    f"simulated: {mb.rollout.image_tokens.shape[0]} images > limit {simulate_oom_above}")
            return out

        trainer.micro_loss = micro_loss
    try:
        yield functools.partial(trainer.train, model_builder=lambda cfg, device: build_shaped_model(
            cfg, device, plan.text_vocab))
    finally:
        trainer.micro_loss = saved


def run_trial(plan: ModelPlan, head_impl: str, cot: bool, n_prompts: int, group_size: int, device_type: str,
              objective: Dict[str, Any], simulate_oom_above: Optional[int] = None) -> Dict[str, Any]:
    """One training step; ``{"status": "ok" | "OOM" | "error", ...}`` with the step's time/memory metrics."""
    images = n_prompts * group_size
    result: Dict[str, Any] = {"n_prompts": n_prompts, "group_size": group_size, "images": images}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="capacity_") as out_dir:
        cfg = trial_config(plan, head_impl, cot, n_prompts, group_size, device_type, out_dir, objective)
        try:
            with _patched_trainer(plan, simulate_oom_above) as train:
                summary = train(cfg, stop_after=1)
            record = summary["history"][0]
            result["status"] = "ok"
            result["metrics"] = {k: v for k, v in record.items()
                                 if k.startswith(("time/", "memory/")) or k in ("rollout/cot_tokens", "loss", "grad_norm")}
            # The objective's own loss metrics (the same names through the fused and the eager head).
            result["loss_metric_names"] = sorted(k for k in record if k.split("/")[0] in
                                                 ("entropy", "mask", "clip", "kl", "adv"))
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised never: the search goes on
            result["status"] = "OOM" if _is_oom(exc) else "error"
            result["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            if result["status"] == "error":
                result["traceback"] = traceback.format_exc()[-2000:]
            del exc   # drop the traceback's frames (engine, activations) before freeing
    result["wall_s"] = time.perf_counter() - t0
    result["allocated_after_mb"] = _free(device_type)
    return result


def run_trial_isolated(args: Dict[str, Any], timeout_s: Optional[float]) -> Dict[str, Any]:
    """:func:`run_trial` in a fresh interpreter: nothing leaks from one trial to the next (DeepSpeed keeps
    global state), and a host-RAM kill of the trial is a recorded result instead of the harness' death."""
    cmd = [sys.executable, "-m", "bench.bench_capacity", "--trial", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=BENCH_DIR.parent)
    except subprocess.TimeoutExpired:
        return {"n_prompts": args["n_prompts"], "group_size": args["group_size"],
                "images": args["n_prompts"] * args["group_size"], "status": "error",
                "reason": f"trial timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("CAPACITY_TRIAL "):
            return json.loads(line[len("CAPACITY_TRIAL "):])
    killed = proc.returncode in (-9, 137)
    return {"n_prompts": args["n_prompts"], "group_size": args["group_size"],
            "images": args["n_prompts"] * args["group_size"], "status": "OOM" if killed else "error",
            "reason": (f"trial process killed (signal 9: host RAM exhausted?), rc {proc.returncode}" if killed
                       else f"trial process exited rc {proc.returncode}: {proc.stderr.strip()[-300:]}")}


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------

def largest_fitting(fits: Callable[[int], bool], start: int = 1, cap: Optional[int] = None,
                    stop: Optional[Callable[[], bool]] = None) -> Tuple[int, Optional[int], List[int]]:
    """Largest ``n >= start`` with ``fits(n)``, assuming fitting is monotone: double from ``start`` until a
    failure (or ``cap``), then bisect between the last success and the first failure.

    Returns ``(best, first_failure, tried)``: ``best`` = 0 when ``start`` does not fit; ``first_failure`` =
    the smallest size seen to fail (None if none failed, e.g. ``cap`` reached); ``tried`` in order. ``stop()``
    true ends the search early (time budget): ``best`` is then a lower bound."""
    if start < 1 or (cap is not None and cap < start):
        raise ValueError(f"start must be >= 1 and <= cap, got start={start}, cap={cap}")
    tried: List[int] = []
    lo, hi = 0, None          # lo fits (0 = nothing yet), hi fails
    n = start
    while True:
        if stop is not None and stop():
            return lo, hi, tried
        tried.append(n)
        if fits(n):
            lo = n
            if cap is not None and n >= cap:
                return lo, hi, tried
            n = n * 2 if cap is None else min(n * 2, cap)
        else:
            hi = n
            break
    while lo and hi - lo > 1:
        if stop is not None and stop():
            break
        mid = (lo + hi) // 2
        tried.append(mid)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, tried


def search_setting(plan: ModelPlan, head_impl: str, cot: bool, device_type: str, objective: Dict[str, Any], *,
                   max_images: Optional[int] = None, simulate_oom_above: Optional[int] = None,
                   isolate: bool = False, deadline: Optional[float] = None, log=print) -> Dict[str, Any]:
    """Largest images per micro-batch for one (model, heads, CoT) setting, and the step split at that size."""
    trials: List[Dict[str, Any]] = []
    by_images: Dict[int, Dict[str, Any]] = {}

    def attempt(n_prompts: int, group_size: int) -> bool:
        args = dict(plan=plan.name, head_impl=head_impl, cot=cot, n_prompts=n_prompts, group_size=group_size,
                    device_type=device_type, objective=objective, simulate_oom_above=simulate_oom_above)
        if isolate:
            left = None if deadline is None else max(deadline - time.time(), 30.0)
            r = run_trial_isolated(args, left)
        else:
            r = run_trial(plan, head_impl, cot, n_prompts, group_size, device_type, objective, simulate_oom_above)
        trials.append(r)
        by_images[r["images"]] = r
        peak = (r.get("metrics") or {}).get("memory/peak_mb")
        log(f"  {plan.name:13s} {head_impl:5s} cot={'on ' if cot else 'off'} {r['images']:4d} images: {r['status']}"
            + (f" peak {peak:.0f} MiB" if peak is not None else "") + (f" ({r['reason']})" if r.get("reason") else ""))
        if r["status"] == "error":
            raise _TrialError(r["reason"])
        return r["status"] == "ok"

    out: Dict[str, Any] = {"model": plan.name, "head_impl": head_impl, "cot": cot, "trials": trials,
                           "status": "ok", "reason": None}
    stop = (lambda: time.time() > deadline) if deadline is not None else None
    group = plan.group_size
    cap = None if max_images is None else max(max_images // group, 1)
    try:
        best, first_fail, _ = largest_fitting(lambda k: attempt(k, group), start=1, cap=cap, stop=stop)
        best_images, fail_images = best * group, (first_fail * group if first_fail else None)
        if best == 0 and first_fail is not None:
            # Not even one group: smaller groups (advantages need >= 2 samples per group).
            for g in sorted({group // 2, 2}, reverse=True):
                if g < 2 or g >= group or (stop and stop()):
                    continue
                if attempt(1, g):
                    best_images = g
                    out["note"] = f"only {g} images (one group of {g}) fit, not one group of {group}"
                    break
                fail_images = g
    except _TrialError as exc:
        out.update(status="error", reason=str(exc))
        return out
    if not trials:   # the budget ran out before the first trial: nothing is known about this setting
        out.update(status="not run", reason=NOT_RUN_REASON, max_images=None)
        return out
    if stop is not None and stop():
        out["note"] = ((out.get("note") or "") + " time budget ran out: the largest size is a lower bound").strip()
    out["max_images"] = best_images
    out["first_failing_images"] = fail_images
    out["search_capped"] = fail_images is None
    best_trial = by_images.get(best_images)
    out["at_max"] = best_trial.get("metrics") if best_trial else None
    if not best_images and out["status"] == "ok":
        out["status"] = "does not fit"
        out["reason"] = next((t["reason"] for t in trials if t.get("reason")), None)
    return out


NOT_RUN_REASON = "time budget spent before this setting started; `--resume` measures it"
FINISHED = ("ok", "does not fit")


def finished(setting: Dict[str, Any]) -> bool:
    """A setting whose result stands: searched to the end (not cut by a time budget), or statically too big."""
    return setting.get("status") in FINISHED and "time budget" not in (setting.get("note") or "")


class _TrialError(RuntimeError):
    """A trial failed for a reason other than memory: the search stops (its result would be meaningless)."""


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def versions() -> Dict[str, Optional[str]]:
    from bench.env import versions as suite_versions

    out = suite_versions()
    try:
        from importlib.metadata import version

        out["deepspeed"] = version("deepspeed")
    except Exception:  # noqa: BLE001
        out["deepspeed"] = None
    return out


def run(device: Optional[str] = None, models: Optional[List[str]] = None, heads=HEADS, cots=(False, True),
        max_images: Optional[int] = None, simulate_oom_above: Optional[int] = None, isolate: Optional[bool] = None,
        time_budget_s: Optional[float] = None, objective: Optional[Dict[str, Any]] = None, log=print,
        partial_out: Optional[Path] = None, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Search every (model, CoT, heads) setting. ``previous`` (an earlier report for the same device and
    objective) supplies the settings it finished, which are not searched again; settings the time budget
    leaves out are recorded as "not run"; ``complete`` says whether every setting finished."""
    import torch

    from bench.env import device_name

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = models or (["janus-pro-1b", "janus-pro-7b"] if device == "cuda" else ["tiny"])
    isolate = (device == "cuda") if isolate is None else isolate
    # EG-GRPO as published (beta 0.01 -> a frozen reference model is part of the step).
    objective = objective or {"name": "eg_grpo", "beta": 0.01}
    t_start = time.time()
    deadline = None if time_budget_s is None else t_start + time_budget_s
    report: Dict[str, Any] = {
        "benchmark": "egrpo training capacity (images per micro-batch, one training step)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "device_type": device, "device": device_name(device), "versions": versions(),
        "objective": objective, "reward": "colour (offline; reward models of the published runs not included)",
        "simulated_oom_above_images": simulate_oom_above, "max_images_cap": max_images, "isolated_trials": isolate,
        "models": {}, "settings": [],
    }
    if device == "cuda":
        report["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    kept: Dict[tuple, Dict[str, Any]] = {}
    if previous:
        if (previous.get("device") == report["device"] and previous.get("objective") == objective
                and previous.get("simulated_oom_above_images") == simulate_oom_above
                and previous.get("max_images_cap") == max_images):
            kept = {(x["model"], x["head_impl"], x["cot"]): x for x in previous.get("settings", []) if finished(x)}
            log(f"--resume: keeping {len(kept)} finished settings")
        else:
            log("--resume: the existing results are from another device or set-up; starting afresh")
    for name in models:
        plan = PLANS[name]
        entry = {"shape": plan.shape(), "notes": plan.notes}
        try:
            entry["params"] = count_params(plan)
        except Exception as exc:  # noqa: BLE001
            entry["params"] = None
            log(f"parameter count of {name} failed: {exc}")
        reason = static_memory_check(plan, device, float(objective.get("beta", 0.0)))
        entry["static_check"] = reason
        report["models"][name] = entry
        for cot in cots:
            for head in heads:
                if (name, head, cot) in kept:
                    report["settings"].append(kept[(name, head, cot)])
                    continue
                if deadline is not None and time.time() > deadline:
                    report["settings"].append({"model": name, "head_impl": head, "cot": cot, "status": "not run",
                                               "reason": NOT_RUN_REASON, "max_images": None, "trials": []})
                    continue
                if reason is not None:
                    report["settings"].append({"model": name, "head_impl": head, "cot": cot, "status": "does not fit",
                                               "reason": reason, "max_images": 0, "trials": []})
                    log(f"{name} {head} cot={cot}: {reason}")
                    continue
                log(f"{name} heads={head} cot={cot}")
                s = search_setting(plan, head, cot, device, objective, max_images=max_images,
                                   simulate_oom_above=simulate_oom_above, isolate=isolate, deadline=deadline, log=log)
                report["settings"].append(s)
                report["wall_s"] = time.time() - t_start
                if partial_out is not None:   # a killed run still leaves what it measured
                    partial_out.write_text(json.dumps(report, indent=1) + "\n")
    report["wall_s"] = time.time() - t_start + (float(previous.get("wall_s", 0.0)) if kept else 0.0)
    report["complete"] = all(finished(x) for x in report["settings"])
    add_ratios(report)
    return report


def add_ratios(report: Dict[str, Any]) -> None:
    """Fused over eager images per micro-batch, per (model, CoT)."""
    ratios = []
    for model in report["models"]:
        for cot in (False, True):
            s = {x["head_impl"]: x for x in report["settings"] if x["model"] == model and x["cot"] == cot}
            if "fused" in s and "eager" in s and s["fused"]["status"] in FINISHED and s["eager"]["status"] in FINISHED:
                f, e = s["fused"].get("max_images") or 0, s["eager"].get("max_images") or 0
                ratios.append({"model": model, "cot": cot, "fused": f, "eager": e,
                               "ratio": (f / e) if e else None, "only_fused_fits": bool(f and not e),
                               "lower_bound": bool(s["fused"].get("search_capped") or "lower bound" in
                                                   (s["fused"].get("note") or ""))})
    report["fused_over_eager"] = ratios


def render_readme(results_dir: Path = RESULTS, readme: Path = BENCH_DIR / "README.md") -> Path:
    from bench.render import render

    return render(results_dir, readme)


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--models", default=None, help=f"comma list of {sorted(PLANS)}")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--cot", choices=("both", "on", "off"), default="both")
    parser.add_argument("--max-images", type=int, default=None, help="stop doubling at this many images")
    parser.add_argument("--simulate-oom-above", type=int, default=None,
                        help="(testing) raise a CUDA OOM in the loss of any step with more images than this")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="each trial in a fresh process (auto: yes on CUDA)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later searches end early")
    parser.add_argument("--resume", action="store_true",
                        help="keep the settings the output JSON already finished (same device and set-up)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/capacity_<device>.json)")
    parser.add_argument("--no-render", action="store_true")
    parser.add_argument("--readme", default=str(BENCH_DIR / "README.md"))
    parser.add_argument("--trial", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.trial is not None:   # child of run_trial_isolated
        t = json.loads(args.trial)
        r = run_trial(PLANS[t["plan"]], t["head_impl"], t["cot"], t["n_prompts"], t["group_size"], t["device_type"],
                      t["objective"], t.get("simulate_oom_above"))
        print("CAPACITY_TRIAL " + json.dumps(r), flush=True)
        return 0

    models = args.models.split(",") if args.models else None
    for m in models or []:
        if m not in PLANS:
            raise SystemExit(f"unknown model {m!r}; known: {sorted(PLANS)}")
    heads = [h for h in args.heads.split(",") if h]
    for h in heads:
        if h not in HEADS:
            raise SystemExit(f"unknown head implementation {h!r}; known: {HEADS}")
    cots = {"both": (False, True), "on": (True,), "off": (False,)}[args.cot]
    isolate = {"auto": None, "yes": True, "no": False}[args.isolate]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.max_images is None and args.simulate_oom_above is None:
        # Nothing runs out of memory on a CPU: the smoke run caps the search and simulates a limit so that
        # both the doubling and the bisection happen.
        args.max_images, args.simulate_oom_above = 8, 5
        print("CPU smoke run: --max-images 8 --simulate-oom-above 5 (no real OOM on a CPU)")
    out = Path(args.out) if args.out else RESULTS / f"capacity_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if (args.resume and out.exists()) else None
    report = run(device, models, heads, cots, args.max_images, args.simulate_oom_above, isolate, args.time_budget,
                 partial_out=out, previous=previous)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({report['wall_s']:.0f} s{'' if report['complete'] else ', INCOMPLETE: run again with --resume'})")
    for r in report["fused_over_eager"]:
        print(f"{r['model']} cot={r['cot']}: fused {r['fused']} vs eager {r['eager']} images per micro-batch")
    if not args.no_render:
        from bench.render import render

        print(f"rendered {render(out.parent, Path(args.readme))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
