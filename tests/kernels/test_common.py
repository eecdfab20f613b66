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


@pytest.mark.parametrize("device,vocab,rows", [
    ("cpu", 16384, 1024),     # 64 MiB of fp32 logits
    ("cpu", 102400, 512),     # the budget gives 163 rows: the dW GEMM's floor of 512 rows wins
    ("cuda", 16384, 4096),    # 256 MiB
    ("cuda", 102400, 2048),   # the budget gives 655 rows: the floor of 2048 wins
])
def test_default_chunk_rows_follow_the_documented_budgets(device, vocab, rows):
    """docs/kernels.md: 64 MiB (CPU) / 256 MiB (CUDA) of fp32 logits per chunk, at least 512 / 2048 rows, whole
    128-row tiles, never more rows than there are."""
    assert _common.default_chunk_rows(10**6, vocab, torch.device(device)) == rows
    assert _common.default_chunk_rows(300, vocab, torch.device(device)) == 300
