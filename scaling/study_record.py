"""The study's MLflow record, written by the driver: one study run, one nested run per trial.

The driver is the single writer (workers on other nodes need no access to the tracking
store, and SQLite never sees concurrent writers). Writes are idempotent by step: a point at
or below the highest `samples` already logged for a trial is skipped, so a resumed study
neither loses nor doubles a metric point.

If the tracking server goes away mid-study, nothing is lost: every trial write is an intent
queued in order; intents that cannot be applied stay queued (and journaled to a local file
beside the study's checkpoints) and are retried every few seconds while training goes on.
A study that ends, or is killed, while the server is still down keeps the journal, and the
next run with `hydra.sweeper.resume=true` replays it first.

Writes are applied by a background thread, in order within each trial. Tune calls the study's
callback on its controller thread, and a trial's `report` waits until that thread has taken the
result: a synchronous SQLite write (5-25 ms of CPU here) there stalls every running trial.

The thread also coalesces: a trial's writes are held until it finishes, or for at most `hold_s`,
and then sent together (its run's creation, its config, then one `log_batch` of params, every
held evaluation's metrics and its tags, then its end). MLflow's cost is mostly per request, and
the driver shares the CPUs with the trials: for the 32 trials of benchmark row 4, one write per
trial instead of one per evaluation and tag takes 1.9 s of the driver's CPU instead of 4.5 s.
Metrics keep the time they were reported at, so a write retried after a failure is idempotent.

With `mlflow.enabled=false` the recorder keeps the same bookkeeping in memory and writes nothing
(a study then cannot be resumed).
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Optional, Sequence

from scaling.config import redact_url
from scaling.recorded import LAST_TRIAL_PARAM, config_yaml, recorded_config, trial_params, trial_run_name
from scaling.store import make_client
from scaling.tracking import (KIND_TAG, STATUS_TAG, STUDY_TAG, check_store_exists, check_study_run, get_experiment_id,
                              log_batch, log_params, metric_list, not_logged, provenance_tags)

TRIAL_INDEX_TAG = "scaling.trial_index"
TERMINAL = ("completed", "pruned", "early_stopped", "diverged", "oom", "error")


class StudyRecorder:
    """Creates (or reopens) the study run and records every trial under it."""

    def __init__(self, tracking_uri: str, experiment: str, *, study_name: str, run_id: Optional[str] = None,
                 enabled: bool = True):
        self.uri, self.experiment, self.study_name, self.enabled = tracking_uri, experiment, study_name, enabled
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
        self.pending: deque = deque()  # trial writes not yet applied to MLflow, in order
        self.journal: Optional[Path] = None
        self.retry_s = 5.0
        # A running trial's writes wait at most this long to be sent together: the MLflow UI (and whoever
        # polls it) still sees a trial's progress live, and a busy writer coalesces more by itself.
        self.hold_s = 0.5
        self.last_metrics: dict[int, dict[str, float]] = {}  # trial index -> its latest evaluation
        self._retry_at = 0.0
        self._journal_at = 0.0
        self._warned = False
        self._apply_lock = threading.Lock()  # one applier at a time: the writer thread or a drain
        self._wake = threading.Event()
        self._writer: Optional[threading.Thread] = None
        self.provenance: dict[str, str] = {}  # git revision and versions, read once by start()
        if tracking_uri.startswith("http"):  # fail fast and queue, instead of MLflow's minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def __getstate__(self) -> dict:  # Ray may pickle callbacks holding us; the client is rebuilt
        state = dict(self.__dict__)
        state.update(client=None, _apply_lock=None, _wake=None, _writer=None, pending=deque(self.pending))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.client = make_client(self.uri) if self.enabled else None
        self._apply_lock, self._wake = threading.Lock(), threading.Event()

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

    def _submit(self, intent: dict) -> None:
        if not self.enabled:
            return
        intent["ts"] = int(time.time() * 1000)  # when it happened, whenever it is written
        self.pending.append(intent)  # deque.append is atomic; only the applier pops
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
            self._writer.start()
        if intent["op"] == "finished":  # its trial's writes are due now; others wait for hold_s
            self._wake.set()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(timeout=self.hold_s / 2)
            self._wake.clear()
            with self._apply_lock:
                self._flush(0.0, due_only=True)

    def flush(self, wait_s: float = 0.0) -> bool:
        """Apply every queued write; return True when none is left (retrying up to wait_s)."""
        with self._apply_lock:
            return self._flush(wait_s)

    def _flush(self, wait_s: float, due_only: bool = False) -> bool:
        """Apply queued writes, trial by trial (only the trials whose writes are due, if due_only)."""
        deadline = time.time() + wait_s
        while self.pending:
            if time.time() < self._retry_at:  # the store failed a moment ago
                if time.time() >= deadline:
                    self._save_journal(every_s=1.0)  # what arrived since the failure, for a kill to keep
                    return False
                time.sleep(max(0.0, min(self._retry_at, deadline) - time.time()))
                continue
            taken = [self.pending.popleft() for _ in range(len(self.pending))]
            by_trial: dict[int, list[dict]] = {}
            for intent in taken:
                by_trial.setdefault(intent["index"], []).append(intent)
            now_ms = time.time() * 1000
            done: set[int] = set()
            failed = False
            for i, intents in by_trial.items():
                if due_only and not any(x["op"] == "finished" or x.get("ts", 0) <= now_ms - self.hold_s * 1000
                                        for x in intents):
                    continue
                try:
                    self._apply(i, intents)
                except Exception as exc:  # noqa: BLE001 - the store is down: keep the intents, train on
                    self._failed(exc)
                    failed = True
                    break
                done.add(i)
            # what was not applied goes back in front, in order (new intents only ever join at the end)
            self.pending.extendleft(reversed([x for x in taken if x["index"] not in done]))
            if failed:
                self._save_journal()
                if time.time() >= deadline:
                    return False
                continue
            if done and self._warned:
                print("MLflow reachable again: queued results recorded", file=sys.stderr, flush=True)
                self._warned = False
            if due_only:
                break
        if self.journal is not None and self.journal.exists():
            self._save_journal()  # only a failure writes one; held writes are not journaled
        return not self.pending

    def _failed(self, exc: Exception) -> None:
        self._retry_at = time.time() + self.retry_s
        if not self._warned:
            print(f"warning: MLflow unreachable ({redact_url(str(exc).splitlines()[0])[:200]}); "
                  f"queueing results and retrying every {self.retry_s:g}s", file=sys.stderr, flush=True)
            self._warned = True

    def drain(self) -> None:
        """Apply every queued write, waiting for the store (SCALING_MLFLOW_WAIT_S); else raise RuntimeError."""
        if not self.flush(wait_s=float(os.environ.get("SCALING_MLFLOW_WAIT_S", "120"))):
            raise RuntimeError(f"MLflow still unreachable: {len(self.pending)} results kept in {self.journal}; "
                               "run the same command with hydra.sweeper.resume=true to record them")

    def use_journal(self, path: Path) -> None:
        """Journal unapplied writes to `path`, and queue any left there by an earlier run."""
        self.journal = path
        if not path.exists():
            return
        intents = [json.loads(line) for line in path.read_text().splitlines() if line]
        for intent in intents:  # what the earlier run already knew, before MLflow hears of it
            i = intent["index"]
            if intent["op"] == "finished":
                self.status[i] = intent["status"]
            elif intent["op"] == "metrics":
                self.logged_samples[i] = max(self.logged_samples.get(i, -1), int(intent["metrics"].get("samples", 0)))
            elif i not in self.status:
                self.status[i] = "running"
        self.pending.extendleft(reversed(intents))

    def _save_journal(self, every_s: float = 0.0) -> None:
        if self.journal is None or time.time() < self._journal_at + every_s:
            return
        self._journal_at = time.time()
        if not self.pending:
            self.journal.unlink(missing_ok=True)
            return
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(i) + "\n" for i in list(self.pending)))
        os.replace(tmp, self.journal)  # atomic: a kill leaves the old or the new journal, never half

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
        self.client.log_text(self.trial_runs[index], config_yaml(recorded_config(cfg)), "config.yaml")
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
        self.client.log_text(self.run_id, json.dumps(best_per_batch, indent=2, default=str), "best_per_batch_size.json")
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
