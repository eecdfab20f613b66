"""The rollout engine: static KV cache, one decode step per token, fused sampling, batched VQ decode.

Protocol-agnostic: a phase starts from a `Prefill` (padded input embeddings, attention mask, position
ids, built by the caller or by :func:`text_prefill` / :func:`cfg_prefill`) and the engine only decodes.

Per phase (text CoT or image tokens) the engine

1. allocates one K/V buffer per layer for every row, sized prompt + new tokens, and the rotary
   cos/sin of every position it will visit (positions continue from each row's last prompt position);
2. runs the prompt through the language model in ONE batched forward, writing K/V into the buffer;
3. runs the decode step ``embed -> LM over one position -> head -> sample -> next embedding`` once per
   token. The step reads and writes only preallocated buffers, reads the step index from a device
   tensor and never synchronises with the host; the text phase checks for "all rows finished" every
   ``eos_check_every`` steps.

Decode step variants (`EngineConfig`):

* eager (default on CPU): attends over the filled prefix only (a view; the length is known on the host); in
  bf16 on CPU over the whole buffer with a mask once that is at most 3x the prefix (bf16 CPU matmuls copy
  prefix views).
* ``compile=True``: ``torch.compile`` of the step; attends over the buffer with a mask, so the shapes never
  change and one compilation serves the whole phase (one per key span, ``key_buckets``).
* ``cuda_graph=True`` (CUDA only): the (compiled or eager) full-buffer step captured once per phase
  shape (and key span) as a ``torch.cuda.CUDAGraph`` and replayed; each replay reads the next row of the
  phase's table of uniforms through a device index (see :mod:`egrpo.rollout.sampling`), so replays differ
  without host work.

The language model is driven through its own submodules (``input_layernorm``, ``self_attn.q_proj`` ...,
``mlp``), so kernel patches of those modules (Liger) still apply. The prefill attends with
``torch.nn.functional.scaled_dot_product_attention``; a decode step with :mod:`egrpo.rollout.attention`'s Triton
kernel on CUDA (``EngineConfig.attention``), two matmuls and a masked softmax on CPU. This matches HF's Llama
(``sdpa`` or ``eager``) to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from egrpo.kernels._common import HAS_TRITON, resolve_backend

from .attention import decode_attention, decode_attention_op
from .linear import can_pack, make_linear
from .sampling import SamplingParams, phase_uniforms, sample
from .vq import decode_images

LAYOUTS = ("left", "right")
# Eager step, CPU, bf16: attend over the whole K/V buffer with a mask while the buffer is at most this many times
# the filled prefix (see RolloutEngine._decode_hidden); 0 = always the prefix.
_CPU_BF16_FULL_BUFFER_RATIO = 3.0
# torch.compile modes that capture CUDA graphs of their own (rejected together with the engine's CUDA graphs).
_CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def _captures_graphs(device: torch.device) -> bool:
    """Whether ``cuda_graph=True`` applies to a phase on ``device``: CUDA graphs exist on CUDA only. (A function of its
    own so that the CPU tests can run the capture path with a stand-in for torch.cuda's graph API.)"""
    return device.type == "cuda"


@dataclass
class EngineConfig:
    """Settings of the engine (all defaults: our choice)."""

    compile: bool = False            # torch.compile the decode step (mode below); off: eager step
    compile_mode: Optional[str] = None  # torch.compile mode; None = torch's default mode
    compile_backend: str = "inductor"   # torch.compile backend ("eager" exercises the compiled-shape path fast)
    cuda_graph: bool = True          # CUDA only: capture the decode step as a CUDA graph
    # Compiled / graph step: attend over the keys up to the end of one of this many equal spans of the buffer
    # instead of the whole buffer (one compilation / graph per span; 1 = whole buffer, one compilation). None =
    # 4 for CUDA graphs with torch's attention (faster than the whole buffer in all four H200 configurations,
    # 1.04-1.24x: docs/rollout.md), else 1: the Triton attention never reads past the filled prefix (one graph was
    # 1.02-1.05x faster than 4 spans on an H200), no gain was measured on CPU, and under compile each span is one
    # more compilation against torch's recompile limit.
    key_buckets: Optional[int] = None
    # Compiled step: prompts are left-padded with masked slots to a multiple of this length, so prompts of
    # different lengths reuse one compilation (the masked slots change nothing); 0 = off.
    prompt_bucket: int = 64
    sampler: str = "auto"            # "auto" (Triton on CUDA, torch on CPU) | "triton" | "torch"
    # Decode-step attention (one query per row): "triton" = egrpo.rollout.attention's kernel (reads each valid
    # K/V slot once; in a compiled step an opaque operator, torch.ops.egrpo.decode_attention); "torch" = SDPA on
    # CUDA, two matmuls and a masked softmax on CPU. "auto" = Triton on CUDA, torch on CPU.
    attention: str = "auto"
    eos_check_every: int = 16        # text phase: host check for "all rows finished" every k steps
    # VQ decode chunk (rows; 0 = all at once). None = the decoder's default (egrpo.rollout.vq.decode_images): 4 on
    # CPU (the fastest chunk measured there: one call's activations stay in cache), 8 elsewhere (the old loop's).
    vq_batch_size: Optional[int] = None
    vq_channels_last: bool = True    # VQ decode in channels-last memory format (faster on CPU, see docs)
    # One GEMM for q/k/v and one for gate/up per layer, from weights concatenated once per phase (a copy of those
    # weights for the phase). None = on CPU (fewer, wider GEMMs and fewer ops: docs/rollout.md), off on CUDA
    # (the CUDA graph already removes the per-op cost and a 7B copy would cost GBs).
    fuse_projections: Optional[bool] = None
    # The decode step's GEMM weights reordered once per phase into oneDNN's blocked layout (a copy of every
    # projection and head weight for the phase), still fp32 / bf16 math. None = on where this torch has oneDNN
    # linears for the model's dtype on CPU: the skinny decode GEMMs ran ~2x faster packed (docs/rollout.md).
    pack_weights: Optional[bool] = None

    def __post_init__(self):
        for name in ("sampler", "attention"):
            if getattr(self, name) not in ("auto", "triton", "torch"):
                raise ValueError(f"engine.{name} must be auto, triton or torch, got {getattr(self, name)!r}")
        for name, minimum, note in (("eos_check_every", 1, ""), ("key_buckets", 1, " or null (auto)"),
                                    ("prompt_bucket", 0, " (0 = off)"),
                                    ("vq_batch_size", 0, " (0 = all rows) or null (auto)")):
            value = getattr(self, name)
            if value is None and name in ("vq_batch_size", "key_buckets"):  # null = the default of the device
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"engine.{name} must be an integer >= {minimum}{note}, got {value!r}")
        for name in ("fuse_projections", "pack_weights"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"engine.{name} must be true, false or null (auto), got {getattr(self, name)!r}")
        if self.compile and self.cuda_graph and self.compile_mode in _CUDAGRAPH_COMPILE_MODES:
            # Those modes capture torch's own CUDA graphs inside the step, which the engine then captures in its graph.
            raise ValueError(f"engine.compile_mode={self.compile_mode!r} makes torch capture its own CUDA graphs, "
                             "nested in the engine's (engine.cuda_graph=true): use compile_mode null or "
                             "'max-autotune-no-cudagraphs', or set engine.cuda_graph=false")


@dataclass
class Prefill:
    """A padded prompt batch: ``inputs_embeds [R, L, D]``, ``attention_mask [R, L]`` (1 = real token),
    ``position_ids [R, L]`` (the rotary position of each slot). Decoding continues at
    ``position_ids[:, -1] + 1`` for every row, so the last slot must be each row's last real token."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def __post_init__(self):
        rows, length = self.attention_mask.shape
        if self.inputs_embeds.shape[:2] != (rows, length) or self.position_ids.shape != (rows, length):
            raise ValueError(
                f"Prefill: inputs_embeds {tuple(self.inputs_embeds.shape)}, attention_mask {(rows, length)} and "
                f"position_ids {tuple(self.position_ids.shape)} must agree on [rows, length]"
            )
        if length == 0:
            raise ValueError("Prefill: the prompt is empty (length 0)")


@dataclass
class TextOutput:
    ids: torch.Tensor    # [R, Lc] int64, pad after each row's EOS
    mask: torch.Tensor   # [R, Lc] float32, 1 up to and including the first EOS
    logp: torch.Tensor   # [R, Lc] float32, each token's log-prob under the sampling distribution (0 where mask 0)


@dataclass
class ImageOutput:
    tokens: torch.Tensor  # [B, T] int64
    kl: torch.Tensor      # [B, T] float32, KL(sampling dist || conditional dist) per step
    logp: torch.Tensor    # [B, T] float32, each token's log-prob under the sampling (guided) distribution


def pad_prompt(prefill: Prefill, multiple: int) -> Prefill:
    """``prefill`` left-padded with masked slots (zero embedding, position 0) to a multiple of ``multiple``
    slots. No real token attends to a masked slot and positions of real tokens are kept, so decoding from it
    gives the same tokens; the compiled step then sees one prompt length per bucket."""
    rows, length = prefill.attention_mask.shape
    extra = -(-length // multiple) * multiple - length if multiple else 0
    if extra == 0:
        return prefill
    embeds = prefill.inputs_embeds
    return Prefill(torch.cat([embeds.new_zeros(rows, extra, embeds.shape[-1]), embeds], 1),
                   torch.cat([prefill.attention_mask.new_zeros(rows, extra), prefill.attention_mask], 1),
                   torch.cat([prefill.position_ids.new_zeros(rows, extra), prefill.position_ids], 1))


def _positions(attention_mask: torch.Tensor, layout: str) -> torch.Tensor:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "left":  # each row starts at position 0 after its left padding (HF generate)
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    # right: positions are absolute slot indices, pads included (released Janus image prompts)
    length = attention_mask.shape[1]
    return torch.arange(length, device=attention_mask.device).expand(attention_mask.shape[0], length)


def text_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: str = "left") -> Prefill:
    """Prefill of token ids for the text phase; ``layout`` "left" (position = count of real tokens before)
    or "right" (position = slot index)."""
    embeds = model.get_input_embeddings()(input_ids)
    return Prefill(embeds, attention_mask, _positions(attention_mask, layout))


def cfg_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, layout: str = "left",
                keep_ids=()) -> Prefill:
    """Conditional rows then their unconditional twins (``2B`` rows) for the image phase.

    * ``layout="left"`` (today's loop, HF ``generate``): left-padded; the unconditional row replaces every id
      not in ``keep_ids`` (pass BOS and the image-start id) by ``pad_id`` and keeps the conditional mask;
      positions count real tokens.
    * ``layout="right"`` (the released Janus trainers): ``[BOS text pads BOI]``; the unconditional row is the
      pad embedding at slots 1..L-2 with an all-ones mask; positions are slot indices.
    """
    if layout == "left":
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in keep_ids:
            if token is not None:
                keep |= input_ids == token
        uncond_ids = torch.where(keep, input_ids, torch.full_like(input_ids, pad_id))
        uncond_mask = attention_mask
    elif layout == "right":
        uncond_ids = input_ids.clone()
        uncond_ids[:, 1:-1] = pad_id
        uncond_mask = torch.ones_like(attention_mask)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ids = torch.cat([input_ids, uncond_ids], 0)
    mask = torch.cat([attention_mask, uncond_mask], 0)
    positions = torch.cat([_positions(attention_mask, layout), _positions(uncond_mask, layout)], 0)
    return Prefill(model.get_input_embeddings()(ids), mask, positions)


class _PhaseState:
    """Everything one phase's decode steps read or write, allocated once."""

    def __init__(self, lm, prefill: Prefill, new_tokens: int, seed: int, sampled_rows: int):
        config = lm.config
        rows, length = prefill.attention_mask.shape
        device, dtype = prefill.inputs_embeds.device, prefill.inputs_embeds.dtype
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        total = length + max(new_tokens, 1)
        self.rows, self.prompt_len, self.total = rows, length, total
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.keys = [torch.zeros(rows, kv_heads, total, head_dim, device=device, dtype=dtype) for _ in lm.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        # Key validity of every slot: prompt mask, then the generated slots (filled in order).
        self.key_valid = torch.ones(rows, total, dtype=torch.bool, device=device)
        self.key_valid[:, :length] = prefill.attention_mask.bool()
        positions = torch.cat([
            prefill.position_ids.long(),
            prefill.position_ids[:, -1:].long() + 1 + torch.arange(total - length, device=device),
        ], 1)
        cos, sin = lm.rotary_emb(prefill.inputs_embeds, positions)
        self.cos, self.sin = cos[:, None], sin[:, None]  # [R, 1, total, d]
        self.slot = torch.arange(total, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # slot index of the next decode input
        # Every uniform of the phase, one row per draw: row 0 for the prefill's token, row step + 1 for the token
        # a decode step writes at column step + 1 (read through the device index, graph-safe, no host sync).
        self.uniforms = phase_uniforms(seed, total - length + 1, sampled_rows, device)
        self.fused: Optional[List[_LayerWeights]] = None  # set by the engine: concatenated and/or packed weights
        self.head_weights: Optional[_HeadWeights] = None  # set by the engine when it packs weights


def _plain_linear(module) -> bool:
    """An ``nn.Linear`` exactly, with no hooks: its forward is ``F.linear(x, weight, bias)`` and nothing else, so the
    engine may concatenate or pack its weight. Anything else (a hooked or patched layer, a LoRA wrapper) is called."""
    return type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _stock_mlp(mlp) -> bool:
    """The stock Llama MLP, ``down(silu(gate(x)) * up(x))`` (transformers' ``SiLUActivation`` or torch's ``SiLU``)."""
    silu = isinstance(mlp.act_fn, torch.nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"
    return type(mlp).__name__ == "LlamaMLP" and silu and not mlp._forward_hooks and not mlp._forward_pre_hooks \
        and all(_plain_linear(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)) \
        and mlp.gate_proj.bias is None and mlp.up_proj.bias is None


class _LayerWeights:
    """One layer's projections for a phase, as callables ``x -> x W^T + b`` (:mod:`.linear`).

    ``concat``: q/k/v as one GEMM and gate/up as another, from weights concatenated for the phase. ``pack``:
    every weight oneDNN-packed (CPU). The MLP is taken apart only when it is the stock SiLU-gated one; any
    other MLP module (e.g. a kernel patch) is called as it is."""

    def __init__(self, layer, concat: bool, pack: bool, rows: int):
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv = self.q = self.k = self.v = None
        if not all(_plain_linear(m) for m in projections):
            self.q, self.k, self.v = projections   # called as they are
        elif concat:
            weight = torch.cat([m.weight for m in projections], 0)
            biases = [m.bias for m in projections]
            bias = None
            if any(b is not None for b in biases):  # a missing bias is a zero bias
                bias = torch.cat([b if b is not None else m.weight.new_zeros(m.weight.shape[0])
                                  for m, b in zip(projections, biases)], 0)
            self.qkv = make_linear(weight, bias, pack, rows)
        else:
            self.q, self.k, self.v = (make_linear(m.weight, m.bias, pack, rows) for m in projections)
        self.o = make_linear(attn.o_proj.weight, attn.o_proj.bias, pack, rows) if _plain_linear(attn.o_proj) \
            else attn.o_proj
        mlp = layer.mlp
        self.mlp = _stock_mlp(mlp)
        self.gate_up = self.gate = self.up = self.down = None
        if self.mlp:
            if concat:
                self.gate_up = make_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0), None, pack, rows)
            else:
                self.gate = make_linear(mlp.gate_proj.weight, None, pack, rows)
                self.up = make_linear(mlp.up_proj.weight, None, pack, rows)
            self.down = make_linear(mlp.down_proj.weight, mlp.down_proj.bias, pack, rows)


class _HeadWeights:
    """The head a phase samples from, with packed weights: the image generation head (stock ``JanusVQVAEHead``:
    proj_out -> activation -> vision_head) for an image phase, the text ``lm_head`` for a text phase; any other
    (or hooked) head module is called as it is."""

    def __init__(self, model, pack: bool, rows: int, image: bool):
        self.image = self.text = None
        head = model.model.generation_head
        if image and type(head).__name__ == "JanusVQVAEHead" and not head._forward_hooks \
                and not head._forward_pre_hooks and _plain_linear(head.proj_out) and _plain_linear(head.vision_head):
            self.image = (make_linear(head.proj_out.weight, head.proj_out.bias, pack, rows), head.activation_fn,
                          make_linear(head.vision_head.weight, head.vision_head.bias, pack, rows))
        lm_head = model.lm_head
        if not image and _plain_linear(lm_head):
            self.text = make_linear(lm_head.weight, lm_head.bias, pack, rows)


def _rms_norm(norm, h):
    """``norm(h)``; the stock Llama RMSNorm as one fused op (same formula), any other module (a patch) as is."""
    if type(norm).__name__ == "LlamaRMSNorm" and h.dtype == torch.float32:
        return F.rms_norm(h, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(h)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _decode_attention(q, keys, values, key_mask, scale):
    """Attention of ONE query position per row (CPU): two batched matmuls and a masked softmax.

    PyTorch's CPU SDPA kernel (flash, blocked over queries) costs milliseconds for a single query with a
    mask; this costs microseconds. q [R, H, 1, d]; keys/values [R, Hkv, S, d]; key_mask bool [R, 1, 1, S]."""
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(rows, kv_heads, heads // kv_heads, dim)  # query heads grouped by their shared K/V head
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [R, Hkv, G, S]
    scores = scores.masked_fill(~key_mask.view(rows, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values).reshape(rows, heads, 1, dim)


class RolloutEngine:
    """Fast sampling for a `JanusForConditionalGeneration` (text CoT, CFG image tokens, VQ decode).

    Usage (B prompts x G rows each, consecutive)::

        engine = RolloutEngine(model, EngineConfig())
        cot = engine.generate_text(text_prefill(model, ids, mask), max_new_tokens=1024, eos_id=eos, pad_id=pad,
                                   params=SamplingParams(top_k=50), seed=seed_text)
        img = engine.generate_image_tokens(cfg_prefill(model, ids2, mask2, pad, layout="right"), num_tokens=576,
                                           params=SamplingParams(cfg_scale=5.0), seed=seed_image)
        images = engine.decode(img.tokens)          # [B, 3, H, W] float32 in [0, 1]

    Weights are read at every call, so the engine follows training updates; build it once per model.
    Run under ``torch.no_grad()`` semantics (the engine disables grad itself).
    """

    def __init__(self, model, config: Optional[EngineConfig] = None):
        self.model = model
        self.config = config or EngineConfig()
        self.lm = model.model.language_model
        self._compiled = {}
        self._graphs = {}

    # ---- the language model over one new position per row -------------------------------------------

    def _attention_layer(self, layer, index, h, state: _PhaseState, cos, sin, write_at, key_len, key_mask,
                         key_limit=None):
        attn = layer.self_attn
        rows, length = h.shape[:2]
        heads, kv_heads, dim = state.heads, state.kv_heads, state.head_dim
        fused = state.fused[index] if state.fused is not None else None
        if fused is not None and fused.qkv is not None:
            # One GEMM; rotary applied to q and k together (same arithmetic per element as apart).
            qkv = fused.qkv(h)
            qk = _rotate(qkv[..., :(heads + kv_heads) * dim].view(rows, length, heads + kv_heads, dim),
                         cos.transpose(1, 2), sin.transpose(1, 2))
            q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
            v = qkv[..., (heads + kv_heads) * dim:].view(rows, length, kv_heads, dim).transpose(1, 2)
        else:
            q_proj, k_proj, v_proj = (fused.q, fused.k, fused.v) if fused is not None else \
                (attn.q_proj, attn.k_proj, attn.v_proj)
            q = q_proj(h).view(rows, -1, heads, dim).transpose(1, 2)
            k = k_proj(h).view(rows, -1, kv_heads, dim).transpose(1, 2)
            v = v_proj(h).view(rows, -1, kv_heads, dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = state.keys[index], state.values[index]
        if isinstance(write_at, int):
            keys[:, :, write_at:write_at + k.shape[2]] = k
            values[:, :, write_at:write_at + v.shape[2]] = v
        else:  # a device tensor: graph/compile-safe in-place write
            keys.index_copy_(2, write_at, k)
            values.index_copy_(2, write_at, v)
        keys, values = keys[:, :, :key_len], values[:, :, :key_len]
        if q.shape[2] == 1 and self._triton_attention(q.device):
            # (compiled: the kernel as an opaque operator; torch.compile fuses the ops around it)
            attend = decode_attention_op if self.config.compile else decode_attention
            out = attend(q, keys, values, key_mask, attn.scaling, key_limit)
        elif q.shape[2] == 1 and q.device.type == "cpu":
            out = _decode_attention(q, keys, values, key_mask, attn.scaling)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask, scale=attn.scaling,
                                                 enable_gqa=kv_heads != heads)
        o_proj = fused.o if fused is not None else attn.o_proj
        return o_proj(out.transpose(1, 2).reshape(rows, -1, heads * dim))

    def _mlp(self, layer, index, x, state: _PhaseState):
        fused = state.fused[index] if state.fused is not None else None
        if fused is None or not fused.mlp:
            return layer.mlp(x)
        if fused.gate_up is not None:
            gate, up = fused.gate_up(x).chunk(2, -1)
        else:
            gate, up = fused.gate(x), fused.up(x)
        return fused.down(F.silu(gate).mul_(up))

    def _triton_attention(self, device: torch.device) -> bool:
        """Whether decode steps on ``device`` attend with the Triton kernel (EngineConfig.attention)."""
        choice = self.config.attention
        if choice == "auto":
            return device.type == "cuda" and HAS_TRITON
        return resolve_backend(choice, device) == "triton"

    def _layers(self, h, state, cos, sin, write_at, key_len, key_mask, key_limit=None):
        for index, layer in enumerate(self.lm.layers):
            h = h + self._attention_layer(layer, index, _rms_norm(layer.input_layernorm, h), state, cos, sin,
                                          write_at, key_len, key_mask, key_limit)
            h = h + self._mlp(layer, index, _rms_norm(layer.post_attention_layernorm, h), state)
        return _rms_norm(self.lm.norm, h)

    def _new_state(self, prefill: Prefill, new_tokens: int, seed: int, sampled_rows: int,
                   image: bool) -> _PhaseState:
        state = _PhaseState(self.lm, prefill, new_tokens, seed, sampled_rows)
        embeds = prefill.inputs_embeds
        fuse, pack = self.config.fuse_projections, self.config.pack_weights
        if fuse is None:
            fuse = embeds.device.type == "cpu"
        if pack is None:
            pack = can_pack(embeds.device, embeds.dtype)
        elif pack and not can_pack(embeds.device, embeds.dtype):
            raise ValueError(f"engine.pack_weights=true needs oneDNN linears for {embeds.dtype} on "
                             f"{embeds.device.type} (CPU, float32 or bfloat16, torch built with oneDNN); set it "
                             "to null (auto) or false")
        rows = embeds.shape[0]
        if fuse or pack:
            state.fused = [_LayerWeights(layer, fuse, pack, rows) for layer in self.lm.layers]
        if pack:
            state.head_weights = _HeadWeights(self.model, pack, rows, image)
        return state

    def _image_logits(self, hidden, state: _PhaseState):
        weights = state.head_weights
        if weights is None or weights.image is None:
            return self.model.model.generation_head(hidden)
        proj_out, activation, vision_head = weights.image
        return vision_head(activation(proj_out(hidden)))

    def _text_logits(self, hidden, state: _PhaseState):
        if state.head_weights is None or state.head_weights.text is None:
            return self.model.lm_head(hidden)
        return state.head_weights.text(hidden)

    def _prefill(self, prefill: Prefill, state: _PhaseState) -> torch.Tensor:
        """One batched forward over the prompt; returns the last hidden state [R, D]."""
        length = state.prompt_len
        causal = torch.ones(length, length, dtype=torch.bool, device=state.slot.device).tril()
        mask = causal[None] & state.key_valid[:, None, :length]
        # A query whose keys are all padding would give NaN; letting it see itself keeps pad slots finite.
        mask |= torch.eye(length, dtype=torch.bool, device=mask.device)[None]
        hidden = self._layers(prefill.inputs_embeds, state, state.cos[:, :, :length], state.sin[:, :, :length], 0,
                              length, mask[:, None])
        return hidden[:, -1]

    def _decode_hidden(self, embeds: torch.Tensor, state: _PhaseState, step: Optional[int],
                       keys: Optional[int] = None) -> torch.Tensor:
        """LM over one new position per row ([R, D] -> [R, D]). ``step`` (host int) selects the eager variant
        attending over the filled prefix; None reads ``state.step`` (device) and attends over the first ``keys``
        slots of the buffer (None: all; a host int fixed per compilation / graph, covering every filled slot)."""
        h = embeds[:, None]
        if step is not None:
            slot = state.prompt_len + step
            cos, sin = state.cos[:, :, slot:slot + 1], state.sin[:, :, slot:slot + 1]
            if state.keys[0].dtype == torch.bfloat16 and state.slot.device.type == "cpu" \
                    and state.total <= _CPU_BF16_FULL_BUFFER_RATIO * (slot + 1):
                # bf16 CPU matmuls copy any operand that is not a whole dense tensor (a prefix of the cache is
                # not), i.e. K and V of every layer at every step: attend over the whole buffer, masked, once it
                # costs less than that copy (write + two reads of the prefix: up to ~3x the prefix). Early in a
                # long phase (a CoT buffer sized for 1024 new tokens) the prefix and its copy stay cheaper.
                key_mask = (state.key_valid & (state.slot <= slot))[:, None, None, :]
                return self._layers(h, state, cos, sin, slot, state.total, key_mask)[:, 0]
            key_mask = state.key_valid[:, None, None, :slot + 1]
            return self._layers(h, state, cos, sin, slot, slot + 1, key_mask)[:, 0]
        keys = keys or state.total
        slot = state.prompt_len + state.step
        cos = state.cos.index_select(2, slot.view(1))
        sin = state.sin.index_select(2, slot.view(1))
        key_mask = (state.key_valid[:, :keys] & (state.slot[:keys] <= slot))[:, None, None, :]
        # (the Triton attention reads no slot at or past this bound: the filled prefix, not the whole span)
        return self._layers(h, state, cos, sin, slot.view(1), keys, key_mask, (slot + 1).view(1))[:, 0]

    # ---- decode steps ----------------------------------------------------------------------------------

    def _image_step(self, token, state, params, out_tokens, out_kl, out_logp, step=None, keys=None):
        """Embed ``token`` [B] for both branches, one LM position, generation head, CFG sampling.
        Writes the next token and its KL at column ``state.step + 1`` and advances the counters."""
        embeds = self.model.prepare_embeddings_for_image_generation(token)
        hidden = self._decode_hidden(torch.cat([embeds, embeds], 0), state, step, keys)
        logits = self._image_logits(hidden, state)
        batch = token.shape[0]
        column = (state.step + 1).view(1)
        next_token, kl, logp = sample(logits[:batch], logits[batch:], params,
                                      state.uniforms.index_select(0, column)[0], True, self.config.sampler,
                                      want_logp=True)
        out_tokens.index_copy_(1, column, next_token[:, None])
        out_kl.index_copy_(1, column, kl[:, None])
        out_logp.index_copy_(1, column, logp[:, None])
        state.step += 1
        return next_token

    def _text_step(self, token, finished, state, params, pad_id, eos_id, out_ids, out_valid, out_logp, step=None,
                   keys=None):
        hidden = self._decode_hidden(self.model.get_input_embeddings()(token), state, step, keys)
        column = (state.step + 1).view(1)
        next_token, _, logp = sample(self._text_logits(hidden, state), None, params,
                                     state.uniforms.index_select(0, column)[0], False, self.config.sampler,
                                     want_logp=True)
        out_valid.index_copy_(1, column, (~finished)[:, None])
        out_logp.index_copy_(1, column, torch.where(finished, torch.zeros_like(logp), logp)[:, None])
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        out_ids.index_copy_(1, column, next_token[:, None])
        finished |= next_token == eos_id
        state.step += 1
        return next_token

    @staticmethod
    def _key_span(state: _PhaseState, buckets: int, step: int) -> int:
        """Keys the full-buffer step at host step ``step`` attends over: the end of the first of ``buckets``
        equal spans of the buffer (rounded up to 16 slots) that covers slot ``prompt_len + step``."""
        span = -(-state.total // buckets)
        span = -(-span // 16) * 16
        return min(state.total, -(-(state.prompt_len + step + 1) // span) * span)

    def _default_key_buckets(self, device: torch.device) -> int:
        """``key_buckets=None``: 4 spans for CUDA graphs with torch's attention (measured on an H200). The Triton
        attention reads only the filled prefix whatever the span (its device limit): one graph over the whole buffer
        was as fast or faster (H200, 2026-12-04). Compiled steps and CPU: the whole buffer."""
        cfg = self.config
        graphs = cfg.cuda_graph and _captures_graphs(device) and not cfg.compile
        return 4 if graphs and not self._triton_attention(device) else 1

    def _runner(self, kind: str, fn: Callable, state: _PhaseState, static_args: tuple):
        """Return ``run(step)`` performing one decode step in the configured mode."""
        cfg = self.config
        on_cuda = _captures_graphs(state.slot.device)
        if not cfg.compile and not (cfg.cuda_graph and on_cuda):
            return lambda step: fn(*static_args, step=step)
        step_fn = fn
        if cfg.compile:
            # One compiled function per phase kind; torch.compile specialises it per (rows, prompt length, key
            # span) (static shapes), so bucketing prompt lengths avoids recompiling for every new length.
            if kind not in self._compiled:
                kwargs = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
                self._compiled[kind] = torch.compile(fn, dynamic=False, backend=cfg.compile_backend, **kwargs)
            step_fn = self._compiled[kind]
        buckets = cfg.key_buckets
        if buckets is None:
            buckets = self._default_key_buckets(state.slot.device)
        span = lambda step: self._key_span(state, buckets, step)  # noqa: E731
        if not (cfg.cuda_graph and on_cuda):
            return lambda step: step_fn(*static_args, step=None, keys=span(step))
        graphs = {}

        def replay(step):
            keys = span(step)
            if keys not in graphs:  # captured when the phase first reaches this key span
                graphs[keys] = self._capture(step_fn, state, static_args, keys)
            graphs[keys].replay()
        return replay

    def _capture(self, step_fn, state: _PhaseState, static_args: tuple, keys: int):
        """Capture one full-buffer decode step (over ``keys`` slots) as a CUDA graph; replays advance the
        device counters. Called at the phase's current step ``s`` (the first step of the span ``keys``); the
        warm-up runs step ``s`` twice, so it never steps past the phase, and leaves the state as it found it."""
        tensors = [t for t in static_args if isinstance(t, torch.Tensor)]
        saved_step = state.step.clone()
        saved = [t.clone() for t in tensors]

        def restore():
            # Back to step s: a second warm-up at s + 1 would index one past the buffers when s is the phase's
            # last step (a 2-token phase, or a key span that starts on the last step): on CUDA a device-side
            # assert that kills the process. K/V written at slot s are rewritten by the replay of step s.
            state.step.copy_(saved_step)
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (compilation, autotuning, allocator) outside the graph
                step_fn(*static_args, step=None, keys=keys)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's capture-unsafe CUDA calls fail the capture, not another thread's (in
        # the trainer, torch.distributed's NCCL watchdog queries events all the time).
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step_fn(*static_args, step=None, keys=keys)
        restore()  # the capture records and runs nothing on CUDA; anything that did run is undone
        return graph

    # ---- phases ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_image_tokens(self, prefill: Prefill, num_tokens: int, params: SamplingParams,
                              seed: int) -> ImageOutput:
        """CFG sampling of ``num_tokens`` image tokens. ``prefill`` holds the B conditional rows then their B
        unconditional twins (see :func:`cfg_prefill`). Returns tokens and the per-step CFG KL, each [B, T]."""
        if params.cfg_scale is None:
            raise ValueError("generate_image_tokens: params.cfg_scale must be set (image sampling uses CFG)")
        rows = prefill.attention_mask.shape[0]
        if rows % 2:
            raise ValueError(f"generate_image_tokens: the prefill must hold 2B rows (cond then uncond), got {rows}")
        if num_tokens < 1:
            raise ValueError(f"generate_image_tokens: num_tokens must be >= 1, got {num_tokens}")
        batch = rows // 2
        if self.config.compile:
            prefill = pad_prompt(prefill, self.config.prompt_bucket)
        state = self._new_state(prefill, num_tokens - 1, seed, batch, image=True)
        device = prefill.inputs_embeds.device
        tokens = torch.zeros(batch, num_tokens, dtype=torch.int64, device=device)
        kl = torch.zeros(batch, num_tokens, dtype=torch.float32, device=device)
        logp = torch.zeros(batch, num_tokens, dtype=torch.float32, device=device)
        logits = self._image_logits(self._prefill(prefill, state), state)
        first, first_kl, first_logp = sample(logits[:batch], logits[batch:], params, state.uniforms[0], True,
                                             self.config.sampler, want_logp=True)
        tokens[:, 0], kl[:, 0], logp[:, 0] = first, first_kl, first_logp
        if num_tokens > 1:
            token = first.clone()  # the step's (graph-static) input buffer
            run = self._runner("image", self._image_step, state, (token, state, params, tokens, kl, logp))
            for step in range(num_tokens - 1):
                run(step)
                token.copy_(tokens[:, step + 1])
        return ImageOutput(tokens, kl, logp)

    @torch.no_grad()
    def generate_text(self, prefill: Prefill, max_new_tokens: int, eos_id: int, pad_id: int,
                      params: SamplingParams, seed: int) -> TextOutput:
        """Sample up to ``max_new_tokens`` per row with the LM head; a row stops at its first EOS (later slots
        hold ``pad_id``, which a finished row also feeds itself); the phase stops when every row has finished
        (checked every ``eos_check_every`` steps) and is trimmed to the longest row. ``pad_id`` is just the
        post-EOS fill: the trainer's rollout passes the EOS id, as the released rollout fills with EOS."""
        if params.cfg_scale is not None:
            raise ValueError("generate_text: params.cfg_scale must be None (the text phase has no CFG)")
        if max_new_tokens < 1:
            raise ValueError(f"generate_text: max_new_tokens must be >= 1, got {max_new_tokens}")
        rows = prefill.attention_mask.shape[0]
        device = prefill.inputs_embeds.device
        if self.config.compile:
            prefill = pad_prompt(prefill, self.config.prompt_bucket)
        state = self._new_state(prefill, max_new_tokens - 1, seed, rows, image=False)
        ids = torch.full((rows, max_new_tokens), pad_id, dtype=torch.int64, device=device)
        valid = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
        logp = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
        first, _, first_logp = sample(self._text_logits(self._prefill(prefill, state), state), None, params,
                                      state.uniforms[0], False, self.config.sampler, want_logp=True)
        ids[:, 0], valid[:, 0], logp[:, 0] = first, True, first_logp
        finished = first == eos_id
        token = first.clone()
        run = self._runner("text", self._text_step, state,
                           (token, finished, state, params, pad_id, eos_id, ids, valid, logp))
        for step in range(max_new_tokens - 1):
            if step % self.config.eos_check_every == 0 and bool(finished.all()):
                break
            run(step)
            token.copy_(ids[:, step + 1])
        length = int(valid.sum(1).max())
        return TextOutput(ids[:, :length], valid[:, :length].float(), logp[:, :length])

    def decode(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """VQ-decode ``[B, T]`` image tokens to ``[B, 3, H, W]`` float32 in [0, 1]; see :mod:`egrpo.rollout.vq`."""
        return decode_images(self.model, image_tokens, batch_size=self.config.vq_batch_size,
                             channels_last=self.config.vq_channels_last)


def seeds_from_generator(generator: torch.Generator, count: int = 2) -> List[int]:
    """``count`` phase seeds drawn from ``generator`` (one host op per rollout; keeps rollouts seeded by it)."""
    return [int(s) for s in torch.randint(0, 2**31, (count,), generator=generator, device=generator.device)]
