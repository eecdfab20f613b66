import os
import zlib

import torch

# The Triton interpreter is chosen when @triton.jit decorates, so it must be set before
# egrpo.kernels is imported. Without a GPU, the Triton path runs under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test (vary them all with EGRPO_TEST_SEED), reproducible from the test id.
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("EGRPO_TEST_SEED", "0"))) % 2**31
    torch.manual_seed(seed)
    yield
