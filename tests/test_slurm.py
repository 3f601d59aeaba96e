"""SLURM, for real: a one-node cluster of this host (munged, slurmctld, slurmd) started by the test.

- cluster/slurm/submit.py + study.sbatch: a Ray head started with srun inside the allocation,
  then `scaling-study hydra.sweeper.ray.address=...` joins it; every trial lands in MLflow.
- Hydra's submitit launcher (hydra/launcher=slurm): the plain grid, one SLURM job per trial,
  no Ray, every job writing its run into one SQLite store.

The daemons listen on 127.0.0.1 only and are stopped by their process ids at teardown. The
binaries come from Debian's slurm-wlm and munge (cluster/install-system-deps.sh); without them
the tests skip, naming what is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from cluster_procs import BIN, SlurmCluster, free_port, is_loopback, listeners, slurm_missing, wait_until
from procs import two_second_trials
from records import study_records

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY = ["epochs=1", "eval_every=0.25", "data.n_samples=3000", "model.width=32"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = slurm_missing()
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}): run cluster/install-system-deps.sh")
    if os.geteuid() != 0:
        pytest.skip("the throwaway SLURM cluster runs its daemons as root (slurmd launches the jobs)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def job_env(slurm) -> dict[str, str]:
    """The submitting environment: this venv first on PATH (sbatch exports it to the job)."""
    return {**os.environ, **slurm.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


def test_daemons_listen_on_loopback_only(slurm):
    addresses = listeners(slurm.pids())
    assert addresses, "slurmctld and slurmd listen nowhere?"
    assert all(is_loopback(a) for a in addresses), addresses
    assert "idle" in slurm.run("sinfo", "-h", "-o", "%T").stdout


def test_sbatch_study_runs_ray_on_the_allocation_and_records_every_trial(slurm, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short: Ray's sockets live there
    db = tmp_path / "mlflow.db"
    submit = [sys.executable, ROOT / "cluster" / "slurm" / "submit.py",
              "nodes=1", f"cpus_per_task={min(os.cpu_count() or 1, 2)}", "time=00:10:00",
              f"output={tmp_path / 'study-%j.out'}", f"env.RAY_PORT={free_port()}", f"env.RAY_TEMP_DIR={ray_tmp}",
              "--",
              "batch_size=32,64", "lr_multiplier=1", "scaling.rule=linear", "warmup.epochs=0", *TINY,
              "hydra.sweeper.asha.grace_period=0.25", "hydra.sweeper.report=false", "hydra.sweeper.resources.cpu=1",
              "hydra.sweeper.study_name=slurm-study", f"mlflow.tracking_uri=sqlite:///{db}"]
    proc = slurm.run(*submit, cwd=tmp_path, env=job_env(slurm), timeout=60, check=False)
    assert proc.returncode == 0 and "submitted job " in proc.stdout, proc.stdout + proc.stderr
    job = proc.stdout.split("submitted job ")[1].split(";")[0].strip()
    state = slurm.wait_job(job, timeout=300)
    log = (tmp_path / f"study-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "ray head on" in log and "at 127.0.0.1:" in log and "ray cluster ready: 1 node(s)" in log
    assert "scaling-study exited with 0" in log, log[-4000:]

    client, studies, trials = study_records(f"sqlite:///{db}")
    assert len(studies) == 1 and len(trials) == 2
    assert studies[0].data.tags["trial.status"] == "completed"
    assert {t.data.tags["trial.status"] for t in trials} == {"completed"}
    assert all(t.data.tags.get("ray.node_id") for t in trials), "trial runs must name the Ray node they ran on"
    # the job's Ray is gone with the job (stopped through srun, not with `ray stop`)
    left = slurm.run("pgrep", "-f", ray_tmp, check=False).stdout.split()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes of the job outlived it: {left}"


def sigterm_the_batch_shell(slurm, tmp_path, after: str, db: Path) -> str:
    """Submit a 6-trial study (one at a time), send its batch shell SIGTERM once `after` is in the job's
    log, as `scancel --batch` does (and SLURM, 120 s before the time limit: study.sbatch's --signal), and
    return the log once the job has ended and its Ray is gone."""
    ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")
    submit = [sys.executable, ROOT / "cluster" / "slurm" / "submit.py",
              "nodes=1", "cpus_per_task=1", "time=00:10:00", f"output={tmp_path / 'study-%j.out'}",
              f"env.RAY_PORT={free_port()}", f"env.RAY_TEMP_DIR={ray_tmp}", "--",
              "batch_size=32,64", "lr_multiplier=0.5,1,2", "scaling.rule=linear", "warmup.epochs=0",
              *two_second_trials(TINY), "hydra.sweeper.report=false",  # 3 of 6 had ended at TINY's size
              "hydra.sweeper.resources.cpu=1", f"mlflow.tracking_uri=sqlite:///{db}"]
    proc = slurm.run(*submit, cwd=tmp_path, env=job_env(slurm), timeout=60, check=False)
    assert proc.returncode == 0 and "submitted job " in proc.stdout, proc.stdout + proc.stderr
    job = proc.stdout.split("submitted job ")[1].split(";")[0].strip()
    out = tmp_path / f"study-{job}.out"
    try:
        wait_until(lambda: out.exists() and after in out.read_text(), 240, f"'{after}' in the job's log")
        slurm.run("scancel", "--batch", "--signal=TERM", job)
        slurm.wait_job(job, timeout=120)
    finally:
        left = slurm.run("pgrep", "-f", ray_tmp, check=False).stdout.split()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes of the job outlived it: {left}"
    return out.read_text()


def test_a_sigterm_to_the_batch_shell_ends_the_study_interrupted_with_the_job_s_ray_up(slurm, tmp_path):
    """The shell hands the signal to the driver, which records the study interrupted, to be resumed.
    Before, bash held the signal until the study's end: the time limit then killed the job, Ray and the
    driver at once, and left the study's MLflow runs RUNNING."""
    db = tmp_path / "mlflow.db"
    log = sigterm_the_batch_shell(slurm, tmp_path, "done 1/6", db)
    assert "interrupted: run the same command with hydra.sweeper.resume=true" in log, log[-4000:]
    assert "scaling-study exited with 130" in log and "SIGTERM received" not in log, log[-4000:]
    _, studies, trials = study_records(f"sqlite:///{db}")
    assert (studies[0].info.status, studies[0].data.tags["trial.status"]) == ("KILLED", "interrupted")
    assert all(t.info.status != "RUNNING" for t in trials), [t.info.status for t in trials]
    assert sum(t.info.status == "FINISHED" for t in trials) < 6, [t.info.status for t in trials]


def test_a_sigterm_while_the_job_s_ray_starts_ends_the_job_before_the_study(slurm, tmp_path):
    """A signal sent as the job starts (a time limit shorter than --signal's 120 s sends it at once)."""
    log = sigterm_the_batch_shell(slurm, tmp_path, "ray head on", tmp_path / "mlflow.db")
    assert "SIGTERM while the job's Ray started: the study did not start" in log, log[-4000:]
    assert "scaling-study exited" not in log and not (tmp_path / "mlflow.db").exists(), log[-4000:]


def test_submit_hands_env_values_with_commas_to_the_job_whole(slurm, tmp_path):
    """sbatch splits --export's list at commas; env.* values reach study.sbatch whole (its setup line ends the job)."""
    value = "--min-worker-port=10002,--max-worker-port=10100"
    setup = 'echo "job sees RAY_START_ARGS=$RAY_START_ARGS"; exit 0'
    submit = [sys.executable, ROOT / "cluster" / "slurm" / "submit.py", "nodes=1", "cpus_per_task=1", "time=00:05:00",
              f"output={tmp_path / 'env-%j.out'}", f"env.RAY_START_ARGS={value}", f"env.SCALING_ENV_SETUP={setup}"]
    proc = slurm.run(*submit, cwd=tmp_path, env=job_env(slurm), timeout=60, check=False)
    assert proc.returncode == 0 and "submitted job " in proc.stdout, proc.stdout + proc.stderr
    job = proc.stdout.split("submitted job ")[1].split(";")[0].strip()
    assert slurm.wait_job(job, timeout=120) == "COMPLETED"
    assert f"job sees RAY_START_ARGS={value}\n" in (tmp_path / f"env-{job}.out").read_text()


def test_submit_hands_a_setup_line_with_shell_variables_to_the_job(slurm, tmp_path):
    """`${SLURM_JOB_ID}` in env.SCALING_ENV_SETUP is expanded by the job's shell (OmegaConf took it for its own)."""
    setup = 'echo "job ${SLURM_JOB_ID} sees ${RAY_TEMP_DIR}"; exit 0'
    submit = [sys.executable, ROOT / "cluster" / "slurm" / "submit.py", "nodes=1", "cpus_per_task=1", "time=00:05:00",
              f"output={tmp_path / 'setup-%j.out'}", "env.RAY_TEMP_DIR=/tmp/ray-${SLURM_JOB_ID}",
              f"env.SCALING_ENV_SETUP={setup}", "--", "hydra.sweeper.study_name=study-${oc.env:SLURM_JOB_ID}"]
    proc = slurm.run(*submit, cwd=tmp_path, env=job_env(slurm), timeout=60, check=False)
    assert proc.returncode == 0 and "submitted job " in proc.stdout, proc.stdout + proc.stderr
    job = proc.stdout.split("submitted job ")[1].split(";")[0].strip()
    assert slurm.wait_job(job, timeout=120) == "COMPLETED"
    assert f"job {job} sees /tmp/ray-${{SLURM_JOB_ID}}\n" in (tmp_path / f"setup-{job}.out").read_text()


def test_submitit_launcher_runs_the_plain_grid_as_slurm_jobs(slurm, tmp_path):
    import subprocess

    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    args = [str(BIN / "scaling-train"), "-m", "hydra/sweeper=basic", "hydra/launcher=slurm", "batch_size=32,64",
            *TINY, "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", "threads=1",
            f"mlflow.tracking_uri=sqlite:///{db}"]
    proc = subprocess.run(args, cwd=tmp_path, env=job_env(slurm), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Submitit 'slurm' sweep output dir" in proc.stdout + proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("scaling").experiment_id], max_results=100)
    assert sorted(r.data.params["batch_size"] for r in runs) == ["32", "64"]
    assert {r.data.tags["trial.status"] for r in runs} == {"completed"}
    # each trial ran as a task of one SLURM job array: submitit's folders are named <job>_<task>
    jobs = sorted(p.parent.name for p in tmp_path.glob("multirun/*/*/.submitit/*/*_log.out"))
    assert len(jobs) == 2 and all(re.fullmatch(r"\d+_\d+", j) for j in jobs), jobs
    # submitit returns once the tasks' results are written; SLURM may still show a task COMPLETING
    # (its epilog and cleanup) for a moment: wait for the final state, which must be COMPLETED
    assert [slurm.wait_job(j, timeout=60) for j in jobs] == ["COMPLETED"] * 2
