"""hydra/launcher=slurm where SLURM cannot take the grid: one line, and no sweep folder left behind.

The real `scaling-train` console script and the real sbatch, given an empty SLURM configuration
(which sbatch refuses at once, on any machine); tests/test_slurm.py runs the launcher on a real
SLURM cluster.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher (the slurm extra)")
pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).parent / "scaling-train"
GRID = ["-m", "hydra/sweeper=basic", "hydra/launcher=slurm", "batch_size=32,64", "epochs=0.5", "eval_every=0.25",
        "data.n_samples=2000"]


def train(cwd: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SLURM_CONF")}
    return subprocess.run([str(SCRIPT), *GRID, *extra], cwd=cwd, env={**base, **env}, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture
def refusing_slurm(tmp_path) -> dict[str, str]:
    """The environment of a machine whose SLURM configuration sbatch cannot use."""
    if not (shutil.which("sbatch") and shutil.which("srun")):
        pytest.skip("SLURM's client commands are not installed: run cluster/install-system-deps.sh")
    conf = tmp_path / "conf" / "slurm.conf"
    conf.parent.mkdir()
    conf.write_text("")
    return {"SLURM_CONF": str(conf)}


def test_a_refused_submission_ends_in_one_line_and_leaves_no_sweep_folder(tmp_path, refusing_slurm):
    work = tmp_path / "work"
    work.mkdir()
    proc = train(work, **refusing_slurm)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: hydra/launcher=slurm: sbatch failed: sbatch: fatal: ") \
        and proc.stderr.count("\n") == 1, proc.stderr
    assert list(work.iterdir()) == [], "the failed submission left its multirun folder behind"


def test_a_refused_submission_keeps_what_an_existing_sweep_folder_held(tmp_path, refusing_slurm):
    old = tmp_path / "sweep"
    (old / ".submitit").mkdir(parents=True)
    (old / "notes.txt").write_text("mine")
    (old / ".submitit" / "1_submitted.pkl").write_text("an earlier job's")
    proc = train(tmp_path, f"hydra.sweep.dir={old}", **refusing_slurm)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*")) == [
        ".submitit", ".submitit/1_submitted.pkl", "notes.txt"]


def test_a_machine_without_slurm_ends_in_one_line(tmp_path):
    bare = tmp_path / "bin"  # a PATH without sbatch and srun
    bare.mkdir()
    proc = train(tmp_path, PATH=str(bare))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: hydra/launcher=slurm: sbatch and srun not found on PATH") \
        and proc.stderr.count("\n") == 1, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]
