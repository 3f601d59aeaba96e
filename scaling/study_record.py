"""The study's MLflow record, written by the driver: one study run, one nested run per trial.

The driver is the single writer (workers on other nodes need no access to the tracking
store, and SQLite never sees concurrent writers). Writes are idempotent by step: a point at
or below the highest `samples` already logged for a trial is skipped, so a resumed study
neither loses nor doubles a metric point.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any, Optional

from scaling.tracking import (KIND_TAG, STATUS_TAG, STUDY_TAG, get_experiment_id, log_metrics, log_params,
                              make_client, provenance_tags, trial_params, trial_run_name)

TRIAL_INDEX_TAG = "scaling.trial_index"
TERMINAL = ("completed", "pruned", "early_stopped", "diverged", "oom", "error")


class StudyRecorder:
    """Creates (or reopens) the study run and records every trial under it."""

    def __init__(self, tracking_uri: str, experiment: str, *, study_name: str, run_id: Optional[str] = None):
        self.uri, self.experiment, self.study_name = tracking_uri, experiment, study_name
        self.client = make_client(tracking_uri)
        self.exp_id = get_experiment_id(self.client, experiment)
        self.run_id = run_id
        self.trial_runs: dict[int, str] = {}  # trial index -> run id
        self.logged_samples: dict[int, int] = {}  # trial index -> highest step logged
        self.status: dict[int, str] = {}
        self.best: dict[int, float] = {}

    def __getstate__(self) -> dict:  # Ray may pickle callbacks holding us; the client is rebuilt
        state = dict(self.__dict__)
        state["client"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.client = make_client(self.uri)

    # ---------------------------------------------------------------- study run
    def start(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Create the study run, or reopen it (resume) and reload its trials' state; return its id."""
        if self.run_id is None:
            run = self.client.create_run(self.exp_id, run_name=self.study_name,
                                         tags={KIND_TAG: "study", STATUS_TAG: "running", **provenance_tags(), **tags})
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
            self.status[i] = r.data.tags.get(STATUS_TAG, "running")
            self.logged_samples[i] = int(r.data.metrics.get("samples", -1)) if "samples" in r.data.metrics else -1
            if "best/val_loss" in r.data.metrics:
                self.best[i] = r.data.metrics["best/val_loss"]

    def finished_indices(self) -> set[int]:
        """Return the trial indices already recorded with a terminal status."""
        return {i for i, s in self.status.items() if s in TERMINAL}

    # ---------------------------------------------------------------- trial runs
    def trial_started(self, index: int, cfg: Any, extra_tags: Optional[dict[str, str]] = None) -> str:
        """Return the trial's run id, creating the nested run on first start."""
        if index in self.trial_runs:
            self.client.set_terminated(self.trial_runs[index], status="RUNNING")
            return self.trial_runs[index]
        tags = {KIND_TAG: "trial", STATUS_TAG: "running", "mlflow.parentRunId": self.run_id,
                STUDY_TAG: self.run_id, TRIAL_INDEX_TAG: str(index), **(extra_tags or {})}
        run = self.client.create_run(self.exp_id, run_name=trial_run_name(cfg), tags=tags)
        run_id = run.info.run_id
        self.trial_runs[index], self.logged_samples[index] = run_id, -1
        log_params(self.client, run_id, trial_params(cfg))
        from omegaconf import OmegaConf

        self.client.log_text(run_id, OmegaConf.to_yaml(cfg), "config.yaml")
        return run_id

    def trial_metrics(self, index: int, metrics: dict[str, float]) -> None:
        """Log one evaluation unless a point at this sample count is already recorded."""
        step = int(metrics.get("samples", 0))
        if step <= self.logged_samples.get(index, -1):
            return
        log_metrics(self.client, self.trial_runs[index], metrics, step=step)
        self.logged_samples[index] = step
        if "best/val_loss" in metrics and math.isfinite(metrics["best/val_loss"]):
            self.best[index] = metrics["best/val_loss"]

    def trial_finished(self, index: int, status: str, reason: str = "", summary: Optional[dict] = None) -> None:
        """Set the trial's terminal status (and a summary at its last step) and close its run."""
        run_id = self.trial_runs[index]
        if summary:
            log_metrics(self.client, run_id, summary, step=max(self.logged_samples.get(index, 0), 0))
        self.client.set_tag(run_id, STATUS_TAG, status)
        if reason:
            self.client.set_tag(run_id, "trial.reason", reason[:5000])
        self.client.set_terminated(run_id, status="FAILED" if status == "error" else "FINISHED")
        self.status[index] = status

    # ---------------------------------------------------------------- end of study
    def finish(self, n_trials: int, samples_full_grid: int, samples_trained: int, best_per_batch: dict,
               interrupted: bool = False) -> dict[str, int]:
        """Record counts by status, samples trained vs the full grid, and the best trial per batch size."""
        counts = Counter(self.status.values())
        metrics = {f"trials/{s}": float(counts.get(s, 0)) for s in TERMINAL}
        metrics["trials/total"] = float(n_trials)
        metrics["samples/trained"] = float(samples_trained)
        metrics["samples/full_grid"] = float(samples_full_grid)
        metrics["samples/fraction"] = samples_trained / max(samples_full_grid, 1)
        log_metrics(self.client, self.run_id, metrics, step=0)
        self.client.log_text(self.run_id, json.dumps(best_per_batch, indent=2, default=str), "best_per_batch_size.json")
        self.client.set_tag(self.run_id, STATUS_TAG, "interrupted" if interrupted else "completed")
        self.client.set_terminated(self.run_id, status="KILLED" if interrupted else "FINISHED",
                                   end_time=int(time.time() * 1000))
        return dict(counts)
