"""The fused head's rows of the suite only (kept for ``python -m bench.bench_head``).

    python -m bench.bench_head [suite options]   # == python -m bench.suite --ops head --cases main
                                                  #    --out bench/results/head_<device>.json --no-render

The full suite (all ops, sweeps, README and plots) is ``python -m bench.suite`` / ``make bench``.
"""

import sys

import torch

from bench.suite import RESULTS, main as suite_main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--ops": "head", "--cases": "main"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    if "--out" not in argv:
        device = "cuda" if torch.cuda.is_available() and "cpu" not in argv else "cpu"
        argv += ["--out", str(RESULTS / f"head_{device}.json")]
    if "--no-render" not in argv:
        argv.append("--no-render")
    return suite_main(argv)


if __name__ == "__main__":
    sys.exit(main())
