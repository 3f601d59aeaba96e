"""The worker's side of a study on Ray Tune: the function trainable that runs one grid point and the
reporter that sends its evaluations, checkpoints and final status to Tune.

Workers run `train.run_trial` with a TuneReporter; the driver's callback (`study_callback`) turns
every result into MLflow writes and keeps the terminal progress line. Worker processes
are reused between trials (`reuse_actors`): a new Python + torch process per trial costs
more than a small trial.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from scaling.reporters import Reporter
from scaling.staging import checkpoint_staging


@dataclass
class TrialSpec:
    """One point of the grid: its index, its resolved config and its axis values."""

    index: int
    config: dict
    axes: dict[str, Any]
    overrides: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ worker side


class TuneReporter(Reporter):
    """Sends the trial's evaluations to Ray Tune when they matter, with a checkpoint when due, and
    the final status.

    Tune blocks a function trainable at every report until its controller has taken the result
    (synchronous reporting): a round trip through the driver, ~30-50 ms on a loaded 2-core
    machine, 10 per trial in the benchmark study. So an evaluation is sent at once only when the
    scheduler must see it (the first one at or past each of `report_at`, ASHA's rungs), when it is
    the trial's last, or when `interval_s` has passed since the last report; the others travel
    with the next report (`history`) and the driver records every one, in order.

    A checkpoint rides on a report when the last one (or the trial's start) is at least
    `interval_s` old. Saving costs a deep copy, a torch.save and Tune's registration of the
    folder (measured: 3 s of a 19 s study of 32 short trials at every evaluation).
    """

    def __init__(self, checkpointing: bool, interval_s: float = 0.0, report_at: tuple = (),
                 checkpoint_at_rungs: bool = False) -> None:
        self.checkpointing, self.interval_s = checkpointing, interval_s
        self.checkpoint_at_rungs = checkpoint_at_rungs  # promotion-based ASHA may pause the trial there
        self.report_at = sorted(float(t) for t in report_at)  # epochs (the scheduler's time_attr)
        self._saved_at = self._reported_at = time.monotonic()
        self.pending: list[dict[str, float]] = []  # evaluations not sent yet, oldest first
        self.last: dict[str, float] = {}
        self.total_steps = None
        self.node_id: Optional[str] = None
        self.gpu_ids = ""
        self.resumed_from: Optional[int] = None
        self.extra: dict[str, Any] = {}  # sent with every result (e.g. a range test's ref_lr)
        self.derived: Optional[str] = None  # the loop's derived values, sent once (the driver logs derived.*)

    def _node(self) -> dict[str, str]:
        """Return the Ray node this trial runs on (the driver tags the trial run with it)."""
        if self.node_id is None:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
            self.gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
        return {"node_id": self.node_id, "gpu_ids": self.gpu_ids}

    def start(self, info: dict[str, Any]) -> None:
        self._saved_at = self._reported_at = time.monotonic()
        self.total_steps = info.get("total_steps")
        self.resumed_from = info.get("resumed_from_step")
        self.derived = json.dumps({k: v for k, v in info.items() if k != "resumed_from_step"})

    def _once(self) -> dict[str, str]:
        derived, self.derived = self.derived, None
        return {"derived": derived} if derived else {}

    def _history(self) -> dict[str, str]:
        pending, self.pending = self.pending, []
        return {"history": json.dumps(pending)} if pending else {}

    def _crosses_rung(self, epoch: float) -> bool:
        crossed = False
        while self.report_at and epoch >= self.report_at[0]:  # the scheduler's own test: t >= rung
            self.report_at.pop(0)
            crossed = True
        return crossed

    def report(self, metrics: dict[str, float], checkpoint=None) -> None:
        from ray import tune

        self.last = dict(metrics)
        now = time.monotonic()
        # The last evaluation carries the status: the scheduler stops trials at max_t on this very
        # report, so a later "finish" report might never reach the driver.
        last = self.total_steps is not None and metrics.get("step", 0) >= self.total_steps
        rung = self._crosses_rung(float(metrics.get("epoch", 0.0)))
        if not (last or rung or now - self._reported_at >= self.interval_s):
            self.pending.append(dict(metrics))
            return
        self._reported_at = now
        result = self._result(metrics, "completed" if last else "running")
        due = now - self._saved_at >= self.interval_s or (rung and self.checkpoint_at_rungs)
        if self.checkpointing and checkpoint is not None and due:
            import torch

            self._saved_at = now
            folder = checkpoint_staging()
            torch.save(checkpoint(), os.path.join(folder, "state.pt"))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))  # persisted to storage first
            shutil.rmtree(folder, ignore_errors=True)
        else:
            tune.report(result)

    def flush(self) -> None:
        """Send the evaluations held back: an attempt that fails records its curve up to the failure."""
        from ray import tune

        if not self.pending:
            return
        last = self.pending.pop()
        tune.report(self._result(last, "running"))

    def _result(self, metrics: dict[str, float], status: str) -> dict[str, Any]:
        """Return an evaluation as Tune gets it: with the status, the node, the held-back history and extras."""
        result = {**metrics, "trial_status": status, **self._node(), **self._once(), **self._history()}
        if self.resumed_from:
            result["resumed_from_step"] = self.resumed_from
        return {**result, **self.extra}

    def finish(self, result: Any) -> None:
        from ray import tune

        final = {"val/loss": math.nan, "val/acc": math.nan, "epoch": 0.0, "samples": 0, **self.last,
                 **result.metrics, **(result.target or {})}
        if "mem/peak_mb" not in result.metrics and "mem/peak_mb" in result.info:  # out of memory: the peak that ended it
            final["mem/peak_mb"] = result.info["mem/peak_mb"]
        final.update(trial_status=result.status, trial_reason=result.reason, **self._node(), **self._once(),
                     **self._history(), **self.extra)
        if self.resumed_from:  # a trial lost after its last evaluation resumes straight into finish()
            final["resumed_from_step"] = self.resumed_from
        if result.status in ("diverged", "oom"):
            final["val/loss"] = math.nan  # never "best": the scheduler and the report treat NaN as worst
        tune.report(final)


def trainable(params: dict, configs: dict) -> None:
    """Ray Tune function trainable: run one trial of the grid, resuming from a checkpoint if any."""
    from scaling.heap import imports_without_gc

    with imports_without_gc():  # a worker's first trial imports torch, after Ray and Ray Tune
        import torch
        from omegaconf import OmegaConf
        from ray import tune

        from scaling.split import plan_split
        from scaling.train import run_trial

    torch.set_num_threads(max(1, int(params.get("cpus", 1))))
    gpus = float(params.get("gpus", 0) or 0)
    if 0 < gpus < 1 and torch.cuda.is_available():
        # Ray does not enforce fractions: make the share a hard ceiling of torch's allocator, so a
        # trial packed at 0.25 GPU gets an OOM (status `oom`) instead of starving its neighbours
        torch.cuda.set_per_process_memory_fraction(gpus)
    cfg = OmegaConf.create(configs[params["point"]["index"]])
    resume = None
    ckpt = tune.get_checkpoint()  # Ray's retry after a lost worker, else an earlier attempt's file
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    elif params["point"].get("resume_from"):
        resume = torch.load(params["point"]["resume_from"], weights_only=False)
    reporter = TuneReporter(params.get("checkpoint", True), params.get("checkpoint_interval_s", 0.0),
                            params.get("report_at", ()), params.get("checkpoint_at_rungs", False))
    ref_lr = params.get("ref_lr")
    if cfg.schedule.from_lr_find and resume is None:  # Smith: the cycle's peak from a range test at this batch size
        from scaling.lr_finder import trial_ref_lr

        ref_lr, _ = trial_ref_lr(cfg, ref_lr=ref_lr)
        reporter.extra["lr_find_ref_lr"] = ref_lr
    elif resume is not None and resume.get("ref_lr") is not None:
        ref_lr = resume["ref_lr"]
        if cfg.schedule.from_lr_find:  # the driver may have died before it recorded the LR
            reporter.extra["lr_find_ref_lr"] = ref_lr
    workers = plan_split(cfg).workers
    if workers > 1:  # this trial drives a Ray Train run of `workers` data-parallel ranks (scaling.distributed)
        from scaling.distributed import run_data_parallel

        run_data_parallel(cfg, reporter, workers, resume=resume, ref_lr=ref_lr,
                          checkpoints=reporter.checkpointing, cpus_per_worker=params.get("cpus", 1),
                          gpus_per_worker=params.get("gpus", 0), storage_path=tune.get_context().get_trial_dir())
        return
    try:
        run_trial(cfg, reporter, dataset=_dataset(cfg.data), resume=resume, ref_lr=ref_lr)
    except Exception:
        reporter.flush()  # else the evaluations since the last report die with the attempt, unrecorded
        raise


_DATASET: dict[str, Any] = {}  # data_key -> Dataset, the last one only: a reused actor's next trial skips the load


def data_key(data: Any) -> str:
    """Return a key naming a dataset config (plain dict or DictConfig)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else dict(data)
    container.pop("root", None)  # made absolute for the workers; the same files either way
    return json.dumps(container, sort_keys=True)


def _dataset(data_cfg: Any) -> Any:
    """Return the trial's dataset, loaded once per worker process while trials keep asking for it.

    Actors are reused between trials, so a worker's next trial on the same data takes it from
    memory: CIFAR-10 from its pickles costs ~2 s a trial, MNIST-1D from its cache ~50 ms.
    """
    from scaling.data import load_dataset

    key = data_key(data_cfg)
    if key not in _DATASET:
        _DATASET.clear()  # one dataset per worker: a study over several never holds them all
        _DATASET[key] = load_dataset(data_cfg)
    return _DATASET[key]
