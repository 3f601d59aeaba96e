"""Where a trial's metrics go. The trial loop calls `reporter.report(metrics)` and nothing else.

The base class does nothing; the caller injects MLflow, Ray Tune, a progress bar, or several
at once. This seam keeps `train.py` free of ray and mlflow imports and easy to test.
"""
from __future__ import annotations

from typing import Any, Callable, Optional


class Reporter:
    """Receives a trial's evaluations. Subclasses override what they need; all are no-ops here."""

    def start(self, info: dict[str, Any]) -> None:
        """Called once before training with derived values (effective lr, steps per epoch...)."""

    def report(self, metrics: dict[str, float], checkpoint: Optional[Callable[[], dict]] = None) -> None:
        """Called at every evaluation; `checkpoint()` returns the trial state when one is wanted."""

    def finish(self, result: Any) -> None:
        """Called once with the TrialResult, whatever the status."""


class MultiReporter(Reporter):
    """Fans every call out to several reporters, in order."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = [r for r in reporters if r is not None]

    def start(self, info: dict[str, Any]) -> None:
        for r in self.reporters:
            r.start(info)

    def report(self, metrics: dict[str, float], checkpoint: Optional[Callable[[], dict]] = None) -> None:
        for r in self.reporters:
            r.report(metrics, checkpoint)

    def finish(self, result: Any) -> None:
        for r in self.reporters:
            r.finish(result)


class RecordingReporter(Reporter):
    """Keeps every report in memory: for tests, notebooks and benchmarks."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []
        self.result: Any = None

    def start(self, info: dict[str, Any]) -> None:
        self.info = dict(info)

    def report(self, metrics: dict[str, float], checkpoint: Optional[Callable[[], dict]] = None) -> None:
        self.history.append(dict(metrics))

    def finish(self, result: Any) -> None:
        self.result = result


class ProgressReporter(Reporter):
    """A tqdm bar over epochs showing the latest losses (single runs in a terminal)."""

    def __init__(self, total_epochs: float, desc: str = "trial") -> None:
        self.total_epochs, self.desc, self.bar = total_epochs, desc, None

    def start(self, info: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        if info.get("total_steps") and info.get("steps_per_epoch"):  # the budget to the nearest whole step
            self.total_epochs = info["total_steps"] / info["steps_per_epoch"]
        fmt = "{l_bar}{bar}| {n:.2f}/{total:.2f} epochs [{elapsed}<{remaining}{postfix}]"
        self.bar = tqdm(total=self.total_epochs, desc=self.desc, bar_format=fmt, leave=False)

    def report(self, metrics: dict[str, float], checkpoint: Optional[Callable[[], dict]] = None) -> None:
        if self.bar is None:
            return
        self.bar.n = min(metrics["epoch"], self.total_epochs)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", val_loss=f"{metrics['val/loss']:.4f}",
                             val_acc=f"{metrics['val/acc']:.3f}", refresh=False)
        self.bar.refresh()

    def finish(self, result: Any) -> None:
        if self.bar is not None:
            self.bar.close()
