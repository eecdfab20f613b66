"""What the advantage shaping costs beside the fused head: EG-GRPO's percentile masks and STAGE's
similarity weights, per backend, at the Janus-Pro-7B training shapes.

    python -m bench.shaping_cost --device cuda     # bench/results/shaping_cost_cuda.json
    python -m bench.shaping_cost --dry-run         # CPU, toy shapes (CI)

Rows (all bf16 where a head is involved, CUDA events on a GPU, ``perf_counter`` on CPU; median of
the timed calls after warm-up):

* ``masks``: :func:`egrpo.kernels.entropy_masks` per scope and backend at the shapes the trainer hands
  it: one grpo_loss chunk of whole image sequences (7 x 576 at the default CUDA chunk), the full image
  batch (64 x 576), a text chunk (64 x 256), a group (8 x 8 x 576) and the whole batch as one unit.
* ``eg_grpo``: the EG-GRPO loss with a frozen head at the image case (N = 36864, D = 4096, V = 16384)
  and the text case (N = 16384, V = 102400), the masks on each backend, with and without their own
  NaN check (a host sync per chunk), and plain GRPO beside it: what the shaping adds to a loss step.
* ``stage_weights``: ``cross_sample_similarity`` + the two STAGE weights for 8 groups x 8 images x
  576 tokens against the fused image head's forward+backward (the STAGE goal: < 1% of the head).
"""

from __future__ import annotations

import sys

import torch

from bench import cli
from bench.measure import timed_batches
from egrpo.kernels import cross_sample_similarity, entropy_masks, grpo_loss, linear_logprob_entropy
from egrpo.objectives import eg_grpo_token_advantages, stage_kl_weights, stage_policy_weights


def median_ms(fn, device, reps=20, warmup=3):
    """Median ms per call: measure's event-timed (CUDA) / host-timed batches of one call each."""
    return timed_batches(fn, device.type, batches=reps, inner=1, warmup_s=0.0, warmup_calls=warmup)[0] * 1e3


def mask_rows(device, dry_run, backends):
    g = torch.Generator(device=device).manual_seed(0)
    shapes = ([("image chunk", 7, 576, "sequence"), ("image batch", 64, 576, "sequence"),
               ("text chunk", 64, 256, "sequence"), ("image group", 64, 576, "group"),
               ("image batch, one unit", 64, 576, "batch")]
              if not dry_run else [("toy", 4, 24, "sequence"), ("toy group", 4, 24, "group")])
    rows = []
    for name, B, T, scope in shapes:
        entropy = torch.rand(B, T, generator=g, device=device)
        mask = torch.rand(B, T, generator=g, device=device) > 0.1
        kw = dict(scope=scope, group_size=(4 if dry_run else 8) if scope == "group" else None)
        reference = None
        for backend in backends:
            for check in (True, False):
                call = lambda: entropy_masks(entropy, mask, 0.2, 0.5, backend=backend, check_finite=check, **kw)  # noqa: E731
                out = call()
                same = None if reference is None else all(bool(torch.equal(a, b)) for a, b in zip(out, reference))
                reference = reference or out
                ms = median_ms(call, device)
                rows.append({"what": "masks", "shape": name, "B": B, "T": T, "scope": scope, "backend": backend,
                             "check_finite": check, "ms": ms, "same_masks_as_first_backend": same})
                print(f"masks {name:22s} {scope:8s} {backend:6s} check_finite={check!s:5s} {ms:8.3f} ms", flush=True)
    return rows


def loss_rows(device, dry_run, backends, head_backend, case):
    B, T, D, V = {"image": (64, 576, 4096, 16384), "text": (64, 256, 4096, 102400)}[case] if not dry_run else (4, 24, 32, 64)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(B, T, D, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, device=device) * (3 / D**0.5)).to(dtype)  # frozen head
    targets = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    adv = torch.randn(B, generator=g, device=device)
    ref = -torch.log(torch.tensor(float(V))) + 0.3 * torch.randn(B, T, generator=g, device=device)

    def step(masks_backend, check):
        def run():
            hidden.grad = None
            if masks_backend is None:
                out = grpo_loss(hidden, weight, targets, mask, adv, ref_logp=ref, beta=0.04, backend=head_backend)
            else:
                def advantage_fn(_logp, entropy, seqs):
                    return eg_grpo_token_advantages(adv[seqs], entropy, mask[seqs], V, backend=masks_backend,
                                                    check_finite=check)[0]
                out = grpo_loss(hidden, weight, targets, mask, None, ref_logp=ref, beta=0.04,
                                advantage_fn=advantage_fn, advantage_fn_scope="sequence", backend=head_backend)
            out.loss.backward()
            return out.loss.detach()
        return run

    # check_finite=True: the masks check the entropies themselves (a host sync per chunk, what the trainer did
    # before 2026-12-04); False: the loss checks the advantages once per pass (the trainer now)
    variants = [("grpo", None, False)] + [(f"eg_grpo masks={b} check_finite={c}", b, c)
                                          for b in backends for c in (True, False)]
    rows, losses = [], {}
    for label, masks_backend, check in variants:
        losses[label] = float(step(masks_backend, check)())
        ms = median_ms(step(masks_backend, check), device, reps=10 if not dry_run else 3)
        rows.append({"what": "eg_grpo" if masks_backend else "grpo", "case": case, "masks_backend": masks_backend,
                     "check_finite": check if masks_backend else None, "head_backend": head_backend,
                     "B": B, "T": T, "D": D, "V": V, "frozen_head": True, "dtype": "bfloat16", "fwd_bwd_ms": ms,
                     "loss": losses[label]})
        print(f"{case:5s} {label:40s} {ms:8.2f} ms  loss {losses[label]:.6f}", flush=True)
    return rows


def stage_rows(device, dry_run, head_backend, sim_backend):
    B, T, C, D, V = (64, 576, 8, 4096, 16384) if not dry_run else (8, 24, 8, 32, 64)
    g = torch.Generator(device=device).manual_seed(2)
    codebook = torch.nn.functional.normalize(torch.randn(V, C, generator=g, device=device), dim=-1)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    codes, adv = codebook[ids], torch.randn(B, generator=g, device=device)
    hidden = (torch.randn(B, T, D, generator=g, device=device) * 0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, D, generator=g, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
    bias = torch.zeros(V, device=device, dtype=torch.bfloat16).requires_grad_()

    def reweight():
        sim = cross_sample_similarity(codes, adv, 8, backend=sim_backend)
        return stage_policy_weights(sim), stage_kl_weights(sim)

    def head():
        hidden.grad = weight.grad = bias.grad = None
        logp, ent = linear_logprob_entropy(hidden, weight, ids, bias, backend=head_backend)
        (logp.sum() + 0.1 * ent.sum()).backward()

    t_weights = median_ms(reweight, device, reps=50)
    t_head = median_ms(head, device, reps=5)
    print(f"stage weights {t_weights * 1e3:.1f} us; head {t_head:.2f} ms ({100 * t_weights / t_head:.2f}%)", flush=True)
    return [{"what": "stage_weights", "B": B, "T": T, "groups": B // 8, "similarity_backend": sim_backend,
             "weights_ms": t_weights, "head_fwd_bwd_ms": t_head, "head_backend": head_backend,
             "fraction_of_head": t_weights / t_head, "goal": "< 0.01 of the fused image head's fwd+bwd",
             "verdict": "met" if t_weights < 0.01 * t_head else "missed"}]


def markdown(report) -> list:
    lines = ["## Shaping cost beside the head (`python -m bench.shaping_cost`)", "",
             f"Generated by `bench/shaping_cost.py` into `bench/results/shaping_cost_{'cuda' if report['device'] != 'cpu' else 'cpu'}.json`; "
             f"device {report['device']}, torch {report['versions']['torch']}, date {report['date']}. "
             "Median ms per call (CUDA events, the device synchronised around each call).", "",
             "| entropy masks at | B x T | scope | backend | own NaN check (host sync) | ms |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["what"] == "masks":
            lines.append(f"| {r['shape']} | {r['B']} x {r['T']} | {r['scope']} | {r['backend']} | "
                         f"{'yes' if r['check_finite'] else 'no'} | {r['ms']:.3f} |")
    lines += ["", "| loss (frozen head, bf16) | N x D x V | masks backend | per-chunk NaN check | fwd+bwd ms | vs GRPO |",
              "|---|---|---|---|---|---|"]
    plain = {r["case"]: r["fwd_bwd_ms"] for r in report["rows"] if r["what"] == "grpo"}
    for r in report["rows"]:
        if r["what"] in ("grpo", "eg_grpo"):
            check = "-" if r["check_finite"] is None else ("yes" if r["check_finite"] else "no")
            lines.append(f"| {r['what']} ({r['case']}) | {r['B'] * r['T']} x {r['D']} x {r['V']} | "
                         f"{r['masks_backend'] or '-'} | {check} | {r['fwd_bwd_ms']:.2f} | "
                         f"{r['fwd_bwd_ms'] / plain[r['case']]:.3f} |")
    for r in report["rows"]:
        if r["what"] == "stage_weights":
            lines += ["", f"STAGE similarity + weights ({r['groups']} groups x 8 x {r['T']} tokens): "
                      f"{r['weights_ms'] * 1e3:.0f} us against {r['head_fwd_bwd_ms']:.2f} ms for the fused image head "
                      f"({100 * r['fraction_of_head']:.2f}%; goal {r['goal']}: {r['verdict']})."]
    return lines


def main(argv=None) -> int:
    args = cli.parse(__doc__, argv)
    started = cli.start(args, "shaping_cost", "shaping-cost", markdown)
    if isinstance(started, int):
        return started
    device, out, report = started
    gpu = device.type == "cuda"
    backends = ["triton", "torch"] if gpu else ["torch"]
    head_backend = "triton" if gpu else "torch"
    for part in (lambda: mask_rows(device, args.dry_run, backends),
                 lambda: loss_rows(device, args.dry_run, backends, head_backend, "image"),
                 lambda: loss_rows(device, args.dry_run, backends, head_backend, "text"),
                 lambda: stage_rows(device, args.dry_run, head_backend, head_backend)):
        report["rows"] += part()
        cli.save(out, report)
    return cli.finish(args, out, "shaping-cost", markdown, report)


if __name__ == "__main__":
    sys.exit(main())
