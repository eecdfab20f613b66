"""Where a benchmark ran: software versions and the device's name (shared by every bench script)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Dict, Optional

import torch


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    for mod in ("triton", "liger_kernel", "cut_cross_entropy", "transformers"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", None)
            if out[mod] is None:
                from importlib.metadata import version

                out[mod] = version(mod.replace("_", "-"))
        except Exception:
            out[mod] = None
    return out


def device_name(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}; {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"
