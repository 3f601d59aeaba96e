"""cluster/slurm/submit.py before sbatch: the study is composed and planned with Hydra as its job
would plan it, and every value reaches the job as typed (dry runs; tests/test_slurm.py submits).

A bad study value is refused in one line naming the key and the value, before anything is printed
or submitted, and nothing is written; `${...}` meant for the job (an env.* shell line, a study's
`${oc.env:SLURM_JOB_ID}`) passes through unchanged.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "cluster" / "slurm" / "submit.py"


def submit(*args: str, cwd: Path, env: dict | None = None, dry_run: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SUBMIT), *(["--dry-run"] if dry_run else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Assert one `error:` line that names every word, and nothing on stdout (no sbatch line, no job)."""
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr


@pytest.mark.parametrize("study, words", [
    (["batch_size=abc"], ["batch_size", "abc"]),
    (["batch_size=32,abc"], ["batch_size", "abc"]),
    (["optimizer=nope"], ["optimizer/nope"]),
    (["hydra.sweeper.asha.metric=val/nope"], ["hydra.sweeper.asha.metric", "val/nope"]),
    (["epochs=1", "hydra.sweeper.asha.grace_period=2"], ["hydra.sweeper.asha.grace_period", "epochs=1"]),
    # study.sbatch joins the allocation's Ray, which a local Ray's size cannot apply to
    (["hydra.sweeper.ray.num_cpus=4"], ["hydra.sweeper.ray.num_cpus=4", "hydra.sweeper.ray.address"]),
    # the job has no terminal to confirm a large grid on
    (["hydra.sweeper.max_trials=4", "batch_size=16,32,64"], ["hydra.sweeper.max_trials=4", "--yes"]),
    (["~seed"], ["~seed"]),
])
def test_submit_refuses_a_study_its_job_would_refuse(tmp_path, study, words):
    refused(submit("--", *study, cwd=tmp_path), *words)
    assert list(tmp_path.iterdir()) == [], "a refused submission leaves nothing behind"


def test_submit_passes_a_confirmed_large_grid(tmp_path):
    study = ["--yes", "hydra.sweeper.max_trials=4", "batch_size=16,32,64"]
    proc = submit("--", *study, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout.splitlines()[0])[-3:] == study


def test_submit_checks_the_trial_resources_a_preset_sets(tmp_path):
    """A user's preset (-cd) asks one GPU per trial: the allocation has none, so no trial could ever run."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "gpu_study.yaml").write_text(
        "# @package _global_\ndefaults:\n  - default_study\nhydra:\n  sweeper:\n    resources:\n      gpu: 1\n")
    study = ["-cd", str(tmp_path / "conf"), "experiment=gpu_study"]
    refused(submit("--", *study, cwd=tmp_path), "hydra.sweeper.resources.gpu=1", "gpus_per_node=0")
    proc = submit("gpus_per_node=2", "--", *study, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_submit_hands_sweeps_and_job_interpolations_to_the_study_unchanged(tmp_path):
    """Hydra's sweep grammar, quoting and `${oc.env:...}` of the job's own variables reach scaling-study as typed."""
    study = ["batch_size=32,64", "lr_multiplier=tag(log,interval(0.1,10))", "hydra.sweeper.num_samples=2",
             "hydra.sweeper.study_name=study-${oc.env:SLURM_JOB_ID}", "seed=${oc.env:STUDY_SEED}",
             "mlflow.tracking_uri=sqlite:///${oc.env:SLURM_SUBMIT_DIR}/mlflow db.db", "+model.tag='a b, [c]'"]
    proc = submit("env.STUDY_SEED=3", "--", *study[:-1], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert shlex.split(proc.stdout.splitlines()[0])[-6:] == study[:-1]
    # a key the trial config does not have is still refused, naming it
    refused(submit("--", *study, cwd=tmp_path), "model.tag")


def test_submit_notes_a_variable_only_the_job_sets_and_submits_the_study_as_given(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SCRATCH_ONLY_ON_NODES"}
    proc = submit("--", "hydra.sweeper.storage_path=${oc.env:SCRATCH_ONLY_ON_NODES}/studies", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("note: ") and "SCRATCH_ONLY_ON_NODES" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[0].endswith("'hydra.sweeper.storage_path=${oc.env:SCRATCH_ONLY_ON_NODES}/studies'")


def test_submit_hands_env_lines_with_shell_variables_to_the_job(tmp_path):
    """`${HOME}` in a setup line is the job's shell's to expand; OmegaConf read it as its own interpolation."""
    setup = 'source ${HOME}/venvs/scaling/bin/activate && echo "${SLURM_JOB_ID}"'
    proc = submit(f"env.SCALING_ENV_SETUP={setup}", "env.RAY_TEMP_DIR=/tmp/ray-${USER}", "job_name=s-${USER}",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout.splitlines()[0])
    assert words[:3] == ["env", f"SCALING_ENV_SETUP={setup}", "RAY_TEMP_DIR=/tmp/ray-${USER}"], words
    assert "--job-name=s-${USER}" in words


def test_submit_hands_additional_flags_to_sbatch_as_typed(tmp_path):
    """YAML read 16:00 as 960 (base 60), 010 as 8 and off as false (the flag then left out)."""
    proc = submit("additional.begin=16:00", "additional.time-min=30:00", "additional.nodelist=node010",
                  "additional.exclude=010", "additional.hint=off", "additional.exclusive=true",
                  "additional.mail-type=END,FAIL", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout.splitlines()[0])
    for flag in ("--begin=16:00", "--time-min=30:00", "--nodelist=node010", "--exclude=010", "--hint=off",
                 "--exclusive", "--mail-type=END,FAIL"):
        assert flag in words, (flag, words)


def test_submit_without_a_slurm_client_says_so_in_one_line(tmp_path):
    proc = submit(cwd=tmp_path, env={**os.environ, "PATH": str(tmp_path)}, dry_run=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: sbatch: ") and proc.stderr.count("\n") == 1, proc.stderr
