"""TuneReporter: which evaluations reach Tune at once, and that none is lost on the way.

Tune's `report` stops a function trainable until the driver has taken the result, so the reporter
sends an evaluation only when the scheduler must see it (ASHA's rungs), at the trial's end, or once
per interval; every other evaluation rides along in the next report's `history`. Tune's report is
replaced by a list here: what is under test is the choice of what to send. That every evaluation
ends up in MLflow through a real study is tests/test_study.py::test_metric_step_axis_is_samples_seen.
"""
from __future__ import annotations

import json
import math

import pytest

from scaling.study import TuneReporter
from scaling.train import TrialResult


@pytest.fixture
def sent(monkeypatch):
    import ray.tune

    out: list[dict] = []
    monkeypatch.setattr(ray.tune, "report", lambda result, checkpoint=None: out.append(dict(result)))
    return out


def evaluations(reporter: TuneReporter, total_steps: int, every: int, steps_per_epoch: int) -> list[dict]:
    reporter._node = lambda: {}  # no Ray runtime context outside a trial
    reporter.start({"total_steps": total_steps})
    evals = []
    for step in range(every, total_steps + 1, every):
        m = {"step": step, "epoch": step / steps_per_epoch, "samples": step * 32, "val/loss": 1.0 / step}
        reporter.report(m)
        evals.append(m)
    return evals


def unpack(sent: list[dict]) -> list[int]:
    """Return the steps of every evaluation the driver receives, in arrival order."""
    steps = []
    for r in sent:
        steps += [h["step"] for h in json.loads(r.get("history", "[]"))]
        steps.append(r["step"])
    return steps


def test_only_rungs_and_the_end_are_sent_and_nothing_is_lost(sent):
    # 100 steps per epoch, an evaluation every 10 steps (0.1 epoch), rungs at 0.1, 0.3 and 0.9 epochs
    evals = evaluations(TuneReporter(False, interval_s=3600, report_at=(0.1, 0.3, 0.9)), 100, 10, 100)
    assert [r["step"] for r in sent] == [10, 30, 90, 100]  # the first evaluation at or past each rung, the last
    assert unpack(sent) == [m["step"] for m in evals]
    assert [r["trial_status"] for r in sent] == ["running"] * 3 + ["completed"]


def test_without_rungs_the_interval_decides(sent):
    every_time = evaluations(TuneReporter(False, interval_s=0.0), 50, 10, 100)
    assert [r["step"] for r in sent] == [m["step"] for m in every_time] and "history" not in sent[0]
    sent.clear()
    evaluations(TuneReporter(False, interval_s=3600), 50, 10, 100)
    assert [r["step"] for r in sent] == [50] and unpack(sent) == [10, 20, 30, 40, 50]


def test_a_trial_ending_early_sends_what_it_held(sent):
    reporter = TuneReporter(False, interval_s=3600, report_at=(0.5,))
    reporter._node = lambda: {}
    reporter.start({"total_steps": 100})  # a rung at step 50, the end at step 100 ...
    reporter.report({"step": 10, "epoch": 0.1, "samples": 320, "val/loss": 2.0})
    reporter.report({"step": 20, "epoch": 0.2, "samples": 640, "val/loss": math.nan})
    assert sent == []  # ... but it diverges at step 20, before either
    reporter.finish(TrialResult("diverged", metrics={"step": 20}, reason="nan"))  # what run_trial hands it
    assert unpack(sent) == [10, 20, 20] and sent[-1]["trial_status"] == "diverged"


def test_checkpoint_staging_removes_the_folders_of_ended_processes_only(tmp_path, monkeypatch):
    """A worker ended while tune.report waited (a pause, a stop at a rung, a kill) never removed its
    checkpoint folder: /tmp kept a state.pt per report. Staging is one folder per process, and the
    next checkpoint on the node removes those of processes that have ended, not of running ones."""
    import os
    import subprocess
    import sys
    import tempfile

    from scaling.study import STAGING_PREFIX, checkpoint_staging, remove_stale_staging

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (int(ended.stdout), running.pid):
            (tmp_path / f"{STAGING_PREFIX}{pid}").mkdir()
            (tmp_path / f"{STAGING_PREFIX}{pid}" / "state.pt").write_bytes(b"x")
        (tmp_path / "unrelated-123").mkdir()
        mine = checkpoint_staging()
        assert mine == str(tmp_path / f"{STAGING_PREFIX}{os.getpid()}") and os.listdir(mine) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"{STAGING_PREFIX}{running.pid}", f"{STAGING_PREFIX}{os.getpid()}", "unrelated-123"])
        running.kill()
        running.wait()
        remove_stale_staging()  # what the study's driver runs once Ray has stopped
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{STAGING_PREFIX}{os.getpid()}", "unrelated-123"])
    finally:
        running.kill()


def test_a_study_end_waits_for_its_ending_workers_and_takes_a_zombie_for_ended(tmp_path, monkeypatch):
    """Ray stops a study's workers after its driver has asked it to: at the study's end they were often
    still running (state R) when the driver removed the ended ones' folders, and theirs stayed. The
    driver now waits (bounded) for the workers that reported to it; a zombie (ended, not yet reaped by
    its parent) counts as ended, and a process that goes on past the bound keeps its folder."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from scaling.study import STAGING_PREFIX, remove_stale_staging

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for until the end: a zombie
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another study's
    try:
        for pid in (ending.pid, zombie.pid, other.pid):
            (tmp_path / f"{STAGING_PREFIX}{pid}").mkdir()
        deadline = time.monotonic() + 10
        while open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never ended"
            time.sleep(0.01)
        t0 = time.monotonic()
        remove_stale_staging(wait_for=[ending.pid, zombie.pid])
        assert 0.2 < time.monotonic() - t0 < 3.0  # it waited for the ending one, not for the zombie's bound
        assert [p.name for p in tmp_path.iterdir()] == [f"{STAGING_PREFIX}{other.pid}"]
        t0 = time.monotonic()
        remove_stale_staging(wait_for=[other.pid], wait_s=0.3)  # past the bound: it goes on, the folder stays
        assert time.monotonic() - t0 < 1.0
        assert [p.name for p in tmp_path.iterdir()] == [f"{STAGING_PREFIX}{other.pid}"]
    finally:
        for proc in (ending, zombie, other):
            proc.kill()
            proc.wait()
