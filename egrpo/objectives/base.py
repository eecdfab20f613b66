"""What every objective shares: the head batch, the settings machinery, the needs declaration, the base class.

An objective turns one micro-batch (rewards of ``B = n_groups * group_size`` samples plus the hidden
states of their image tokens and, optionally, of their text chain-of-thought tokens) into a scalar loss.
It declares what it needs from the trainer in :class:`Needs` (a reference model, codebook vectors,
reference entropies, the text part, sampling log-probs), so the trainer never asks which objective it
runs. Settings are one typed dataclass per objective (:class:`ObjectiveSettings` and its subclasses);
each field carries its meaning, default and source in its metadata, and every value is checked in one
place (:meth:`ObjectiveSettings.validate`). The formulas are in ``docs/algorithms.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from ..kernels.grpo_loss import IS_LEVELS, NORMALIZATIONS, WEIGHTED_EPS, GRPOLossOutput
from . import heads
from .advantages import (REWARD_AGGREGATIONS, REWARD_SCALES, ZERO_SPREAD_TOL, combine_rewards, group_advantages,
                         group_spread, normalize_then_sum)
from .metrics import to_host

HEAD_IMPLS = tuple(heads.HEAD_LOSSES)
LOGPROB_SOURCES = ("conditional", "guided")


@dataclass
class HeadBatch:
    """One head's tokens for a micro-batch of ``B = n_groups * group_size`` samples."""

    hidden: torch.Tensor                        # [B, T, D], requires grad (policy)
    weight: torch.Tensor                        # [V, D] head weight
    bias: Optional[torch.Tensor]                # [V] or None
    targets: torch.Tensor                       # int64 [B, T] sampled ids
    mask: torch.Tensor                          # [B, T] 1 = valid
    ref_logp: Optional[torch.Tensor] = None     # [B, T] reference log-probs (no grad)
    old_logp: Optional[torch.Tensor] = None     # [B, T] log-probs of the policy before this update; None = on-policy
    ref_entropy: Optional[torch.Tensor] = None  # [B, T] reference entropies (raw nats), for STAGE
    temperature: float = 1.0
    sampling_logp: Optional[torch.Tensor] = None  # [B, T] log-probs of the distribution that sampled (e.g. CFG)
    uncond_hidden: Optional[torch.Tensor] = None  # [B, T, D] unconditional-branch hidden states (guided log-probs)
    guidance_scale: float = 1.0                   # w of the guided logits u + w (c - u)

    def policy_hidden(self) -> torch.Tensor:
        """The hidden states the head's log-probs come from: ``hidden`` (conditional), or with ``uncond_hidden``
        set the guided mix ``(1 - w) h_u + w h_c``, whose logits through the affine head are ``u + w (c - u)``."""
        if self.uncond_hidden is None:
            return self.hidden
        if self.uncond_hidden.shape != self.hidden.shape:
            raise ValueError(f"uncond_hidden must have the shape of hidden {tuple(self.hidden.shape)}, got "
                             f"{tuple(self.uncond_hidden.shape)}")
        return self.uncond_hidden + self.guidance_scale * (self.hidden - self.uncond_hidden)

    def logp_entropy(self, backend: str = "auto", chunk_size: Optional[int] = None,
                     head: str = "fused") -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logp, entropy)`` ``[B, T]`` of the sampled tokens (float32; float64 for float64 hidden), without
        gradient (reference pass, sampling-policy pass, STAGE's policy entropies). ``head``: ``"fused"``
        kernels or ``"eager"`` full logits."""
        with torch.no_grad():
            logp, entropy = heads.HEAD_LOGP_ENTROPY[head](
                self.policy_hidden().detach(), self.weight.detach(), self.targets,
                None if self.bias is None else self.bias.detach(), self.temperature,
                backend=backend, chunk_size=chunk_size)
        return logp, entropy


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                               # scalar, differentiable
    metrics: Dict[str, float] = field(default_factory=dict)
    advantages: Optional[torch.Tensor] = None        # [B] sequence advantages (detached)


@dataclass(frozen=True)
class Needs:
    """What an objective needs the trainer to provide, declared by the objective from its settings."""

    reference_logp: bool = False      # a frozen reference model's log-probs (the KL term)
    reference_entropy: bool = False   # the reference model's entropies (STAGE's entropy reward)
    codebook_vectors: bool = False    # codes [B, T_img, C] of the sampled image tokens (STAGE's similarity)
    text: bool = True                 # trains on the text chain-of-thought tokens when the rollout has them
    sampling_logp: bool = False       # log-probs of the sampling distribution (importance-sampling correction)
    unconditional_hidden: bool = False  # the image part's unconditional-branch hidden states (guided log-probs)

    @property
    def reference_model(self) -> bool:
        return self.reference_logp or self.reference_entropy


# ------------------------------------------------------------------------------------------- settings
# A field's metadata: ``help`` (meaning), ``source`` ("released code", "paper", "ours"), ``check`` (one of
# CHECKS) and ``choices``. ``setting()`` builds such a field; ``ObjectiveSettings.validate`` applies them.

RELEASED, PAPER, OURS = "released code", "paper", "ours"
TRL, VERL = "TRL", "verl"                      # the option (and its default) follows that library's trainer
SOURCES = (RELEASED, PAPER, TRL, VERL, OURS)


def setting(default: Any, help: str, source: str, check: Optional[str] = None, choices: Tuple = ()) -> Any:
    return field(default=default, metadata={"help": help, "source": source, "check": check, "choices": choices})


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))


CHECKS = {
    "nonneg": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "positive": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "unit_open": (lambda v: _number(v) and 0 < v < 1, "a number strictly inside (0, 1)"),
    "unit_half_open": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "positive_or_none": (lambda v: v is None or (_number(v) and v > 0), "a positive number or null"),
    "above_one_or_none": (lambda v: v is None or (_number(v) and v > 1), "a number > 1 or null"),
    "positive_int_or_none": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                             "a positive integer or null"),
}


@dataclass
class ObjectiveSettings:
    """Settings every objective has (the GRPO core). Subclasses add theirs; all are validated by
    :meth:`validate` from the field metadata, plus :meth:`check_combination` for rules across fields."""

    beta: float = setting(0.01, "KL coefficient of the k3 estimator against the reference model; 0 = no KL and "
                          "no reference model", RELEASED, "nonneg")
    eps_low: float = setting(0.2, "clip range lower side: ratios below 1 - eps_low stop pushing negative "
                             "advantages (active only when the ratio is not 1, i.e. several updates per rollout)",
                             RELEASED, "nonneg")
    eps_high: float = setting(0.2, "clip range upper side (clip-higher when > eps_low)", RELEASED, "nonneg")
    normalization: str = setting("token_mean", "loss denominator: token_mean (one mean over all tokens of the "
                                 "micro-batch), sequence_mean (per sample, then over samples), constant (Dr. GRPO), "
                                 "weighted (sum of policy weights, STAGE)", RELEASED, choices=NORMALIZATIONS)
    constant_normalizer: Optional[float] = setting(None, "denominator for normalization=constant; null = B x tokens "
                                                   "per sample (text + image)", OURS, "positive_or_none")
    scale_rewards: str = setting("group", "advantage scale: group (r - mean_g) / (std_g + adv_eps), batch (std of "
                                 "the micro-batch), none (Dr. GRPO: r - mean_g)", RELEASED, choices=REWARD_SCALES)
    adv_eps: float = setting(1e-4, "added to the std in the advantage denominator", RELEASED, "nonneg")
    backend: str = setting("auto", "kernel backend: auto (Triton on CUDA, torch otherwise), triton, torch", OURS,
                           choices=("auto", "triton", "torch"))
    chunk_size: Optional[int] = setting(None, "rows per chunk of the fused head kernels; null = from the device's "
                                        "memory", OURS, "positive_int_or_none")
    reward_aggregation: str = setting("sum", "how [B, R] rewards become one advantage: sum (weighted sum, then group "
                                      "normalisation), normalize_then_sum (GDPO: each function group-normalised, "
                                      "weighted sum, then normalised over the micro-batch)", RELEASED,
                                      choices=REWARD_AGGREGATIONS)
    drop_zero_spread_groups: bool = setting(False, "DAPO-style: groups whose combined reward has zero spread (std <= "
                                            "1e-6) leave the loss entirely (no policy, no KL, not in the "
                                            "denominators)", RELEASED, "bool")
    top_entropy_quantile: float = setting(1.0, "rho: only the rho fraction of valid tokens with the highest entropy "
                                          "(per part, per micro-batch) get a policy update; KL stays on every token; "
                                          "1 = all tokens", RELEASED, "unit_half_open")
    tis_clip_max: Optional[float] = setting(None, "truncated importance-sampling correction: the policy term of each "
                                            "token is multiplied by min(exp(old_logp - sampling_logp), tis_clip_max); "
                                            "null = off", RELEASED, "positive_or_none")
    importance_sampling_level: str = setting("token", "token: one ratio exp(logp - old_logp) per token (GRPO); "
                                             "sequence: GSPO, one ratio per sample exp(mean over its valid tokens "
                                             "of logp - old_logp), clipped as a whole, its gradient shared by "
                                             "all of the sample's tokens", TRL, choices=IS_LEVELS)
    clip_ratio_c: Optional[float] = setting(None, "dual clip: for negative advantages the per-token loss is "
                                            "capped at clip_ratio_c |A| (verl uses 3.0 when enabled); null = off",
                                            VERL, "above_one_or_none")
    entropy_coef: float = setting(0.0, "entropy bonus: loss -= entropy_coef x mean entropy (with the token "
                                  "denominator of the KL term); the entropy carries gradient; 0 = off", VERL,
                                  "nonneg")
    logprob_source: str = setting("conditional", "which image log-probs and entropies the loss uses: conditional "
                                  "(the conditional branch, as every released Janus trainer) or guided (the CFG "
                                  "distribution u + w (c - u) the images were sampled from, w = rollout.cfg_scale; "
                                  "costs one more LM forward/backward over the unconditional rows)", RELEASED,
                                  choices=LOGPROB_SOURCES)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """``ValueError`` naming the first setting whose value is out of range (one line)."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {list(meta['choices'])}, got {value!r}")
            check = meta.get("check")
            if check is not None:
                ok, what = CHECKS[check]
                if not ok(value):
                    raise ValueError(f"{f.name} must be {what}, got {value!r}")
        self.check_combination()

    def check_combination(self) -> None:
        """Rules that involve several settings; subclasses extend it."""

    def to_dict(self) -> Dict[str, Any]:
        """The effective settings, defaults included."""
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> List[Dict[str, Any]]:
        """``[{name, type, default, source, help}]`` for documentation and ``--help`` style listings."""
        return [dict(name=f.name, type=str(f.type), default=f.default, source=f.metadata.get("source"),
                     help=f.metadata.get("help")) for f in dataclasses.fields(cls)]


def settings_names(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ------------------------------------------------------------------------------------------- objective


class Objective:
    """Base class of the objectives: ``Objective(settings)`` or ``Objective(**overrides)`` (on the class
    defaults), then ``objective(rewards, group_size, image, text=None, reward_weights=..., codes=...)``.

    Setting values read as attributes (``objective.beta``); ``objective.settings`` is the dataclass.
    """

    name: ClassVar[str] = "base"
    Settings: ClassVar[type] = ObjectiveSettings

    def __init__(self, settings: Optional[ObjectiveSettings] = None, **overrides):
        if settings is None:
            unknown = sorted(set(overrides) - set(settings_names(self.Settings)))
            if unknown:
                raise ValueError(f"unknown hyper-parameter(s) {unknown} for objective {self.name!r}; valid: "
                                 f"{', '.join(settings_names(self.Settings))}")
            settings = self.Settings(**overrides)
        elif overrides:
            settings = dataclasses.replace(settings, **overrides)
        if not isinstance(settings, self.Settings):
            raise TypeError(f"objective {self.name!r} takes {self.Settings.__name__}, got {type(settings).__name__}")
        self.settings = settings

    def __getattr__(self, key):
        # Only called for attributes not found normally: the settings' fields read as attributes.
        settings = self.__dict__.get("settings")
        if settings is not None and key in settings.__dataclass_fields__:
            return getattr(settings, key)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {key!r}")

    @property
    def hparams(self) -> Dict[str, Any]:
        return self.settings.to_dict()

    @property
    def needs(self) -> Needs:
        s = self.settings
        return Needs(reference_logp=s.beta > 0, sampling_logp=s.tis_clip_max is not None,
                     unconditional_hidden=s.logprob_source == "guided")

    def __repr__(self):
        return f"{type(self).__name__}({self.settings!r})"

    # ---- pieces shared by the objectives ---------------------------------------------------------

    def parts(self, image: HeadBatch, text: Optional[HeadBatch] = None) -> List[Tuple[str, HeadBatch]]:
        """``[("text", text), ("image", image)]`` (text first when given), after consistency checks."""
        out = []
        for name, batch in (("text", text), ("image", image)):
            if batch is None:
                if name == "image":
                    raise ValueError("image must be a HeadBatch")
                continue
            if not isinstance(batch, HeadBatch):
                raise TypeError(f"{name} must be a HeadBatch, got {type(batch).__name__}")
            if not isinstance(batch.hidden, torch.Tensor) or batch.hidden.dim() != 3:
                raise ValueError(f"{name}.hidden must have shape [B, T, D]")
            guided = self.settings.logprob_source == "guided"
            if name == "image" and guided and batch.uncond_hidden is None:
                raise ValueError("logprob_source=guided needs image.uncond_hidden (the unconditional branch's hidden "
                                 "states; the trainer provides them when objective.needs.unconditional_hidden)")
            if name == "image" and not guided and batch.uncond_hidden is not None:
                raise ValueError("image.uncond_hidden is set but logprob_source is conditional; drop it or set "
                                 "logprob_source=guided")
            out.append((name, batch))
        if len({b.hidden.shape[0] for _, b in out}) > 1:
            raise ValueError("text and image batches must hold the same B samples: "
                             f"{[(n, b.hidden.shape[0]) for n, b in out]}")
        return out

    def sequence_advantages(self, rewards, group_size, reward_weights=None, B=None):
        """``(combined rewards [B], sequence advantages [B])`` (docs/algorithms.md, "Rewards to advantages")."""
        s = self.settings
        r = combine_rewards(rewards, reward_weights)
        if B is not None and r.shape[0] != B:
            raise ValueError(f"rewards has {r.shape[0]} samples but the head batches have B = {B}")
        if s.reward_aggregation == "normalize_then_sum" and rewards.dim() == 2:
            return r, normalize_then_sum(rewards, group_size, reward_weights, eps=s.adv_eps, scale=s.scale_rewards)
        return r, group_advantages(r, group_size, eps=s.adv_eps, scale=s.scale_rewards)

    def drop_flat_groups(self, parts, rewards: torch.Tensor, group_size: int, metrics: Dict[str, torch.Tensor]):
        """With ``drop_zero_spread_groups``: the parts with the rows of zero-spread groups masked out (they then
        count nowhere: policy term, KL term, denominators, metrics). Without it: the parts unchanged."""
        if not self.settings.drop_zero_spread_groups:
            return parts
        flat = group_spread(rewards.detach().double(), group_size) <= ZERO_SPREAD_TOL
        metrics["groups/dropped_frac"] = flat.float().mean()
        keep = (~flat).repeat_interleave(group_size)[:, None]
        return [(name, dataclasses.replace(b, mask=b.mask * keep.to(device=b.mask.device, dtype=b.mask.dtype)))
                for name, b in parts]

    def token_options(self, name: str, batch: HeadBatch, seen: Dict[str, torch.Tensor]):
        """``post(a_tok, logp, entropy) -> a_tok`` applying top-rho entropy masking and the truncated IS correction
        to a head's token advantages, or None when both are off. Both multiply the advantage by a factor >= 0,
        which scales the clipped surrogate by the same factor and keeps every clip decision."""
        s = self.settings
        if s.top_entropy_quantile >= 1.0 and s.tis_clip_max is None:
            return None
        valid = batch.mask.bool()
        if s.tis_clip_max is not None and batch.sampling_logp is None:
            raise ValueError(f"{name}.sampling_logp ([B, T] log-probs of the sampling distribution) is required by "
                             "tis_clip_max")

        tis_sums = [0.0, 0.0]   # running sum of the weights and count of valid tokens, over the calls of post

        def post(a_tok, logp, entropy, rows: slice = slice(None)):
            valid_rows = valid[rows].to(logp.device)
            a = a_tok if a_tok.dim() == 2 else a_tok[:, None].expand_as(logp)
            a = a.to(torch.promote_types(a.dtype, logp.dtype))   # float64 advantages stay float64
            if s.top_entropy_quantile < 1.0:   # called on the whole micro-batch (see run_head)
                values = entropy[valid_rows].float()
                thr = torch.quantile(values, 1.0 - s.top_entropy_quantile) if values.numel() else values.new_zeros(())
                keep = (entropy >= thr) & valid_rows
                seen[f"mask/top_entropy_frac_{name}"] = keep.float().sum() / valid_rows.float().sum().clamp(min=1.0)
                a = a * keep
            if s.tis_clip_max is not None:   # token-local: may be called per chunk of whole sequences
                base = logp.to(a.dtype) if batch.old_logp is None else batch.old_logp[rows].to(a.dtype)
                delta = torch.where(valid_rows, base - batch.sampling_logp[rows].to(a.dtype), torch.zeros_like(base))
                weight = torch.exp(delta).clamp(max=s.tis_clip_max)
                tis_sums[0] = tis_sums[0] + (weight * valid_rows).sum()
                tis_sums[1] = tis_sums[1] + valid_rows.float().sum()
                seen[f"tis/weight_mean_{name}"] = tis_sums[0] / torch.as_tensor(tis_sums[1]).clamp(min=1.0)
                a = a * weight
            return a

        return post

    def shared_denominators(self, parts, policy_weights: Optional[Dict[str, torch.Tensor]] = None):
        """``(normalizer, kl_normalizer)`` over the tokens of all parts together, so that the per-head losses
        add up to the loss over the concatenated tokens (docs/algorithms.md, "One normalisation")."""
        s = self.settings
        masks = [b.mask.to(torch.float32) for _, b in parts]
        B = masks[0].shape[0]
        if s.normalization == "token_mean":
            den = sum(m.sum() for m in masks).clamp(min=1.0)
            return den, den
        if s.normalization == "sequence_mean":
            den = sum(m.sum(1) for m in masks).clamp(min=1.0)
            return den, den
        if s.normalization == "constant":
            den = s.constant_normalizer or B * sum(m.shape[1] for m in masks)
            return float(den), float(den)
        weights = policy_weights or {}
        pol = sum((m * weights[n].to(m.dtype)).sum() if n in weights else m.sum()
                  for m, (n, _) in zip(masks, parts))
        return pol + WEIGHTED_EPS, sum(m.sum() for m in masks).clamp(min=1.0)

    def run_head(self, batch: HeadBatch, normalizer, kl_normalizer, *, head: str = "fused", part: str = "image",
                 seen: Optional[Dict[str, torch.Tensor]] = None, **kw) -> GRPOLossOutput:
        """One head's share of the loss through the fused kernel (``head="fused"``) or full logits (``"eager"``)."""
        if head not in heads.HEAD_LOSSES:
            raise ValueError(f"head must be one of {HEAD_IMPLS}, got {head!r}")
        s = self.settings
        post = self.token_options(part, batch, {} if seen is None else seen)
        if post is not None:   # the options need the current log-probs / entropies: through advantage_fn
            inner = kw.pop("advantage_fn", None)
            fixed = kw.pop("advantages", None)
            scope = kw.get("advantage_fn_scope", "batch")

            def with_options(logp, entropy, seqs=None):
                rows = slice(None) if seqs is None else seqs
                if inner is None:
                    a = fixed.to(logp.device)[rows]
                else:
                    a = inner(logp, entropy) if seqs is None else inner(logp, entropy, seqs)
                return post(a, logp, entropy, rows)

            kw["advantage_fn"] = with_options
            # top-rho's quantile spans the micro-batch: batch scope; the IS correction alone is token-local
            kw["advantage_fn_scope"] = "batch" if s.top_entropy_quantile < 1.0 else (
                "sequence" if inner is None else scope)
        return heads.HEAD_LOSSES[head](
            batch.policy_hidden(), batch.weight, batch.targets, batch.mask, kw.pop("advantages", None), batch.bias,
            old_logp=batch.old_logp, ref_logp=batch.ref_logp, beta=s.beta if batch.ref_logp is not None else 0.0,
            normalization=s.normalization, normalizer=normalizer, kl_normalizer=kl_normalizer,
            eps_low=s.eps_low, eps_high=s.eps_high, temperature=batch.temperature,
            importance_sampling_level=s.importance_sampling_level, clip_ratio_c=s.clip_ratio_c,
            entropy_coef=s.entropy_coef, backend=s.backend, chunk_size=s.chunk_size, **kw,
        )

    def logp_entropy(self, batch: HeadBatch, head: str = "fused") -> Tuple[torch.Tensor, torch.Tensor]:
        """No-grad ``(logp, entropy)`` of ``batch`` with this objective's backend and chunk size."""
        return batch.logp_entropy(self.settings.backend, self.settings.chunk_size, head=head)

    @staticmethod
    def finish(loss, metrics: Dict[str, torch.Tensor], advantages) -> ObjectiveOutput:
        return ObjectiveOutput(loss=loss, metrics=to_host(metrics), advantages=advantages.detach())

    def __call__(self, rewards, group_size, image: HeadBatch, text: Optional[HeadBatch] = None, *,
                 reward_weights=None, codes=None, codebook=None, head: str = "fused") -> ObjectiveOutput:
        raise NotImplementedError
