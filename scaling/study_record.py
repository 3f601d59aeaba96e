"""The study's MLflow record, written by the driver: one study run, one nested run per trial.

The driver is the single writer (workers on other nodes need no access to the tracking
store, and SQLite never sees concurrent writers). Writes are idempotent by step: a point at
or below the highest `samples` already logged for a trial is skipped, so a resumed study
neither loses nor doubles a metric point.

Every trial write is an intent, queued, coalesced and applied off Tune's controller thread, and
journaled beside the study's checkpoints while the tracking server is down (scaling.write_queue:
nothing is lost, and the next run with `hydra.sweeper.resume=true` replays the journal first). A
trial's held writes go out together: its run's creation, its config, then one `log_batch` of
params, every held evaluation's metrics and its tags, then its end. Metrics keep the time they
were reported at, so a write retried after a failure is idempotent.

With `mlflow.enabled=false` the recorder keeps the same bookkeeping in memory and writes nothing
(a study then cannot be resumed).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from typing import Any, Optional, Sequence

from scaling.recorded import LAST_TRIAL_PARAM, config_yaml, recorded_config, trial_params, trial_run_name
from scaling.staging import log_text
from scaling.store import make_client
from scaling.tracking import (KIND_TAG, STATUS_TAG, STUDY_TAG, check_store_exists, check_study_run, get_experiment_id,
                              log_batch, log_params, metric_list, not_logged, provenance_tags)
from scaling.write_queue import QueuedWriter

TRIAL_INDEX_TAG = "scaling.trial_index"
TERMINAL = ("completed", "pruned", "early_stopped", "diverged", "oom", "error")


class StudyRecorder(QueuedWriter):
    """Creates (or reopens) the study run and records every trial under it."""

    def __init__(self, tracking_uri: str, experiment: str, *, study_name: str, run_id: Optional[str] = None,
                 enabled: bool = True):
        super().__init__(enabled)
        self.uri, self.experiment, self.study_name = tracking_uri, experiment, study_name
        if enabled and run_id is not None:
            check_store_exists(tracking_uri, run_id)  # before opening it would create an empty one
        self.client = make_client(tracking_uri) if enabled else None
        if enabled and run_id is not None:
            check_study_run(self.client, tracking_uri, experiment, run_id)  # before the experiment is looked up or made
        self.exp_id = get_experiment_id(self.client, experiment) if enabled else None
        self.run_id = run_id
        self.trial_runs: dict[int, str] = {}  # trial index -> run id
        self.logged_samples: dict[int, int] = {}  # trial index -> highest step logged
        self.status: dict[int, str] = {}
        self.best: dict[int, float] = {}
        self._ready: set[int] = set()  # trial runs created and filled with params
        self._creating: set[int] = set()  # trial runs whose create_run was sent and did not answer
        self.last_metrics: dict[int, dict[str, float]] = {}  # trial index -> its latest evaluation
        self.provenance: dict[str, str] = {}  # git revision and versions, read once by start()
        if tracking_uri.startswith("http"):  # fail fast and queue, instead of MLflow's minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def __getstate__(self) -> dict:  # Ray may pickle callbacks holding us; the client is rebuilt
        return {**super().__getstate__(), "client": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.client = make_client(self.uri) if self.enabled else None

    # ---------------------------------------------------------------- study run
    def start(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Create the study run, or reopen it (resume) and reload its trials' state; return its id."""
        if not self.enabled:
            self.run_id = f"offline:{self.study_name}"
            return self.run_id
        self.provenance = provenance_tags()  # on the study run and on each trial run (what produced its numbers)
        if self.run_id is None:
            run = self.client.create_run(self.exp_id, run_name=self.study_name,
                                         tags={KIND_TAG: "study", STATUS_TAG: "running", **self.provenance, **tags})
            self.run_id = run.info.run_id
            log_params(self.client, self.run_id, {k: v if isinstance(v, str) else json.dumps(v)
                                                  for k, v in params.items()})
        else:
            self.client.set_terminated(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, STATUS_TAG, "running")
            self._reload()
        return self.run_id

    def _reload(self) -> None:
        runs = self.client.search_runs([self.exp_id], f"tags.{STUDY_TAG} = '{self.run_id}'", max_results=5000)
        for r in runs:
            i = int(r.data.tags[TRIAL_INDEX_TAG])
            self.trial_runs[i] = r.info.run_id
            if LAST_TRIAL_PARAM in r.data.params:  # else killed before its params landed: log them again
                self._ready.add(i)
            self.status[i] = r.data.tags.get(STATUS_TAG, "running")
            self.logged_samples[i] = int(r.data.metrics.get("samples", -1)) if "samples" in r.data.metrics else -1
            self.last_metrics[i] = dict(r.data.metrics)
            if "best/val_loss" in r.data.metrics:
                self.best[i] = r.data.metrics["best/val_loss"]

    def finished_indices(self) -> set[int]:
        """Return the trial indices already recorded with a terminal status."""
        return {i for i, s in self.status.items() if s in TERMINAL}

    def reopen_errored(self) -> list[int]:
        """Make the trials recorded as `error` unfinished again, as a killed study leaves its running ones,
        so this run trains them (each from its last checkpoint); return their indices. The failure's
        `trial.reason` becomes the run's `trial.last_failure`, which a retry also writes."""
        errored = sorted(i for i, s in self.status.items() if s == "error")
        for i in errored:
            self.status[i] = "running"
            if self.enabled and i in self.trial_runs:
                run = self.trial_runs[i]
                reason = self.client.get_run(run).data.tags.get("trial.reason")
                moved = {"trial.last_failure": reason} if reason else {}
                log_batch(self.client, run, tags={STATUS_TAG: "running", **moved})
                if reason is not None:
                    self.client.delete_tag(run, "trial.reason")
        return errored

    def metric_history(self, index: int, keys: Sequence[str]) -> list[dict[str, float]]:
        """Return a recorded trial's evaluations in step order, each as {key: value} over `keys`
        (one request per key: for a resume, not for the hot path)."""
        if index not in self.trial_runs:
            return []
        rows: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in self.client.get_metric_history(self.trial_runs[index], key):
                rows.setdefault(m.step, {})[key] = m.value
        return [rows[step] for step in sorted(rows)]

    # ---------------------------------------------------------------- trial runs (queued intents)
    def trial_started(self, index: int, cfg: Any, extra_tags: Optional[dict[str, str]] = None,
                      axes: Optional[dict[str, Any]] = None) -> None:
        """Queue the creation (or reopening) of the trial's nested run (cfg: a DictConfig, or its
        resolved container, which is kept as it is and must not change afterwards; axes: its grid
        point's axis values, for the run's name)."""
        self.logged_samples.setdefault(index, -1)
        self.status[index] = "running"
        if not self.enabled:
            return
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
        self._submit({"op": "started", "index": index, "config": config, "tags": extra_tags or {}, "axes": axes or {}})

    def trial_metrics(self, index: int, metrics: dict[str, float]) -> None:
        """Queue one evaluation unless a point at this sample count is already recorded or queued."""
        step = int(metrics.get("samples", 0))
        if step <= self.logged_samples.get(index, -1):
            return
        self.logged_samples[index] = step
        if "best/val_loss" in metrics and math.isfinite(metrics["best/val_loss"]):
            self.best[index] = metrics["best/val_loss"]
        values = {k: float(v) for k, v in metrics.items()}
        self.last_metrics[index] = values
        self._submit({"op": "metrics", "index": index, "metrics": values})

    def trial_finished(self, index: int, status: str, reason: str = "", summary: Optional[dict] = None) -> None:
        """Queue the trial's terminal status and a summary, logged where the trial stopped: its last
        evaluation, or the `samples` the summary gives (a trial stopped between evaluations)."""
        self.status[index] = status
        summary = {k: float(v) for k, v in (summary or {}).items()}
        at = max(self.logged_samples.get(index, 0), int(summary.get("samples", 0)), 0)
        if "samples" in summary:
            self.logged_samples[index] = at  # samples/trained counts it
        summary = not_logged(summary, self.last_metrics.get(index, {}), at)
        self._submit({"op": "finished", "index": index, "status": status, "reason": reason, "summary": summary,
                      "step": at})

    def trial_params(self, index: int, params: dict[str, str]) -> None:
        """Queue params for the trial's run (the trial loop's derived values, `derived.*`)."""
        self._submit({"op": "params", "index": index, "params": {k: str(v) for k, v in params.items()}})

    def trial_tags(self, index: int, tags: dict[str, str]) -> None:
        """Queue tags for the trial's run (e.g. `ray.node_id`, the node it ran on)."""
        self._submit({"op": "tags", "index": index, "tags": {k: str(v) for k, v in tags.items()}})

    def trial_tag(self, index: int, key: str, value: str) -> None:
        """Queue a tag on the trial's run."""
        self._submit({"op": "tag", "index": index, "key": key, "value": value})

    def _absorb(self, intent: dict) -> None:
        """What a journaled intent says the earlier run already knew, before MLflow hears of it."""
        i = intent["index"]
        if intent["op"] == "finished":
            self.status[i] = intent["status"]
        elif intent["op"] == "metrics":
            self.logged_samples[i] = max(self.logged_samples.get(i, -1), int(intent["metrics"].get("samples", 0)))
        elif i not in self.status:
            self.status[i] = "running"

    def _apply(self, i: int, intents: list[dict]) -> None:
        """Write one trial's queued intents (in order) in as few requests as they allow.

        Every step is idempotent, so after a failure the whole list is applied again: the run is
        created once (its id is kept), params and tags are rewritten with the same values, and a
        metric point (same key, step, value and time) is not stored twice.
        """
        batch = _Batch()
        for intent in intents:
            op, ts = intent["op"], intent.get("ts") or int(time.time() * 1000)
            if op == "started":
                self._write(i, batch)  # a new attempt: what came before lands first
                self._open_trial_run(i, intent, batch)
            elif op == "metrics":
                batch.metrics += metric_list(intent["metrics"], int(intent["metrics"].get("samples", 0)), ts)
            elif op == "params":
                batch.params.update(intent["params"])
            elif op == "tags":
                batch.tags.update(intent["tags"])
            elif op == "tag":
                batch.tags[intent["key"]] = intent["value"]
            else:  # finished: the summary, then the status tag after everything else, then the run's end
                batch.metrics += metric_list(intent["summary"], intent["step"], ts)
                if intent["reason"]:
                    batch.tags["trial.reason"] = intent["reason"][:5000]
                batch.tags.pop(STATUS_TAG, None)
                batch.tags[STATUS_TAG] = intent["status"]
                self._write(i, batch)
                self.client.set_terminated(self.trial_runs[i], status="FAILED" if intent["status"] == "error"
                                           else "FINISHED", end_time=ts)
        self._write(i, batch)

    def _open_trial_run(self, index: int, intent: dict, batch: _Batch) -> None:
        """Create the trial's run (at the time the trial started) and queue its params into `batch`."""
        if index in self._ready:
            self.client.set_terminated(self.trial_runs[index], status="RUNNING")
            return
        cfg = intent["config"]  # the trial's plain resolved config: no DictConfig needed (scaling.recorded)
        if index not in self.trial_runs:
            # a create_run that failed may have landed before its reply was lost (a server killed
            # mid-request): find that run before creating another, or the trial would have two
            found = self._find_trial_run(index) if index in self._creating else None
            if found is None:
                tags = {KIND_TAG: "trial", STATUS_TAG: "running", "mlflow.parentRunId": self.run_id,
                        STUDY_TAG: self.run_id, TRIAL_INDEX_TAG: str(index), **self.provenance, **intent["tags"]}
                self._creating.add(index)
                found = self.client.create_run(self.exp_id, start_time=intent.get("ts"), run_name=trial_run_name(cfg, intent.get("axes")),
                                               tags=tags).info.run_id
            self.trial_runs[index] = found
            self._creating.discard(index)
        # A retry after the store failed (or the driver died) between creating the run and filling it
        # lands here again; MLflow accepts a param logged twice with the same value. The config
        # artifact goes first and LAST_TRIAL_PARAM last, so a run holding that param is complete.
        log_text(self.client, self.trial_runs[index], config_yaml(recorded_config(cfg)), "config.yaml")
        batch.params.update(trial_params(cfg))
        batch.completes = True

    def _find_trial_run(self, index: int) -> Optional[str]:
        """Return the id of the study's run for trial `index` in the store, the first created, if any."""
        runs = self.client.search_runs([self.exp_id], f"tags.{STUDY_TAG} = '{self.run_id}' and "
                                       f"tags.{TRIAL_INDEX_TAG} = '{index}'", max_results=10,
                                       order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def _write(self, index: int, batch: _Batch) -> None:
        if not (batch.params or batch.metrics or batch.tags):
            return
        params = dict(batch.params)
        if LAST_TRIAL_PARAM in params:
            params[LAST_TRIAL_PARAM] = params.pop(LAST_TRIAL_PARAM)  # last of all
        log_batch(self.client, self.trial_runs[index], params, batch.metrics, batch.tags)
        if batch.completes:
            self._ready.add(index)
        batch.clear()

    # ---------------------------------------------------------------- end of study
    def finish(self, n_trials: int, samples_full_grid: int, samples_trained: int, best_per_batch: dict,
               interrupted: bool = False) -> dict[str, int]:
        """Record counts by status, samples trained vs the full grid, and the best trial per batch size.
        Interrupted, a trial stopped mid-way ends `interrupted` (its run KILLED; a resume reopens it)."""
        stopped = [i for i, s in self.status.items() if s == "running"] if interrupted else []
        for i in stopped:  # not "running" for ever, in the summary's table or the run's tag
            self.status[i] = "interrupted"
        counts = Counter(self.status.values())
        if not self.enabled:
            return dict(counts)
        self.drain()
        metrics = {f"trials/{s}": float(counts.get(s, 0)) for s in TERMINAL}
        metrics["trials/total"] = float(n_trials)
        metrics["samples/trained"] = float(samples_trained)
        metrics["samples/full_grid"] = float(samples_full_grid)
        metrics["samples/fraction"] = samples_trained / max(samples_full_grid, 1)
        log_text(self.client, self.run_id, json.dumps(best_per_batch, indent=2, default=str), "best_per_batch_size.json")
        log_batch(self.client, self.run_id, metrics=metric_list(metrics, 0, int(time.time() * 1000)),
                  tags={STATUS_TAG: "interrupted" if interrupted else "completed"})
        end = int(time.time() * 1000)
        for i in stopped:  # not RUNNING in the UI for ever
            if i in self.trial_runs:
                self.client.set_tag(self.trial_runs[i], STATUS_TAG, "interrupted")
                self.client.set_terminated(self.trial_runs[i], status="KILLED", end_time=end)
        self.client.set_terminated(self.run_id, status="KILLED" if interrupted else "FINISHED", end_time=end)
        return dict(counts)


class _Batch:
    """One trial's writes on their way into a single `log_batch`."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.params: dict[str, str] = {}
        self.metrics: list = []
        self.tags: dict[str, str] = {}
        self.completes = False  # holds the trial's config params: the run is complete once it lands
