"""Batched VQ decode of image tokens to pixels, in the model's dtype.

``decode_images`` is what the rollout hands to the rewards: ``[B, T]`` tokens -> ``[B, 3, H, W]`` float32
in [0, 1]. It runs the VQ decoder of ``JanusForConditionalGeneration`` (``model.model.vqmodel``) without
autograd, in chunks of ``batch_size`` rows (0 = all at once) with the activations in channels-last memory
format (``channels_last=True``), which made the CPU decode 1.35-1.48x faster at 8 rows per call
(docs/rollout.md, ``python -m bench.rollout --vq-only``).
"""

from typing import Optional

import torch
import torch.nn.functional as F


def codebook_entry(vq, image_tokens: torch.Tensor) -> torch.Tensor:
    """``vq.quantize.get_codebook_entry(image_tokens)`` ([B, T] -> [B, C, h, w], L2-normalised codebook vectors)
    through the embedding's module call only. transformers' version reads ``embedding.weight.shape`` outside the
    call; under DeepSpeed ZeRO-3 the embedding's post-forward hook releases (re-partitions) the weight after each
    call, even inside ``GatheredParameters``, so a second chunk saw a 0-wide weight ("shape [b, h, w, 0] is
    invalid"). The module call gathers it every time."""
    quantize = vq.quantize
    vectors = F.normalize(quantize.embedding(image_tokens), p=2, dim=-1)   # [B, T, C]
    return vectors.view(image_tokens.shape[0], *quantize.quant_state_dims, vectors.shape[-1]).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def decode_images(model, image_tokens: torch.Tensor, batch_size: Optional[int] = None,
                  channels_last: bool = True) -> torch.Tensor:
    """VQ-decode ``image_tokens [B, T]`` to ``[B, 3, H, W]`` float32 in [0, 1] (``(x + 1) / 2`` clamped).

    batch_size: rows per decoder call (0 = all; None = 4 on CPU, where it was the fastest chunk measured, 8
    elsewhere, the old loop's value); channels_last: run the decoder on NHWC activations.
    """
    vq = model.model.vqmodel
    rows = image_tokens.shape[0]
    if batch_size is None:
        batch_size = 4 if image_tokens.device.type == "cpu" else 8
    step = rows if batch_size == 0 else batch_size
    chunks = []
    for start in range(0, rows, max(step, 1)):
        codes = codebook_entry(vq, image_tokens[start:start + step])
        if channels_last:
            codes = codes.contiguous(memory_format=torch.channels_last)
        pixels = vq.decoder(vq.post_quant_conv(codes))
        chunks.append(((pixels.float() + 1) / 2).clamp_(0, 1))
    return torch.cat(chunks, 0).contiguous()
