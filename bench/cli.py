"""The command line the small single-table benchmarks share (``bench.shaping_cost``, ``bench.decode_attention``):
``--device``, ``--dry-run`` (CPU, toy shapes), ``--out``, ``--readme``, ``--render``, and the start of a run."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch

from bench.render import replace_section

RESULTS = Path(__file__).resolve().parent / "results"


def parse(doc: str, argv=None, add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy shapes")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--readme", type=Path, default=RESULTS.parent / "README.md")
    p.add_argument("--render", action="store_true", help="only re-render the README section from the JSON")
    if add_arguments:
        add_arguments(p)
    return p.parse_args(argv)


def start(args, stem: str, section: str, markdown: Callable[[dict], list]) -> Union[int, Tuple[torch.device, Path, dict]]:
    """An exit code when the run ends here (``--render`` done: 0; no CUDA device: 2), else the device, the JSON
    path (``<stem>_<device>.json``, ``<stem>_dry_run.json``) and the report's header."""
    if args.render:
        path = args.out or RESULTS / f"{stem}_{args.device}.json"
        replace_section(args.readme, section, markdown(json.loads(path.read_text())))
        return 0
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    out = args.out or RESULTS / (f"{stem}_dry_run.json" if args.dry_run else f"{stem}_{device.type}.json")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__}, "threads": torch.get_num_threads(), "rows": []}
    return device, out, report


def save(out: Path, report: dict) -> None:
    """Write the report (after every part of a run: a killed run keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


def finish(args, out: Path, section: str, markdown: Callable[[dict], list], report: dict) -> int:
    """After a real (not dry) run, rewrite the README section; report where the JSON went."""
    if not args.dry_run:
        replace_section(args.readme, section, markdown(report))
    print(f"wrote {out}")
    return 0
