"""Triton kernels over large vocabularies that never materialise [N, V] logits."""

from .linear_logprob_entropy import linear_logprob_entropy
from .entropy_masks import entropy_masks
from .grpo_loss import GRPOLossOutput, grpo_loss
from .cross_sample_similarity import cross_sample_similarity
from ._head import free_cpu_workspace

__all__ = ["linear_logprob_entropy", "entropy_masks", "grpo_loss", "GRPOLossOutput", "cross_sample_similarity",
           "free_cpu_workspace"]
