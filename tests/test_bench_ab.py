"""`python -m benchmarks.ab`: the base side really runs the base commit's code, and leaves nothing behind."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from benchmarks import ab
from benchmarks.common import REPO

pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")


def _worktrees() -> list[str]:
    out = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if line.startswith("worktree ")]


def test_a_bad_base_ends_in_one_line_naming_it_and_creates_nothing(capsys, tmp_path):
    before = _worktrees()
    out = tmp_path / "ab.json"
    assert ab.main(["--base", "no-such-rev", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --base=no-such-rev: not a commit in {REPO}"]
    assert _worktrees() == before and not out.exists()


@pytest.mark.parametrize("flag", ["--pairs", "--epochs"])
def test_a_count_below_one_ends_in_one_line_naming_it(flag, capsys):
    assert ab.main([flag, "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {flag}=0: must be at least 1"]


def test_the_base_side_imports_the_base_tree_and_its_configs_and_the_worktree_goes_away():
    commit = ab.resolve("HEAD")
    before = _worktrees()
    probe = "import scaling.cli as c, pathlib; print(pathlib.Path(c.__file__).resolve()); print(c.CONF_DIR.resolve())"
    with ab.worktree(commit) as tree:
        assert (tree / "scaling" / "cli.py").is_file()
        assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.strip() == commit
        out = subprocess.run([sys.executable, "-c", probe], env={**_env(), **ab.base_env(tree)}, capture_output=True,
                             text=True, check=True, cwd=tree.parent).stdout.split()
        conf = tree / "scaling" / "conf"
        conf = conf if conf.is_dir() else tree / "conf"  # a base from before the configs moved into the package
        assert out == [str((tree / "scaling" / "cli.py").resolve()), str(conf.resolve())]
        here = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True,
                              check=True, cwd=tree.parent).stdout.split()
        assert here == [str(REPO / "scaling" / "cli.py"), str(REPO / "scaling" / "conf")]  # this tree without it
        assert len(_worktrees()) == len(before) + 1
    assert not tree.exists() and not tree.parent.exists()
    assert _worktrees() == before


def test_compare_reports_this_tree_over_the_base_and_skips_what_a_side_did_not_measure():
    pairs = [({"wall_s": 9.0, "machine_cpu_s": 18.0, "startup_s": math.nan},
              {"wall_s": 10.0, "machine_cpu_s": 18.0, "startup_s": 5.0}),
             ({"wall_s": 12.0, "machine_cpu_s": 20.0}, {"wall_s": 10.0, "machine_cpu_s": 16.0}),
             ({"wall_s": 8.0, "machine_cpu_s": 19.0}, {"wall_s": 10.0, "machine_cpu_s": 19.0})]
    rows = {r.name: r for r in ab.compare(pairs, "base abc")}
    assert set(rows) == {"study wall", "whole-machine CPU"}  # no pair has both sides' start-up
    wall = rows["study wall"]
    assert wall.ratio == pytest.approx(0.9) and wall.spread == "0.80-1.20"
    assert wall.note == "lower in 2 of 3 pairs" and wall.baseline == "10.00 s (base abc)"
    assert rows["whole-machine CPU"].ratio == pytest.approx(1.0) and rows["whole-machine CPU"].note == "lower in 0 of 3 pairs"


def test_results_are_compared_per_batch_size():
    same = {"best_per_batch_size": {"16": 1.2, "64": 1.3}}
    assert ab.same_results([(same, dict(same))]).startswith("same best val/loss per batch size")
    other = {"best_per_batch_size": {"16": 1.2, "64": 1.4}}
    assert ab.same_results([(same, same), (other, same)]).startswith("best val/loss per batch size differs in 1 of 2")
    assert ab.same_results([({}, {})]).startswith("results not compared")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
