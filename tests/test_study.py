"""End to end: the study is a Hydra multirun on Ray Tune with stratified ASHA, recorded in MLflow.

Every test drives the real console script in a subprocess (real Hydra, real Ray bound to
127.0.0.1, real MLflow on a temporary SQLite file) at tiny sizes.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from procs import stop_group, two_second_trials, wait_for_text
from records import client_for, evaluated_samples, study_records

from scaling.tracking import UI_COMMAND

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = ["epochs=1", "eval_every=0.25", "data.n_samples=3000", "model.width=32",
        "hydra.sweeper.asha.grace_period=0.25", "hydra.sweeper.report=false"]


def run_cli(args, cwd, script="scaling-train", timeout=240, extra_env=None, **kw):
    """Run a console script in `cwd` with its output piped and COLUMNS=80, as CI and pytest often set
    it (and `extra_env`); return the CompletedProcess (text)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", "COLUMNS": "80", **(extra_env or {})}
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def study_runs(path: Path):
    """Return (study runs, trial runs) of the default experiment in `path`'s store."""
    return study_records(f"sqlite:///{path / 'mlflow.db'}")[1:]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """2 batch sizes x 4 LR multipliers, one trial at a time (in the sweeper's seeded shuffled order)."""
    cwd = tmp_path_factory.mktemp("study")
    proc = run_cli(["-m", "batch_size=32,256", "lr_multiplier=1,2,0.01,0.003", "hydra.sweeper.max_concurrent=1",
                    *TINY], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_study_records_one_parent_and_a_child_per_trial(small_study):
    cwd, proc = small_study
    studies, trials = study_runs(cwd)
    assert len(studies) == 1 and len(trials) == 8
    study = studies[0]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {study.info.run_id}
    # what produced each trial's numbers, as on the study run (the README's promise for every trial run)
    assert all(t.data.tags["git.revision"] == study.data.tags["git.revision"] and "version.torch" in t.data.tags
               for t in trials)
    assert study.data.tags["trial.status"] == "completed"
    assert study.data.metrics["trials/total"] == 8
    assert '"batch_size": ["32", "256"]' in study.data.params["grid"]
    # the Hydra sweep folder it names exists, with multirun.yaml as Hydra's own sweeper writes it
    multirun = OmegaConf.load(Path(study.data.tags["scaling.sweep_dir"]) / "multirun.yaml")
    assert "batch_size=32,256" in multirun.hydra.overrides.task and multirun.hydra.mode == "MULTIRUN"
    # the last line opens the study run: `mlflow ui` over this store (as tests/test_mlflow_ui.py runs it), then its page
    page = f"http://127.0.0.1:5000/#/experiments/{study.info.experiment_id}/runs/{study.info.run_id}"
    assert proc.stdout.strip().splitlines()[-1] == f"{UI_COMMAND} --backend-store-uri sqlite:///mlflow.db   # then open {page}"
    names = {t.info.run_name for t in trials}
    assert "bs=32 lr×0.01 linear s0" in names


def test_every_batch_size_keeps_a_full_budget_trial_and_asha_prunes(small_study):
    cwd, _ = small_study
    _, trials = study_runs(cwd)
    statuses = [t.data.tags["trial.status"] for t in trials]
    assert "pruned" in statuses
    def at_budget(t) -> bool:  # 1 epoch of 2,400 samples: 75 steps of 32, 9 of 256 (0.96 epoch)
        return t.data.metrics.get("step") == int(t.data.params["derived.total_steps"])

    for bs in ("32", "256"):
        full = [t for t in trials if t.data.params["batch_size"] == bs and at_budget(t)]
        assert full, f"batch size {bs} lost every trial before the full budget"
        assert all(t.data.tags["trial.status"] == "completed" for t in full)
    pruned = [t for t in trials if t.data.tags["trial.status"] == "pruned"]
    assert pruned and not any(at_budget(t) for t in pruned)
    assert all(t.data.metrics["epoch"] < 0.96 for t in pruned)


def test_metric_step_axis_is_samples_seen(small_study):
    cwd, _ = small_study
    _, trials = study_runs(cwd)
    client = client_for(cwd)
    for t in trials:
        bs = int(t.data.params["batch_size"])
        hist = client.get_metric_history(t.info.run_id, "val/loss")
        steps = [m.step for m in hist]
        assert steps == sorted(set(steps)), "a metric point was logged twice"
        assert all(s % bs == 0 and s > 0 for s in steps)
        samples = {m.step: m.value for m in client.get_metric_history(t.info.run_id, "samples")}
        assert all(samples[s] == s for s in steps)
        if t.data.tags["trial.status"] == "completed":  # every evaluation, including those a trial
            total = int(t.data.params["derived.total_steps"])  # held back from Tune between rungs
            spe = float(t.data.params["derived.steps_per_epoch"])
            assert steps == evaluated_samples(bs, spe, total), (bs, steps)


def test_short_trials_skip_checkpoints_younger_than_the_interval(small_study, tmp_path):
    """Sub-second trials under the default 10 s interval save none; interval 0 saves one per evaluation."""
    cwd, _ = small_study
    assert list(cwd.glob(".studies/*/tune-0/trial_*/")) and not list(cwd.glob(".studies/*/tune-0/trial_*/checkpoint_*"))
    proc = run_cli(["-m", "batch_size=256", "hydra.sweeper.checkpoint_interval_s=0", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = list(tmp_path.glob(".studies/*/tune-0/trial_00000/checkpoint_*"))
    # 9.375 steps of 256 per epoch, 9 trained, evaluations at steps 2, 5, 7 and 9: four checkpoints, the newest kept
    assert len(kept) == 1 and kept[0].name == "checkpoint_000003", kept


def test_bare_multirun_sweeps_only_the_given_axes(tmp_path):
    proc = run_cli(["-m", "batch_size=32,64", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert len(trials) == 2
    assert {t.data.params["lr_multiplier"] for t in trials} == {"1.0"}
    assert {t.data.params["scaling.rule"] for t in trials} == {"linear"}


MIXED = ("note: ASHA compares trials of different batch sizes at each rung (hydra.sweeper.asha.stratified=false): "
         "a batch size can be pruned whole; add batch_size to group_by for the best LR of each batch size")


@pytest.mark.parametrize("asha, strata, note", [([], '["batch_size"]', False),
                                                (["hydra.sweeper.asha.stratified=false"], "[]", True),
                                                (["hydra.sweeper.asha.enabled=false"], "[]", False)])
def test_the_study_run_records_the_strata_asha_judged_within(tmp_path, asha, strata, note):
    """An unstratified ASHA (or none) was recorded with strata ["batch_size"]. One that compares batch
    sizes says so at the start."""
    proc = run_cli(["-m", "batch_size=32,64", "lr_multiplier=0.5,1", *asha, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, _ = study_runs(tmp_path)
    assert studies[0].data.params["strata"] == strata
    assert (MIXED in proc.stdout) == note, proc.stdout[-3000:]


@pytest.mark.parametrize("grid", ["hydra.sweeper.params.batch_size='32,64'", "+hydra.sweeper.params.batch_size='32,64'",
                                  "hydra.sweeper.params={batch_size:'32,64'}"], ids=["key", "plus", "dict"])
def test_a_grid_given_in_hydra_sweeper_params_on_the_command_line_runs(tmp_path, grid):
    """hydra.sweeper.params was null, so no axis could be set under it from the shell."""
    proc = run_cli(["-m", grid, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert len(studies) == 1 and len(trials) == 2
    assert sorted(t.data.params["batch_size"] for t in trials) == ["32", "64"]
    assert '"batch_size": ["32", "64"]' in studies[0].data.params["grid"]


@pytest.mark.parametrize("where", ["preset", "shell"])
def test_a_list_in_hydra_sweeper_params_sweeps_its_values(tmp_path, where):
    """A list (a preset's `batch_size: [32, 64]`) was merged as one value and ended in a garbled line."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "listy.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n      batch_size: [32, 64]\n")
    grid = ["-cd", str(tmp_path / "conf"), "experiment=listy"] if where == "preset" else \
        ["hydra.sweeper.params.batch_size=[32,64]"]
    proc = run_cli(["-m", *grid, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert len(studies) == 1 and sorted(t.data.params["batch_size"] for t in trials) == ["32", "64"]


def test_resume_finds_its_study_in_any_order_and_refuses_a_store_without_it(small_study, tmp_path):
    """A resume finds the study by its name (its points, whatever the order of the fixed overrides), then
    reopens its MLflow run: in another experiment, or in a store that lost it, the resume would find none
    of its trials and run them all again under a run it cannot reopen. One line, and nothing made."""
    work = tmp_path / "copy"
    shutil.copytree(small_study[0], work)  # the finished study: its store and its state in .studies
    (name,) = [p.name for p in (work / ".studies").iterdir()]
    resume = ["-m", "batch_size=32,256", "lr_multiplier=1,2,0.01,0.003", *reversed(TINY),
              "hydra.sweeper.max_concurrent=1", "hydra.sweeper.resume=true"]
    proc = run_cli(resume, work, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming study {name} " in proc.stdout and "8/8 trials already finished" in proc.stdout

    proc = run_cli([*resume, "mlflow.experiment=elsewhere", f"hydra.sweeper.study_name={name}"], work, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: mlflow.experiment='elsewhere'") and "mlflow.experiment=scaling" in lines[0]
    assert "elsewhere" not in {e.name for e in client_for(work).search_experiments()}

    # its name with another grid: trials are matched by index, so bs=128's trial 0 would pass for bs=32's
    other = ["-m", "batch_size=32,128", "lr_multiplier=1,2,0.01,0.003", *TINY, "hydra.sweeper.resume=true"]
    proc = run_cli([*other, f"hydra.sweeper.study_name={name}"], work, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: hydra.sweeper.resume=True: study {name} was started with another grid")
    assert len(study_runs(work)[1]) == 8

    (work / "mlflow.db").unlink()
    proc = run_cli(resume, work, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: hydra.sweeper.resume=True: the study's MLflow run ") and \
        "cannot be read: mlflow.tracking_uri=sqlite:///mlflow.db names no existing store" in lines[0], lines[0]
    assert not (work / "mlflow.db").exists(), "an empty store was created in its place"


def test_resume_after_driver_kill_finishes_without_duplicates(tmp_path):
    """Kill the driver twice mid-study (each time after one more trial finished), then finish it."""
    args = ["-m", "batch_size=32,256", "lr_multiplier=0.5,1,2", *TINY]
    finished = 1  # kill the first attempt once 2 trials are done; each resume, once one more is
    for attempt in range(2):
        log = tmp_path / f"attempt{attempt}.log"
        extra = ["hydra.sweeper.resume=true"] if attempt else []
        with open(log, "w") as out:
            proc = subprocess.Popen([str(BIN / "scaling-train"), *args, *extra], cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                if attempt:  # the kill may land after more trials ended than the marker said
                    wait_for_text(log, "trials already finished", proc, timeout=180)
                    finished = int(re.search(r"(\d+)/6 trials already finished", log.read_text()).group(1))
                if finished + 1 < 6:
                    wait_for_text(log, f"done {finished + 1}/6", proc, timeout=180)
            finally:
                stop_group(proc)  # the driver and the Ray processes it started, nothing else
    proc = run_cli([*args, "hydra.sweeper.resume=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resuming study" in proc.stdout
    done_before = re.search(r"(\d+)/6 trials already finished", proc.stdout).group(1)
    assert f"ASHA: rung values of {done_before} finished trials restored" in proc.stdout, proc.stdout[-2000:]
    studies, trials = study_runs(tmp_path)
    assert len(studies) == 1 and len(trials) == 6, "a resume created duplicate runs"
    assert studies[0].data.tags["trial.status"] == "completed"
    assert sum(studies[0].data.metrics[f"trials/{s}"] for s in ("completed", "pruned")) == 6
    client = client_for(tmp_path)
    for t in trials:
        assert t.data.tags["trial.status"] in ("completed", "pruned")
        assert float(t.data.params["lr.effective"]) > 0, f"{t.info.run_name}: params lost to the kill"
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "val/loss")]
        assert steps == sorted(set(steps)), f"{t.info.run_name}: doubled points {steps}"
        if t.data.tags["trial.status"] == "completed":
            bs = int(t.data.params["batch_size"])
            spe = 2400 / bs  # one epoch of the 80% training split, to the nearest step
            expected = evaluated_samples(bs, spe, round(spe))
            assert steps == expected, f"{t.info.run_name}: lost points {steps} != {expected}"


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_ends_a_study_as_interrupted_and_a_resume_finishes_it(tmp_path, stop):
    """Ray Tune takes the first Ctrl-C itself and returns from fit() as if the run had ended: the study
    was recorded FINISHED and 'completed', exited 0, and the trial it stopped stayed RUNNING.
    A SIGTERM is a Ctrl-C too: before, one to the driver printed Ray's stack dump and exited with the
    study's and its trials' runs RUNNING. It goes to the whole process group here (`kill -TERM -- -<pgid>`,
    what a supervisor sends), which holds the driver, not its local Ray (scaling.local_ray._own_session):
    before, the group's SIGTERM stopped Ray under the driver, which waited Ray's 60 s for its GCS and
    exited 1 with those runs RUNNING."""
    # the signal at the first trial's end finds ~7 s of the study left
    args = ["-m", "batch_size=32,256", "lr_multiplier=0.5,1,2", "hydra.sweeper.max_concurrent=1",
            *two_second_trials(TINY)]
    log = tmp_path / "attempt.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "scaling-train"), *args], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for_text(log, "done 1/6", proc, timeout=180)
            # a terminal's Ctrl-C goes to the whole foreground group; so does this SIGTERM
            os.killpg(proc.pid, signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
            assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
        finally:
            stop_group(proc)
    text = log.read_text()
    assert "interrupted: run the same command with hydra.sweeper.resume=true" in text and "Traceback" not in text
    assert "SIGTERM received" not in text, text[-3000:]
    studies, trials = study_runs(tmp_path)
    assert (studies[0].info.status, studies[0].data.tags["trial.status"]) == ("KILLED", "interrupted")
    # some trial is left to train (the last one may have started before the signal, and ends KILLED)
    assert sum(t.info.status == "FINISHED" for t in trials) < 6, [t.info.status for t in trials]
    assert all(t.info.status != "RUNNING" for t in trials), [t.info.status for t in trials]
    # a trial it stopped (when one ran at the Ctrl-C) reads interrupted, in its run and in the summary's table
    statuses = [(t.info.status, t.data.tags["trial.status"]) for t in trials]
    assert all(tag == "interrupted" for run, tag in statuses if run == "KILLED"), statuses
    assert all(tag != "running" for _, tag in statuses), statuses
    assert "running" not in text.split("best trial per batch size")[-1].split("trials in")[0], text[-3000:]
    proc = run_cli([*args, "hydra.sweeper.resume=true"], tmp_path)
    assert proc.returncode == 0 and "resuming study" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    studies, trials = study_runs(tmp_path)
    assert (studies[0].info.status, studies[0].data.tags["trial.status"]) == ("FINISHED", "completed")
    assert len(trials) == 6 and all(t.info.status == "FINISHED" for t in trials)


def test_a_terminal_hang_up_ends_a_study_as_interrupted(tmp_path):
    """The terminal a study runs in from a shell hangs up (an SSH connection lost): the shell dies of its
    SIGHUP and the kernel sends one to the foreground process group, the study's. That SIGHUP ended the
    driver at once, and stopped the local Ray that shared its group, every run left RUNNING. Now Ray is
    in a session of its own and the driver takes the signal as a Ctrl-C. (The resume after it is the
    Ctrl-C test's, above.)"""
    import psutil
    from procs import Terminal

    args = ["-m", "batch_size=32,256", "lr_multiplier=0.5,1,2", "hydra.sweeper.max_concurrent=1",
            *two_second_trials(TINY)]
    # `; exit`: the shell stays the study's parent, as a login shell does, rather than exec it
    term = Terminal(["sh", "-c", '"$@"; exit', "sh", BIN / "scaling-train", *args], tmp_path)
    try:
        deadline = time.monotonic() + 180
        while "done 1/6" not in term.text() and term.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "done 1/6" in term.text(), term.text()[-3000:]
        [driver] = psutil.Process(term.proc.pid).children()
        term.hang_up()
        assert term.proc.wait(timeout=60) == -signal.SIGHUP  # the shell, as by default
        driver.wait(timeout=120)
    finally:
        term.hang_up()
        stop_group(term.proc)
    studies, trials = study_runs(tmp_path)
    assert (studies[0].info.status, studies[0].data.tags["trial.status"]) == ("KILLED", "interrupted")
    assert sum(t.info.status == "FINISHED" for t in trials) < 6, [t.info.status for t in trials]
    statuses = [(t.info.status, t.data.tags["trial.status"]) for t in trials]
    assert all(run != "RUNNING" and tag != "running" for run, tag in statuses), statuses


@pytest.mark.parametrize("after_s", [0.3, 1.5, 2.5])
def test_ctrl_c_while_a_study_starts_is_one_line_and_leaves_nothing(tmp_path, after_s):
    """Before its MLflow run exists (imports, Hydra, Ray's start, the store's creation) a Ctrl-C printed
    a traceback, and could leave a half-migrated mlflow.db or Ray's agents behind; in CI one landed in
    an import's lock callback, was lost, and the driver hung (scaling.interrupts). 0.3 s is Python's and
    Hydra's imports, 1.5 s torch's and the grid's checks, 2.5 s Ray's start and MLflow's import."""
    proc = subprocess.Popen([str(BIN / "scaling-train"), "-m", "batch_size=32,256", *TINY], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"})
    try:
        time.sleep(after_s)  # the study line comes after ~4 s here
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        stop_group(proc)
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-3000:]
    assert lines == ["error: interrupted before the study started: nothing was recorded"], err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_while_the_report_is_built_ends_with_the_study_recorded(tmp_path):
    """The report comes ~2 s after the summary here. Ray Tune left its SIGINT handler after the trials
    had ended, so a Ctrl-C there set a flag nothing read and the report went on; a second raised in
    the sweeper, which said nothing was recorded. Now the study run is complete and the line says so."""
    args = [a for a in TINY if a != "hydra.sweeper.report=false"]
    proc = subprocess.Popen([str(BIN / "scaling-train"), "-m", "batch_size=32,256", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"})
    watchdog = threading.Timer(240, stop_group, (proc,))  # a study that hangs without printing
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if " trials in " in line:  # the summary's last line: the report is next
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, err = proc.communicate(timeout=60)
        out = "".join(seen) + out
    finally:
        watchdog.cancel()
        stop_group(proc)
    studies, trials = study_runs(tmp_path)
    run_id = studies[0].info.run_id
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-3000:]
    assert f"error: interrupted after the study was recorded: scaling-report {run_id} prints its summary " \
           "and report" in err.splitlines(), err[-2000:]
    assert "Figures and tables" not in out and "resume" not in out + err, out[-2000:]
    assert (studies[0].info.status, studies[0].data.tags["trial.status"]) == ("FINISHED", "completed")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)


@pytest.mark.parametrize("stuck", ["", "import atexit, time; atexit.register(time.sleep, 600)"],
                         ids=["ray-start-never-ends", "and-an-exit-handler-blocks"])
def test_ctrl_c_whose_ray_start_never_finishes_still_ends_the_driver(stuck):
    """A Ctrl-C mid-import can leave the module's import lock held, and Ray's start thread, importing
    aiohttp for the raylet, then waits on it forever: the driver waited for that start with no bound
    and never exited (seen under load at ~2 s). A start that never ends is a Future never set. Ray's
    exit handler (ray.shutdown, which imports first) can block on the same lock: CI saw the driver
    hang past 120 s with the start's wait bounded, so the exit handlers are not run either."""
    code = (f"{stuck}\n"
            "from concurrent.futures import Future\n"
            "from scaling.sweeper import _interrupted\n"
            "_interrupted(Future())\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: interrupted before the study started: nothing was recorded"


@pytest.mark.parametrize("args, key", [
    (["batch_size=32,-1"], "batch_size"),
    (["batch_sise=32,64"], "batch_sise"),
    (["batch_size=range(5,5)"], "batch_size"),
    (["batch_size=32,64", "hydra.sweeper.asha.grace_period=2"], "grace_period"),
    (["batch_size=32,64", "hydra.sweeper.resources.gpu=1"], "resources.gpu"),
    (["batch_size=32,64", "mlflow.tracking_uri=http://127.0.0.1:9"], "mlflow.tracking_uri"),
    (["batch_size=32,64", "hydra.sweeper.study_name=../escape"], "study_name"),
    (["batch_size=32,64", "hydra.sweeper.ray.address=127.0.0.1:1"], "ray.address"),
    (["batch_size=32,64", "hydra.sweeper.ray.num_cpus=0"], "hydra.sweeper.ray.num_cpus=0"),
    (["batch_size=32,64", "hydra.sweeper.ray.num_gpus=-1"], "hydra.sweeper.ray.num_gpus=-1"),
    (["batch_size=32,64", "hydra.sweeper.ray.address=auto", "hydra.sweeper.ray.num_cpus=2"],
     "hydra.sweeper.ray.num_cpus=2: sizes a local Ray only"),
    (["batch_size=32,64", "hydra.sweeper.storage_path=/proc/no/such"], "storage_path"),
    (["batch_size=32,64", "hydra.sweeper.max_trials=1"], "max_trials"),
    (["batch_size=32,64", "hydra.sweeper.checkpoint_interval_s=-1"], "checkpoint_interval_s"),
    (["batch_size=32,64", "mlflow.enabled=true,false"], "mlflow.enabled"),
    (["batch_size=32,64", "mlflow.enabled=false", "hydra.sweeper.resume=true"], "hydra.sweeper.resume"),
])
def test_bad_study_input_is_one_line_and_leaves_nothing(tmp_path, args, key):
    proc = run_cli(["-m", *args, "epochs=1", "data.n_samples=3000"], tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow store was created for a rejected study"


def test_basic_sweeper_with_joblib_launcher_records_one_run_per_job(tmp_path):
    """The plain grid without Ray: Hydra's basic sweeper, jobs in 2 joblib processes, one writer each."""
    proc = run_cli(["-m", "hydra/sweeper=basic", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    "batch_size=32,64", "lr_multiplier=0.5,1", "epochs=0.5", "eval_every=0.25",
                    "data.n_samples=3000", "model.width=32", "threads=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    assert studies == [] and len(trials) == 4
    assert {(t.data.params["batch_size"], t.data.params["lr_multiplier"]) for t in trials} == \
        {("32", "0.5"), ("32", "1.0"), ("64", "0.5"), ("64", "1.0")}
    assert all(t.data.tags["trial.status"] == "completed" for t in trials)


def test_ref_lr_auto_runs_the_range_test_first_and_trials_use_it(tmp_path):
    """One range test for every seed: seeds of a grid point train the same LRs, so the report pools them."""
    proc = run_cli(["-m", "batch_size=32,128", "seed=0,1", "scaling.ref_lr=auto", "lr_find.num_iters=40",
                    "hydra.sweeper.asha.enabled=false", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    studies, trials = study_runs(tmp_path)
    chosen = float(studies[0].data.tags["scaling.ref_lr_auto"])
    assert proc.stdout.count("chose ref_lr=") == 1 and f"chose ref_lr={chosen:.4g}" in proc.stdout
    assert sorted(t.data.params["seed"] for t in trials) == ["0", "0", "1", "1"]
    assert "lr_find.png" in {a.path for a in client_for(tmp_path).list_artifacts(studies[0].info.run_id)}
    for t in trials:
        assert float(t.data.params["scaling.ref_lr"]) == pytest.approx(chosen)
        bs = int(t.data.params["batch_size"])
        assert float(t.data.params["lr.effective"]) == pytest.approx(chosen * bs / 128)


def test_trials_whose_own_range_test_sets_their_lr_record_the_lr_they_trained(tmp_path):
    """schedule.from_lr_find: each trial's LR comes from a test at its batch size, run in the trial; its
    lr.effective and lr.base (what the report reads) were the rule's from the config, not the LR trained."""
    proc = run_cli(["-m", "batch_size=32,128", "schedule=onecycle", "schedule.from_lr_find=true",
                    "lr_find.num_iters=40", "hydra.sweeper.asha.enabled=false", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, trials = study_runs(tmp_path)
    rows = {line.split("│")[1].strip(): float(line.split("│")[2]) for line in proc.stdout.splitlines()
            if line.startswith("│")}
    for t in trials:
        p = t.data.params
        assert float(p["lr.effective"]) == pytest.approx(float(p["derived.lr"]), rel=1e-12)  # the loop's own LR
        assert float(p["lr.base"]) == pytest.approx(float(t.data.tags["lr_find.ref_lr"]), rel=1e-12)
        assert rows[p["batch_size"]] == pytest.approx(float(p["lr.effective"]), rel=1e-3)  # the summary's too
    assert len({t.data.params["lr.effective"] for t in trials}) == 2


def test_study_with_mlflow_disabled_runs_and_records_nothing(tmp_path):
    proc = run_cli(["-m", "batch_size=32,256", "lr_multiplier=1,2", "mlflow.enabled=false", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not recorded (mlflow.enabled=false)" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["32", "256"]
    for r in rows:  # the summary is built from the run itself: a real LR and loss, no MLflow lookups
        lr, loss = float(r.split("│")[2]), float(r.split("│")[5])
        assert lr > 0 and 0 < loss < 10
        assert r.split("│")[8].strip() == "completed", r
    assert "…" not in proc.stdout, proc.stdout[-3000:]  # piped, the summary takes its full width


def _study_driver_imports(tmp_path, args: list[str], modules: tuple[str, ...]):
    """Run a 2-trial study in a driver process of its own; return it and which of `modules` it
    had imported when it exited."""
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print('imported:', [m for m in {modules!r} if m in sys.modules], flush=True))\n"
            f"sys.argv = ['scaling-train', '-m', 'batch_size=32,256', 'lr_multiplier=1', *{args!r}]\n"
            "from scaling.cli import train_entry\n"
            "train_entry()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials in" in proc.stdout and "completed 2" in proc.stdout, proc.stdout[-2000:]
    return proc, re.search(r"^imported: (.*)$", proc.stdout, re.M).group(1)


def test_the_study_driver_never_imports_torch(tmp_path):
    """Only trials need torch: in the driver its import costs ~1.2 s of CPU on the study's critical
    path (start-up, benchmark row 2b), taken from the trials' cores. Report included."""
    proc, imported = _study_driver_imports(tmp_path, TINY[:-1], ("torch", "mlflow"))
    assert (tmp_path / "mlflow.db").exists() and imported == "['mlflow']", proc.stdout[-2000:]


def test_a_study_without_mlflow_never_imports_it(tmp_path):
    """With mlflow.enabled=false the driver imports no MLflow: Ray Tune's usage tags used to import
    it at Tuner.fit, on the way to the first trial (~0.95 s of CPU; scaling.local_ray)."""
    proc, imported = _study_driver_imports(tmp_path, ["mlflow.enabled=false", *TINY], ("torch", "mlflow"))
    assert not (tmp_path / "mlflow.db").exists() and imported == "[]", proc.stdout[-2000:]
