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
