"""Before and after: the benchmark study at a base commit against this tree, side by side.

    python -m benchmarks.ab [--base REV] [--pairs 8] [--mlflow on|off] [--asha] [--epochs 1]
    make bench-ab BASE=REV ARGS="--pairs 6"

Separate `make bench` runs cannot resolve a second of a ~14 s study on a shared machine (see
benchmarks/README.md, "Noise"), so a change that moves a study is measured here: the same study,
alternating A B, B A, ... between a git worktree of REV and this tree. The base side runs with that
worktree first on PYTHONPATH, so its driver, and the Ray workers that inherit its environment,
import the base's `scaling` and compose the base's configs; everything else (the venv, the
benchmark's own code and command line) is this tree's. Each metric is reported as this tree / the
base, median [min-max] over the pairs, with how many pairs came out lower; both sides' best
val/loss per batch size are compared, so a change that alters what a study trains shows it.
The worktree is removed at the end, whatever happens.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks.common import REPO, Ctx, Row, machine, paired, ray_sessions_in, summarize, table
from benchmarks.studyrun import run_study

# (key in a study's result, its name in the table); the first trial's start needs MLflow on
METRICS = (("wall_s", "study wall"), ("startup_s", "start-up (launch to first trial start)"),
           ("to_study_line_s", "launch to the 'study' line"), ("machine_cpu_s", "whole-machine CPU"))


def resolve(rev: str) -> str:
    """Return the commit `rev` names in this repository; ValueError (one line) if none."""
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise ValueError(f"--base={rev}: not a commit in {REPO}")
    return out.stdout.strip()


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """Check `commit` out in a temporary git worktree; remove it (and its record in .git) on exit."""
    parent = Path(tempfile.mkdtemp(prefix="scaling-ab-"))
    path = parent / commit[:12]
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), commit], cwd=REPO, check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)


def base_env(tree: Path) -> dict[str, str]:
    """The variables that make a study import `scaling` (and compose its configs) from `tree`: it goes first
    on PYTHONPATH, ahead of this tree's editable install, in the driver and in Ray's workers."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}


def compare(pairs: list[tuple[dict, dict]], label: str) -> list[Row]:
    """Rows of (this tree, base) pairs: per metric, the ratio this / base, median [min-max]."""
    rows = []
    for key, name in METRICS:
        both = [(a[key], b[key]) for a, b in pairs if _finite(a.get(key)) and _finite(b.get(key))]
        if not both:
            continue
        s = summarize([a / b for a, b in both])
        lower = sum(a < b for a, b in both)
        this, base = (statistics.median(p[side] for p in both) for side in (0, 1))
        rows.append(Row(name, f"{this:.2f} s (this tree)", f"{base:.2f} s ({label})", s.median, "-", None,
                        s.spread, note=f"lower in {lower} of {len(both)} pairs", data={"ratios": s.values}))
    return rows


def same_results(pairs: list[tuple[dict, dict]]) -> str:
    """Say whether both sides reached the same best val/loss per batch size in every pair."""
    diffs = [(a.get("best_per_batch_size"), b.get("best_per_batch_size")) for a, b in pairs]
    diffs = [(a, b) for a, b in diffs if a is not None and b is not None]
    if not diffs:
        return "results not compared (MLflow off: nothing recorded to read back)"
    bad = [(a, b) for a, b in diffs if a != b]
    if not bad:
        return f"same best val/loss per batch size on both sides in all {len(diffs)} pairs"
    a, b = bad[0]
    return f"best val/loss per batch size differs in {len(bad)} of {len(diffs)} pairs, e.g. this tree {a} vs base {b}"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", metavar="REV",
                   help="the commit to compare this tree with (any git revision; default HEAD: what the uncommitted "
                        "change does)")
    p.add_argument("--pairs", type=int, default=8,
                   help="alternating pairs of studies (default 8, ~30 s each: 4 cannot tell a few percent)")
    p.add_argument("--mlflow", choices=("on", "off"), default="on", help="record the studies in MLflow (default on)")
    p.add_argument("--asha", action="store_true", help="the ASHA study instead of the full grid")
    p.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    p.add_argument("--out", default=str(REPO / "bench-results" / "ab.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    for key, value in (("--pairs", args.pairs), ("--epochs", args.epochs)):
        if value < 1:
            print(f"error: {key}={value}: must be at least 1", file=sys.stderr)
            return 2
    try:
        commit = resolve(args.base)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line, before anything is created
        return 2

    info = machine()
    label = f"base {commit[:7]}"
    print(f"this tree: git {info.get('git', '?')} | {label} ({args.base}) | {args.pairs} pairs, "
          f"mlflow {args.mlflow}, asha {args.asha}, {args.epochs} epoch(s) | {info['cpu']}, "
          f"{info['cores_usable']} cores", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="scaling-ab-run-")).resolve()
    t0 = time.perf_counter()
    try:
        with worktree(commit) as base, ray_sessions_in(tmp):
            ctx = Ctx(quick=False, tmp=tmp)
            env = base_env(base)
            study = dict(asha=args.asha, mlflow=args.mlflow == "on", epochs=args.epochs)
            pairs = paired(lambda: run_study(ctx, **study), lambda: run_study(ctx, env=env, **study), args.pairs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = compare(pairs, label)
    print(table(rows))
    print("notes:\n" + "\n".join(f"  {r.name}: {r.note}" for r in rows))
    print(f"  {same_results(pairs)}")
    print(f"ratio column: this tree / base, median [min-max over pairs]; {time.perf_counter() - t0:.0f}s in all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "base": commit, "args": vars(args), "pairs": pairs}, indent=2,
                              default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
