"""Triton kernels over large vocabularies that never materialise [N, V] logits."""

from .linear_logprob_entropy import linear_logprob_entropy

__all__ = ["linear_logprob_entropy"]
