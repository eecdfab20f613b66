"""Cost of guided log-probs (``objective.logprob_source: guided``) against conditional ones, on CPU.

    python -m bench.guided_cost                  # demo + mid-size random Janus, 1 thread
    python -m bench.guided_cost --threads 2 --repeats 7
    python -m bench.guided_cost --configs tiny --repeats 1 --out /tmp/g.json   # smoke run (the test's)

One training micro-batch (2 prompts x G = 8 images, no CoT) is sampled once; then the trainer's own
``micro_loss`` (teacher-forced forward, GRPO objective through the fused head, backward) runs with
``logprob_source: conditional`` and ``guided`` alternately in one process, ``--repeats`` rounds, median. Guided
adds one LM forward/backward over the unconditional rows (same length as the conditional ones); the head
runs once either way. Results: ``bench/results/guided_cost_cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from egrpo.objectives import build_objective
from egrpo.trainer.model import ModelConfig, build_model, num_image_tokens
from egrpo.trainer.rollout import RolloutConfig, rollout
from egrpo.trainer.tokenizer import janus_tokens
from egrpo.trainer.train import MicroBatch, micro_loss

from .rollout import CPU_CONFIGS, PROMPTS

RESULTS = Path(__file__).resolve().parent / "results" / "guided_cost_cpu.json"


def measure(name: str, repeats: int, cfg_scale: float = 5.0) -> dict:
    spec = CPU_CONFIGS[name]
    # the recipes' trainable set (language model + text head; the image head frozen)
    model, tokenizer = build_model(ModelConfig(tiny=spec["tiny"], dtype="fp32"), "cpu")
    n_image = num_image_tokens(model)
    G = spec["group"]
    ro = rollout(model, tokenizer, PROMPTS[: spec["prompts"]],
                 RolloutConfig(group_size=G, image_tokens=n_image, cfg_scale=cfg_scale), torch.Generator().manual_seed(0))
    B = ro.image_tokens.shape[0]
    rewards = torch.linspace(0, 1, B)[:, None]
    guidance = (janus_tokens(tokenizer), cfg_scale)
    runs = {
        "conditional": (build_objective("grpo", beta=0.0), None),
        "guided": (build_objective("grpo", beta=0.0, logprob_source="guided"), guidance),
    }
    model.train()

    def once(objective, g):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = micro_loss(model, objective, MicroBatch(rollout=ro, metadata=[{}] * B, rewards=rewards,
                                                          guidance=g), G, torch.ones(1), "fused")
        loss.backward()
        return time.perf_counter() - t0

    for objective, g in runs.values():   # warm-up
        once(objective, g)
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, (objective, g) in runs.items():
            times[k].append(once(objective, g))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(config=name, B=B, context_len=int(ro.sequence_ids.shape[1]), image_tokens=n_image,
                hidden_size=model.config.text_config.hidden_size, layers=model.config.text_config.num_hidden_layers,
                ms_conditional=1e3 * med["conditional"], ms_guided=1e3 * med["guided"],
                ratio=med["guided"] / med["conditional"], repeats=repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["demo", "mid"], choices=sorted(CPU_CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON path (default bench/results/guided_cost_cpu.json)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    rows = [measure(name, args.repeats) for name in args.configs]
    out = dict(device=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    for r in rows:
        print(f"{r['config']}: B={r['B']} T_img={r['image_tokens']} L={r['context_len']} D={r['hidden_size']} "
              f"layers={r['layers']}: conditional {r['ms_conditional']:.1f} ms, guided {r['ms_guided']:.1f} ms, "
              f"ratio {r['ratio']:.2f} ({args.threads} thread(s), median of {r['repeats']})")


if __name__ == "__main__":
    main()
