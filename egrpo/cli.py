"""The ``egrpo`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="egrpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the fused-head kernel benchmark (see bench/README.md)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from bench.bench_head import main as bench_main

        return bench_main(args.args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
