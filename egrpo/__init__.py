"""egrpo: kernel-backed RL fine-tuning (GRPO, EG-GRPO, STAGE) for autoregressive text-to-image models."""

__version__ = "0.1.0"
