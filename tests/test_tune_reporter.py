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
