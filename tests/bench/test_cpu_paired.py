"""Smoke run of ``python -m bench.cpu_paired`` (bench/README.md, "CPU paired timings") at a toy shape, without
``torch.compile``, and its README section rendered from the JSON it wrote."""

import json
import re

import pytest
import torch

from bench.cpu_paired import main
from bench.render import cpu_paired_lines


def test_toy_case_every_op_and_dtype_then_render(tmp_path, capsys):
    out = tmp_path / "cpu_paired_toy.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--case", "128,64,512", "--rounds", "1", "--no-compile", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["dtype"]) for r in rows] == [(op, dt) for op in ("head", "grpo", "grpo_frozen")
                                                      for dt in ("float32", "bfloat16")]
    onednn = json.loads(out.read_text())["cpu_fp32_gemm"] == "onednn"
    for r in rows:
        # fp32 rows also time our path on BLAS GEMMs when ours runs oneDNN's
        blas_row = onednn and r["dtype"] == "float32"
        assert (r["N"], r["D"], r["V"]) == (128, 64, 512)
        assert set(r["median_s"]) == {"fused", "eager"} | ({"fused_blas"} if blas_row else set())
        (fused,), (eager,) = r["samples_s"]["fused"], r["samples_s"]["eager"]
        assert r["median_paired_ratio"]["fused/eager"] == pytest.approx(fused / eager)
        assert set(r["median_paired_ratio"]) == {"fused/eager"} | ({"fused/fused_blas"} if blas_row else set())
    section = "\n".join(cpu_paired_lines(tmp_path))
    assert "### `cpu_paired_toy.json`" in section and "| grpo_frozen | 128 | 64 | 512 | bfloat16 |" in section
    # bf16 rows: no BLAS timing, no compile timing
    assert re.search(r"\| grpo_frozen \| 128 \| 64 \| 512 \| bfloat16 \| [\d.]+ \| - \| [\d.]+ \| - \|", section)


@pytest.mark.parametrize("args, needle", [
    # an unknown op used to run as a trainable-head GRPO row under its name; the others were tracebacks
    (["--ops", "head,bogus", "--case", "64,32,128"], "--ops: unknown ['bogus']"),
    (["--case", "128,64"], "--case"),                              # ValueError
    (["--case", "100,64,512"], "--case"),                          # N not a multiple of 64: a view error in grpo
    (["--rounds", "0"], "--rounds"),                               # StatisticsError
])
def test_bad_arguments_are_usage_errors(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--no-compile", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x.json").exists()
