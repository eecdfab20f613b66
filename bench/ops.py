"""The benchmarked ops, their cases and every implementation compared (ours and the peers).

An op builds its inputs for a :class:`Case` and, for each implementation name, either a
:class:`Runner` (a forward closure returning what to back-propagate and a value to check against
eager) or a string saying why that implementation cannot run here (``"n/a: ..."`` when it cannot
compute the quantity at all, ``"needs CUDA ..."`` when it can but not on this machine). The suite
keeps those rows in the table instead of dropping them.

Ops (N = B * T rows, D hidden, V vocab):

* ``head``: fused head log-prob + entropy, :func:`egrpo.kernels.linear_logprob_entropy`.
* ``grpo``, ``eg_grpo``, ``stage``: the GRPO loss of :func:`egrpo.kernels.grpo_loss` in the three
  objectives' modes (sequence advantages; entropy-shaped token advantages through
  ``advantage_fn``; STAGE's similarity weights with ``normalization="weighted"``).
* ``entropy_masks``: per-row 20% / 50% entropy percentile masks (no gradient).
* ``similarity``: STAGE's cross-sample similarity over groups of ``group_size`` images (no gradient).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from egrpo.kernels._common import default_chunk_rows
from egrpo.kernels import cross_sample_similarity, entropy_masks, grpo_loss, linear_logprob_entropy
from egrpo.kernels.reference import (
    eg_grpo_loss_reference,
    grpo_loss_reference,
    linear_logprob_entropy_reference,
)
from egrpo.objectives import eg_grpo_token_advantages
from egrpo.objectives import stage_kl_weights, stage_policy_weights

IMPLS = ("ours_triton", "ours_torch", "eager", "compile", "torch_lce", "liger_flce", "liger_grpo", "cce")
# The trainer's frozen image head (no dW): the GRPO losses with weight/bias detached, ours and the peers that can
# skip dW too (eager autograd; Liger's GRPO loss, which computes grad_weight only when the weight requires grad).
FROZEN_IMPLS = ("ours_triton_frozen", "ours_torch_frozen", "eager_frozen", "liger_grpo_frozen")
IMPL_LABELS = {
    "ours_triton": "ours (Triton)",
    "ours_torch": "ours (torch chunked)",
    "eager": "eager PyTorch",
    "compile": "eager + torch.compile",
    "torch_lce": "F.linear_cross_entropy (chunked)",
    "liger_flce": "Liger fused linear CE",
    "liger_grpo": "Liger LigerFusedLinearGRPOLoss",
    "cce": "Cut Cross-Entropy (Apple)",
    "ours_triton_frozen": "ours (Triton), frozen head",
    "ours_torch_frozen": "ours (torch chunked), frozen head",
    "eager_frozen": "eager PyTorch, frozen head",
    "liger_grpo_frozen": "Liger LigerFusedLinearGRPOLoss, frozen head",
}
GEMM_OPS = ("head", "grpo", "eg_grpo", "stage")
OPS = GEMM_OPS + ("entropy_masks", "similarity")
BETA = 0.04
CODE_DIM = 8  # Janus-Pro's VQ codebook vectors


@dataclass
class Case:
    name: str
    N: int
    D: int
    V: int
    T: int              # tokens per sample (576 image tokens, 256 CoT tokens)
    bias: bool
    group_size: int = 8
    sweep: Optional[str] = None  # "N" or "V" for sweep points, None for the headline cases

    @property
    def B(self) -> int:
        return self.N // self.T

    def to_dict(self) -> dict:
        return asdict(self)


def gpu_cases() -> List[Case]:
    cases = [
        Case("image", 36864, 4096, 16384, 576, True),   # 64 images x 576 tokens, 7B generation head
        Case("text", 16384, 4096, 102400, 256, False),  # 64 CoTs x 256 tokens, 7B LM head
    ]
    cases += [Case(f"N={n}", n, 4096, 16384, 576, True, sweep="N") for n in (4608, 9216, 18432, 36864, 73728)]
    cases += [Case(f"V={v}", 16384, 4096, v, 256, False, sweep="V") for v in (8192, 16384, 32768, 65536, 102400)]
    return cases


def cpu_cases() -> List[Case]:
    # Same vocabularies and tokens per sample as the GPU cases at a width (D = 128) and batch
    # (2 samples) that keep the whole CPU run to a few minutes on two cores.
    cases = [
        Case("image", 1152, 128, 16384, 576, True, group_size=2),
        Case("text", 512, 128, 102400, 256, False, group_size=2),
    ]
    cases += [Case(f"N={n}", n, 128, 16384, 576, True, group_size=1, sweep="N") for n in (576, 1152, 2304, 4608)]
    cases += [Case(f"V={v}", 512, 128, v, 256, False, group_size=2, sweep="V") for v in (4096, 16384, 65536)]
    return cases


def tiny_cases() -> List[Case]:
    """For the smoke test: every code path at toy sizes."""
    return [
        Case("image", 32, 16, 300, 8, True, group_size=2),
        Case("text", 32, 16, 500, 8, False, group_size=2),
        Case("N=16", 16, 16, 300, 8, True, group_size=2, sweep="N"),
        Case("V=200", 32, 16, 200, 8, False, group_size=2, sweep="V"),
    ]


def sweep_ops() -> Tuple[str, ...]:
    return ("head", "grpo")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def make_inputs(op: str, case: Case, dtype: torch.dtype, device: str) -> Dict[str, torch.Tensor]:
    """Deterministic inputs of ``op`` for ``case``; leaves that get gradients have requires_grad."""
    # Generated on the device: a 102400 x 4096 weight made on the CPU and copied takes seconds.
    g = torch.Generator(device=device).manual_seed(0)
    B, T, N, D, V = case.B, case.T, case.N, case.D, case.V
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    inp: Dict[str, torch.Tensor] = {}
    if op in GEMM_OPS:
        inp["hidden"] = randn(B, T, D).to(dtype).requires_grad_()
        inp["weight"] = (randn(V, D) * (3 / D**0.5)).to(dtype).requires_grad_()
        inp["bias"] = (randn(V) * 0.5).to(dtype).requires_grad_() if case.bias else None
        inp["targets"] = torch.randint(0, V, (B, T), generator=g, device=device)
        inp["g_logp"] = randn(B, T)
        inp["g_entropy"] = randn(B, T)
        inp["mask"] = torch.ones(B, T, dtype=torch.bool, device=device)
        inp["advantages"] = randn(B)
        inp["ref_logp"] = -math.log(V) + 0.3 * randn(B, T)
        if op == "stage":
            inp["codes"] = randn(B, T, CODE_DIM)
    elif op == "entropy_masks":
        inp["entropy"] = torch.rand(B, T, generator=g, device=device)  # H / ln V lies in [0, 1]
        inp["mask"] = torch.ones(B, T, dtype=torch.bool, device=device)
    elif op == "similarity":
        inp["codes"] = randn(B, T, CODE_DIM)
        inp["advantages"] = randn(B)
    else:
        raise ValueError(f"unknown op {op!r}")
    return inp


def grad_leaves(inp: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [t for t in inp.values() if isinstance(t, torch.Tensor) and t.requires_grad]


# ------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------

@dataclass
class Runner:
    """``forward(inp) -> (outputs, upstream_grads, check)``: ``torch.autograd.backward(outputs,
    upstream_grads)`` is the backward; ``check`` is compared with eager's (same shape: elementwise,
    a scalar: against eager's mean)."""

    forward: Callable
    differentiable: bool = True
    computes_entropy: Optional[bool] = None
    notes: List[str] = field(default_factory=list)


Impl = Union[Runner, str]


def _flat(inp):
    hidden = inp["hidden"]
    return hidden.reshape(-1, hidden.shape[-1]), inp["targets"].reshape(-1)


def _eager_similarity(codes, advantages, group_size):
    """What a trainer writes: all pairwise cosines of a group at once, [n_groups, G, G, T]."""
    B, T, C = codes.shape
    q = F.normalize(codes.float(), dim=-1).view(B // group_size, group_size, T, C)
    cos = torch.einsum("gitc,gjtc->gijt", q, q)
    s = torch.sign(advantages.float()).view(B // group_size, group_size)
    opposite = (s[:, :, None] * s[:, None, :] <= 0) & ~torch.eye(group_size, dtype=torch.bool, device=codes.device)
    opposite = opposite[..., None].to(cos.dtype)
    count = opposite.sum(2)
    sim = (cos * opposite).sum(2) / count.clamp(min=1)
    return torch.where(count > 0, sim, torch.zeros_like(sim)).reshape(B, T)


def _eager_entropy_masks(h, low_q=0.2, high_q=0.5):
    """The released EG-GRPO code: ``torch.sort`` of each row, thresholds ``sorted[int(q n)]``."""
    ordered = torch.sort(h, dim=-1).values
    n = h.shape[-1]
    low = h < ordered[:, int(low_q * n)][:, None]
    high = h > ordered[:, int(high_q * n)][:, None]
    return low, high


def _maybe_compile(fn, device, allow_compile):
    if device != "cuda":
        return "not run on CPU (compile time; measured on GPU only)"
    if not allow_compile:
        return "skipped in the sweep / with --no-compile (compile time)"
    return torch.compile(fn)


def build_impl(op: str, impl: str, case: Case, device: str, allow_compile: bool = True) -> Impl:
    """The implementation ``impl`` of ``op`` on ``device``, or why it cannot run."""
    on_cuda = device == "cuda"
    if impl == "ours_triton" and not on_cuda:
        return "needs CUDA (the Triton interpreter is far too slow to time)"
    if impl in ("ours_triton", "ours_torch"):
        backend = "triton" if impl == "ours_triton" else "torch"
        return _ours(op, case, backend)
    if impl in FROZEN_IMPLS:
        if op not in ("grpo", "eg_grpo"):
            return "n/a: frozen-head rows are measured for the GRPO losses"
        if impl == "ours_triton_frozen" and not on_cuda:
            return "needs CUDA (the Triton interpreter is far too slow to time)"
        if impl == "eager_frozen":
            return _eager(op, case, frozen=True)
        if impl == "liger_grpo_frozen":
            if op != "grpo":
                return "n/a: takes [B] sequence advantages; cannot apply entropy-shaped per-token advantages"
            return _liger_grpo(case, device, frozen=True)
        return _ours(op, case, "triton" if impl == "ours_triton_frozen" else "torch", frozen=True)
    if impl == "cce":
        if op != "head":
            return "n/a: cross-entropy only (no advantages, KL, entropy or masks)"
        if not on_cuda:
            return "needs CUDA (compiled Triton)"
        try:
            from cut_cross_entropy import linear_cross_entropy  # noqa: F401
        except Exception:
            return "not installed: pip install cut-cross-entropy (make gpu-wheels)"
        return _cce(case)
    if impl == "eager":
        return _eager(op, case)
    if impl == "compile":
        eager = _eager(op, case)
        compiled = _maybe_compile(eager.forward, device, allow_compile)
        if isinstance(compiled, str):
            return compiled
        return Runner(compiled, eager.differentiable, eager.computes_entropy)
    if impl == "torch_lce":
        if op != "head":
            return "n/a: cross-entropy only (no advantages, KL, entropy or masks)"
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"n/a: torch {torch.__version__} has no F.linear_cross_entropy"
        return _torch_lce(case, device)
    if impl == "liger_flce":
        if op != "head":
            return "n/a: cross-entropy only (no advantages, KL, entropy or masks)"
        if not on_cuda:
            return "needs CUDA (compiled Triton)"
        return _liger_flce(case)
    if impl == "liger_grpo":
        if op == "head":
            return "n/a: loss only (no per-token log-prob/entropy outputs to back-propagate)"
        if op == "eg_grpo":
            return "n/a: takes [B] sequence advantages; cannot apply entropy-shaped per-token advantages"
        if op == "stage":
            return "n/a: no per-token policy/KL weights or weighted normalisation"
        if op != "grpo":
            return "n/a: op not provided"
        return _liger_grpo(case, device)
    raise ValueError(f"unknown impl {impl!r}")


def _head_params(inp, frozen):
    """(weight, bias) as the loss sees them: detached for a frozen head, so no dW/db GEMM runs."""
    if not frozen:
        return inp["weight"], inp["bias"]
    return inp["weight"].detach(), None if inp["bias"] is None else inp["bias"].detach()


def _ours(op, case, backend, frozen=False):
    if op == "head":
        def forward(inp):
            x, y = _flat(inp)
            lp, h = linear_logprob_entropy(x, inp["weight"], y, inp["bias"], backend=backend)
            return (lp, h), (inp["g_logp"].reshape(-1), inp["g_entropy"].reshape(-1)), lp
        return Runner(forward, computes_entropy=True)
    cost = "4NDV: frozen head, no dW" if frozen else "6NDV"
    if op == "grpo":
        def forward(inp):
            weight, bias = _head_params(inp, frozen)
            out = grpo_loss(inp["hidden"], weight, inp["targets"], inp["mask"], inp["advantages"], bias,
                            ref_logp=inp["ref_logp"], beta=BETA, backend=backend)
            return (out.loss,), (None,), out.loss
        return Runner(forward, computes_entropy=True, notes=[f"gradients formed in the forward pass ({cost})"])
    if op == "eg_grpo":
        def forward(inp):
            V = inp["weight"].shape[0]
            weight, bias = _head_params(inp, frozen)

            def advantage_fn(_logp, entropy, seqs):  # per-row percentiles: whole sequences suffice
                return eg_grpo_token_advantages(inp["advantages"][seqs], entropy, inp["mask"][seqs], V,
                                                backend=backend, check_finite=False)[0]  # as the trainer

            out = grpo_loss(inp["hidden"], weight, inp["targets"], inp["mask"], None, bias,
                            ref_logp=inp["ref_logp"], beta=BETA, advantage_fn=advantage_fn,
                            advantage_fn_scope="sequence", backend=backend)
            return (out.loss,), (None,), out.loss
        return Runner(forward, computes_entropy=True,
                      notes=[f"chunks of whole sequences, g formed in the same pass ({cost})"])
    if op == "stage":
        def forward(inp):
            adv = inp["advantages"]
            sim = cross_sample_similarity(inp["codes"], adv, case.group_size, backend=backend)
            out = grpo_loss(inp["hidden"], inp["weight"], inp["targets"], inp["mask"], adv, inp["bias"],
                            ref_logp=inp["ref_logp"], beta=BETA, policy_weights=stage_policy_weights(sim),
                            kl_weights=stage_kl_weights(sim), normalization="weighted", backend=backend)
            return (out.loss,), (None,), out.loss
        return Runner(forward, computes_entropy=True)
    if op == "entropy_masks":
        def forward(inp):
            low, high = entropy_masks(inp["entropy"], inp["mask"], 0.2, 0.5, backend=backend)
            return (), (), torch.stack([low, high]).float()
        return Runner(forward, differentiable=False)
    if op == "similarity":
        def forward(inp):
            sim = cross_sample_similarity(inp["codes"], inp["advantages"], case.group_size, backend=backend)
            return (), (), sim
        return Runner(forward, differentiable=False)
    raise ValueError(op)


def eager_grpo_loss(hidden, weight, targets, mask, advantages, bias=None, ref_logp=None, beta=BETA):
    """The eager GRPO peer: ``grpo_loss_reference`` with the entropy (a logged metric) under ``no_grad``, as
    trainers write it. Tracking the entropy's graph keeps one more fp32 ``[N, V]`` tensor alive in the forward
    (and gives ``torch.compile`` a backward to prepare for it): as a peer that would flatter every ratio."""
    return grpo_loss_reference(hidden, weight, targets, mask, advantages, bias, ref_logp=ref_logp,
                               beta=beta if ref_logp is not None else 0.0, entropy_grad=False)[0]


def _eager(op, case, frozen=False):
    if op == "head":
        def forward(inp):
            x, y = _flat(inp)
            lp, h = linear_logprob_entropy_reference(x, inp["weight"], y, inp["bias"])
            return (lp, h), (inp["g_logp"].reshape(-1), inp["g_entropy"].reshape(-1)), lp
        return Runner(forward, computes_entropy=True)
    notes = ["frozen head: weight and bias detached, autograd runs no dW GEMM (4NDV)"] if frozen else []
    if op == "grpo":
        def forward(inp):
            weight, bias = _head_params(inp, frozen)
            loss = eager_grpo_loss(inp["hidden"], weight, inp["targets"], inp["mask"], inp["advantages"], bias,
                                   inp["ref_logp"])
            return (loss,), (None,), loss
        return Runner(forward, computes_entropy=True,
                      notes=notes + ["entropy (a logged metric) under no_grad, as TRL computes it"])
    if op == "eg_grpo":
        def forward(inp):
            weight, bias = _head_params(inp, frozen)
            loss = eg_grpo_loss_reference(inp["hidden"], weight, inp["targets"], inp["mask"], inp["advantages"],
                                          bias, ref_logp=inp["ref_logp"], beta=BETA)
            return (loss,), (None,), loss
        return Runner(forward, computes_entropy=True, notes=notes)
    if frozen:
        raise ValueError(f"no frozen eager {op!r}")
    if op == "stage":
        def forward(inp):
            sim = _eager_similarity(inp["codes"], inp["advantages"], case.group_size)
            loss = grpo_loss_reference(inp["hidden"], inp["weight"], inp["targets"], inp["mask"], inp["advantages"],
                                       inp["bias"], ref_logp=inp["ref_logp"], beta=BETA,
                                       policy_weights=stage_policy_weights(sim), kl_weights=stage_kl_weights(sim),
                                       normalization="weighted")[0]
            return (loss,), (None,), loss
        return Runner(forward, computes_entropy=True)
    if op == "entropy_masks":
        def forward(inp):
            low, high = _eager_entropy_masks(inp["entropy"])
            return (), (), torch.stack([low, high]).float()
        return Runner(forward, differentiable=False)
    if op == "similarity":
        def forward(inp):
            return (), (), _eager_similarity(inp["codes"], inp["advantages"], case.group_size)
        return Runner(forward, differentiable=False)
    raise ValueError(op)


def _torch_lce(case, device):
    notes = ["log-prob only: cannot compute entropy", "reduction='sum' (scalar upstream gradient)"]
    if device == "cuda":
        options = torch.nn.LinearCrossEntropyOptions()
    else:
        # Its "auto" chunking took ~10 s per forward at N=1152, V=16384 on this CPU (25x the
        # reference path); our chunk size makes it comparable.
        rows = default_chunk_rows(case.N, case.V, torch.device(device))
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows)
        notes.append(f"batch_chunk_size={rows} (ours) on CPU")

    def forward(inp):
        x, y = _flat(inp)
        # reduction="sum": with "none" the chunked path took ~20 s per call at N=1152, V=16384 on CPU
        # (torch 2.13); its fused backward is built for a scalar loss, as Liger's is.
        loss = F.linear_cross_entropy(x, inp["weight"], y, linear_bias=inp["bias"], reduction="sum", options=options)
        return (loss,), (None,), -loss.float() / x.shape[0]  # mean log-prob
    return Runner(forward, computes_entropy=False, notes=notes)


def _cce(case):
    import inspect

    from cut_cross_entropy import linear_cross_entropy

    if case.bias and "bias" not in inspect.signature(linear_cross_entropy).parameters:
        return "n/a: this cut-cross-entropy version has no bias argument"

    def forward(inp):
        x, y = _flat(inp)
        # bias only when there is one: cut-cross-entropy 25.1.1 (make gpu-wheels) has no bias parameter at all,
        # so bias=None would raise a TypeError in the bias-free text case
        kwargs = {} if inp["bias"] is None else {"bias": inp["bias"]}
        loss = linear_cross_entropy(x, inp["weight"], y, reduction="sum", **kwargs)
        return (loss,), (None,), -loss.float() / x.shape[0]  # mean log-prob
    return Runner(forward, computes_entropy=False,
                  notes=["log-prob only: cannot compute entropy", "reduction='sum'",
                         "filter_eps default (gradient blocks with every p < bf16 eps/32 skipped; recomputes the "
                         "logits in backward: 8NDV)"])


def _liger_flce(case):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def forward(inp):
        x, y = _flat(inp)
        loss = loss_fn(inp["weight"], x, y, inp["bias"])
        return (loss,), (None,), -loss.float() / x.shape[0]  # mean log-prob
    return Runner(forward, computes_entropy=False,
                  notes=["log-prob only: cannot compute entropy", "reduction='sum' (its fused backward needs a scalar)"])


def _liger_grpo(case, device, frozen=False):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # loss_type="bnpo" is sum(per-token loss * mask) / sum(mask): our "token_mean" normalisation.
    loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, compiled=device == "cuda", use_ref_model=True,
                                       epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo")

    def forward(inp):
        weight, bias = _head_params(inp, frozen)
        loss = loss_fn(inp["hidden"], weight, inp["targets"], inp["mask"].float(), inp["advantages"],
                       bias=bias, ref_per_token_logps=inp["ref_logp"])[0]
        return (loss,), (None,), loss
    notes = ["no entropy output", f"chunk_size={loss_fn.chunk_size} sequence(s) per chunk (its default)",
             "its selective log-prob recomputes the logits in backward and runs its dx/dW GEMMs in fp32 "
             "(IEEE unless TF32 is on: see the +tf32 row)"]
    if frozen:
        import inspect

        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

        if "weight_requires_grad" in inspect.getsource(LigerFusedLinearPPOBase.forward):
            notes.append("frozen head: weight and bias detached, so it computes no grad_weight (4NDV useful)")
        else:  # older Liger: grad_weight is always formed, so this row is not a like-for-like frozen peer
            notes.append("frozen head requested, but this Liger version computes grad_weight anyway (6NDV)")
    if device != "cuda":
        notes.append("compiled=False on CPU")
    return Runner(forward, computes_entropy=False, notes=notes)
