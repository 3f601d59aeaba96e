"""`scaling-lr-find [overrides]`: one LR range test per batch size, recorded in MLflow, and the LR-vs-B fit.

    scaling-lr-find batch_size=32,256,2048 optimizer=adam lr_find.suggestion=steep

`batch_size=32,256,2048` is not a Hydra multirun: the script runs the tests one after another on
one loaded dataset (the comma list becomes `lr_find.batch_sizes`, which may also be given as
a list, but not beside it). Per batch size it prints fastai's three suggestions, naming the one
in use, and records one MLflow run (tag scaling.kind=lr_find): the curve as metrics at step = iteration
(`lr` beside `lr_find/loss` and `lr_find/loss_smoothed`), the suggestions as params, and
lr_find.png / lr_find.json as artifacts. With two or more batch sizes it then fits how the
suggested LR moves with batch size, lr(B) ~ B^alpha, beside the linear (1) and sqrt (0.5) rules.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import uuid
from typing import Any, Optional, Sequence

from scaling import interrupts
from scaling.config import ConfigError, redact_url
from scaling.staging import artifact_folder, log_text
from scaling.data_fit import check_batch_fits
from scaling.validation import at_batch_size, validate

CURVE_METRICS = {"lr": "lrs", "lr_find/loss": "losses", "lr_find/loss_smoothed": "smoothed"}
BATCH_LIST = re.compile(r"\s*(\[?)\s*(\d+(?:\s*,\s*\d+)*)\s*(\]?)\s*")  # 32,256 or [32, 256]


def expand_batch_sizes(argv: Sequence[str]) -> list[str]:
    """Return argv with `batch_size=32,256` rewritten as `lr_find.batch_sizes=[32,256]` (one line on error).

    batch_size and lr_find.batch_sizes together are refused: the list would replace batch_size silently.
    """
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "batch_size" or not set(",[]") & set(value):
            out.append(arg)
            continue
        m = BATCH_LIST.fullmatch(value)
        if m is None or bool(m.group(1)) != bool(m.group(3)):  # brackets must pair: [32,64 is a typo
            raise ConfigError("batch_size", value, "must be one integer or a comma list of integers, e.g. 32,256,2048")
        out.append(f"lr_find.batch_sizes=[{','.join(v.strip() for v in m.group(2).split(','))}]")
    given = {a.partition("=")[0]: a.partition("=")[2] for a in argv}
    if "batch_size" in given and "lr_find.batch_sizes" in given:
        listed = given["lr_find.batch_sizes"]
        raise ConfigError("batch_size", given["batch_size"], f"conflicts with lr_find.batch_sizes={listed}, "
                          "which the range tests would use instead; give one of the two")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Check the command line (one line on error, nothing created), then run the tests as a Hydra app."""
    from scaling.cli import MULTIRUN_FLAGS, _run_hydra, fail
    from scaling.preflight import preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in MULTIRUN_FLAGS for a in argv):
        fail("scaling-lr-find runs one range test per batch size itself: drop -m and pass batch_size=32,256,2048")
    try:
        argv = expand_batch_sizes(argv)
    except ConfigError as exc:
        fail(str(exc))
    preflight(argv, check=validate_tested)
    _run_hydra(_task, argv)


def tested_batch_sizes(cfg: Any) -> tuple[str, list[int]]:
    """Return (the key that lists them, the batch sizes the range tests run at)."""
    if cfg.lr_find.batch_sizes:
        return "lr_find.batch_sizes", [int(b) for b in cfg.lr_find.batch_sizes]
    return "batch_size", [int(cfg.batch_size)]


def validate_tested(cfg: Any) -> None:
    """Validate cfg at every tested batch size; an error found at one names the key that lists it.

    The tested batch sizes replace batch_size, which the test never uses (its default may not even
    fit the data), so cfg is never validated at batch_size itself.
    """
    key, sizes = tested_batch_sizes(cfg)
    for b in sizes:
        try:
            validate(at_batch_size(cfg, b))
        except ConfigError as exc:
            raise (exc if key == "batch_size" else _at_tested(exc, key, b)) from None


def _at_tested(exc: ConfigError, key: str, batch_size: int) -> ConfigError:
    """Return exc as found at one of `key`'s batch sizes: `lr_find.batch_sizes=0: must be positive`."""
    if exc.key == "batch_size":
        return ConfigError(key, batch_size, exc.problem)
    return ConfigError(exc.key, exc.value,
                       exc.problem.replace(f"batch_size={batch_size}", f"batch size {batch_size} of {key}"))


def _task(cfg: Any) -> None:
    from scaling.cli import fail
    from scaling.lr_finder import range_test, usable_lr

    data = _checked_data(cfg)
    store = _Record(cfg)
    progress = sys.stderr.isatty() or os.environ.get("SCALING_PROGRESS") == "1"
    results, runs = [], []
    for b in tested_batch_sizes(cfg)[1]:
        result = range_test(cfg, data, b, progress=progress)
        try:  # before its run is created: a test that diverged at once records no NaN suggestions
            usable_lr(result, "lr_find.start_lr", cfg.lr_find.start_lr)
        except ConfigError as exc:
            _say_recorded(cfg, store.group, runs)  # the batch sizes tested before it are real results: kept, FINISHED
            fail(str(exc))
        run_id = store.record(result)
        interrupts.started()  # a test is recorded: a Ctrl-C from now on is "interrupted", the runs kept
        results.append(result)
        runs.append(run_id)
        print(result.describe() + (f" | mlflow run {run_id}" if run_id else ""), flush=True)
    line, alpha = fit_line([r.batch_size for r in results], [r.lr for r in results], cfg.lr_find.suggestion)
    if line:
        print(line, flush=True)
    for run_id in runs if store.client is not None and alpha is not None else []:
        store.client.set_tag(run_id, "lr_find.alpha", f"{alpha:.4g}")
    _say_recorded(cfg, store.group, runs)


def _checked_data(cfg: Any) -> Any:
    """Return the dataset, loaded once for every batch size, after checking cfg at each (exit with one line)."""
    from scaling.cli import fail
    from scaling.data import load_dataset

    key, batch_sizes = tested_batch_sizes(cfg)
    try:
        validate_tested(cfg)
        data = load_dataset(cfg.data)  # a missing dataset fails before any run
        for b in batch_sizes:
            check_batch_fits(key, b, data.n_train)
    except ConfigError as exc:
        fail(str(exc))
    return data


class _Record:
    """Where the range tests go. The store is checked before any test runs (one line, and nothing made,
    if it cannot be written or names a deleted experiment), and opened at the first result: a first
    test that fails leaves no empty store or experiment behind."""

    def __init__(self, cfg: Any):
        from scaling.cli import fail
        from scaling.store import check_tracking_uri, make_client, sqlite_path
        from scaling.tracking import get_experiment_id

        self.cfg, self.client, self.exp_id = cfg, None, None
        self.group = uuid.uuid4().hex[:12] if cfg.mlflow.enabled else None
        if not cfg.mlflow.enabled:
            return
        uri = cfg.mlflow.tracking_uri
        try:
            check_tracking_uri(uri)
            db = sqlite_path(uri)
            if db is None or db.exists():  # an existing store: its experiment is looked up, not created
                get_experiment_id(make_client(uri), cfg.mlflow.experiment, create=False)
        except ConfigError as exc:
            fail(str(exc))

    def record(self, result: Any) -> Optional[str]:
        """Record one batch size's test (opening the store and the experiment the first time); its run id."""
        if not self.cfg.mlflow.enabled:
            return None
        if self.client is None:
            from scaling.store import make_client
            from scaling.tracking import get_experiment_id

            self.client = make_client(self.cfg.mlflow.tracking_uri)
            self.exp_id = get_experiment_id(self.client, self.cfg.mlflow.experiment)
        return record(self.cfg, result, self.client, self.exp_id, self.group)


def _say_recorded(cfg: Any, group: Optional[str], runs: Sequence[Optional[str]]) -> None:
    """Print where the runs went, if any were recorded."""
    if any(runs):
        print(f"recorded in '{cfg.mlflow.experiment}' at {redact_url(cfg.mlflow.tracking_uri)} "
              f"(tag lr_find.group={group})", flush=True)


def fit_line(batch_sizes: Sequence[int], lrs: Sequence[float], suggestion: str) -> tuple[str, Optional[float]]:
    """Return (a line describing lr(B) ~ B^alpha beside the linear and sqrt rules, alpha); ('', None) if < 2 points."""
    from scaling.fits import RULES, fit_lr_exponent

    pts = [(b, lr) for b, lr in zip(batch_sizes, lrs) if math.isfinite(lr) and lr > 0]
    if len(pts) < 2:
        return "", None
    b, lr = zip(*pts)
    rules = f"linear rule: {RULES['linear']:g}, sqrt rule: {RULES['sqrt']:g}"
    head = f"{suggestion} LR vs batch size over {len(pts)} batch sizes: alpha = "
    if len(pts) >= 3:
        fit = fit_lr_exponent(b, lr)
        lo, hi = fit.alpha_interval
        nearest = ", ".join(fit.consistent) if fit.consistent else f"none (nearest: {fit.verdict})"
        return f"{head}{fit.alpha:.3f} (95% interval {lo:.2f}..{hi:.2f}; {rules}) -> consistent with {nearest}", fit.alpha
    alpha = math.log(lr[1] / lr[0]) / math.log(b[1] / b[0])
    nearest = min(RULES, key=lambda r: abs(RULES[r] - alpha))
    return f"{head}{alpha:.3f} (2-point slope, no interval; {rules}) -> nearest: {nearest}", alpha


# --------------------------------------------------------------------------- MLflow record


def record(cfg: Any, result: Any, client: Any, exp_id: str, group: str) -> str:
    """Return the id of a new MLflow run holding one range test: config + suggestions, curve, plot."""
    from scaling.recorded import config_params, param_values
    from scaling.tracking import KIND_TAG, log_params, provenance_tags

    tags = {KIND_TAG: "lr_find", "lr_find.group": group, **provenance_tags()}
    with interrupts.deferred():  # a Ctrl-C waits for the whole record: no run left RUNNING, half-logged
        run_id = client.create_run(exp_id, run_name=f"lr_find bs={result.batch_size}", tags=tags).info.run_id
        params = config_params(cfg)
        params["batch_size"] = str(result.batch_size)
        params.update(param_values(result.params()))
        log_params(client, run_id, params)
        log_range_test(client, run_id, result)
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def log_range_test(client: Any, run_id: str, result: Any, artifact_path: Optional[str] = None) -> None:
    """Log a range test into run_id: the curve (step = iteration), lr_find.png and lr_find.json."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(name, float(v), ts, i) for name, attr in CURVE_METRICS.items()
               for i, v in enumerate(getattr(result, attr)) if math.isfinite(v)]
    metrics += [Metric("lr_find/val_loss", v, ts, i) for i, v in result.val_losses.items() if math.isfinite(v)]
    for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)
    curve = {"batch_size": result.batch_size, "suggestion": result.suggestion, "suggestions": result.suggestions,
             "stopped_early": result.stopped_early, "num_iters": result.num_iters, "lrs": result.lrs,
             "losses": _json_floats(result.losses), "smoothed": _json_floats(result.smoothed),
             "val_losses": {str(k): v for k, v in result.val_losses.items()}}
    log_text(client, run_id, json.dumps(_json_safe(curve), indent=2, default=str), os.path.join(artifact_path or "", "lr_find.json"))
    with artifact_folder() as tmp:  # not a TemporaryDirectory: a process killed here leaves it to be found
        path = os.path.join(tmp, "lr_find.png")
        plot_range_test(result, path)
        client.log_artifact(run_id, path, artifact_path)


def _json_floats(values: Sequence[float]) -> list[Optional[float]]:
    return [v if math.isfinite(v) else None for v in values]


def _json_safe(d: dict) -> dict:
    return {k: (_json_safe(v) if isinstance(v, dict) else
                None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def plot_range_test(result: Any, path: str) -> None:
    """Write loss vs LR (log axis): raw and smoothed loss, validation points, the suggestions marked."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    ok = [i for i, s in enumerate(result.smoothed) if math.isfinite(s)]
    lrs = [result.lrs[i] for i in ok]
    ax.plot(lrs, [result.losses[i] for i in ok], color="0.75", lw=0.8, label="loss")
    ax.plot(lrs, [result.smoothed[i] for i in ok], color="C0", lw=1.8, label="smoothed loss")
    if result.val_losses:
        its = sorted(result.val_losses)
        ax.plot([result.lrs[i] for i in its], [result.val_losses[i] for i in its], "o-", color="C2", ms=3,
                lw=1, label="validation loss")
    for (name, lr), color in zip(result.suggestions.items(), ("C3", "C1", "C4")):
        if math.isfinite(lr):
            used = name == result.suggestion
            ax.axvline(lr, color=color, ls="-" if used else "--", lw=2 if used else 1,
                       label=f"{name} {lr:.2g}" + (" (used)" if used else ""))
    if ok:
        smooth = [result.smoothed[i] for i in ok]
        start = max(smooth[: smooth.index(min(smooth)) + 1])  # the plateau before the minimum
        low = min(min(smooth), min(result.losses[i] for i in ok))
        ax.set_ylim(low - 0.05 * (start - low + 1e-12), start + 0.25 * (start - low + 1e-12))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    end = "diverged" if result.stopped_early else "completed"
    ax.set_title(f"LR range test, batch size {result.batch_size} ({len(result.lrs)}/{result.num_iters} iterations, "
                 f"{end})", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
