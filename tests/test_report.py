"""End to end: `scaling-report` on tiny real studies (real Hydra, Ray, MLflow), and the notebook on the same data.

The studies are built once per module by the real console script in a temporary folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from records import client_for

from scaling.plots import FIGURES

BIN = Path(sys.executable).parent
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "scaling_report.ipynb"
TABLES = ("summary", "lr_grid", "memory", "rules", "divergence", "trials")
TINY = ["eval_every=0.25", "data.n_samples=3000", "model.width=32"]
slow = pytest.mark.slow


def run_cli(args, cwd, script, timeout=300):
    """Run a console script in `cwd` with its output piped and COLUMNS=80, as CI and pytest often
    set it; return the CompletedProcess (text)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", "COLUMNS": "80"}
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def study_run(path: Path, name: str | None = None):
    """Return the (only, or named) study run in `path`'s store."""
    client = client_for(path)
    exp = client.get_experiment_by_name("scaling")
    runs = client.search_runs([exp.experiment_id], "tags.`scaling.kind` = 'study'")
    return next(r for r in runs if name is None or r.info.run_name == name)


def assert_one_error_line(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """3 batch sizes x 4 LR multipliers (the largest diverges at B=512), then `scaling-report` on it."""
    cwd = tmp_path_factory.mktemp("report")
    proc = run_cli(["-m", "batch_size=32,128,512", "lr_multiplier=0.25,1,4,64", "epochs=2", *TINY, "hydra.sweeper.report=false",
                    "target.metric=val/loss", "target.mode=min", "target.value=2.2"], cwd, "scaling-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = run_cli(["--out", "report", "--memory-budget", "50"], cwd, "scaling-report")
    return cwd, study_run(cwd), report


# ---------------------------------------------------------------- the report on a real study
@slow
def test_report_prints_the_per_batch_size_table_and_the_fits(tiny_study):
    _, run, proc = tiny_study
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr and not proc.stderr.strip(), proc.stderr[-2000:]
    assert f"Study {run.info.run_name}" in out and "Target: val/" in out
    assert "Per batch size" in out and all(f"│ {b:>5} │" in out for b in (32, 128, 512)), out[-3000:]
    assert "…" not in out, out[-3000:]  # piped, the tables take the width they need: no figure cut short
    for line in ("LR scaling: best LR ~ B^alpha", "Critical batch size: B_crit =", "B_simple: not logged",
                 "Recommendation: fastest to target within 50 MB", "Scaling rules"):
        assert line in out, out[-3000:]


@slow
def test_every_figure_and_table_is_written_and_logged_on_the_study_run(tiny_study):
    cwd, run, _ = tiny_study
    logged = {a.path: a.file_size for a in client_for(cwd).list_artifacts(run.info.run_id, "report")}
    for name in FIGURES:
        png = cwd / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
        assert logged.get(f"report/{name}.png", 0) > 10_000, f"{name}.png not logged: {sorted(logged)}"
    for name in TABLES:
        assert (cwd / "report" / f"{name}.csv").stat().st_size > 0
        assert logged.get(f"report/{name}.csv", 0) > 0, name


@slow
def test_summary_csv_has_one_row_per_batch_size_with_a_best_lr(tiny_study):
    import pandas as pd

    cwd, _, _ = tiny_study
    summary = pd.read_csv(cwd / "report" / "summary.csv")
    assert summary["batch_size"].tolist() == [32, 128, 512]
    assert summary["lr_refined"].gt(0).all() and summary["best"].lt(2.31).all()
    divergence = pd.read_csv(cwd / "report" / "divergence.csv").set_index("batch_size")
    assert divergence.loc[512, "diverges_at"] == pytest.approx(12.8)  # 0.05 x 64 x 512/128


def _report_interrupted(cwd: Path, out: str, when) -> subprocess.CompletedProcess:
    """Run `scaling-report --no-log --out <out>` in cwd and send it one SIGINT once `when()` is true."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([str(BIN / "scaling-report"), "--no-log", "--out", out], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not when() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@slow
def test_ctrl_c_while_the_report_starts_is_one_line_and_writes_nothing(tiny_study):
    """A Ctrl-C while scaling-report imports MLflow, pandas and matplotlib (scaling.interrupts): one
    line, exit 130, no traceback and no folder; unguarded it could land mid-import."""
    import time

    cwd, _, _ = tiny_study
    t0 = time.monotonic()
    proc = _report_interrupted(cwd, "early", lambda: time.monotonic() - t0 > 0.4)
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (
        130, "", "error: interrupted before the report was written: nothing was written"), proc.stderr[-2000:]
    assert not (cwd / "early").exists()


@slow
def test_ctrl_c_while_the_report_is_written_takes_effect_once_it_is_whole(tiny_study):
    """A Ctrl-C the moment the report's folder appears (figures and tables still to come) ends the command
    once every figure and table is written: before, it stopped between two figures, leaving some."""
    cwd, _, _ = tiny_study
    proc = _report_interrupted(cwd, "whole", (cwd / "whole").exists)
    assert proc.returncode == 130 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: interrupted", proc.stderr[-2000:]
    written = sorted(p.name for p in (cwd / "whole").iterdir())
    assert written == sorted(p.name for p in (cwd / "report").iterdir()), written
    for name in FIGURES:
        assert (cwd / "whole" / f"{name}.png").stat().st_size > 10_000, name


@slow
def test_report_finds_the_study_by_name_without_logging(tiny_study):
    cwd, run, _ = tiny_study
    proc = run_cli([run.info.run_name, "--no-log", "--out", "by_name"], cwd, "scaling-report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run.info.run_id in proc.stdout and (cwd / "by_name" / "lr_heatmap.png").exists()


@slow
def test_notebook_executes_against_the_study(tiny_study, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    cwd, run, _ = tiny_study
    monkeypatch.delenv("SCALING_TRACKING_URI", raising=False)  # the default: the store one folder up
    monkeypatch.setenv("SCALING_STUDY", run.info.run_id)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cwd / "notebooks").mkdir(exist_ok=True)  # Jupyter runs the kernel in the notebook's folder, not the study's
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(FIGURES)
    assert any(run.info.run_name in o.get("text", "") for o in outputs)


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])


@slow
def test_a_study_measures_the_noise_scale_at_every_batch_size_with_one_override(tmp_path):
    """gns.micro_batches=4 splits each batch size of the grid into 4 micro-batches: every trial logs
    gns/b_simple with its split, and the report puts B_simple per batch size beside B_crit."""
    proc = run_cli(["-m", "batch_size=32,128", "lr_multiplier=0.5,1", "epochs=1", *TINY, "gns.enabled=true",
                    "gns.micro_batches=4", "hydra.sweeper.asha.enabled=false"], tmp_path, "scaling-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("B_simple")]
    assert line.startswith("B_simple (gradient noise scale") and "32: " in line and "128: " in line, line
    client = client_for(tmp_path)
    trials = client.search_runs([client.get_experiment_by_name("scaling").experiment_id],
                                "tags.`scaling.kind` = 'trial'")
    assert len(trials) == 4
    for run in trials:
        b = int(run.data.params["batch_size"])
        assert run.data.params["derived.split"] == f"1x{b // 4}x4" and run.data.metrics["gns/b_simple"] > 0


# ---------------------------------------------------------------- bad input
def test_missing_store_is_one_line_and_creates_nothing(tmp_path):
    proc = run_cli(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"], tmp_path, "scaling-report")
    assert_one_error_line(proc, "no MLflow store")
    assert not (tmp_path / "none.db").exists()


@slow
def test_unknown_study_or_experiment_is_one_line(tiny_study):
    cwd, _, _ = tiny_study
    assert_one_error_line(run_cli(["no-such-study"], cwd, "scaling-report"), "no study 'no-such-study'", "latest studies")
    assert_one_error_line(run_cli(["--experiment", "nope"], cwd, "scaling-report"), "no experiment 'nope'")
    # a study recorded under another mlflow.experiment: the line names where it is
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    if client.get_experiment_by_name("elsewhere") is None:
        client.create_experiment("elsewhere")
    name = study_run(cwd).info.run_name
    assert_one_error_line(run_cli([name, "--experiment", "elsewhere"], cwd, "scaling-report"),
                          f"no study '{name}' in experiment 'elsewhere'", "it is in --experiment 'scaling'")
    assert_one_error_line(run_cli(["--memory-budget", "-3"], cwd, "scaling-report"), "must be positive")
    assert_one_error_line(run_cli(["--memory-budget", "inf"], cwd, "scaling-report"), "must be positive and finite")
    assert_one_error_line(run_cli(["--out", "/proc/nope/report"], cwd, "scaling-report"), "--out /proc/nope/report")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Three small studies in one store: no completed trial, one batch size (reported by the driver), target never met."""
    cwd = tmp_path_factory.mktemp("bad")
    studies = {
        "all-diverged": ["batch_size=32,64", "lr_multiplier=1000", "epochs=1", "hydra.sweeper.report=false"],
        "one-batch": ["batch_size=64", "lr_multiplier=0.5,2", "epochs=1", "hydra.sweeper.report=true"],
        "never-reached": ["batch_size=32,128,512", "lr_multiplier=1", "epochs=1", "target.value=0.99",
                          "hydra.sweeper.report=false"],
    }
    procs = {}
    for name, args in studies.items():
        procs[name] = run_cli(["-m", *args, *TINY, f"hydra.sweeper.study_name={name}"], cwd, "scaling-train")
        assert procs[name].returncode == 0, procs[name].stderr[-3000:]
    return cwd, procs


@slow
def test_a_study_without_completed_trials_is_one_line(bad):
    cwd, _ = bad
    proc = run_cli(["all-diverged", "--out", "r"], cwd, "scaling-report")
    assert_one_error_line(proc, "'all-diverged' has no completed trials (diverged 2): nothing to report")
    assert proc.returncode == 1 and not (cwd / "r").exists()


@slow
def test_one_batch_size_is_reported_by_the_driver_with_a_note(bad):
    cwd, procs = bad
    out = procs["one-batch"].stdout
    assert "Per batch size" in out and "note: one batch size (64): no scaling law and no critical batch size" in out
    assert "LR scaling: not fitted" in out and "Traceback" not in out + procs["one-batch"].stderr
    run = study_run(cwd, "one-batch")
    logged = {a.path for a in client_for(cwd).list_artifacts(run.info.run_id, "report")}
    assert {f"report/{f}.png" for f in FIGURES} <= logged


@slow
def test_a_target_never_reached_falls_back_to_a_common_target_and_says_so(bad):
    cwd, _ = bad
    proc = run_cli(["never-reached", "--out", "r2"], cwd, "scaling-report")
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert "note: the configured target val/acc >= 0.99 was never reached" in proc.stdout
    assert "(common)" in proc.stdout and "costs to target use val/acc >= " in proc.stdout
    assert "not reached" not in proc.stdout.split("Per batch size")[1].split("LR scaling")[0]
