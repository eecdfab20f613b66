import pytest
import torch

from egrpo.kernels import _common


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        _common.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.skipif(not (_common.HAS_TRITON and _common.INTERPRETING), reason="needs the Triton interpreter")
def test_interpreter_probe_runs_here():
    _common.check_interpreter_works()
    assert _common.resolve_backend("triton", torch.device("cpu")) == "triton"


@pytest.mark.skipif(not (_common.HAS_TRITON and _common.INTERPRETING), reason="needs the Triton interpreter")
def test_broken_interpreter_gets_a_clear_error_every_time(monkeypatch):
    class BrokenLaunch:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(_common, "_interpreter_probe_kernel", BrokenLaunch())
    monkeypatch.setattr(_common, "_INTERPRETER_CHECKED", False)
    monkeypatch.setattr(_common, "_INTERPRETER_ERROR", None)
    for _ in range(2):  # the probe runs once; the error is raised on every later call too
        with pytest.raises(RuntimeError, match=r"Triton interpreter .*numpy.*backend='torch'"):
            _common.resolve_backend("triton", torch.device("cpu"))
    assert _common.resolve_backend("torch", torch.device("cpu")) == "torch"


class _OnCuda:
    """Stands in for a CUDA tensor in the fp32-output GEMM helpers (only ``is_cuda`` and ``dtype`` are read)."""

    is_cuda, dtype = True, torch.bfloat16


@pytest.mark.parametrize("helper,flag", [("mm_wide", "_OUT_DTYPE_MM_OK"), ("addmm_wide", "_OUT_DTYPE_ADDMM_OK")])
def test_out_of_memory_does_not_switch_off_the_fp32_output_gemm(helper, flag, monkeypatch):
    """An OOM inside the fp32-output GEMM is re-raised, not read as "this torch has no out_dtype": that would round
    every later chunk's logits to bf16 for the rest of the process."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "mm", out_of_memory)
    monkeypatch.setattr(torch, "addmm", out_of_memory)
    monkeypatch.setattr(_common, flag, None)
    args = (_OnCuda(), _OnCuda(), torch.float32) if helper == "mm_wide" else (torch.zeros(1), _OnCuda(), _OnCuda())
    with pytest.raises(torch.OutOfMemoryError):
        getattr(_common, helper)(*args)
    assert getattr(_common, flag) is None


@pytest.mark.parametrize("value", ["onednn", "blas"])
def test_cpu_fp32_gemm_setting(value, monkeypatch):
    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", value)
    assert _common.cpu_fp32_gemm() in (value, "blas")  # "onednn" falls back to "blas" on a build without oneDNN
    assert _common.uses_onednn(torch.zeros(1)) == (_common.cpu_fp32_gemm() == "onednn")
    assert not _common.uses_onednn(torch.zeros(1, dtype=torch.float64))  # oneDNN has no fp64 GEMM
    assert not _common.uses_onednn(torch.zeros(1, dtype=torch.bfloat16))  # bf16 GEMMs: torch.mm runs oneDNN already


def test_unknown_cpu_fp32_gemm_is_named(monkeypatch):
    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", "mkl")
    with pytest.raises(ValueError, match="EGRPO_CPU_FP32_GEMM must be one of"):
        _common.cpu_fp32_gemm()


@pytest.mark.parametrize("device,vocab,logit_bytes,rows", [
    ("cpu", 16384, 4, 1024),      # 64 MiB of fp32 logits
    ("cpu", 102400, 4, 512),      # the budget gives 163 rows: the dW GEMM's floor of 512 rows wins
    ("cuda", 16384, 4, 4096),     # 256 MiB of fp32 logits (the default)
    ("cuda", 16384, 2, 8192),     # 256 MiB of bf16 logits (EGRPO_HALF_LOGITS=1)
    ("cuda", 102400, 4, 4096),    # the budget gives 655 rows: the floor of 4096 wins
    ("cuda", 102400, 2, 4096),    # 1310 rows: the floor again (800 MiB of bf16 logits)
    ("cuda", 4096, 2, 32768),     # 256 MiB / (2 x 4096): the budget alone
    ("cuda", 50000, 2, 4096),     # 1342 rows: the floor
    ("cuda", 20000, 2, 6656),     # 6710 rows rounded down to whole 128-row tiles
])
def test_default_chunk_rows_follow_the_documented_budgets(device, vocab, logit_bytes, rows):
    """docs/kernels.md: 64 MiB (CPU) / 256 MiB (CUDA) of logits per chunk at their real size (2 bytes for half logits,
    4 for fp32 ones), at least 512 / 4096 rows, whole 128-row tiles, never more rows than there are."""
    assert _common.default_chunk_rows(10**6, vocab, torch.device(device), logit_bytes) == rows
    assert _common.default_chunk_rows(300, vocab, torch.device(device), logit_bytes) == 300
    if logit_bytes == 4:  # the default count
        assert _common.default_chunk_rows(10**6, vocab, torch.device(device)) == rows


def test_default_chunk_rows_constants():
    assert _common.MIN_CHUNK_ROWS_CUDA == 4096 and _common.MIN_CHUNK_ROWS_CPU == 512
    assert _common.DEFAULT_CHUNK_BYTES_CUDA == 256 * 2**20 and _common.DEFAULT_CHUNK_BYTES_CPU == 64 * 2**20


@pytest.mark.parametrize("logit_bytes", [0, -2, 2.0, True])
def test_default_chunk_rows_refuses_a_bad_logit_size(logit_bytes):
    with pytest.raises(ValueError, match="logit_bytes must be a positive int"):
        _common.default_chunk_rows(100, 1000, torch.device("cuda"), logit_bytes)


def test_check_chunk_size_passes_the_logit_size_on():
    cuda = torch.device("cuda")
    assert _common.check_chunk_size(None, 10**6, 16384, cuda) == 4096
    assert _common.check_chunk_size(None, 10**6, 16384, cuda, 2) == 8192
    assert _common.check_chunk_size(1000, 10**6, 16384, cuda, 2) == 1000   # an explicit size is kept


# ------------------------------------------------------------------ EGRPO_HALF_LOGITS: unset / "0" off, "1" on

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing is allocated on them


def _set_env(monkeypatch, name, value):
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("value,expected", [(None, False), ("0", False), ("1", True)])
def test_env_switch(value, expected, monkeypatch):
    _set_env(monkeypatch, "EGRPO_X", value)
    assert _common.env_switch("EGRPO_X") is expected


@pytest.mark.parametrize("value", ["", "yes", "true", "2", " 1", "on", "auto"])
def test_env_switch_refuses_other_values_in_one_line(value, monkeypatch):
    monkeypatch.setenv("EGRPO_X", value)
    with pytest.raises(ValueError) as e:
        _common.env_switch("EGRPO_X")
    assert str(e.value) == f"EGRPO_X must be 0 or 1, got {value!r}"


@pytest.mark.parametrize("setting,on", [(None, False), ("0", False), ("1", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_with_half_inputs_on_triton(setting, on, dtype, monkeypatch):
    """Unset: off (fp32 logits); "0" off; "1" on (on CUDA and in the interpreter alike)."""
    _set_env(monkeypatch, "EGRPO_HALF_LOGITS", setting)
    assert _common.half_logits(dtype, "triton") is on


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_half_logits_is_off_without_half_inputs_or_triton(setting, monkeypatch):
    _set_env(monkeypatch, "EGRPO_HALF_LOGITS", setting)
    for dtype in (torch.float32, torch.float64):
        assert _common.half_logits(dtype, "triton") is False
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert _common.half_logits(dtype, "torch") is False


@pytest.mark.parametrize("env,expected", [(None, False), ("0", False), ("1", True)])
def test_half_logits_reads_the_environment(env, expected, monkeypatch):
    _set_env(monkeypatch, "EGRPO_HALF_LOGITS", env)
    assert _common.half_logits(torch.bfloat16, "triton") is expected
    assert _common.half_logits(torch.float32, "triton") is False


def test_half_logits_refuses_a_bad_value_whatever_the_inputs(monkeypatch):
    monkeypatch.setenv("EGRPO_HALF_LOGITS", "yes")
    for dtype, backend in ((torch.bfloat16, "triton"), (torch.float32, "torch")):
        with pytest.raises(ValueError, match="EGRPO_HALF_LOGITS must be 0 or 1"):
            _common.half_logits(dtype, backend)


@pytest.mark.parametrize("env,bf16_cuda_bytes,bf16_rows", [(None, 4, 4096), ("0", 4, 4096), ("1", 2, 8192)])
def test_cuda_default_chunk_follows_the_logits_held(env, bf16_cuda_bytes, bf16_rows, monkeypatch):
    """On CUDA the default chunk is sized by the logits' real bytes: 4096 rows of fp32 logits at V = 16384 by
    default (and with EGRPO_HALF_LOGITS=0, fp32 inputs, or the torch backend), 8192 of bf16 ones with "1"."""
    if env is None:
        monkeypatch.delenv("EGRPO_HALF_LOGITS", raising=False)
    else:
        monkeypatch.setenv("EGRPO_HALF_LOGITS", env)
    for dtype in (torch.bfloat16, torch.float16):
        assert _common.chunk_logit_bytes(dtype, CUDA, "triton") == bf16_cuda_bytes
        assert _common.default_chunk_rows(36864, 16384, CUDA, _common.chunk_logit_bytes(dtype, CUDA, "triton")) \
            == bf16_rows
        assert _common.default_chunk_rows(16384, 102400, CUDA, _common.chunk_logit_bytes(dtype, CUDA, "triton")) \
            == 4096
        assert _common.chunk_logit_bytes(dtype, CUDA, "torch") == 4
    assert _common.chunk_logit_bytes(torch.float32, CUDA, "triton") == 4


def test_cpu_chunk_logit_bytes_unchanged_when_unset(monkeypatch):
    """Unset, nothing on CPU holds half logits: every CPU default chunk keeps the fp32 count."""
    monkeypatch.delenv("EGRPO_HALF_LOGITS", raising=False)
    for backend in ("triton", "torch"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            assert _common.chunk_logit_bytes(dtype, CPU, backend) == 4
    # the Triton backend's GEMM dtype on CPU is unchanged too: fp32 GEMMs (fp32 logits) unless "1"
    assert _common.gemm_dtype(torch.bfloat16, CPU, "triton") == torch.float32
    assert _common.gemm_dtype(torch.float16, CPU, "triton") == torch.float32


def test_cpu_interpreter_under_1_holds_half_logits_where_the_cpu_has_bf16_gemms(monkeypatch):
    monkeypatch.setenv("EGRPO_HALF_LOGITS", "1")
    fast = _common.cpu_has_fast_bf16()
    assert _common.gemm_dtype(torch.bfloat16, CPU, "triton") == (torch.bfloat16 if fast else torch.float32)
    assert _common.chunk_logit_bytes(torch.bfloat16, CPU, "triton") == (2 if fast else 4)
    assert _common.chunk_logit_bytes(torch.float16, CPU, "triton") == 4   # fp16 is upcast on CPU: fp32 logits
