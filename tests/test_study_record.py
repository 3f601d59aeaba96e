"""The study's MLflow record on a real SQLite store: a driver killed mid-write leaves nothing half-done."""
from __future__ import annotations

import time

from scaling.recorded import LAST_TRIAL_PARAM, trial_params
from scaling.study_record import TRIAL_INDEX_TAG, StudyRecorder
from scaling.tracking import KIND_TAG, STUDY_TAG, log_batch, metric_list


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
    """The writer thread applies a burst of evaluations in order; drain waits for all."""
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    rec.start({}, {})
    rec.trial_started(0, compose_cfg("batch_size=32", "optimizer=adam"), axes={"optimizer": "adam", "batch_size": "32"})
    for k in range(1, 41):
        rec.trial_metrics(0, {"samples": 32.0 * k, "val/loss": 1.0 / k, "val/acc": k / 40, "best/val_loss": 1.0 / k})
    time.sleep(0.01)  # as in a study: the summary comes later, with another timestamp (MLflow keeps both points)
    rec.trial_finished(0, "completed", summary={"best/val_loss": 1 / 40, "samples": 32 * 40, "mem/peak_mb": 3.0})
    rec.drain()
    assert not rec.pending
    run = rec.client.get_run(rec.trial_runs[0])
    history = rec.client.get_metric_history(run.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(32 * k, 1.0 / k) for k in range(1, 41)]
    assert run.data.tags["trial.status"] == "completed" and run.info.status == "FINISHED"
    assert run.info.run_name == "bs=32 lr×1 linear optimizer=adam s0"  # the grid's axes name it
    for key in ("samples", "best/val_loss", "mem/peak_mb"):  # the summary adds no second point at the last step
        assert [m.step for m in rec.client.get_metric_history(run.info.run_id, key)][-2:] != [1280, 1280], key
    assert [m.step for m in rec.client.get_metric_history(run.info.run_id, "mem/peak_mb")] == [1280]


def test_an_interrupted_study_ends_its_stopped_trials_as_interrupted_and_a_resume_reopens_them(tracking_uri,
                                                                                               compose_cfg):
    """A trial stopped by a Ctrl-C kept trial.status=running, in its run and in the summary's table."""
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    study_id = rec.start({}, {})
    for i in (0, 1):
        rec.trial_started(i, compose_cfg(f"batch_size={32 * (i + 1)}"))
        rec.trial_metrics(i, {"samples": 64.0, "val/loss": 2.0, "best/val_loss": 2.0})
    rec.trial_finished(0, "completed")
    assert rec.finish(2, 200, 128, {}, interrupted=True) == {"completed": 1, "interrupted": 1}
    assert rec.status == {0: "completed", 1: "interrupted"}
    stopped = rec.client.get_run(rec.trial_runs[1])
    assert (stopped.info.status, stopped.data.tags["trial.status"]) == ("KILLED", "interrupted")

    again = StudyRecorder(tracking_uri, "scaling", study_name="s", run_id=study_id)
    again.start({}, {})
    assert again.finished_indices() == {0}  # the interrupted trial is trained again


def test_disabled_recorder_keeps_the_bookkeeping_and_writes_nothing(tmp_path, compose_cfg):
    rec = StudyRecorder(f"sqlite:///{tmp_path}/mlflow.db", "scaling", study_name="s", enabled=False)
    rec.start({}, {})
    rec.trial_started(0, compose_cfg("batch_size=32"))
    rec.trial_metrics(0, {"samples": 64.0, "val/loss": 2.0, "best/val_loss": 2.0})
    rec.trial_finished(0, "pruned")
    assert rec.finish(1, 100, 64, {}) == {"pruned": 1}
    assert rec.best == {0: 2.0} and rec.last_metrics[0]["val/loss"] == 2.0
    assert list(tmp_path.iterdir()) == [], "a disabled recorder touched the tracking store"


class CountingClient:
    """Wraps an MlflowClient, counting the requests that write (and failing the n-th, or all while down;
    or landing the n-th and losing its reply, as a server killed mid-request does)."""

    WRITES = ("create_run", "log_batch", "log_artifact", "set_tag", "set_terminated")  # log_artifact: scaling.staging.log_text

    def __init__(self, client, fail_at: int = 0, down: bool = False, lose_reply_at: int = 0):
        self.client, self.fail_at, self.down, self.calls = client, fail_at, down, []
        self.lose_reply_at = lose_reply_at

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if name not in self.WRITES:
            return attr

        def counted(*args, **kwargs):
            self.calls.append(name)
            if self.down or len(self.calls) == self.fail_at:
                raise ConnectionError("the store went away")
            result = attr(*args, **kwargs)
            if len(self.calls) == self.lose_reply_at:
                raise ConnectionError("the store went away before it answered")
            return result
        return counted


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "the writer thread did not write in time"
        time.sleep(0.05)


def _evaluation(k: int, bs: int = 32) -> dict[str, float]:
    return {"samples": float(bs * 10 * k), "step": 10.0 * k, "epoch": k / 4, "val/loss": 1.0 / k, "val/acc": k / 4}


def test_a_trial_is_written_in_one_batch_when_it_finishes(tracking_uri, compose_cfg):
    """Creation, config, one log_batch (params, every evaluation, tags), end: whatever the evaluations."""
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    rec.start({}, {})
    rec.client = counting = CountingClient(rec.client)
    rec.hold_s = 60.0  # nothing is due before the trial ends
    t0 = int(time.time() * 1000)
    rec.trial_started(0, compose_cfg("batch_size=32"), {"tune.trial_id": "t0"})
    rec.trial_tags(0, {"ray.node_id": "n1"})
    rec.trial_params(0, {"derived.total_steps": "40"})
    for k in range(1, 5):
        rec.trial_metrics(0, _evaluation(k))
    time.sleep(0.3)
    assert counting.calls == [], "a running trial's writes were not held"
    rec.trial_finished(0, "completed", summary={"best/val_loss": 0.25})
    _wait_for(lambda: "set_terminated" in counting.calls)  # its end makes them due: the writer sends them
    assert rec.flush()  # waits for the writer thread's pass, with nothing left to send
    assert counting.calls == ["create_run", "log_artifact", "log_batch", "set_terminated"] and not rec.pending

    run = rec.client.get_run(rec.trial_runs[0])
    assert run.data.params[LAST_TRIAL_PARAM] and run.data.params["derived.total_steps"] == "40"
    assert run.data.tags["ray.node_id"] == "n1" and run.data.tags["tune.trial_id"] == "t0"
    assert run.data.tags["trial.status"] == "completed" and run.info.status == "FINISHED"
    assert run.data.metrics["best/val_loss"] == 0.25
    history = rec.client.get_metric_history(run.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(320 * k, 1.0 / k) for k in range(1, 5)]
    # the record keeps when things happened, not when they were written
    assert t0 <= run.info.start_time <= history[0].timestamp <= run.info.end_time < t0 + 300 + 1000


def test_a_long_trial_is_written_every_hold_s(tracking_uri, compose_cfg):
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    rec.start({}, {})
    rec.client = counting = CountingClient(rec.client)
    rec.hold_s = 0.2
    rec.trial_started(0, compose_cfg("batch_size=32"))
    rec.trial_metrics(0, _evaluation(1))
    _wait_for(lambda: "log_batch" in counting.calls)
    assert rec.flush() and counting.calls == ["create_run", "log_artifact", "log_batch"]
    run = rec.client.get_run(rec.trial_runs[0])
    assert run.data.metrics["val/loss"] == 1.0 and run.data.tags["trial.status"] == "running"


def test_a_write_that_fails_half_way_is_retried_without_duplicates(tracking_uri, compose_cfg):
    """The store fails after the run was created and filled: the retry repeats the trial's writes, and
    MLflow ends up with one run and one point per step (the points keep their report times)."""
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    rec.start({}, {})
    real = rec.client
    rec.client = CountingClient(real, fail_at=4)  # create_run, log_artifact, log_batch land; set_terminated fails
    rec.retry_s = 0.1
    rec.hold_s = 60.0
    rec.trial_started(0, compose_cfg("batch_size=32"))
    for k in range(1, 4):
        rec.trial_metrics(0, _evaluation(k))
    rec.trial_finished(0, "completed")
    rec.drain()
    assert rec.client.calls.count("create_run") == 1 and rec.client.calls.count("log_batch") == 2
    runs = real.search_runs([rec.exp_id], f"tags.{STUDY_TAG} = '{rec.run_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = real.get_metric_history(runs[0].info.run_id, "val/loss")
    assert [m.step for m in history] == [320, 640, 960]


def test_a_trial_run_created_whose_reply_was_lost_is_found_not_made_twice(tracking_uri, compose_cfg):
    """create_run lands in the store and the server dies before it answers: the retry finds that run
    by the trial's tags and fills it, so the trial has one run (CI once counted 5 runs for 4 trials)."""
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    rec.start({}, {})
    real = rec.client
    rec.client = CountingClient(real, lose_reply_at=1)  # the first write: the trial's create_run
    rec.retry_s = 0.1
    rec.trial_started(0, compose_cfg("batch_size=32"))
    rec.trial_metrics(0, _evaluation(1))
    rec.trial_finished(0, "completed")
    rec.drain()
    assert rec.client.calls.count("create_run") == 1, "a second run was created"
    runs = real.search_runs([rec.exp_id], f"tags.{STUDY_TAG} = '{rec.run_id}'")
    assert len(runs) == 1 and runs[0].info.run_id == rec.trial_runs[0]
    assert runs[0].info.status == "FINISHED" and LAST_TRIAL_PARAM in runs[0].data.params


class RecordingClient:
    def __init__(self):
        self.requests = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=True):
        self.requests.append((list(params), list(metrics), list(tags)))


def test_log_batch_keeps_mlflow_limits_and_lands_params_then_metrics_then_tags():
    client = RecordingClient()
    params = {f"p{i}": str(i) for i in range(150)}
    params[LAST_TRIAL_PARAM] = "False"
    metrics = metric_list({f"m{i}": float(i) for i in range(1200)}, step=64, timestamp_ms=1)
    log_batch(client, "run", params, metrics, {"trial.status": "completed"})
    for p, m, t in client.requests:
        assert len(p) <= 100 and len(t) <= 100 and len(m) <= 1000 and len(p) + len(m) + len(t) <= 1000
    order = [e.key for p, m, t in client.requests for e in p + m + t]
    assert order == [*params, *(m.key for m in metrics), "trial.status"]
    assert client.requests[-1][2][-1].key == "trial.status" and len(client.requests) == 3
    assert all(m.step == 64 and m.timestamp == 1 for m in metrics)


def test_writes_kept_through_an_outage_are_replayed_by_the_next_run(tracking_uri, compose_cfg, tmp_path):
    """The store is down for the whole run: its writes are journaled, and the resumed run records them."""
    rec = StudyRecorder(tracking_uri, "scaling", study_name="s")
    study_id = rec.start({}, {})
    rec.use_journal(tmp_path / "journal.jsonl")
    rec.client = CountingClient(rec.client, down=True)
    rec.hold_s = rec.retry_s = 3600.0  # this run's writer thread stays out of the next run's way
    rec.trial_started(0, compose_cfg("batch_size=32"))
    for k in range(1, 3):
        rec.trial_metrics(0, _evaluation(k))
    rec.trial_finished(0, "completed")
    assert not rec.flush() and (tmp_path / "journal.jsonl").exists()

    again = StudyRecorder(tracking_uri, "scaling", study_name="s", run_id=study_id)
    again.start({}, {})
    again.use_journal(tmp_path / "journal.jsonl")
    assert again.status[0] == "completed" and again.logged_samples[0] == 640
    assert again.flush() and not (tmp_path / "journal.jsonl").exists()
    run = again.client.get_run(again.trial_runs[0])
    assert run.data.tags["trial.status"] == "completed" and run.info.status == "FINISHED"
    assert [m.step for m in again.client.get_metric_history(run.info.run_id, "val/loss")] == [320, 640]



def test_import_mlflow_creates_no_store(tmp_path):
    """The driver imports MLflow before its cluster check: a study rejected there must leave no store."""
    import gc

    from scaling.store import import_mlflow

    import_mlflow(f"sqlite:///{tmp_path}/mlflow.db")
    assert list(tmp_path.iterdir()) == [] and gc.isenabled()


def test_a_new_experiment_keeps_its_artifacts_beside_the_sqlite_store(tmp_path, monkeypatch, compose_cfg):
    """MLflow's default is ./mlruns of whatever folder the store was created from; the study's
    config artifacts belong beside its database, whichever folder the driver runs in."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    rec = StudyRecorder(uri, "my study/v1", study_name="s")
    rec.start({}, {})
    rec.trial_started(0, compose_cfg("batch_size=32"))
    rec.drain()
    run_id = rec.trial_runs[0]
    assert (tmp_path / "store" / "mlruns" / "my_study_v1" / run_id / "artifacts" / "config.yaml").is_file()
    assert not (elsewhere / "mlruns").exists()
    # an experiment that already exists keeps the location it was made with
    again = StudyRecorder(uri, "my study/v1", study_name="s2")
    assert again.exp_id == rec.exp_id
