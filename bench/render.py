"""Render ``bench/results/suite_*.json`` into ``bench/README.md`` (markdown tables) and PNG plots.

    python -m bench.render            # re-render from whatever results exist
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
OP_TITLES = {
    "head": "Fused head: log-prob + entropy",
    "grpo": "GRPO loss, GRPO mode (sequence advantages, k3 KL)",
    "eg_grpo": "GRPO loss, EG-GRPO mode (entropy-shaped token advantages)",
    "stage": "GRPO loss, STAGE mode (similarity weights, weighted normalisation)",
    "entropy_masks": "Entropy percentile masks (20% / 50%, per row)",
    "similarity": "STAGE cross-sample similarity",
}
DEVICE_TITLES = {"cuda": "GPU", "cpu": "CPU"}


def load_reports(results_dir: Path) -> Dict[str, dict]:
    out = {}
    for dev in ("cuda", "cpu"):
        p = results_dir / f"suite_{dev}.json"
        if p.exists():
            out[dev] = json.loads(p.read_text())
    return out


def _ms(stat: Optional[dict]) -> str:
    if not stat:
        return "n/a"
    return f"{stat['median']:.3g} [{stat['p20']:.3g}, {stat['p80']:.3g}]"


def _ratio(v: Optional[float], fmt="{:.2f}x") -> str:
    return "n/a" if v is None else fmt.format(v)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _mib(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _entropy(r) -> str:
    return {True: "yes", False: "**no** (cannot)", None: "n/a"}[r.get("computes_entropy")]


def _check(r) -> str:
    c = r.get("check_vs_eager")
    if r["impl"] == "eager":
        return "(reference)"
    if not c:
        return "n/a"
    return f"{c['max_abs_diff']:.2g}"


def row_table(rows: List[dict]) -> List[str]:
    lines = [
        "| case | implementation | fwd ms | bwd ms | fwd+bwd ms | speed-up vs eager (fwd+bwd) | of matmul floor (fwd+bwd) "
        "| peak MiB | memory vs eager | entropy | max abs diff vs eager | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            why = r["reason"] if r["reason"].startswith(r["status"]) else f"{r['status']}: {r['reason']}"
            lines.append(f"| {r['case']} | {r['label']} | {why} | | | | | | | | | |")
            continue
        frac = (r.get("fraction_of_floor") or {}).get("forward_backward_ms")
        spd = (r.get("speedup_vs_eager") or {}).get("forward_backward_ms")
        lines.append(
            f"| {r['case']} | {r['label']} | {_ms(r.get('forward_ms'))} | {_ms(r.get('backward_ms'))} "
            f"| {_ms(r.get('forward_backward_ms'))} | {_ratio(spd)} | {_pct(frac)} | {_mib(r.get('peak_bytes'))} "
            f"| {_ratio(r.get('memory_vs_eager'), '{:.3f}')} | {_entropy(r)} | {_check(r)} | {'; '.join(r.get('notes') or [])} |"
        )
    return lines


def _find(report, op, case, impl):
    for r in report["rows"]:
        if r["op"] == op and r["case"] == case and r["impl"] == impl:
            return r
    return None


def goals(report: Optional[dict]) -> List[str]:
    """The GPU kernel targets (set on 2026-11-22 for an H100), evaluated on the GPU results."""
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    if report is None:
        for t in ("fused head fwd+bwd >= 70% of the matmul floor (image case)",
                  "fused head fwd+bwd >= 2x faster than eager (image case)",
                  "fused head peak memory <= 1/8 of eager (image case)",
                  "our GRPO loss faster than Liger's chunked GRPO loss at <= its memory (image case)"):
            lines.append(f"| {t} | not measured yet (no GPU run) | - |")
        return lines
    head = _find(report, "head", "image", "ours_triton")
    grpo, liger = _find(report, "grpo", "image", "ours_triton"), _find(report, "grpo", "image", "liger_grpo")

    def ok(r):
        return r is not None and r["status"] == "ok"

    if ok(head):
        frac = head["fraction_of_floor"]["forward_backward_ms"]
        spd = head["speedup_vs_eager"]["forward_backward_ms"]
        mem = head["memory_vs_eager"]
        lines.append(f"| fused head fwd+bwd >= 70% of the matmul floor | {_pct(frac)} | {'met' if frac and frac >= 0.7 else 'MISSED'} |")
        lines.append(f"| fused head >= 2x faster than eager | {_ratio(spd)} | {'met' if spd and spd >= 2 else 'MISSED'} |")
        lines.append(f"| fused head memory <= 1/8 of eager | {_ratio(mem, '{:.3f}')} of eager "
                     f"| {'met' if mem is not None and mem <= 0.125 else 'MISSED'} |")
    else:
        lines.append(f"| fused head targets | {head['status'] + ': ' + str(head['reason']) if head else 'no row'} | MISSED |")
    if ok(grpo) and ok(liger):
        t_o, t_l = grpo["forward_backward_ms"]["median"], liger["forward_backward_ms"]["median"]
        m_o, m_l = grpo["peak_bytes"], liger["peak_bytes"]
        verdict = "met" if (t_o < t_l and m_o <= m_l) else "MISSED"
        lines.append(f"| GRPO loss faster than Liger at <= memory | ours {t_o:.3g} ms / {_mib(m_o)} MiB vs Liger "
                     f"{t_l:.3g} ms / {_mib(m_l)} MiB | {verdict} |")
    else:
        lines.append("| GRPO loss vs Liger | a row did not run | MISSED |")
    return lines


def plot(report: dict, plots_dir: Path) -> List[Path]:
    """Time and memory (fwd+bwd) vs N and vs V for the swept ops; one PNG per sweep axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = report["device_type"]
    paths = []
    for axis in ("N", "V"):
        rows = [r for r in report["rows"] if r["shape"].get("sweep") == axis and r["status"] == "ok"]
        if not rows:
            continue
        ops = sorted({r["op"] for r in rows}, key=lambda o: list(OP_TITLES).index(o))
        fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.8 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            for impl in sorted({r["impl"] for r in rows if r["op"] == op}):
                pts = sorted((r["shape"][axis], r) for r in rows if r["op"] == op and r["impl"] == impl)
                xs = [p[0] for p in pts]
                label = pts[0][1]["label"]
                axes[i][0].plot(xs, [p[1]["forward_backward_ms"]["median"] for p in pts], "o-", label=label)
                mem = [(x, p["peak_bytes"] / 2**20) for x, p in pts if p.get("peak_bytes") is not None]
                if mem:
                    axes[i][1].plot([m[0] for m in mem], [m[1] for m in mem], "o-", label=label)
            floor = sorted((r["shape"][axis], r["floor_ms"]["forward_backward_ms"]) for r in rows
                           if r["op"] == op and r.get("floor_ms"))
            if floor:
                axes[i][0].plot([f[0] for f in floor], [f[1] for f in floor], "k--", label="matmul floor (6NDV)")
            fixed = {k: v for k, v in rows[0]["shape"].items() if k in ("N", "D", "V") and k != axis}
            for j, what in enumerate(("fwd+bwd time (ms, median)", "peak memory above inputs (MiB)")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(what)
                ax.set_title(f"{op}: {what.split(' (')[0]} vs {axis} ({', '.join(f'{k}={v}' for k, v in fixed.items())})",
                             fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"{DEVICE_TITLES[dev]}: {report['device']} ({report['dtype']})", fontsize=10)
        fig.tight_layout()
        plots_dir.mkdir(parents=True, exist_ok=True)
        path = plots_dir / f"{dev}_sweep_{axis}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def device_section(dev: str, report: Optional[dict], readme_dir: Path, plots_dir: Path) -> List[str]:
    title = DEVICE_TITLES[dev]
    lines = [f"## {title} results", ""]
    if report is None:
        lines += [f"**Not measured yet.** No `results/suite_{dev}.json`: run "
                  f"`{'make gpu-check' if dev == 'cuda' else 'make bench'}` on a "
                  f"{'CUDA machine (H100 for the GPU kernel targets)' if dev == 'cuda' else 'CPU'}.", ""]
        return lines
    v = report["versions"]
    lines += [
        f"- device: {report['device']}; dtype {report['dtype']}; date {report['date']}; host `{report['host']}`",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- matmul rate measured in this run: {report['matmul']['flops_per_s'] / 1e12:.3f} TFLOP/s "
        f"({report['matmul']['dtype']} {report['matmul']['n']}^3 GEMM); floor = 6NDV / that rate"
        + ("; on CPU that is `torch.mm`'s rate (BLAS), while our fp32 chunk GEMMs run through oneDNN, up to ~2x "
           "faster on the AMD development CPU (docs/kernels.md, \"CPU fp32 GEMMs\"), so our fraction can exceed 100%"
           if dev == "cpu" and report["dtype"] == "float32" else ""),
        f"- {report['reps']} timed repetitions after {report['warmup']} warm-up; times are "
        f"`median [p20, p80]` in ms; {report['wall_s']:.0f} s for the whole run",
    ]
    if report.get("complete") is False:
        lines += [f"- **INCOMPLETE**: {len(report['rows'])} of {report.get('rows_selected', '?')} rows measured "
                  "(the run was stopped or ran out of its time budget; `python -m bench.suite --resume` measures "
                  "the rest). Rows measured in different runs may use different matmul rates "
                  "(`matmul_flops_per_s` per row in the JSON)."]
    if dev == "cpu":
        lines += ["- **CPU numbers are noisy**: this machine's 2 cores are shared with other jobs, so timings can "
                  "move by tens of percent between runs; read the ratios, not the absolute values, and only "
                  "as an indication. CPU shapes are scaled down (D = 128, 2 samples per case) from the GPU cases."]
    lines += [""]
    shape_of = {}
    for c in report["cases"]:
        shape_of[c["name"]] = c
    main_cases = [c for c in report["cases"] if c.get("sweep") is None]
    lines += ["Cases: " + "; ".join(f"**{c['name']}** N={c['N']} (B={c['N'] // c['T']} x T={c['T']}), D={c['D']}, "
                                    f"V={c['V']}{', bias' if c['bias'] else ''}" for c in main_cases), ""]
    for op in report["ops"]:
        rows = [r for r in report["rows"] if r["op"] == op and r["shape"].get("sweep") is None]
        if not rows:
            continue
        lines += [f"### {OP_TITLES.get(op, op)}", ""] + row_table(rows) + [""]
    sweep_rows = [r for r in report["rows"] if r["shape"].get("sweep") is not None]
    if sweep_rows:
        lines += ["### Sweeps over N and V (fwd+bwd)", ""]
        for path in plot(report, plots_dir):
            lines += [f"![{path.stem}]({path.relative_to(readme_dir).as_posix()})", ""]
        lines += ["<details><summary>sweep table</summary>", ""] + row_table(sweep_rows) + ["", "</details>", ""]
    return lines


HEADER = """# Kernel benchmarks

Generated by `python -m bench.suite` (`make bench` on CPU, `make gpu-check` on a CUDA machine) from
`bench/results/suite_<cpu|cuda>.json`; re-render with `python -m bench.render`. Do not edit by hand.

What is measured, per op x case x implementation:

- **time**: forward (autograd on), backward, and their sum, each the median `[p20, p80]` over the timed
  repetitions (CUDA events on GPU, `perf_counter` on CPU);
- **speed-up vs eager**: eager's median fwd+bwd time over this row's;
- **of matmul floor**: 6NDV FLOPs over the GEMM rate measured at the start of the same run (bf16 on GPU, fp32
  on CPU), divided by this row's fwd+bwd time (1.0 = as fast as the GEMMs alone could be; ours needs 6NDV
  (GRPO, STAGE, and EG-GRPO with its per-sequence percentiles as run here; 4NDV with a frozen head) or 8NDV
  (head with autograd) of GEMM work);
- **peak MiB**: peak memory above the inputs during one forward+backward (CUDA allocator peak; on CPU the
  peak RSS of a fresh forked child per row, which runs on `EGRPO_BENCH_THREADS` threads, default torch's
  count; gradients of the inputs are included);
- **max abs diff vs eager**: per-token log-probs (head), loss (loss ops), mask disagreement (masks: 1 = some
  token differs), similarity values; Liger's fused CE gives only a summed loss, compared as a mean log-prob.

A peer that cannot compute a quantity keeps its row: `n/a: ...` (cannot), `needs CUDA ...` (can, not on this
machine), `**no** (cannot)` in the entropy column (log-prob-only peers). Peers: `F.linear_cross_entropy` with
`LinearCrossEntropyOptions()` (PyTorch's chunked path), Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` and
`LigerFusedLinearGRPOLoss` (`loss_type="bnpo"` = our token-mean normalisation, `beta` and the k3 KL as ours).
The eager baselines are `egrpo.kernels.reference` (`linear_logprob_entropy_reference`, `grpo_loss_reference`,
`eg_grpo_loss_reference`, which follows the released EG-GRPO code) plus, for STAGE and the masks, the
trainer-style eager code in `bench/ops.py`.
"""


# ------------------------------------------------------------------------------------------------
# Training-capacity section (from bench/results/capacity_<dev>.json, written by bench.bench_capacity)
# ------------------------------------------------------------------------------------------------

def _fmt_s(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def capacity_lines(results_dir: Path) -> List[str]:
    lines = ["## Training capacity (GPU target set on 2026-11-22: >= 2x more images per micro-batch with fused heads)", "",
             "Generated by `python -m bench.bench_capacity` (`make bench-capacity`; `make gpu-check` runs it after "
             "the suite) from `bench/results/capacity_<cpu|cuda>.json`. Largest images per micro-batch (576 image "
             "tokens each, with and without a 256-token CoT) for which ONE training step (rollout + reward + "
             "reference + loss + update) of a random-weight Janus-Pro-shaped model fits, found by doubling then "
             "bisecting on CUDA OOM; fused heads (`train.head_impl=fused`) vs the eager full-logits heads of the "
             "reference trainers (`eager`); step time split at the largest size that fits. Objective EG-GRPO "
             "(beta 0.01, so a frozen reference model is resident); reward: the offline colour reward (reward models "
             "not included). The 1B plan trains all LM parameters with DeepSpeed bf16 ZeRO-0; the 7B plan needs "
             "ZeRO-3 with the AdamW states offloaded to CPU RAM plus gradient checkpointing to fit one GPU at all.", ""]
    target = "| target | measured | verdict |"
    for dev, title in (("cuda", "GPU"), ("cpu", "CPU (smoke test, tiny model)")):
        path = results_dir / f"capacity_{dev}.json"
        lines += [f"### {title}", ""]
        if not path.exists():
            lines += [f"**Not measured yet.** No `results/capacity_{dev}.json`: run "
                      f"`{'make gpu-check' if dev == 'cuda' else 'make bench-capacity'}` on a "
                      f"{'CUDA machine' if dev == 'cuda' else 'CPU'}.", ""]
            if dev == "cuda":
                lines += [target, "|---|---|---|",
                          "| >= 2x more images per micro-batch with fused heads than eager | not measured yet "
                          "(no GPU run) | - |", ""]
            continue
        rep = json.loads(path.read_text())
        v = rep["versions"]
        lines += [f"- device: {rep['device']}; date {rep['date']}; host `{rep['host']}`; {rep['wall_s']:.0f} s",
                  "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
        if rep.get("simulated_oom_above_images") is not None or rep.get("max_images_cap") is not None:
            lines += [f"- **smoke run, not a capacity measurement**: search capped at {rep.get('max_images_cap')} "
                      f"images; simulated OOM above {rep.get('simulated_oom_above_images')} images"]
        for name, m in rep["models"].items():
            p = m.get("params") or {}
            sh = m["shape"]
            t = sh["tiny_overrides"]
            lines += [f"- **{name}**: hidden {t.get('hidden_size', 64)}, {t.get('num_layers')} layers, text vocab "
                      f"{sh['text_vocab'] or 'char'}, image vocab {t.get('image_vocab_size', 256)}, "
                      f"{sh['image_tokens']} image tokens, CoT cap {sh['cot_tokens']}; "
                      f"{(p.get('trainable') or 0) / 1e9:.3g} B trainable of {(p.get('total') or 0) / 1e9:.3g} B; "
                      f"{m['notes']}" + (f"; **{m['static_check']}**" if m.get("static_check") else "")]
        if dev == "cpu":
            lines += ["- peak MiB on CPU is the process' peak RSS so far (ru_maxrss), not a per-trial figure"]
        if rep.get("complete") is False:
            lines += ["- **INCOMPLETE**: some settings were not run or were cut by the time budget "
                      "(`python -m bench.bench_capacity --resume` goes on from this JSON)"]
        lines += ["", "| model | CoT | heads | max images / micro-batch | first OOM at | peak MiB at max | step s | "
                  "rollout s | reward s | ref s | loss s | update s | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in rep["settings"]:
            a = s.get("at_max") or {}
            note = s.get("note") or ""
            if s["status"] != "ok":
                note = f"{s['status']}: {s.get('reason')}" + (f"; {note}" if note else "")
            elif s.get("search_capped"):
                note = ("search capped (no OOM seen); " + note).strip("; ")
            if a.get("rollout/cot_tokens") is not None:
                note = (note + f"; mean CoT {a['rollout/cot_tokens']:.0f} tokens").strip("; ")
            lines.append(
                f"| {s['model']} | {'256-token CoT' if s['cot'] and s['model'] != 'tiny' else ('CoT' if s['cot'] else 'none')} "
                f"| {s['head_impl']} | {s.get('max_images', 0)} | {s.get('first_failing_images') or '-'} "
                f"| {_fmt_s(a.get('memory/peak_mb'))} | {_fmt_s(a.get('time/step'))} | {_fmt_s(a.get('time/rollout'))} "
                f"| {_fmt_s(a.get('time/reward'))} | {_fmt_s(a.get('time/ref'))} | {_fmt_s(a.get('time/loss'))} "
                f"| {_fmt_s(a.get('time/update'))} | {note} |")
        lines += ["", target, "|---|---|---|"]
        for r in rep.get("fused_over_eager", []):
            ratio = r["ratio"]
            measured = (f"{r['fused']} vs {r['eager']} images (eager does not fit at all)" if r.get("only_fused_fits")
                        else f"{r['fused']} vs {r['eager']} images = {ratio:.2f}x" if ratio is not None
                        else f"{r['fused']} vs {r['eager']} images")
            if r["lower_bound"]:
                measured += " (fused side capped: lower bound)"
            verdict = ("n/a (smoke run)" if dev == "cpu" else
                       "met" if (ratio is not None and ratio >= 2) or r.get("only_fused_fits") else "MISSED")
            lines.append(f"| {r['model']} {'with' if r['cot'] else 'without'} CoT: >= 2x images, fused vs eager "
                         f"| {measured} | {verdict} |")
        lines += [""]
    return lines


def cpu_paired_lines(results_dir: Path) -> List[str]:
    """Section from ``bench/results/cpu_paired*.json`` (``python -m bench.cpu_paired``)."""
    lines = ["## CPU paired timings (CPU goal: no slower than eager or torch.compile)", "",
             "Generated by `python -m bench.cpu_paired` from `bench/results/cpu_paired*.json`: fwd+bwd of our torch "
             "path vs eager PyTorch and `torch.compile(eager)`, run interleaved in one process; each figure is the "
             "median over rounds of the per-round time ratio (below 1 = ours faster). `head`: "
             "`linear_logprob_entropy`, trainable head (recomputes in backward: 8NDV); `grpo`: `grpo_loss`, "
             "trainable head (6NDV); `grpo_frozen`: frozen head (4NDV). Goal: <= 1 against eager and compile, fp32 and "
             "bf16. On a CPU with bf16 GEMMs our bf16 path rounds the logits to bf16 once, as eager does (docs/kernels.md, "
             "Numerics). Our fp32 GEMMs run through oneDNN where torch has it (`cpu_fp32_gemm`; eager and compile use "
             "torch.mm, i.e. MKL); `ours BLAS s` is our path with `EGRPO_CPU_FP32_GEMM=blas`, the same GEMMs as eager's, "
             "which separates what the GEMM library gives from what the algorithm gives (docs/kernels.md, \"CPU fp32 "
             "GEMMs\"). Runs on a shared 2-core machine: single figures move by ~10% between runs.", ""]
    paths = sorted(results_dir.glob("cpu_paired*.json"))
    if not paths:
        return lines + ["**Not measured yet.**", ""]
    for path in paths:
        rep = json.loads(path.read_text())
        lines += [f"### `{path.name}`", "",
                  f"- device: {rep['device']}; torch threads {rep['threads']}; date {rep['date']}; our fp32 GEMMs: "
                  f"{rep.get('cpu_fp32_gemm', 'blas (torch.mm)')}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v)]
        if rep.get("grpo_rows"):
            g = rep["grpo_rows"]
            lines += [f"- `grpo` / `grpo_frozen` rows re-measured {g['date']} ({g['threads']} thread(s)): eager = "
                      f"{g['eager']}" + (f"; {g['note']}" if g.get("note") else "")]
        lines += ["", "| op | N | D | V | dtype | ours s | ours BLAS s | eager s | compile s | ours/eager | ours/compile "
                  "| goal |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rep["rows"]:
            m, q = r["median_s"], r["median_paired_ratio"]
            goal_ratios = [v for k, v in q.items() if k in ("fused/eager", "fused/compiled_eager")]
            comp = q.get("fused/compiled_eager")
            cells = [r["op"], r["N"], r["D"], r["V"], r["dtype"]] + [
                "-" if m.get(k) is None else f"{m[k]:.3f}" for k in ("fused", "fused_blas", "eager", "compiled_eager")]
            cells += [f"{q['fused/eager']:.2f}", "-" if comp is None else f"{comp:.2f}",
                      ("met" if max(goal_ratios) <= 1.0 else "MISSED") + ("; " + r["note"] if r.get("note") else "")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines += [""]
    return lines


# Sections other tools write into the README between ``<!-- name:begin -->`` / ``<!-- name:end -->`` markers
# (bench/rollout.py) come after the ones rendered here; from the first of them on, the README is not ours to
# rewrite: that text (those sections and the notes after them) is kept as it is.
FOREIGN_SECTION = re.compile(r"^<!-- [\w-]+:begin -->$", re.M)


def kept_tail(readme: Path) -> str:
    """The part of an existing ``readme`` that :func:`render` keeps (empty when there is none)."""
    text = readme.read_text() if readme.exists() else ""
    match = FOREIGN_SECTION.search(text)
    return text[match.start():] if match else ""


def replace_section(readme: Path, name: str, section_lines: List[str]) -> None:
    """Write ``section_lines`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``readme`` (appended
    at the end the first time). The rendered suite tables above the first such section are left alone."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = "\n".join([begin, *section_lines, end])
    text = readme.read_text() if readme.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    readme.write_text(text)


def render(results_dir: Path, readme: Path, plots_dir: Optional[Path] = None) -> Path:
    tail = kept_tail(readme)
    reports = load_reports(results_dir)
    plots_dir = plots_dir or readme.parent / "plots"
    cuda = reports.get("cuda")
    where = cuda["device"] if cuda else "GPU"
    lines = [HEADER, f"## GPU kernel targets ({where}, image case; set on 2026-11-22 for an H100)", ""] + goals(cuda) + [""]
    for dev in ("cuda", "cpu"):
        lines += device_section(dev, reports.get(dev), readme.parent, plots_dir)
    lines += cpu_paired_lines(results_dir)
    lines += capacity_lines(results_dir)
    readme.write_text("\n".join(lines).rstrip() + "\n" + ("\n" + tail if tail else ""))
    return readme


def main(argv=None) -> int:
    render(BENCH_DIR / "results", BENCH_DIR / "README.md")
    print(f"rendered {BENCH_DIR / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
