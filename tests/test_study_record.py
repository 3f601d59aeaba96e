"""The study's MLflow record on a real SQLite store: a driver killed mid-write leaves nothing half-done."""
from __future__ import annotations

from scaling.study_record import TRIAL_INDEX_TAG, StudyRecorder
from scaling.tracking import KIND_TAG, STUDY_TAG, trial_params


def test_resume_fills_a_trial_run_the_driver_died_creating(tracking_uri, compose_cfg):
    """A kill between creating a trial's run and logging its params must not leave it without them."""
    cfg = compose_cfg("batch_size=256", "lr_multiplier=2")
    first = StudyRecorder(tracking_uri, "scaling", study_name="s")
    study_id = first.start({}, {})
    # What the killed driver left: the trial's run exists (found by its tags) with no params.
    orphan = first.client.create_run(first.exp_id, tags={KIND_TAG: "trial", STUDY_TAG: study_id,
                                                         TRIAL_INDEX_TAG: "0"}).info.run_id

    again = StudyRecorder(tracking_uri, "scaling", study_name="s", run_id=study_id)
    again.start({}, {})
    again.trial_started(0, cfg)
    again.drain()

    assert again.trial_runs[0] == orphan, "the resume created a second run for the trial"
    params = again.client.get_run(orphan).data.params
    assert params == trial_params(cfg)
    assert float(params["lr.effective"]) > 0
    assert [a.path for a in again.client.list_artifacts(orphan)] == ["config.yaml"]


def test_resume_does_not_rewrite_a_complete_trial_run(tracking_uri, compose_cfg):
    cfg = compose_cfg("batch_size=64")
    first = StudyRecorder(tracking_uri, "scaling", study_name="s")
    study_id = first.start({}, {})
    first.trial_started(0, cfg)
    first.trial_metrics(0, {"samples": 640.0, "val/loss": 1.5})
    first.drain()

    again = StudyRecorder(tracking_uri, "scaling", study_name="s", run_id=study_id)
    again.start({}, {})
    assert 0 in again._ready and again.logged_samples[0] == 640
    again.trial_started(0, cfg)
    again.trial_metrics(0, {"samples": 640.0, "val/loss": 9.9})  # a replayed point: skipped
    again.drain()
    history = again.client.get_metric_history(again.trial_runs[0], "val/loss")
    assert [(m.step, m.value) for m in history] == [(640, 1.5)]


def test_queued_writes_land_complete_and_in_order(tracking_uri, compose_cfg):
    """The writer thread applies a burst of evaluations in order, one request each; drain waits for all."""
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    rec.start({}, {})
    rec.trial_started(0, compose_cfg("batch_size=32"))
    for k in range(1, 41):
        rec.trial_metrics(0, {"samples": 32.0 * k, "val/loss": 1.0 / k, "val/acc": k / 40})
    rec.trial_finished(0, "completed", summary={"best/val_loss": 1 / 40})
    rec.drain()
    assert not rec.pending
    run = rec.client.get_run(rec.trial_runs[0])
    history = rec.client.get_metric_history(run.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(32 * k, 1.0 / k) for k in range(1, 41)]
    assert run.data.tags["trial.status"] == "completed" and run.info.status == "FINISHED"


def test_disabled_recorder_keeps_the_bookkeeping_and_writes_nothing(tmp_path, compose_cfg):
    rec = StudyRecorder(f"sqlite:///{tmp_path}/mlflow.db", "scaling", study_name="s", enabled=False)
    rec.start({}, {})
    rec.trial_started(0, compose_cfg("batch_size=32"))
    rec.trial_metrics(0, {"samples": 64.0, "val/loss": 2.0, "best/val_loss": 2.0})
    rec.trial_finished(0, "pruned")
    assert rec.finish(1, 100, 64, {}) == {"pruned": 1}
    assert rec.best == {0: 2.0} and rec.last_metrics[0]["val/loss"] == 2.0
    assert list(tmp_path.iterdir()) == [], "a disabled recorder touched the tracking store"
