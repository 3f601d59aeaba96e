"""A study under signals: Ctrl-C, SIGTERM, a terminal's hang-up and Ctrl-Z, at each stage of its life.

Like test_study, every test drives the real console script in a subprocess (real Hydra, real Ray bound
to 127.0.0.1, real MLflow on a temporary SQLite file) at tiny sizes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from procs import stop_group, two_second_trials, wait_for_text
from test_study import BIN, TINY, run_cli, study_runs

pytestmark = pytest.mark.slow

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



def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the processes under `pid` now: a study's local Ray and its trials."""
    import psutil

    total = 0.0
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.Error:
            pass  # ended since the listing
    return total


def test_ctrl_z_pauses_a_study_and_fg_resumes_it(tmp_path):
    """A terminal's Ctrl-Z sends SIGTSTP to the foreground group: the driver's, which no longer holds the
    study's local Ray (scaling.local_ray._own_session). The driver stops; Ray and a running trial do not
    take the signal, but the trial stops at its next report, which waits for the driver to take it (Ray
    Tune's function trainable), so the study's processes stop using the CPU. SIGCONT (`fg`) goes on
    where it left off, and the study ends complete, as if never paused. The study runs in a process
    group of its own in this session, as a shell's job does (SIGTSTP does not stop an orphaned group)."""
    import psutil

    args = ["-m", "batch_size=32,256", "lr_multiplier=0.5,1,2", "hydra.sweeper.max_concurrent=1",
            *two_second_trials(TINY)]
    log = tmp_path / "attempt.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "scaling-train"), *args], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, process_group=0,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for_text(log, "done 1/6", proc, timeout=180)
            # the measurement sees a trial train: its CPU over a window before the stop
            before = _tree_cpu_s(proc.pid)
            time.sleep(1.5)
            running = _tree_cpu_s(proc.pid) - before
            os.killpg(proc.pid, signal.SIGTSTP)
            time.sleep(1.5)  # the trial trains on to its next report (0.25 epoch: < 0.5 s here)
            assert psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
            before = _tree_cpu_s(proc.pid)
            time.sleep(3)
            paused = _tree_cpu_s(proc.pid) - before
            assert proc.poll() is None and psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
            os.killpg(proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
        finally:
            stop_group(proc)  # SIGKILL ends a stopped process too
    assert running > 0.5 and paused < 0.3, (running, paused)
    studies, trials = study_runs(tmp_path)
    assert (studies[0].info.status, studies[0].data.tags["trial.status"]) == ("FINISHED", "completed")
    assert len(trials) == 6 and all(t.info.status == "FINISHED" for t in trials), [t.info.status for t in trials]


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
