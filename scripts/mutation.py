"""Mutation testing: plant one small bug at a time in a copy of the code and check that the tests notice.

Usage (from the repository root; ``make mutation`` runs the defaults)::

    python scripts/mutation.py                        # curated + a random sample of operator mutants
    python scripts/mutation.py --budget 40 --seed 1   # another sample
    python scripts/mutation.py --targets 'egrpo/kernels/grpo_loss.py' --budget 0   # curated mutants of one file
    python scripts/mutation.py --list                 # print the mutants, run nothing

Two kinds of mutants, each applied alone to a temporary copy of the repository:

* curated: the realistic single bugs of ``CURATED`` (a swapped clip bound, a biased std, a dropped vocabulary
  column, ...), found by their text in whichever target file holds it, so they survive code moving between
  files (the ``egrpo/objectives/`` package); one whose text is gone is
  reported as stale and not counted;
* operator: generated from the AST of the target files (``<`` <-> ``<=``, ``+`` <-> ``-``, ``*`` <-> ``/``,
  ``and`` <-> ``or``, ``min`` <-> ``max``, a numeric constant changed, a ``not``/unary minus removed, ``True``
  <-> ``False``), then ``--budget`` of them drawn at random (``--seed``). Input validation (``_validate``,
  ``if ...: raise`` tests, error messages) and docstrings are not mutated: their tests check messages, and a
  mutant there is a different error, not a wrong result.

A mutant is killed when the tests of its file fail (or time out: ``--timeout``). The tests run per file are
chosen by ``TESTS`` (globs, so new test files are picked up). The score is killed / (killed + survived).
The report (``--out``, JSON) lists every survivor with its diff; each survivor needs a test or a written
reason why it is equivalent (docs/testing.md).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_TARGETS = [
    "egrpo/kernels/*.py",
    "egrpo/objectives/*.py",
]
EXCLUDE = ["*/__init__.py"]

# target glob -> test globs (pytest node ids after "::" select inside a file; "-k EXPR" after "|")
TRAINER_CHECK = "tests/trainer/test_train.py|-k float64"
TESTS = {
    "egrpo/kernels/grpo_loss.py": ["tests/kernels/test_grpo_loss*.py", "tests/kernels/test_head_paths.py"],
    "egrpo/kernels/_head.py": ["tests/kernels/test_linear_logprob_entropy*.py", "tests/kernels/test_grpo_loss*.py",
                               "tests/kernels/test_head_paths.py", "tests/kernels/test_overlap_row_passes.py",
                               "tests/kernels/test_cpu_workspace.py"],
    "egrpo/kernels/linear_logprob_entropy.py": ["tests/kernels/test_linear_logprob_entropy*.py"],
    "egrpo/kernels/entropy_masks.py": ["tests/kernels/test_entropy_masks*.py"],
    "egrpo/kernels/cross_sample_similarity.py": ["tests/kernels/test_cross_sample_similarity*.py"],
    "egrpo/kernels/_common.py": ["tests/kernels/test_common*.py", "tests/kernels/test_linear_logprob_entropy*.py",
                                 "tests/kernels/test_head_paths.py", "tests/kernels/test_cpu_workspace.py"],
    # the eager references: ground truth of the kernel tests and the trainer's head_impl=eager path, which the
    # trainer check compares with its own hand-written float64 objective
    "egrpo/kernels/reference.py": [TRAINER_CHECK, "tests/kernels/test_reference.py", "tests/test_objectives.py",
                                   "tests/test_stage.py",
                                   "tests/kernels/test_grpo_loss.py", "tests/kernels/test_entropy_masks.py",
                                   "tests/kernels/test_cross_sample_similarity.py"],
    "egrpo/objectives*": ["tests/test_objective*.py", "tests/test_stage*.py", TRAINER_CHECK],
    # the rollout's decode attention (interpreter); the sm_90 compile checks are left out (they read no values)
    "egrpo/rollout/attention.py": ["tests/rollout/test_attention.py|-k not(compiles)"],
}

# (description, original text, mutated text): realistic single bugs (issue 18's planted kinds and more).
CURATED = [
    ("biased std in group advantages", "groups.std(1, keepdim=True)", "groups.std(1, keepdim=True, unbiased=False)"),
    ("advantage eps outside the std", "centred / (std + eps)", "centred / std.clamp_min(eps)"),
    ("STAGE weight (1 + Sim) / 2", "((1.0 - sim) * 0.5)", "((1.0 + sim) * 0.5)"),
    ("STAGE KL weight without clamp", "a + b * (sim + 1.0).clamp(0.0, 1.0)", "a + b * (sim + 1.0)"),
    ("EG-GRPO low-entropy tokens not excluded", "return (a + bonus) * (~low), low, high", "return a + bonus, low, high"),
    ("EG-GRPO bonus uncapped", "torch.minimum(c1 * a.abs(), c2 * hn)", "c2 * hn"),
    ("EG-GRPO entropy not normalised by ln V", "hn = entropy.detach() / math.log(vocab_size)", "hn = entropy.detach()"),
    ("entropy reward not centred", "bonus = (bonus - top_mean) * top", "bonus = bonus * top"),
    ("entropy reward coefficient dropped", "return rewards + coef * bonus", "return rewards + bonus"),
    ("zero-spread reward functions kept", "keep = (group_spread(per_fn, group_size) > tol) & (weights != 0)",
     "keep = (group_spread(per_fn, group_size) >= 0) & (weights != 0)"),
    ("text and image normalised separately", "den = sum(m.sum() for m in masks).clamp(min=1.0)",
     "den = masks[-1].sum().clamp(min=1.0)"),
    ("weighted normaliser without eps", "return pol + WEIGHTED_EPS,", "return pol,"),
    ("objective passes the clip bounds swapped", "eps_low=s.eps_low, eps_high=s.eps_high",
     "eps_low=s.eps_high, eps_high=s.eps_low"),
    ("grpo_loss clip bounds swapped", "ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high)",
     "ratio.clamp(1.0 - self.eps_high, 1.0 + self.eps_low)"),
    ("grpo_loss high clip flag uses eps_low", "(ratio > 1.0 + self.eps_high)", "(ratio > 1.0 + self.eps_low)"),
    ("Triton head stats drop the last vocabulary column", "            valid = offs < V\n",
     "            valid = offs < V - 1\n"),
    ("torch head stats drop the last vocabulary column", "    s = tmp.sum(dim=1)\n",
     "    s = tmp[:, :-1].sum(dim=1)\n"),
    ("entropy gradient sign flipped", "z.add_(entropy[:, None]).mul_(g_entropy.to(z.dtype)[:, None])",
     "z.add_(entropy[:, None]).mul_(-g_entropy.to(z.dtype)[:, None])"),
]


def _resolve(patterns, root=ROOT):
    files = []
    for pat in patterns:
        for path in sorted(glob.glob(os.path.join(root, pat))):
            rel = os.path.relpath(path, root)
            if rel not in files and not any(fnmatch.fnmatch(rel, e) for e in EXCLUDE):
                files.append(rel)
    return files


def tests_for(target):
    out = []
    for pat, tests in TESTS.items():
        if fnmatch.fnmatch(target, pat) or fnmatch.fnmatch(target, pat + "/*"):
            for t in tests:
                path, _, extra = t.partition("|")
                for f in _resolve([path]):
                    entry = f + ("|" + extra if extra else "")
                    if entry not in out:
                        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------- mutants

_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
             ast.Mod: ast.FloorDiv}
_NAME_SWAP = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amax": "amin",
              "amin": "amax"}


def _skipped_nodes(tree):
    """Ids of nodes not to mutate: docstrings, _validate / __repr__ bodies, ``if ...: raise`` tests and
    the arguments of ``raise``."""
    skip = set()

    def mark(node):
        for sub in ast.walk(node):
            skip.add(id(sub))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                mark(body[0])
            if isinstance(node, ast.FunctionDef) and (node.name in ("_validate", "__repr__")
                                                     or node.name.startswith("_check")):
                mark(node)
        if isinstance(node, ast.If) and node.body and all(isinstance(s, ast.Raise) for s in node.body):
            mark(node.test)
        if isinstance(node, ast.Raise):
            mark(node)
        if isinstance(node, ast.Assert):
            mark(node)
        if isinstance(node, ast.JoinedStr):
            mark(node)
    return skip


def _operator_sites(tree):
    skip = _skipped_nodes(tree)
    sites = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in _CMP_SWAP:
                    sites.append((node, ("cmp", k)))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            sites.append((node, ("bin",)))
        elif isinstance(node, ast.BoolOp):
            sites.append((node, ("bool",)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            sites.append((node, ("unary",)))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            sites.append((node, ("const",)))
        elif isinstance(node, ast.Attribute) and node.attr in _NAME_SWAP:
            sites.append((node, ("attr",)))
        elif isinstance(node, ast.Name) and node.id in ("min", "max"):
            sites.append((node, ("name",)))
    return sites


def _apply(node, kind):
    """Mutate ``node`` in place; returns the node replacing it (or the node itself)."""
    tag = kind[0]
    if tag == "cmp":
        node.ops[kind[1]] = _CMP_SWAP[type(node.ops[kind[1]])]()
    elif tag == "bin":
        node.op = _BIN_SWAP[type(node.op)]()
    elif tag == "bool":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif tag == "unary":
        return node.operand
    elif tag == "const":
        v = node.value
        if isinstance(v, bool):
            node.value = not v
        elif v == 0:
            node.value = type(v)(1)
        elif v == 1:
            node.value = type(v)(2)
        else:
            node.value = v * 2 if isinstance(v, float) else v + 1
    elif tag == "attr":
        node.attr = _NAME_SWAP[node.attr]
    elif tag == "name":
        node.id = _NAME_SWAP[node.id]
    return node


def operator_mutants(path):
    """Every operator mutant of ``path`` as ``(description, mutated source)``."""
    with open(os.path.join(ROOT, path)) as f:
        source = f.read()
    base = ast.unparse(ast.parse(source))
    n_sites = len(_operator_sites(ast.parse(source)))
    out = []
    for k in range(n_sites):
        tree = ast.parse(source)
        node, kind = _operator_sites(tree)[k]
        before = ast.unparse(node)
        replacement = _apply(node, kind)
        if replacement is not node:  # a unary op dropped: swap it in the parent
            for parent in ast.walk(tree):
                for field, value in ast.iter_fields(parent):
                    if value is node:
                        setattr(parent, field, replacement)
                    elif isinstance(value, list):
                        for i, item in enumerate(value):
                            if item is node:
                                value[i] = replacement
        mutated = ast.unparse(tree)
        if mutated == base:
            continue
        line = getattr(node, "lineno", 0)
        out.append((f"{path}:{line}: {before} -> {ast.unparse(replacement)}", mutated, base))
    return out


def curated_mutants(targets):
    out, stale = [], []
    for desc, old, new in CURATED:
        hits = []
        for path in targets:
            with open(os.path.join(ROOT, path)) as f:
                source = f.read()
            if old in source:
                hits.append((path, source))
        if not hits:
            stale.append(desc)
        for path, source in hits:  # the same text in two files (code and its eager reference): one mutant each
            out.append((path, f"{path}: {desc}", source.replace(old, new, 1), source))
    return out, stale


# ---------------------------------------------------------------------------------------------------- running

def _pytest_cmd(entries, timeout):
    cmds = []
    for entry in entries:
        path, _, extra = entry.partition("|")
        cmds.append([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0", path,
                     *extra.split()])
    return cmds


def run_tests(workdir, entries, timeout):
    """``"killed"`` (a test failed), ``"timeout"`` or ``"survived"``."""
    env = {**os.environ, "PYTHONPATH": workdir, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    deadline = time.time() + timeout
    for cmd in _pytest_cmd(entries, timeout):
        left = deadline - time.time()
        if left <= 0:
            return "timeout"
        try:
            proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return "timeout"
        if proc.returncode != 0:
            return "killed"
    return "survived"


def copy_repo(dst):
    for name in ("egrpo", "tests", "configs", "data", "docs", "bench", "setup.py", "pyproject.toml", "setup.cfg",
                 "pytest.ini"):
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), ignore=shutil.ignore_patterns("__pycache__"))
        elif os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst, name))


def main(argv=None):
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))   # still remove the temporary copy
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, help="globs of the files to mutate")
    ap.add_argument("--budget", type=int, default=30, help="operator mutants drawn at random (0: curated only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-curated", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant (exceeded = killed)")
    ap.add_argument("--out", default="runs/mutation.json")
    ap.add_argument("--tests", nargs="+", default=None,
                    help="run these test entries ('path' or 'path|-k EXPR') for every mutant instead of TESTS")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (when known to pass)")
    ap.add_argument("--match", default=None, help="only the mutants whose description contains this text")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = ap.parse_args(argv)

    targets = _resolve(args.targets)
    if not targets:
        sys.exit(f"--targets {args.targets} match no file")
    mutants, stale = ([], []) if args.no_curated else curated_mutants(targets)
    pool = []
    for path in targets:
        pool += [(path, d, m, b) for d, m, b in operator_mutants(path)]
    random.Random(args.seed).shuffle(pool)
    mutants = [("curated", *m) for m in mutants] + [("operator", *m) for m in pool[:max(args.budget, 0)]]
    if args.match:
        mutants = [m for m in mutants if args.match in m[2]]
    print(f"{len(targets)} target files, {len(pool)} operator mutants in all, running {len(mutants)}"
          + (f"; stale curated: {stale}" if stale else ""))
    if args.list:
        for kind, path, desc, _, _ in mutants:
            print(f"[{kind}] {desc}  <- {args.tests or tests_for(path)}")
        return 0

    select = (lambda _path: list(args.tests)) if args.tests else tests_for  # noqa: E731
    results = []
    with tempfile.TemporaryDirectory(prefix="egrpo-mutation-") as work:
        copy_repo(work)
        baseline_entries = sorted({e for _, path, *_ in mutants for e in select(path)})
        t0 = time.time()
        if not args.no_baseline:
            if run_tests(work, baseline_entries, 3 * args.timeout) != "survived":
                sys.exit(f"the unmutated tests fail: {baseline_entries}")
            print(f"baseline passes ({time.time() - t0:.0f} s)")
        for n, (kind, path, desc, mutated, original) in enumerate(mutants, 1):
            dst = os.path.join(work, path)
            with open(dst) as f:
                pristine = f.read()
            with open(dst, "w") as f:
                f.write(mutated)
            t0 = time.time()
            try:
                status = run_tests(work, select(path), args.timeout)
            finally:
                with open(dst, "w") as f:
                    f.write(pristine)
            diff = "".join(difflib.unified_diff(original.splitlines(True), mutated.splitlines(True), path, path, n=0))
            results.append(dict(kind=kind, file=path, mutant=desc, status=status, seconds=round(time.time() - t0, 1),
                                diff=diff))
            print(f"[{n}/{len(mutants)}] {status:8s} {time.time() - t0:6.1f}s  {desc}", flush=True)

    killed = sum(r["status"] in ("killed", "timeout") for r in results)
    score = killed / len(results) if results else float("nan")
    survivors = [r for r in results if r["status"] == "survived"]
    print(f"\nmutation score: {killed}/{len(results)} = {100 * score:.1f}%")
    for r in survivors:
        print(f"SURVIVED {r['mutant']}\n{r['diff']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(score=score, killed=killed, total=len(results), stale_curated=stale, seed=args.seed,
                       budget=args.budget, targets=targets, results=results), f, indent=1)
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
