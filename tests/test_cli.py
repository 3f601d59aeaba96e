"""The real `scaling-train` console script, end to end: MLflow records, multirun, and bad input."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.recorded import flatten, resolved_container

SCRIPT = Path(sys.executable).parent / "scaling-train"
pytestmark = pytest.mark.slow


def run(args, cwd, *, env_extra=None, timeout=240, module=False):
    """Run scaling-train (or `python -m scaling.train`) in `cwd`; return the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SCALING_PROGRESS")}
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "scaling.train"] if module else [str(SCRIPT)]
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_tiny(tiny):
    """The tiny overrides with MLflow on (the CLI's point is the record)."""
    return [o for o in tiny if not o.startswith("mlflow.enabled")]


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory) -> str:
    """One MLflow store for the module's later runs (each in its own experiment): creating the
    sqlite schema costs seconds on a loaded machine."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def search(uri: str, experiment: str):
    """Return the runs of `experiment` at `uri`, read back with mlflow.search_runs."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):  # not set_tracking_uri: the test process's global URI stays as it was
        return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_script_exists():
    assert SCRIPT.exists(), SCRIPT


def test_chdir_run_records_into_the_launch_folders_store(tmp_path, cli_tiny):
    """hydra.job.chdir=true runs in outputs/<date>/<time>/; the default sqlite:///mlflow.db still
    means the launch folder, as every other command reads it."""
    args = [a for a in cli_tiny if not a.startswith("mlflow.")] + ["hydra.job.chdir=true", "mlflow.experiment=chdir"]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "mlflow.db").exists() and not list((tmp_path / "outputs").rglob("mlflow.db"))
    [r] = search(f"sqlite:///{tmp_path / 'mlflow.db'}", "chdir")
    assert r.info.status == "FINISHED" and f"at sqlite:///{tmp_path}/mlflow.db" in proc.stdout
    # its artifacts lie beside that database too, not under the run folder the job ran in
    assert (tmp_path / "mlruns" / "chdir" / r.info.run_id / "artifacts" / "config.yaml").is_file()
    assert not list((tmp_path / "outputs").rglob("mlruns"))


def test_train_end_to_end(tmp_path, cli_tiny, tracking_uri, compose_cfg):
    from mlflow.tracking import MlflowClient

    args = [*cli_tiny, f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=e2e"]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "INFO mlflow.store.db.utils" not in proc.stderr  # creating the new store says nothing
    [end] = [line for line in proc.stdout.splitlines() if line.startswith("trial ")]
    assert end.startswith("trial completed") and "val/acc=" in end
    run_id = re.search(r"mlflow run ([0-9a-f]{32}) in 'e2e'", end).group(1)

    [r] = search(tracking_uri, "e2e")
    assert r.info.run_id == run_id and r.info.status == "FINISHED"

    # params: every resolved config key, plus the derived LR values
    cfg = compose_cfg(*args)
    expected = {k: "null" if v is None else str(v) for k, v in flatten(resolved_container(cfg)).items()}
    params = r.data.params
    missing = set(expected) - set(params)
    assert not missing, missing
    assert {k: params[k] for k in expected} == expected
    assert float(params["lr.effective"]) == pytest.approx(0.05 * 32 / 128)
    assert params["batch_size"] == "32" and params["data.cache_dir"] == os.environ["SCALING_CACHE"]

    # tags: status and provenance
    tags = r.data.tags
    assert tags["trial.status"] == "completed"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git.revision"])
    import torch

    assert tags["version.torch"] == torch.__version__

    # metrics: MLflow's step is samples seen
    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(run_id, "val/loss")
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)) and len(steps) == 2
    assert all(s > 0 and s % 32 == 0 for s in steps)
    assert steps[-1] == 1600 // 32 * 32
    for m in client.get_metric_history(run_id, "samples"):
        assert m.value == m.step
    best = [m.step for m in client.get_metric_history(run_id, "best/val_loss")]
    assert best == sorted(set(best)), f"the summary doubled the last point: {best}"
    assert r.data.metrics["val/acc"] > 0
    assert "mem/peak_mb" in r.data.metrics

    # the resolved config as an artifact
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    from omegaconf import OmegaConf

    logged = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert OmegaConf.to_container(logged) == resolved_container(cfg)


def test_python_m_scaling_train(tmp_path, cli_tiny, shared_uri):
    proc = run([*cli_tiny, f"mlflow.tracking_uri={shared_uri}", "mlflow.experiment=module"], tmp_path,
               module=True)
    assert proc.returncode == 0, proc.stderr
    assert "trial completed" in proc.stdout
    [r] = search(shared_uri, "module")
    assert r.data.tags["trial.status"] == "completed" and r.info.run_id in proc.stdout


def test_a_single_run_of_a_preset_says_its_grid_was_not_run(tmp_path, cli_tiny):
    """Hydra applies a preset's hydra.sweeper.params only to a multirun: one trial ran, silently."""
    proc = run(["experiment=optimizers", *cli_tiny, "mlflow.enabled=false"], tmp_path)
    assert proc.returncode == 0 and "trial completed" in proc.stdout, proc.stderr[-2000:]
    assert "note: experiment=optimizers defines a grid over optimizer, batch_size, lr_multiplier; this is one " \
           "trial of it: add -m (or run scaling-study) for the grid" in proc.stdout
    proc = run([*cli_tiny, "mlflow.enabled=false"], tmp_path)
    assert proc.returncode == 0 and "note:" not in proc.stdout


def test_basic_sweeper_multirun(tmp_path, cli_tiny, shared_uri):
    grid = [o for o in cli_tiny if not o.startswith("batch_size=")]
    proc = run(["-m", "batch_size=32,64", "lr_multiplier=0.5,1", "hydra/sweeper=basic", *grid,
                f"mlflow.tracking_uri={shared_uri}", "mlflow.experiment=grid"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("trial completed") == 4
    runs = search(shared_uri, "grid")
    points = sorted((r.data.params["batch_size"], r.data.params["lr_multiplier"]) for r in runs)
    assert points == [("32", "0.5"), ("32", "1.0"), ("64", "0.5"), ("64", "1.0")]
    assert all(r.data.tags["trial.status"] == "completed" for r in runs)


BAD = [
    (["batch_size=-1"], ["batch_size", "-1"]),
    (["batch_size=abc"], ["batch_size", "abc"]),
    (["batchsize=3"], ["batchsize"]),
    (["optimizer=foo"], ["optimizer", "foo"]),
    (["batch_size=32", "micro_batch_size=3"], ["micro_batch_size", "3"]),
    (["eval_every=5", "epochs=1"], ["eval_every", "5"]),
    (["target.metric=val/f1"], ["target.metric", "val/f1"]),
    (["mlflow.tracking_uri=http://127.0.0.1:9"], ["mlflow.tracking_uri", "http://127.0.0.1:9"]),
]


def _leftovers(cwd: Path) -> list[str]:
    return sorted(p.name for p in cwd.iterdir())


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line(tmp_path, args, words):
    # the default tracking URI is sqlite:///mlflow.db in the cwd: nothing may appear there
    proc = run(args, tmp_path, timeout=60)
    assert proc.returncode == 2  # a usage error, as documented in scaling.cli
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip("\n").split("\n")
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for word in words:
        assert word in lines[0], lines[0]
    assert _leftovers(tmp_path) == []  # no outputs/, multirun/, mlflow.db, mlruns/


@pytest.mark.parametrize("args", [["batch_size=-1"], ["batch_size=abc"], ["optimizer=foo"]])
def test_hydra_full_error_shows_traceback(tmp_path, args):
    proc = run(args, tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"}, timeout=60)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert _leftovers(tmp_path) == []


def test_ctrl_c_while_a_single_run_starts_is_one_line_and_leaves_nothing(tmp_path, cli_tiny):
    """A Ctrl-C during the imports and the command line's checks (scaling.interrupts): one line, exit
    130, no traceback and nothing written; before, Python's KeyboardInterrupt could land mid-import."""
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SCALING_PROGRESS")}
    proc = subprocess.Popen([str(SCRIPT), *cli_tiny], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # importing, before Hydra's output folder (~1 s here)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err.strip()) == (130, "", "error: interrupted before the run started: "
                                                              "nothing was recorded"), err[-2000:]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("sig, command", [(signal.SIGINT, [str(SCRIPT)]), (signal.SIGTERM, [str(SCRIPT)]),
                                          (signal.SIGTERM, [sys.executable, "-m", "scaling.train"])],
                         ids=["ctrl-c", "sigterm", "sigterm-python-m"])
def test_ctrl_c_mid_run_ends_its_mlflow_run_killed_and_interrupted(tmp_path, cli_tiny, sig, command):
    """A single run stopped by Ctrl-C stayed RUNNING with trial.status=running for ever in MLflow; so did
    one sent SIGTERM, which ended the process at once. The signal can land inside an MLflow write, whose
    SQLite lock then failed the run's last writes ("database is locked"): test_interrupts shows that case.
    `python -m scaling.train` skipped the console script's guard, so a SIGTERM still ended it at once."""
    from procs import interrupt_once_recorded

    args = [a for a in cli_tiny if not a.startswith(("epochs=", "eval_every=", "data.n_samples="))]
    args += ["epochs=500", "eval_every=0.5", "data.n_samples=3000", "mlflow.experiment=ctrl-c"]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SCALING_PROGRESS")}
    proc = subprocess.Popen([*command, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    db = tmp_path / "mlflow.db"  # interrupted once the run has logged an evaluation
    out, err = interrupt_once_recorded(proc, db, "select count(*) from metrics where key = 'val/loss'", sig=sig)
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted", err[-2000:]
    [run] = search(f"sqlite:///{db}", "ctrl-c")
    assert (run.info.status, run.data.tags["trial.status"], run.data.tags["trial.reason"]) == \
        ("KILLED", "interrupted", "Ctrl-C" if sig == signal.SIGINT else "SIGTERM")
    assert 0 < run.data.metrics["epoch"] < 500


@pytest.mark.parametrize("nohup", [False, True], ids=["hang-up", "nohup"])
def test_a_terminal_hang_up_mid_run_ends_its_run_interrupted_unless_started_under_nohup(tmp_path, cli_tiny, nohup):
    """The terminal a run prints to hangs up (an SSH connection lost, a window closed): SIGHUP ended the
    process at once, its MLflow run left RUNNING for ever. Now it is a Ctrl-C, recorded as SIGHUP, and
    what is still printed goes nowhere. `nohup` ignores SIGHUP, and so does the run started under it:
    it trains on, until a SIGTERM ends it."""
    from procs import Terminal, wait_until_recorded

    args = [a for a in cli_tiny if not a.startswith(("epochs=", "eval_every=", "data.n_samples="))]
    args += ["epochs=500", "eval_every=0.5", "data.n_samples=3000", "mlflow.experiment=hang-up"]
    term = Terminal([*(["nohup"] if nohup else []), SCRIPT, *args], tmp_path, {"HYDRA_FULL_ERROR": "0"})
    db = tmp_path / "mlflow.db"
    try:
        wait_until_recorded(term.proc, db, "select count(*) from metrics where key = 'val/loss'")
        term.hang_up()
        if nohup:
            with pytest.raises(subprocess.TimeoutExpired):
                term.proc.wait(timeout=3)
            term.proc.send_signal(signal.SIGTERM)
        assert term.proc.wait(timeout=60) == 130, term.text()[-2000:]
    finally:
        term.hang_up()
        term.proc.kill()
    [run] = search(f"sqlite:///{db}", "hang-up")
    assert (run.info.status, run.data.tags["trial.status"], run.data.tags["trial.reason"]) == \
        ("KILLED", "interrupted", "SIGTERM" if nohup else "SIGHUP")
    assert 0 < run.data.metrics["epoch"] < 500
