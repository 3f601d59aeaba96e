"""`scaling-lr-find [overrides]`: one LR range test per batch size, recorded in MLflow, and the LR-vs-B fit.

    scaling-lr-find batch_size=32,256,2048 optimizer=adam lr_find.suggestion=steep

`batch_size=32,256,2048` is not a Hydra multirun: the script runs the tests one after another on
one loaded dataset (the comma list becomes `lr_find.batch_sizes`, which may also be given as
a list). Per batch size it prints fastai's three suggestions, naming the one in use, and
records one MLflow run (tag scaling.kind=lr_find): the curve as metrics at step = iteration
(`lr` beside `lr_find/loss` and `lr_find/loss_smoothed`), the suggestions as params, and
lr_find.png / lr_find.json as artifacts. With two or more batch sizes it then fits how the
suggested LR moves with batch size, lr(B) ~ B^alpha, beside the linear (1) and sqrt (0.5) rules.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import uuid
from typing import Any, Optional, Sequence

from scaling.config import ConfigError, redact_url
from scaling.validation import at_batch_size, check_batch_fits, validate

CURVE_METRICS = {"lr": "lrs", "lr_find/loss": "losses", "lr_find/loss_smoothed": "smoothed"}


def expand_batch_sizes(argv: Sequence[str]) -> list[str]:
    """Return argv with `batch_size=32,256` rewritten as `lr_find.batch_sizes=[32,256]` (one line on error)."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "batch_size" or ("," not in value and not value.startswith("[")):
            out.append(arg)
            continue
        items = value.strip("[]").split(",")
        if not all(v.strip().isdigit() for v in items):
            raise ConfigError("batch_size", value, "must be one integer or a comma list of integers, e.g. 32,256,2048")
        out.append(f"lr_find.batch_sizes=[{','.join(v.strip() for v in items)}]")
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
    tested = [a.partition("=")[2].strip("[]").split(",") for a in argv if a.startswith("lr_find.batch_sizes=")]
    sizes = [int(b) for b in (tested[-1] if tested else []) if b.strip().isdigit()]
    # the tested batch sizes replace batch_size, which the test never uses: check the config at one of them
    preflight(argv + [f"batch_size={min(sizes)}"] if sizes else argv)
    _run_hydra(_task, argv)


def _task(cfg: Any) -> None:
    from scaling.cli import fail
    from scaling.data import load_dataset
    from scaling.lr_finder import range_test

    key = "lr_find.batch_sizes" if cfg.lr_find.batch_sizes else "batch_size"
    batch_sizes = [int(b) for b in (cfg.lr_find.batch_sizes or [cfg.batch_size])]
    try:
        for b in batch_sizes:  # the batch sizes tested replace batch_size, which the test never uses
            validate(at_batch_size(cfg, b))
        data = load_dataset(cfg.data)  # once for every batch size; a missing dataset fails before any run
        for b in batch_sizes:
            check_batch_fits(key, b, data.n_train)
    except ConfigError as exc:
        fail(str(exc))
    progress = sys.stderr.isatty() or os.environ.get("SCALING_PROGRESS") == "1"
    client = group = exp_id = None
    if cfg.mlflow.enabled:
        from scaling.tracking import get_experiment_id, make_client

        client, group = make_client(cfg.mlflow.tracking_uri), uuid.uuid4().hex[:12]
        try:
            exp_id = get_experiment_id(client, cfg.mlflow.experiment)  # before any range test runs
        except ConfigError as exc:
            fail(str(exc))
    results, runs = [], []
    for b in batch_sizes:
        result = range_test(cfg, data, b, progress=progress)
        run_id = record(cfg, result, client, exp_id, group) if client is not None else None
        results.append(result)
        runs.append(run_id)
        print(result.describe() + (f" | mlflow run {run_id}" if run_id else ""), flush=True)
    line, alpha = fit_line([r.batch_size for r in results], [r.lr for r in results], cfg.lr_find.suggestion)
    if line:
        print(line, flush=True)
    if client is not None:
        for run_id in runs if alpha is not None else []:
            client.set_tag(run_id, "lr_find.alpha", f"{alpha:.4g}")
        print(f"recorded in '{cfg.mlflow.experiment}' at {redact_url(cfg.mlflow.tracking_uri)} (tag lr_find.group={group})",
              flush=True)


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
    client.log_dict(run_id, _json_safe(curve), os.path.join(artifact_path or "", "lr_find.json"))
    with tempfile.TemporaryDirectory() as tmp:
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
