"""Runs a study's trials on Ray Tune, with stratified ASHA, recording each in MLflow from the driver.

Workers run `train.run_trial` with a Tune reporter; the driver's callback turns every result
into MLflow writes (StudyRecorder) and keeps the terminal progress line. Worker processes
are reused between trials (`reuse_actors`): a new Python + torch process per trial costs
more than a small trial.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from scaling.reporters import Reporter
from scaling.study_record import TERMINAL

log = logging.getLogger(__name__)


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
        result = {**metrics, "trial_status": "completed" if last else "running", **self._node(), **self._once(),
                  **self._history()}
        if self.resumed_from:
            result["resumed_from_step"] = self.resumed_from
        result.update(self.extra)
        due = now - self._saved_at >= self.interval_s or (rung and self.checkpoint_at_rungs)
        if self.checkpointing and checkpoint is not None and due:
            import torch

            self._saved_at = now
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(checkpoint(), os.path.join(tmp, "state.pt"))
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(result)

    def finish(self, result: Any) -> None:
        from ray import tune

        final = {"val/loss": math.nan, "val/acc": math.nan, "epoch": 0.0, "samples": 0, **self.last,
                 **result.metrics, **(result.target or {})}
        final.update(trial_status=result.status, trial_reason=result.reason, **self._node(), **self._once(),
                     **self._history(), **self.extra)
        if self.resumed_from:  # a trial lost after its last evaluation resumes straight into finish()
            final["resumed_from_step"] = self.resumed_from
        if result.status in ("diverged", "oom"):
            final["val/loss"] = math.nan  # never "best": the scheduler and the report treat NaN as worst
        tune.report(final)


def trainable(params: dict, configs: dict) -> None:
    """Ray Tune function trainable: run one trial of the grid, resuming from a checkpoint if any."""
    import torch
    from omegaconf import OmegaConf
    from ray import tune

    from scaling.validation import plan_split
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
    workers = plan_split(cfg).workers
    if workers > 1:  # this trial drives a Ray Train run of `workers` data-parallel ranks (scaling.distributed)
        from scaling.distributed import run_data_parallel

        run_data_parallel(cfg, reporter, workers, resume=resume, ref_lr=ref_lr,
                          checkpoints=reporter.checkpointing, cpus_per_worker=params.get("cpus", 1),
                          gpus_per_worker=params.get("gpus", 0), storage_path=tune.get_context().get_trial_dir())
        return
    run_trial(cfg, reporter, dataset=_dataset(cfg.data), resume=resume, ref_lr=ref_lr)


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


# ------------------------------------------------------------------ driver side


def _recorded(result: dict) -> dict:
    """Return the metrics of a result (or of an evaluation it carried) that a trial run records."""
    return {k: v for k, v in result.items() if "/" in k or k in ("lr", "samples", "step", "epoch")}


def _callback_class():
    from ray.tune import Callback

    class StudyCallback(Callback):
        """Driver-side: records each trial in MLflow and prints the study's progress."""

        def __init__(self, recorder, specs: dict[int, TrialSpec], scheduler, quiet: bool = False):
            self.recorder, self.specs, self.scheduler, self.quiet = recorder, specs, scheduler, quiet
            self.t0 = time.time()
            self.running: set[int] = set()
            self.final: dict[int, dict] = {}
            self.resumed: set[int] = set()
            self.unpaused: dict[int, int] = {}  # trial index -> the step it last resumed from a pause
            self.tagged_lr: set[int] = set()
            self.nodes: dict[int, str] = {}  # trial index -> the Ray node id it last reported from

        def _index(self, trial) -> int:
            return int(trial.config["point"]["index"])

        def on_trial_start(self, iteration, trials, trial, **info):
            i = self._index(trial)
            # the spec's resolved dict as it is: a DictConfig made from it here only went back to a dict
            # (~3 ms per trial on the thread every running trial's report waits for)
            self.recorder.trial_started(i, self.specs[i].config, {"tune.trial_id": trial.trial_id})
            self.running.add(i)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            i = self._index(trial)
            metrics = _recorded(result)
            node = result.get("node_id")
            if node and self.nodes.get(i) != node:  # tag the run with where it ran (a retry may move it)
                self.nodes[i] = node
                self.recorder.trial_tags(i, {"ray.node_id": node, "ray.node_ip": str(result.get("node_ip", "")),
                                             "ray.gpu_ids": str(result.get("gpu_ids", ""))})
            if result.get("derived"):  # the trial loop's derived values (lr, steps, the data-parallel split)
                derived = json.loads(result["derived"])
                self.recorder.trial_params(i, {f"derived.{k}": str(v) for k, v in derived.items()})
            step = result.get("resumed_from_step")
            retry = trial.num_failures > 0 and i not in self.resumed  # Tune restarted it after a failure
            if step and not retry and self._unpaused(trial, step):  # promotion-based ASHA paused it there
                if self.unpaused.get(i) != step:
                    self.unpaused[i] = step
                    steps = sorted(self.scheduler.paused_steps[trial.trial_id])
                    self.recorder.trial_tag(i, "asha.paused_at_steps", ",".join(map(str, steps)))
            elif step and i not in self.resumed:
                self.resumed.add(i)
                self.recorder.trial_tag(i, "trial.resumed_from_step", str(step))
            if "lr_find_ref_lr" in result and i not in self.tagged_lr:
                self.tagged_lr.add(i)
                self.recorder.trial_tag(i, "lr_find.ref_lr", repr(result["lr_find_ref_lr"]))
            status = result.get("trial_status", "running")
            for earlier in json.loads(result.get("history") or "[]"):  # evaluations held back by the trial
                self.recorder.trial_metrics(i, _recorded(earlier))
            if status in ("running", "completed"):  # "completed" rides on the last evaluation
                self.recorder.trial_metrics(i, metrics)
            if status != "running":
                self.final[i] = dict(result)

        def _unpaused(self, trial, step: int) -> bool:
            """True when the trial resumed from where the scheduler paused it (not a failure's retry)."""
            return int(step) in getattr(self.scheduler, "paused_steps", {}).get(trial.trial_id, ())

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, error=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            """A failed attempt that Tune retries (max_failures): the run says so and stays running."""
            self.recorder.trial_tags(self._index(trial), {"trial.failures": str(trial.num_failures),
                                                          "trial.last_failure": _error_reason(trial)[:500]})

        def _finish(self, trial, error: bool = False) -> None:
            i = self._index(trial)
            self.running.discard(i)
            final = self.final.get(i)
            if error:
                status, reason = "error", _error_reason(trial)
            elif final is not None:
                status, reason = final["trial_status"], final.get("trial_reason", "")
            elif self.scheduler is not None and trial.trial_id in self.scheduler.pruned_trial_ids:
                status, reason = "pruned", "stopped by ASHA"
            else:  # ended without a final report (e.g. stopped at the end of the study)
                status, reason = "error", "ended without reporting a final status"
            # where it stopped too: a trial that ended between evaluations (diverged, out of memory) trained
            # past its last recorded point, and samples/trained counts what it trained
            summary = {k: v for k, v in (final or {}).items()
                       if k.startswith(("target/", "best/", "mem/")) or k in ("samples", "step", "epoch")}
            if trial.num_failures:  # failed attempts, the last one included when it ends the trial
                self.recorder.trial_tags(i, {"trial.failures": str(trial.num_failures)})
            self.recorder.trial_finished(i, status, reason, summary)
            if not self.quiet:
                self._print_progress()

        def _print_progress(self) -> None:
            from collections import Counter

            done = Counter(self.recorder.status.values())
            best = best_per_batch_size(self.recorder, self.specs)
            bests = " ".join(f"{b}:{v['best/val_loss']:.3f}" for b, v in sorted(best.items()))
            finished = sum(n for status, n in done.items() if status in TERMINAL)
            waiting = len(getattr(self.scheduler, "waiting", ()))  # paused at a rung (promotion-based ASHA)
            running = f"running {len(self.running) - waiting}" + (f" waiting {waiting}" if waiting else "")
            print(f"[{time.time() - self.t0:6.0f}s] done {finished}/{len(self.specs)} {running} "
                  f"pruned {done.get('pruned', 0)} diverged {done.get('diverged', 0)} "
                  f"| best val/loss per batch size {bests}", flush=True)

    return StudyCallback


def _error_reason(trial) -> str:
    """Return the last line of a failed trial's error (the exception), or a generic reason."""
    text = ""
    try:  # Tune writes the error next to the trial locally before calling back; storage may lag
        with open(trial.error_file) as f:
            text = f.read()
    except (OSError, TypeError, AttributeError):
        try:
            text = str(trial.get_error() or "")
        except Exception:  # noqa: BLE001 - the error file may be gone with a lost node
            text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][-2000:] if lines else "worker failed (no error recorded)"


def best_per_batch_size(recorder, specs: dict[int, TrialSpec]) -> dict[int, dict]:
    """Return, per batch size, the trial with the lowest best/val_loss (diverged and oom excluded)."""
    best: dict[int, dict] = {}
    for i, loss in recorder.best.items():
        if recorder.status.get(i) in ("diverged", "oom", "error") or not math.isfinite(loss):
            continue
        cfg = specs[i].config
        b = int(cfg["batch_size"])
        if b not in best or loss < best[b]["best/val_loss"]:
            best[b] = {"best/val_loss": loss, "trial": i, "run_id": recorder.trial_runs.get(i),
                       "lr_multiplier": cfg["lr_multiplier"], "rule": cfg["scaling"]["rule"],
                       "axes": specs[i].axes}
    return best
