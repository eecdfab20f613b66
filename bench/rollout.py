"""Rollout benchmark: today's loop vs transformers' generate vs the rollout engine (eager, compiled).

    python -m bench.rollout                       # CPU: demo + mid-size configs, 1 and 2 threads
    python -m bench.rollout --configs mid --threads 1 --no-compile
    python -m bench.rollout --dtype bf16          # CPU with the model in bf16 (own JSON and README section)
    python -m bench.rollout --device cuda         # GPU: Janus-Pro-1B / 7B shapes, 2 layers, 16 and 128 images
    python -m bench.rollout --device cuda --quick --budget-s 100   # what `make gpu-quick` runs (see main())
    python -m bench.rollout --device cuda --dry-run   # the GPU run's code on CPU at a toy shape (tested in CI)

Per configuration and thread count, the implementations run alternately in one process (``--repeats``
rounds, median), so the ratios are side by side. Measured per implementation:

* ``ms/step``: image-phase sampling time / image tokens (prefill included, VQ decode excluded);
* ``images/s``: images / (sampling + VQ decode) time;
* the memory floor per step (CPU and CUDA): the language model's weights + the K/V cache of every row at the
  mean length (the model's dtype) + the generation head, read once, over the copy bandwidth measured in the
  same run (``ms/step / memory floor`` in the table); on CUDA also ``engine-graph`` (the eager step captured
  as a CUDA graph), ``engine-graph-spans`` (the same over 4 key spans), ``engine-graph-spans-sdpa`` (the same
  with torch's SDPA instead of the Triton decode-attention kernel in the step) and the time per layer;
* ``decode ms``: the VQ decode alone (today: chunks of 8 rows NCHW; engine: its default chunks, channels-last).

On CUDA the rows that capture CUDA graphs run after the others (warm-up and timed rounds), since a device-side
assert in a capture poisons the process's CUDA context; a row that raises keeps the rounds it completed and the
error in its notes, and the other rows and configurations still run. cuDNN attention is off for every CUDA row
(``sdpa_backends`` in the JSON): it builds one plan per (batch, key length), i.e. one per step of the eager rows.

Implementations: ``today`` = ``egrpo.trainer.rollout.sample_image_tokens`` + ``decode_images`` (the loop
of the trainer on main); ``hf-generate`` = ``JanusForConditionalGeneration.generate(generation_mode="image")``
(static cache, transformers' sampling; no KL metric; timed where it runs); ``engine`` = `RolloutEngine`
eager; ``engine-compiled`` = the decode step under ``torch.compile`` (default mode; on CUDA also captured as
a CUDA graph); its compile time is reported separately and excluded (one warm-up phase first).

Results: ``bench/results/rollout_<cpu|cuda>.json`` and a section of ``bench/README.md`` between the
``rollout:begin`` / ``rollout:end`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from bench.render import replace_section
from egrpo.rollout.engine import EngineConfig, RolloutEngine
from egrpo.rollout.sampling import SamplingParams
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.tokenizer import build_char_tokenizer, janus_tokens

BENCH_DIR = Path(__file__).resolve().parent
# README sections (bench.render.replace_section names). CUDA rows get a section of their own: a GPU run must not
# replace the CPU rows (nor the other way round).
SECTION, BF16_SECTION, VQ_SECTION, CUDA_SECTION = "rollout", "rollout-cpu-bf16", "rollout-vq", "rollout-cuda"
VQ_CUDA_SECTION = "rollout-vq-cuda"

# Shapes. demo = configs/demo.yaml's model (TINY_DEFAULTS + its overrides), 2 prompts x G = 8, 64 tokens.
# mid = the mid-size random Janus: hidden 256, 4 layers, 144 image tokens, image vocab 4096.
CPU_CONFIGS = {
    "demo": dict(tiny=dict(vq_base_channels=128, vq_channel_multiplier=[1, 1, 1, 1], initializer_range=0.2),
                 prompts=2, group=8),
    "mid": dict(tiny=dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512, image_size=96,
                          patch_size=8, image_vocab_size=4096), prompts=2, group=8),
    # The test suite's smoke run (not in the default list): TINY_DEFAULTS, 2 prompts x G = 2.
    "tiny": dict(tiny=dict(), prompts=2, group=2),
}
DEFAULT_CPU_CONFIGS = ["demo", "mid"]
# Janus-Pro shapes with 2 layers (report per layer); 384 px, 16 px patches = 576 tokens, 16384 codes.
# --dry-run: the same code on CPU at a toy shape (64 px, 16 tokens), so a lent GPU's minutes are not spent
# finding this script's bugs.
DRY_RUN_SHAPES = {"toy": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, full_layers=4)}
GPU_SHAPES = {
    "janus-pro-1b": dict(hidden_size=2048, num_layers=2, num_heads=16, intermediate_size=5632, full_layers=24),
    "janus-pro-7b": dict(hidden_size=4096, num_layers=2, num_heads=32, intermediate_size=11008, full_layers=30),
}
PROMPTS = ["a red apple on a wooden table", "two blue cars"]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _prompt_batch(tokenizer, tokens, prompts, group, device):
    """The trainer's image-phase prefill (released layout): ``(cond, uncond)`` protocol Prefills."""
    from egrpo.trainer.protocol import image_prefill, image_prompt_text
    from egrpo.trainer.tokenizer import encode_with_bos

    rows = [encode_with_bos(tokenizer, image_prompt_text(p), tokens) for p in prompts for _ in range(group)]
    return image_prefill(rows, tokens, device)


def _implementations(model, tokenizer, prefills, image_tokens, device, compile_step, hf_generate):
    """``(impls, graph_rows)``: name -> (sample() -> tokens, decode(tokens)), and the names of the rows that capture
    CUDA graphs. ``prefills``: the (cond, uncond) protocol Prefills."""
    from egrpo.trainer import rollout as today
    from egrpo.trainer.protocol import Prefill

    tokens = janus_tokens(tokenizer)
    cond, uncond = prefills
    ids, mask = cond.input_ids, cond.attention_mask
    cfg = today.RolloutConfig(group_size=1, cfg_scale=5.0, image_tokens=image_tokens)
    generator = torch.Generator(device=device).manual_seed(0)
    params = SamplingParams(cfg_scale=5.0)
    impls = {
        "today": (lambda: today.sample_image_tokens(model, cond, uncond, cfg, generator)[0],
                  lambda t: today.decode_images(model, t)),
    }
    if hf_generate:
        import copy

        generation_config = copy.deepcopy(model.generation_config)
        generation_config.generation_kwargs = {"boi_token_id": tokens.image_start}
        generation_config.update(do_sample=True, guidance_scale=5.0, top_k=None, top_p=None, temperature=1.0,
                                 pad_token_id=tokens.pad, bos_token_id=tokens.bos)

        def hf():
            return model.generate(input_ids=ids, attention_mask=mask, generation_mode="image",
                                  generation_config=generation_config)
        impls["hf-generate"] = (hf, lambda t: today.decode_images(model, t))
    engines = {"engine": RolloutEngine(model, EngineConfig(cuda_graph=False))}
    if device == "cuda":  # the eager step (full buffer) captured as a CUDA graph, no compilation
        engines["engine-graph"] = RolloutEngine(model, EngineConfig(cuda_graph=True, key_buckets=1))
        # ... attending over 4 key spans (4 graphs): half the K/V read on average, which dominates at 128 rows
        engines["engine-graph-spans"] = RolloutEngine(model, EngineConfig(cuda_graph=True, key_buckets=4))
        # ... with torch's SDPA in the decode step instead of the Triton decode-attention kernel (the default)
        engines["engine-graph-spans-sdpa"] = RolloutEngine(model, EngineConfig(cuda_graph=True, key_buckets=4,
                                                                               attention="torch"))
    if compile_step:
        engines["engine-compiled"] = RolloutEngine(model, EngineConfig(compile=True))
    for name, engine in engines.items():
        def run(engine=engine):
            prefill = today.engine_prefill(model, Prefill.cat([cond, uncond]))  # the trainer's conversion
            return engine.generate_image_tokens(prefill, image_tokens, params, seed=0).tokens
        impls[name] = (run, engine.decode)
    graph_rows = {name for name, engine in engines.items() if device == "cuda" and engine.config.cuda_graph}
    return impls, graph_rows


def _error_note(error: BaseException) -> str:
    """One line for a row's notes: the exception's type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"


def _run_rows(impls, results, notes, device, repeats):
    """Warm-up, then ``repeats`` rounds of ``impls`` alternating. A row that raises leaves the later rounds with the
    error in ``notes``; it keeps the rounds it completed, or is dropped from ``results`` if none."""
    live = dict(impls)
    for impl, (sample_fn, _) in list(live.items()):  # warm-up (compilation, allocator)
        try:
            with torch.no_grad():  # the loop's own sampling function keeps an autograd graph of every step otherwise
                elapsed, _ = _timed(sample_fn, device)
            if impl == "engine-compiled":
                notes[impl] = f"first call incl. compilation {elapsed:.1f} s"
        except Exception as error:  # noqa: BLE001 - a peer that cannot run keeps its row with the reason
            notes[impl] = f"n/a: {_error_note(error)}"
            live.pop(impl)
            results.pop(impl)
    with torch.no_grad():
        for round_ in range(repeats):
            for impl, (sample_fn, decode_fn) in list(live.items()):
                try:
                    seconds, out = _timed(sample_fn, device)
                    decode_s = _timed(lambda: decode_fn(out), device)[0]
                except Exception as error:  # noqa: BLE001 - one row's failure must not lose the others' rows
                    live.pop(impl)
                    done = len(results[impl]["sample_s"])
                    failure = (f"failed in timed round {round_ + 1} (median of the {done} before): " if done
                               else "n/a: ") + _error_note(error)
                    notes[impl] = f"{notes[impl]}; {failure}" if impl in notes else failure
                    if not done:
                        results.pop(impl)
                    continue
                results[impl]["sample_s"].append(seconds)
                results[impl]["decode_s"].append(decode_s)


def profile_engine(model, tokenizer, prefills, image_tokens, device, top=25):
    """Where one eager-engine image rollout spends its time: ``torch.profiler`` over one call after a warm-up, the
    ``top`` ops by self device time (CPU time on CPU). The graph rows replay the same kernels; eager keeps each
    launch visible."""
    from torch.profiler import ProfilerActivity, profile

    from egrpo.trainer import rollout as today
    from egrpo.trainer.protocol import Prefill

    cuda = device == "cuda"
    engine = RolloutEngine(model, EngineConfig(cuda_graph=False))
    cond, uncond = prefills

    def run():
        prefill = today.engine_prefill(model, Prefill.cat([cond, uncond]))
        return engine.generate_image_tokens(prefill, image_tokens, SamplingParams(cfg_scale=5.0), seed=0).tokens

    with torch.no_grad():
        run()
        _sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            run()
            _sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total_us = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return {"what": f"one eager-engine rollout of {cond.input_ids.shape[0]} images x {image_tokens} tokens, "
                    f"self {'device' if cuda else 'CPU'} time per op",
            "total_ms": total_us / 1e3,
            "top": [{"op": e.key[:120], "ms": getattr(e, key) / 1e3, "calls": e.count,
                     "share": getattr(e, key) / total_us if total_us else None} for e in events[:top]]}


def bench_config(name, model, tokenizer, prefills, image_tokens, device, threads, repeats, compile_step,
                 hf_generate=True):
    if device == "cpu" and threads:  # 0: leave the thread count alone (the GPU run's dry run)
        torch.set_num_threads(threads)
    # torch.compile caches per code object, across engines: without a reset, the compilations of earlier
    # configurations count against the recompile limit of this one (then it silently runs eager).
    torch._dynamo.reset()
    impls, graph_rows = _implementations(model, tokenizer, prefills, image_tokens, device, compile_step, hf_generate)
    results = {k: {"sample_s": [], "decode_s": []} for k in impls}
    notes = {}
    # The rows without CUDA graphs first, warm-up and timed rounds, then those with: a device-side assert during a
    # capture or a replay poisons the CUDA context, and every later CUDA call of the process fails.
    for group in ([k for k in impls if k not in graph_rows], [k for k in impls if k in graph_rows]):
        _run_rows({k: impls[k] for k in group}, results, notes, device, repeats)
    rows = prefills[0].rows
    table = {}
    for impl, r in results.items():
        sample_s, decode_s = statistics.median(r["sample_s"]), statistics.median(r["decode_s"])
        table[impl] = dict(ms_per_step=1e3 * sample_s / image_tokens, sample_ms=1e3 * sample_s,
                           decode_ms=1e3 * decode_s, images_per_s=rows / (sample_s + decode_s),
                           samples_ms=[1e3 * s for s in r["sample_s"]])
    base = table.get("today")
    for impl, row in table.items():
        if base:
            row["speedup_step_vs_today"] = base["ms_per_step"] / row["ms_per_step"]
            row["speedup_images_vs_today"] = row["images_per_s"] / base["images_per_s"]
    return dict(config=name, threads=threads, images=rows, image_tokens=image_tokens, results=table, notes=notes)


# VQ decode variants: (rows per decoder call, 0 = all; channels-last; cuDNN autotuning). NCHW only at 8 rows (the
# old loop's decode). CPU: channels-last at every chunk size (smaller chunks keep the activations of one call in
# cache: the demo's 64 px x 128 channels are 2 MiB per image per tensor). CUDA: larger chunks and cuDNN's
# benchmark mode (autotuned convolution algorithms), neither measured yet there.
CPU_VQ_VARIANTS = [(8, False, False), (8, True, False), (4, True, False), (2, True, False), (1, True, False),
                   (0, True, False)]
CUDA_VQ_VARIANTS = [(8, False, False), (8, True, False), (32, True, False), (0, True, False), (8, False, True),
                    (8, True, True), (32, True, True)]


def _vq_variant_name(batch, channels_last, autotune):
    return (f"batch {'all' if batch == 0 else batch}, {'channels-last' if channels_last else 'NCHW'}"
            + (", cudnn.benchmark" if autotune else ""))


def bench_vq(model, rows, image_tokens, device, repeats, variants=CPU_VQ_VARIANTS):
    """VQ decode variants side by side (``variants``: see CPU_VQ_VARIANTS), alternating; speed-up against the
    old loop's 8-row NCHW chunks."""
    from egrpo.rollout.vq import decode_images

    codes = torch.randint(0, model.config.vq_config.num_embeddings, (rows, image_tokens), device=device)
    variants = {_vq_variant_name(*v): v for v in variants}
    times = {name: [] for name in variants}
    autotune_was = torch.backends.cudnn.benchmark

    def call(batch, channels_last, autotune):
        torch.backends.cudnn.benchmark = autotune
        try:
            return decode_images(model, codes, batch, channels_last)
        finally:
            torch.backends.cudnn.benchmark = autotune_was

    for name, variant in variants.items():  # warm-up (cuDNN's autotuning happens here)
        call(*variant)
    for _ in range(repeats):
        for name, variant in variants.items():
            times[name].append(_timed(lambda: call(*variant), device)[0])
    base = statistics.median(times["batch 8, NCHW"])
    return {name: dict(ms=1e3 * statistics.median(t), speedup_vs_batch8_nchw=base / statistics.median(t))
            for name, t in times.items()}


def run_cpu(args, on_run=lambda runs: None):
    runs = []
    for name in args.configs:
        spec = CPU_CONFIGS[name]
        model, tokenizer = build_model(ModelConfig(tiny=dict(spec["tiny"]), dtype=args.dtype), "cpu")
        tokens = janus_tokens(tokenizer)
        prefills = _prompt_batch(tokenizer, tokens, PROMPTS[:spec["prompts"]], spec["group"], "cpu")
        image_tokens = int(model.config.vision_config.num_image_tokens)
        for threads in args.threads:
            print(f"[rollout] {name}: {threads} thread(s)", flush=True)
            run = bench_config(name, model, tokenizer, prefills, image_tokens, "cpu", threads, args.repeats,
                               args.compile)
            bandwidth = _bandwidth_gbs("cpu")  # at this thread count
            prompt_len = prefills[0].input_ids.shape[1]
            run["shape"] = dict(spec["tiny"], prompts=spec["prompts"], group_size=spec["group"], prompt_len=prompt_len)
            run["bandwidth_gbs"] = bandwidth
            run["floor_ms_per_step"] = floor_ms_per_step(model, 2 * prefills[0].rows, prompt_len + image_tokens / 2,
                                                         bandwidth)
            runs.append(run)
            _print_run(run)
            on_run(runs)
    return runs


def _bandwidth_gbs(device):
    """Measured device copy bandwidth (read + write) in GB/s."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    _sync(device)
    return 2 * x.numel() * 20 / (time.perf_counter() - start) / 1e9


def floor_ms_per_step(model, rows: int, mean_keys: float, bandwidth_gbs: float) -> float:
    """Memory floor of one decode step: every language-model layer's weights, the generation head and the K/V of
    ``rows`` rows at ``mean_keys`` keys (the cache's dtype), read once, over ``bandwidth_gbs`` (copy bandwidth)."""
    lm = model.model.language_model
    text = model.config.text_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = next(lm.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.layers.parameters())
    head_bytes = sum(p.numel() * p.element_size() for m in (model.model.generation_head,
                     model.model.generation_aligner) for p in m.parameters())
    kv_bytes = 2 * rows * mean_keys * kv_heads * head_dim * element * len(lm.layers)
    return 1e3 * (weight_bytes + head_bytes + kv_bytes) / (bandwidth_gbs * 1e9)


def _sdpa_backends() -> dict:
    """The scaled-dot-product-attention backends torch may pick now (its global switches)."""
    cuda = torch.backends.cuda
    return dict(flash=cuda.flash_sdp_enabled(), mem_efficient=cuda.mem_efficient_sdp_enabled(),
                cudnn=cuda.cudnn_sdp_enabled(), math=cuda.math_sdp_enabled())


def run_cuda(args, on_run=lambda runs: None, skipped=None):
    """The GPU rows (or, with ``args.dry_run``, the same code on CPU at a toy shape). ``on_run(runs)`` is
    called after every measured configuration (the JSON is rewritten each time); configurations not started
    because ``args.budget_s`` was spent, or that failed outside a row, are appended to ``skipped``.

    cuDNN attention is off for every row (restored at the end): torch may pick it for bf16 SDPA with a mask
    (sm90), and it builds one plan per (batch, key length), so the eager rows, whose key length grows every
    step, would spend tens of seconds building plans. Each run records the enabled backends (``sdpa_backends``)."""
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return _run_cuda(args, on_run, skipped)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


def _run_cuda(args, on_run, skipped):
    from transformers import JanusForConditionalGeneration

    from egrpo.trainer.model import tiny_janus_config

    device = "cpu" if args.dry_run else "cuda"
    shapes = DRY_RUN_SHAPES if args.dry_run else GPU_SHAPES
    if args.quick:  # the headline shape first: a budget that runs out drops the 1B rows
        shapes = dict(reversed(list(shapes.items())))
    image_size, image_tokens = (64, 16) if args.dry_run else (384, 576)
    deadline = time.perf_counter() + (args.budget_s if args.budget_s else float("inf"))
    tokenizer = build_char_tokenizer()
    tokens = janus_tokens(tokenizer)
    bandwidth = _bandwidth_gbs(device)
    runs = []
    for shape_name, shape in shapes.items():
        if time.perf_counter() > deadline:
            skipped.extend(f"{shape_name}, {images} images: time budget spent" for images in args.rows)
            continue
        overrides = {k: v for k, v in shape.items() if k != "full_layers"}
        if args.layers and not args.dry_run:  # deeper than the default 2: the floor ratio nearer full depth
            overrides["num_layers"] = min(args.layers, shape["full_layers"])
        try:
            config = tiny_janus_config(tokenizer, image_size=image_size, patch_size=16, image_vocab_size=16384,
                                       vq_channel_multiplier=(1, 1, 2, 2, 4),
                                       vq_base_channels=32 if args.dry_run else 128, max_position_embeddings=4096,
                                       **overrides)
            config._attn_implementation = config.text_config._attn_implementation = "sdpa"
            model = JanusForConditionalGeneration(config).to(device, torch.bfloat16).eval().requires_grad_(False)
        except Exception as error:  # noqa: BLE001 - e.g. a CUDA context poisoned earlier: list it, write the JSON
            skipped.extend(f"{shape_name}, {images} images: model build failed: {_error_note(error)}"
                           for images in args.rows)
            continue
        for images in args.rows:
            if time.perf_counter() > deadline:
                skipped.append(f"{shape_name}, {images} images: time budget spent")
                continue
            try:
                group = max(1, images // 2)
                prefills = _prompt_batch(tokenizer, tokens, PROMPTS[:2], group, device)
                print(f"[rollout] {shape_name}: {prefills[0].input_ids.shape[0]} images", flush=True)
                run = bench_config(shape_name, model, tokenizer, prefills, image_tokens, device, 0, args.repeats,
                                   args.compile, hf_generate=False)
                # Floor per step: weights once + the KV cache of all 2B rows (mean length), over the copy bandwidth.
                prompt_len = prefills[0].input_ids.shape[1]
                floor_ms = floor_ms_per_step(model, 2 * prefills[0].rows, prompt_len + image_tokens / 2, bandwidth)
            except Exception as error:  # noqa: BLE001 - the rows' own failures are in their notes; this is the rest
                skipped.append(f"{shape_name}, {images} images: failed: {_error_note(error)}")
                continue
            if args.profile and not any("profile" in r for r in runs):  # the first (headline) configuration only
                try:
                    run["profile"] = profile_engine(model, tokenizer, prefills, image_tokens, device)
                except Exception as error:  # noqa: BLE001 - a diagnostic: its failure must not lose the rows
                    run["profile"] = {"error": _error_note(error)}
            run["floor_ms_per_step"] = floor_ms
            run["per_layer"] = {impl: r["ms_per_step"] / overrides["num_layers"] for impl, r in run["results"].items()}
            run["shape"] = dict(overrides, full_layers=shape["full_layers"], images=prefills[0].input_ids.shape[0])
            run["bandwidth_gbs"] = bandwidth
            run["sdpa_backends"] = _sdpa_backends()
            runs.append(run)
            _print_run(run)
            on_run(runs)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return runs


def run_vq_only(args):
    if args.device == "cuda":
        return run_vq_only_cuda(args)
    import transformers

    lines = ["### VQ decode variants (`python -m bench.rollout --vq-only`)", "",
             "Same tokens, variants alternating in one process; speed-up vs today's 8-row NCHW chunks.", ""]
    runs = []
    for name in args.configs:
        spec = CPU_CONFIGS[name]
        model, _ = build_model(ModelConfig(tiny=dict(spec["tiny"]), dtype="fp32"), "cpu")
        images = spec["prompts"] * spec["group"]
        image_tokens = int(model.config.vision_config.num_image_tokens)
        for threads in args.threads:
            torch.set_num_threads(threads)
            result = bench_vq(model, images, image_tokens, "cpu", args.repeats)
            runs.append(dict(config=name, threads=threads, images=images, shape=spec["tiny"], variants=result))
            for variant, r in result.items():
                print(f"  {name} {threads}t vq decode {variant:28s} {r['ms']:8.1f} ms  x{r['speedup_vs_batch8_nchw']:.2f}")
    payload = dict(device="cpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   cpu=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible",
                   dtype="float32", torch=torch.__version__, transformers=transformers.__version__,
                   repeats=args.repeats, runs=runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "rollout_vq_cpu.json").write_text(json.dumps(payload, indent=1))
    lines += [f"- {payload['cpu']}; float32; {payload['date']}; torch {payload['torch']}; median of {args.repeats}", "",
              "| config | threads | images | variant | ms | speed-up |", "|---|---|---|---|---|---|"]
    for run in runs:
        for variant, r in run["variants"].items():
            lines.append(f"| {run['config']} | {run['threads']} | {run['images']} | {variant} | {r['ms']:.1f} | "
                         f"{r['speedup_vs_batch8_nchw']:.2f}x |")
    replace_section(args.readme, VQ_SECTION, lines)


def run_vq_only_cuda(args):
    """``--vq-only --device cuda``: the Janus-Pro VQ decoder (384 px, bf16; the language model is irrelevant here and
    has one layer) over ``args.rows[0]`` images, CUDA_VQ_VARIANTS side by side. ``--dry-run``: the same code on
    CPU at the toy shape. JSON ``rollout_vq_cuda[_dry_run].json``; README section ``rollout-vq-cuda``."""
    import transformers
    from transformers import JanusForConditionalGeneration

    from egrpo.trainer.model import tiny_janus_config

    device = "cpu" if args.dry_run else "cuda"
    tokenizer = build_char_tokenizer()
    shape = dict(DRY_RUN_SHAPES["toy"] if args.dry_run else GPU_SHAPES["janus-pro-1b"], num_layers=1)
    shape.pop("full_layers")
    image_size = 64 if args.dry_run else 384
    config = tiny_janus_config(tokenizer, image_size=image_size, patch_size=16, image_vocab_size=16384,
                               vq_channel_multiplier=(1, 1, 2, 2, 4), vq_base_channels=32 if args.dry_run else 128,
                               max_position_embeddings=4096, **shape)
    model = JanusForConditionalGeneration(config).to(device, torch.bfloat16).eval().requires_grad_(False)
    rows = args.rows[0]
    image_tokens = (image_size // 16) ** 2
    with torch.no_grad():
        result = bench_vq(model, rows, image_tokens, device, args.repeats, CUDA_VQ_VARIANTS)
    for variant, r in result.items():
        print(f"  vq decode {rows} images {variant:40s} {r['ms']:8.1f} ms  x{r['speedup_vs_batch8_nchw']:.2f}")
    payload = dict(device=device, dry_run=args.dry_run,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   gpu=None if args.dry_run else torch.cuda.get_device_name(), dtype="bfloat16",
                   torch=torch.__version__, transformers=transformers.__version__, repeats=args.repeats,
                   images=rows, image_size=image_size, variants=result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rollout_vq_cuda{'_dry_run' if args.dry_run else ''}.json").write_text(json.dumps(payload, indent=1))
    if not args.dry_run:
        replace_section(args.readme, VQ_CUDA_SECTION, vq_cuda_lines(payload))
    return 0


def vq_cuda_lines(payload):
    """The README section of a ``--vq-only --device cuda`` report."""
    lines = ["### VQ decode on CUDA (`python -m bench.rollout --vq-only --device cuda`)", "",
             f"- {payload['gpu']}; bf16; {payload['images']} images of {payload['image_size']} px; {payload['date']}; "
             f"torch {payload['torch']}; median of {payload['repeats']}; variants alternating; speed-up vs the old "
             "loop's 8-row NCHW chunks (the engine's CUDA default: 8 rows, channels-last, no autotuning)", "",
             "| variant | ms | speed-up |", "|---|---|---|"]
    return lines + [f"| {v} | {r['ms']:.1f} | {r['speedup_vs_batch8_nchw']:.2f}x |"
                    for v, r in payload["variants"].items()]


def _print_run(run):
    for impl, r in run["results"].items():
        print(f"  {impl:16s} {r['ms_per_step']:8.2f} ms/step  {r['images_per_s']:7.2f} img/s  "
              f"decode {r['decode_ms']:8.1f} ms  x{r.get('speedup_images_vs_today', float('nan')):.2f} img/s vs today",
              flush=True)
    for impl, note in run["notes"].items():
        print(f"  {impl}: {note}")


def _result_name(payload):
    if payload.get("dry_run"):
        return "rollout_cuda_dry_run", False
    cpu_bf16 = payload["device"] == "cpu" and payload["dtype"] == "bfloat16"
    layers = f"_{payload['layers']}layers" if payload.get("layers") else ""  # --layers N: results of their own
    return f"rollout_{payload['device']}" + ("_bf16" if cpu_bf16 else "") + layers, cpu_bf16


def _section(payload):
    """The README section of a results payload."""
    name, cpu_bf16 = _result_name(payload)
    if cpu_bf16:
        return BF16_SECTION
    if payload["device"] == "cuda":
        return f"{CUDA_SECTION}-{payload['layers']}layers" if payload.get("layers") else CUDA_SECTION
    return SECTION


def _markdown(payload):
    name, cpu_bf16 = _result_name(payload)
    title = ("## Rollout engine, CPU with the model in bf16 (`python -m bench.rollout --dtype bf16`)" if cpu_bf16
             else "## Rollout engine on CUDA (`python -m bench.rollout --device cuda`)" if payload["device"] == "cuda"
             else "## Rollout engine (`python -m bench.rollout`)")
    lines = [title, "",
             f"Generated by `bench/rollout.py` into `bench/results/{name}.json`; "
             "docs/rollout.md explains what is measured.", "",
             f"- device: {payload['device']} ({payload['cpu']}); dtype {payload['dtype']}; date {payload['date']}",
             f"- versions: torch {payload['torch']}, transformers {payload['transformers']}; "
             f"{payload['repeats']} timed rounds (median), implementations alternating in one process", ""]
    if payload["device"] == "cpu":
        lines.append("CPU numbers are noisy (2 shared cores); read the side-by-side ratios.")
        lines.append("")
    backends = next((run["sdpa_backends"] for run in payload["runs"] if "sdpa_backends" in run), None)
    if backends:
        lines.append("SDPA backends enabled: " + ", ".join(k for k, on in backends.items() if on) +
                     " (cuDNN attention off: one plan per key length); rows with CUDA graphs ran after the others.")
        lines.append("")
    lines += ["| config | threads | images x tokens | implementation | ms/step | decode ms | images/s | "
              "step speed-up vs today | images/s vs today | ms/step / memory floor | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in payload["runs"]:
        config = run["config"]
        if payload["device"] == "cuda" and run.get("shape", {}).get("num_layers"):
            config += f" ({run['shape']['num_layers']} layers)"
        for impl, r in run["results"].items():
            lines.append(
                f"| {config} | {run['threads'] or '-'} | {run['images']} x {run['image_tokens']} | {impl} | "
                f"{r['ms_per_step']:.2f} | {r['decode_ms']:.1f} | {r['images_per_s']:.2f} | "
                f"{r.get('speedup_step_vs_today', float('nan')):.2f}x | "
                f"{r.get('speedup_images_vs_today', float('nan')):.2f}x | "
                f"{r['ms_per_step'] / run['floor_ms_per_step'] if run.get('floor_ms_per_step') else float('nan'):.1f}x | "
                f"{run['notes'].get(impl, '')} |")
        for impl, note in run["notes"].items():
            if impl not in run["results"]:
                lines.append(f"| {config} | {run['threads'] or '-'} | {run['images']} x {run['image_tokens']} "
                             f"| {impl} | | | | | | | {note} |")
    for reason in payload.get("skipped", []):
        lines.append(f"- not run: {reason}")
    for run in payload["runs"]:
        prof = run.get("profile")
        if prof and "top" in prof:
            lines += ["", f"Profile ({run['config']}, {prof['what']}; {prof['total_ms']:.1f} ms in all):", "",
                      "| op | ms | calls | share |", "|---|---|---|---|"]
            lines += [f"| `{e['op']}` | {e['ms']:.2f} | {e['calls']} | {100 * (e['share'] or 0):.1f}% |"
                      for e in prof["top"][:15]]
        elif prof:
            lines.append(f"- profile ({run['config']}): {prof.get('error')}")
    return "\n".join(lines)


def _write(payload, out_dir: Path, readme: Optional[Path], quiet=False):
    """The JSON, and the README section unless ``readme`` is None (a dry run must not replace real rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name, cpu_bf16 = _result_name(payload)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    if readme is not None:
        replace_section(readme, _section(payload), [_markdown(payload)])
    if not quiet:
        print(f"wrote {path}" + (f" and the rollout section of {readme}" if readme is not None else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true",
                        help="GPU (make gpu-quick): 2 timed rounds, no torch.compile row, the 7B shape first")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --device cuda: run the GPU code on CPU at a toy shape; JSON only, no README")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="GPU: stop starting new configurations after this many seconds (the rest are listed "
                             "as not run)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="CPU: the model's dtype (the GPU rows always run bf16)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CPU_CONFIGS, choices=list(CPU_CONFIGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rows", nargs="+", type=int, default=[16, 128], help="GPU: images per rollout")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 2 with --quick)")
    parser.add_argument("--layers", type=int, default=None,
                        help="GPU: language-model layers of each shape (default 2; at most the real depth). With 2 "
                             "the per-step work that does not scale with depth (head, CFG, sampling) weighs more "
                             "than at full depth")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip engine-compiled (CPU compilation takes about a minute per config)")
    parser.add_argument("--vq-only", action="store_true",
                        help="CPU: only the VQ decode variants (rollout_vq_cpu.json, own README section)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--readme", type=Path, default=BENCH_DIR / "README.md")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: also profile one eager-engine rollout of the first configuration (top ops by "
                             "device time, in the JSON and the README section)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the README section of this results JSON (e.g. one copied back from a GPU)")
    args = parser.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        if "variants" in payload:  # a --vq-only --device cuda report
            replace_section(args.readme, VQ_CUDA_SECTION, vq_cuda_lines(payload))
        else:
            replace_section(args.readme, _section(payload), [_markdown(payload)])
        return 0
    if args.dry_run and args.device != "cuda":
        parser.error("--dry-run: only with --device cuda (it runs the GPU code on CPU)")
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (--dry-run runs the same code on CPU)")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.quick:
        args.compile = False  # minutes of compilation; the CUDA-graph rows are the GPU engine anyway
    torch.manual_seed(0)
    if args.vq_only:
        return run_vq_only(args)
    import transformers

    on_gpu = args.device == "cuda" and not args.dry_run
    payload = dict(
        device=args.device, dry_run=args.dry_run,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=(torch.cuda.get_device_name() if on_gpu else
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"),
        dtype="bfloat16" if (args.device == "cuda" or args.dtype == "bf16") else "float32", torch=torch.__version__,
        transformers=transformers.__version__, repeats=args.repeats, runs=[], skipped=[],
        layers=args.layers if (args.device == "cuda" and not args.dry_run) else None,
    )
    readme = None if args.dry_run else args.readme

    def save(runs):  # after every configuration: a run killed later keeps what it measured
        payload["runs"] = list(runs)
        _write(payload, args.out_dir, readme, quiet=True)

    if args.device == "cuda":
        runs = run_cuda(args, save, payload["skipped"])
    else:
        runs = run_cpu(args, save)
    payload["runs"] = runs
    _write(payload, args.out_dir, readme)


if __name__ == "__main__":
    main()
