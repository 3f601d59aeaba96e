"""The driver's side of a study on Ray Tune: a Tune callback that turns every trial's results into
MLflow writes (through the StudyRecorder) and prints the study's progress line.

The callback's class derives from `ray.tune.Callback`, so it is made on first use
(`callback_class`): the modules that import this one stay free of `ray.tune` until a study runs.
"""
from __future__ import annotations

import json
import math
import platform
import time

from scaling.recorded import lr_params
from scaling.study import TrialSpec
from scaling.study_record import TERMINAL

HOSTNAME = platform.node()  # as Tune's results name the machine a worker ran on


def _recorded(result: dict) -> dict:
    """Return the metrics of a result (or of an evaluation it carried) that a trial run records."""
    return {k: v for k, v in result.items() if "/" in k or k in ("lr", "samples", "step", "epoch")}


def callback_class():
    """Return the Tune callback class (built on first use: it needs `ray.tune`)."""
    from ray.tune import Callback

    class StudyCallback(Callback):
        """Driver-side: records each trial in MLflow and prints the study's progress."""

        def __init__(self, recorder, specs: dict[int, TrialSpec], scheduler, quiet: bool = False):
            self.recorder, self.specs, self.scheduler, self.quiet = recorder, specs, scheduler, quiet
            self.t0 = time.time()
            self.running: set[int] = set()
            self.final: dict[int, dict] = {}
            self.resumed: set[int] = set()
            self.retrying: set[int] = set()  # restarted after a failure, no result from the new attempt yet
            self.unpaused: dict[int, int] = {}  # trial index -> the step it last resumed from a pause
            self.ref_lrs: dict[int, float] = {}  # trial index -> ref_lr of its own range test (from_lr_find)
            self.nodes: dict[int, str] = {}  # trial index -> the Ray node id it last reported from
            self.local_pids: set[int] = set()  # the worker processes on this node that ran trials

        def _index(self, trial) -> int:
            return int(trial.config["point"]["index"])

        def on_trial_start(self, iteration, trials, trial, **info):
            i = self._index(trial)
            # the spec's resolved dict as it is: a DictConfig made from it here only went back to a dict
            # (~3 ms per trial on the thread every running trial's report waits for)
            self.recorder.trial_started(i, self.specs[i].config, {"tune.trial_id": trial.trial_id},
                                        self.specs[i].axes)
            self.running.add(i)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            i = self._index(trial)
            metrics = _recorded(result)
            if result.get("pid") and result.get("hostname") == HOSTNAME:  # Tune fills both in
                self.local_pids.add(int(result["pid"]))
            node = result.get("node_id")
            if node and self.nodes.get(i) != node:  # tag the run with where it ran (a retry may move it)
                self.nodes[i] = node
                self.recorder.trial_tags(i, {"ray.node_id": node, "ray.node_ip": str(result.get("node_ip", "")),
                                             "ray.gpu_ids": str(result.get("gpu_ids", ""))})
            if result.get("derived"):  # the trial loop's derived values (lr, steps, the data-parallel split)
                derived = json.loads(result["derived"])
                self.recorder.trial_params(i, {f"derived.{k}": str(v) for k, v in derived.items()})
            step = result.get("resumed_from_step")
            # the new attempt's first result: a retry from scratch carries no step, and a later
            # resume from a pause must not be taken for the retry's
            retry = i in self.retrying and i not in self.resumed
            self.retrying.discard(i)
            if step and not retry and self._unpaused(trial, step):  # promotion-based ASHA paused it there
                if self.unpaused.get(i) != step:
                    self.unpaused[i] = step
                    steps = sorted(self.scheduler.paused_steps[trial.trial_id])
                    self.recorder.trial_tag(i, "asha.paused_at_steps", ",".join(map(str, steps)))
            elif step and i not in self.resumed:
                self.resumed.add(i)
                self.recorder.trial_tag(i, "trial.resumed_from_step", str(step))
            if "lr_find_ref_lr" in result and i not in self.ref_lrs:  # the trial's own range test chose its LR
                self.ref_lrs[i] = ref = float(result["lr_find_ref_lr"])
                self.recorder.trial_tag(i, "lr_find.ref_lr", repr(ref))
                self.recorder.trial_params(i, lr_params(self.specs[i].config, ref))
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
            self.retrying.add(self._index(trial))
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
            # failed trials too, when there are any: "done 4/4 ... pruned 0 diverged 0" hid four errors
            failed = "".join(f" {s} {done[s]}" for s in ("oom", "error") if done.get(s))
            print(f"[{time.time() - self.t0:6.0f}s] done {finished}/{len(self.specs)} {running} "
                  f"pruned {done.get('pruned', 0)} diverged {done.get('diverged', 0)}{failed} "
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
