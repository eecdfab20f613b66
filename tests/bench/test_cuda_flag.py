"""``--device cuda`` on a machine without CUDA: the benchmark scripts stop with argparse's one-line error, not a
traceback from deep inside torch (``bench.rollout`` and ``bench.gpu_quick`` already did)."""

import pytest
import torch

from bench.bench_capacity import main as capacity_main
from bench.suite import main as suite_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("main", [suite_main, capacity_main], ids=["suite", "bench_capacity"])
def test_device_cuda_without_cuda_is_a_usage_error(main, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda", "--out", str(tmp_path / "x.json"), "--no-render"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --device cuda: no CUDA device here")
    assert not (tmp_path / "x.json").exists()
