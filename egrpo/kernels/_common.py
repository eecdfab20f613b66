"""Shared plumbing for the kernels: backend choice, input checks, chunking, GEMM helpers.

Every op in this package runs on one of three paths:

* ``"triton"``: the op's Triton kernels. Compiled on CUDA; on CPU only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``egrpo.kernels`` is first imported).
* ``"torch"``: the same chunked algorithm written with PyTorch ops (default on CPU).
* ``"auto"``: ``"triton"`` for CUDA tensors when Triton is importable, ``"torch"`` otherwise.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # Triton is optional at import time: the torch path works without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

# Read once: the interpreter is chosen when @triton.jit decorates, i.e. at import time.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "torch")
HALF_DTYPES = (torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Bytes of logits one chunk may hold, counted at the bytes each logit really takes (:func:`chunk_logit_bytes`: 2 for
# the opt-in half logits of the CUDA Triton path, 4 for fp32 logits). On CUDA, 256 MiB keeps the GEMMs large enough to run
# near peak (8192 rows of bf16 logits, or 4096 of fp32, at V = 16384) while staying far below the [N, V] eager
# buffers. Measured on an H200 (2026-12-04, bf16, image case N 36864 D 4096 V 16384, fwd+bwd of the GRPO loss):
# frozen head 43.12 / 21.76 / 18.01 / 17.37 ms at 512 / 1024 / 4096 / 8192 rows (fp32 logits), trainable 37.81 /
# 27.44 / 25.91 ms at 1024 / 4096 / 8192: larger chunks were faster at every size tried. On CPU, larger chunks were
# faster up to the sizes we tried; 64 MiB (1024 rows at V = 16384) keeps the two live fp32 [chunk, V] buffers of
# the torch row passes at 128 MiB (our choice; bench/cpu_paired.py).
DEFAULT_CHUNK_BYTES_CUDA = 256 * 2**20
DEFAULT_CHUNK_BYTES_CPU = 64 * 2**20


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the 'triton' package, which is not importable")
        if device.type != "cuda" and not INTERPRETING:
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing egrpo.kernels (or use backend='torch')"
            )
        if device.type != "cuda":
            check_interpreter_works()
    return backend


_INTERPRETER_ERROR: Optional[str] = None
_INTERPRETER_CHECKED = False

if HAS_TRITON:

    @triton.jit
    def _interpreter_probe_kernel(out_ptr, n):
        acc = 0.0
        for _ in range(0, n):  # a loop bound passed at run time, as every kernel here has
            acc += 1.0
        tl.store(out_ptr, acc)


def check_interpreter_works() -> None:
    """Fail with a clear message, once, where the installed Triton interpreter cannot run these kernels.

    Known case: Triton <= 3.6's interpreter converts run-time scalars with ``int(array)``, which
    NumPy >= 2.4 rejects for 1-element arrays; every kernel then dies with "only 0-dimensional arrays can
    be converted to Python scalars". Compiled kernels on a GPU are unaffected."""
    global _INTERPRETER_ERROR, _INTERPRETER_CHECKED
    if not _INTERPRETER_CHECKED:
        _INTERPRETER_CHECKED = True
        out = torch.zeros(1)
        try:
            _interpreter_probe_kernel[(1,)](out, 3)
            if float(out) != 3.0:
                raise RuntimeError(f"a 3-step loop counted {float(out)}")
        except Exception as e:  # the interpreter's own failure, whatever its type
            import numpy

            _INTERPRETER_ERROR = (
                f"the Triton interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run this "
                f"package's kernels: {e!r}. Triton <= 3.6's interpreter fails with numpy >= 2.4; install a newer "
                "triton (>= 3.7) or numpy < 2.4, or use backend='torch'"
            )
    if _INTERPRETER_ERROR is not None:
        raise RuntimeError(_INTERPRETER_ERROR)


# On CUDA a chunk holds at least this many rows whatever V is: the dW GEMM's inner dimension is the chunk's row
# count, and short ones stop being compute-bound. Raised from 2048 to 4096 on 2026-12-04 after an H200 run (bf16,
# text case N 16384 D 4096 V 102400, fwd+bwd of the GRPO loss with fp32 logits): trainable head 84.96 / 75.21 /
# 67.80 ms at 1024 / 2048 / 8192 rows (10% faster at 8192 than at 2048), frozen 47.78 / 46.31 / 45.64 ms. At
# V = 102400, 4096 rows hold 1600 MiB of fp32 logits plus 800 MiB of bf16 dz (the default), or 800 MiB of bf16
# logits with dz formed over them in place (EGRPO_HALF_LOGITS=1).
MIN_CHUNK_ROWS_CUDA = 4096
# The same argument on CPU (our choice, bench/cpu_paired.py): at V = 102400 the 64 MiB budget alone gives
# 128-row chunks, whose short-K dW GEMMs ran ~1.2-1.35x eager's time; 512 rows cost 200 MiB per buffer.
MIN_CHUNK_ROWS_CPU = 512


def default_chunk_rows(n_rows: int, vocab: int, device: torch.device, logit_bytes: int = 4) -> int:
    """Rows per chunk when the caller gives none: the device's byte budget over ``vocab`` logits of ``logit_bytes``
    bytes each (2 where the chunk GEMM writes half logits, 4 for fp32 logits), at least the device's minimum,
    whole 128-row tiles, never more rows than there are."""
    if isinstance(logit_bytes, bool) or not isinstance(logit_bytes, int) or logit_bytes < 1:
        raise ValueError(f"logit_bytes must be a positive int, got {logit_bytes!r}")
    budget = DEFAULT_CHUNK_BYTES_CUDA if device.type == "cuda" else DEFAULT_CHUNK_BYTES_CPU
    rows = max(1, budget // (logit_bytes * vocab))
    rows = max(rows, MIN_CHUNK_ROWS_CUDA if device.type == "cuda" else MIN_CHUNK_ROWS_CPU)
    if rows >= 128:
        rows -= rows % 128  # whole tensor-core tiles
    return max(1, min(rows, max(n_rows, 1)))


def check_chunk_size(chunk_size: Optional[int], n_rows: int, vocab: int, device: torch.device,
                     logit_bytes: int = 4) -> int:
    """``chunk_size`` checked, or the default for these rows (``logit_bytes``: see :func:`chunk_logit_bytes`)."""
    if chunk_size is None:
        return default_chunk_rows(n_rows, vocab, device, logit_bytes)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def check_temperature(temperature) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a positive float, got {temperature!r}") from None
    if not (t > 0.0 and t != float("inf")):
        raise ValueError(f"temperature must be a finite positive float, got {temperature!r}")
    return t


def check_head_inputs(hidden, weight, targets, bias):
    """Validate the (hidden, weight, targets, bias) quadruple shared by the head-based ops.

    Returns ``(V, D)``. Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor (float32/bfloat16/float16), got {hidden.dtype}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden has unsupported dtype {hidden.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [N, D] or [B, T, D], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    V, D = weight.shape
    if V == 0:
        raise ValueError("weight has V = 0 rows: the vocabulary must not be empty")
    if D == 0 or hidden.shape[-1] == 0:
        raise ValueError("hidden size D must not be zero")
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal weight's D ({D}); weight is [V, D]")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer (int64) tensor of token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if targets.numel() > 0:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(targets)).tolist())  # one device sync
        if lo < 0 or hi >= V:
            raise ValueError(f"targets must be token ids in [0, {V}); found values in [{lo}, {hi}]")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape [V] = [{V}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    return V, D


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (oneDNN with AVX512-BF16 / AMX)."""
    global _CPU_BF16
    if _CPU_BF16 is None:
        try:
            _CPU_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # pragma: no cover - depends on the build
            _CPU_BF16 = False
    return _CPU_BF16


_CPU_BF16: Optional[bool] = None


# The kernels' on/off environment switches (docs/kernels.md): read at every call, checked up front by
# `check_environment` so that a bad value stops a run (or its --dry-run) before anything loads.
ENV_SWITCHES = ("EGRPO_HALF_LOGITS", "EGRPO_FUSED_ROW_PASS", "EGRPO_OVERLAP_ROW_PASSES")


def check_environment() -> None:
    """Raise ValueError naming the variable if any environment setting of the kernels has an invalid value."""
    for name in ENV_SWITCHES:
        env_switch(name)
    cpu_fp32_gemm()


def env_switch(name: str) -> bool:
    """An on/off environment switch of the kernels: unset or "0" is off, "1" on; anything else is refused."""
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def half_logits(dtype: torch.dtype, backend: str) -> bool:
    """Half logits (``EGRPO_HALF_LOGITS=1``, opt-in, on CUDA and in the Triton interpreter): with half-precision operands and the Triton row passes, each
    chunk's logits GEMM writes half-precision logits (rounded once, as eager half code and our CPU path round them)
    that the row passes read directly and turn into dz in place, instead of fp32 logits plus a half copy of dz: 10
    instead of 16 bytes of memory traffic per logit, and no fp32 [chunk, V] buffer. The softmax statistics stay fp32.
    Measured on an H200 (2026-12-04, bf16, GRPO loss fwd+bwd, paired rows): frozen image head 17.58 -> 16.55 ms and
    674 -> 546 MiB, frozen text head 45.90 -> 44.14 ms. Not the default: rounding the logits makes the path
    exactly as accurate as eager bf16 and no more (two GPU parity tests against eager's error failed on such
    draws), where fp32 logits were ~100x more accurate on a cancellation-heavy gradient (docs/kernels.md,
    "Numerics"). The setting is read (and checked) at every call, whatever the inputs."""
    on = env_switch("EGRPO_HALF_LOGITS")
    return on and backend == "triton" and dtype in HALF_DTYPES


def gemm_dtype(dtype: torch.dtype, device: torch.device, backend: str = "torch") -> torch.dtype:
    """Operand dtype of the chunk GEMMs.

    Half inputs use tensor-core GEMMs on CUDA. On CPU, bf16 inputs stay bf16 where the CPU has native
    bf16 GEMMs (about 4x the fp32 rate on AVX512-BF16 parts; the logits are then rounded to bf16 once,
    as eager bf16 code does, and widened to fp32 before any softmax statistic); fp16, and bf16 on CPUs
    without bf16 units, are upcast to fp32 (slow half GEMMs there). The Triton backend on CPU (the
    interpreter, a test vehicle for the CUDA path) keeps fp32 GEMMs, i.e. the CUDA path's fp32 logits, unless
    :func:`half_logits` is on ("1"; it is off there by default).
    """
    if dtype in HALF_DTYPES and device.type != "cuda":
        if dtype == torch.bfloat16 and cpu_has_fast_bf16() and (
                backend == "torch" or half_logits(dtype, backend)):
            return dtype  # (the Triton backend too under EGRPO_HALF_LOGITS=1: the CUDA variant's test vehicle)
        return torch.float32
    return dtype


def chunk_logit_bytes(dtype: torch.dtype, device: torch.device, backend: str) -> int:
    """Bytes per logit of a chunk's logits, which size the default chunk (:func:`default_chunk_rows`): 2 where the
    chunk GEMM writes half logits (:func:`half_logits`, with half GEMM operands), else 4 (fp32 logits; fp64
    logits and the CPU torch path's bf16-rounded logits, widened to fp32, keep this count too)."""
    if half_logits(dtype, backend) and gemm_dtype(dtype, device, backend) in HALF_DTYPES:
        return 2
    return 4


def logits_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The library that runs fp32 chunk GEMMs on CPU. PyTorch's ``torch.mm`` calls BLAS (MKL in the x86 wheels), which
# on the AMD EPYC development core runs fp32 GEMMs at ~85 GFLOP/s (MKL's AVX2 code path on AMD); oneDNN, which
# PyTorch ships for its CPU convolutions and bf16 GEMMs, runs the same fp32 GEMMs at ~165-210 GFLOP/s with AVX-512,
# still in fp32 (docs/kernels.md, "CPU fp32 GEMMs"). ``EGRPO_CPU_FP32_GEMM=blas`` goes back to ``torch.mm``.
CPU_FP32_GEMMS = ("onednn", "blas")
_ONEDNN_FP32_OK: Optional[bool] = None


def cpu_fp32_gemm() -> str:
    """``"onednn"`` or ``"blas"``: who runs the fp32 chunk GEMMs on CPU (read at every call, so a test or a user
    can switch it with ``EGRPO_CPU_FP32_GEMM``). ``"onednn"`` is the default where this torch build has it."""
    global _ONEDNN_FP32_OK
    choice = os.environ.get("EGRPO_CPU_FP32_GEMM", "onednn")
    if choice not in CPU_FP32_GEMMS:
        raise ValueError(f"EGRPO_CPU_FP32_GEMM must be one of {CPU_FP32_GEMMS}, got {choice!r}")
    if choice == "onednn" and _ONEDNN_FP32_OK is None:
        try:  # present in x86 and aarch64 builds with oneDNN; probe once rather than trust the attribute
            a, b = torch.ones(2, 3), torch.ones(4, 3)
            _ONEDNN_FP32_OK = bool(torch.backends.mkldnn.is_available()) and torch.equal(
                torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), torch.full((2, 4), 3.0))
        except Exception:  # pragma: no cover - depends on the build
            _ONEDNN_FP32_OK = False
    return "onednn" if (choice == "onednn" and _ONEDNN_FP32_OK) else "blas"


def uses_onednn(a: torch.Tensor) -> bool:
    """Whether a GEMM with operand ``a`` runs through :func:`onednn_mm` (fp32 on CPU, oneDNN chosen)."""
    return a.device.type == "cpu" and a.dtype == torch.float32 and cpu_fp32_gemm() == "onednn"


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (fp32, CPU) by oneDNN, into a new tensor (oneDNN's linear has no ``out=``)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def onednn_addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` (fp32, CPU) by oneDNN, the add fused into the GEMM, into a new tensor."""
    return torch.ops.mkldnn._linear_pointwise.binary(a, acc, b.t(), None, "add")


_OUT_DTYPE_MM_OK: Optional[bool] = None
_OUT_DTYPE_ADDMM_OK: Optional[bool] = None


def mm_wide(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with ``out_dtype`` output (fp32 output from bf16 operands on CUDA).

    Uses cuBLAS's fp32-output GEMM (``torch.mm(..., out_dtype=)``) where this torch has it, so
    half-precision logits are never rounded to half before the softmax statistics.
    """
    global _OUT_DTYPE_MM_OK
    if a.dtype == out_dtype:
        return torch.mm(a, b)
    if a.is_cuda and _OUT_DTYPE_MM_OK is not False:
        try:
            out = torch.mm(a, b, out_dtype=out_dtype)
            _OUT_DTYPE_MM_OK = True
            return out
        except torch.OutOfMemoryError:  # not a sign of a missing feature: keep the fp32-output GEMM for later calls
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM_OK = False
    return torch.mm(a, b).to(out_dtype)


def addmm_wide(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` with ``acc`` wider than the operands (fp32 accumulator, bf16 operands).

    Returns the new accumulator (in place where the dtypes match). On CUDA the add is fused into
    the GEMM (cuBLAS with an fp32 C matrix) when torch has ``addmm(..., out_dtype=)``, which saves
    a read and a write of the whole [V, D] accumulator per chunk.
    """
    global _OUT_DTYPE_ADDMM_OK
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda and _OUT_DTYPE_ADDMM_OK is not False:
        try:
            out = torch.addmm(acc, a, b, out_dtype=acc.dtype)
            _OUT_DTYPE_ADDMM_OK = True
            return out
        except torch.OutOfMemoryError:  # not a sign of a missing feature: keep the fp32-output GEMM for later calls
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_ADDMM_OK = False
    return acc.add_(mm_wide(a, b, acc.dtype))
