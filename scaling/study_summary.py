"""The end of a study: the samples it trained against its full grid, the study run's final counts,
the best trial per batch size as a table, the report and the MLflow UI command."""
from __future__ import annotations

import math
import sys

from scaling import interrupts
from scaling.config import effective_lr, epochs_to_steps, redact_url
from scaling.recorded import as_attributes
from scaling.study import TrialSpec, data_key
from scaling.study_callback import best_per_batch_size
from scaling.tracking import ui_hint


RESUME = "run the same command with hydra.sweeper.resume=true to finish the study"


def _report(recorder) -> None:
    """Build the study's report; a failure is one line (the study is recorded either way)."""
    try:
        from scaling.report import report_study

        report_study(recorder.uri, recorder.run_id)
    except Exception as exc:  # noqa: BLE001 - the study is recorded; a failed report must not hide that
        error = f"error: the report failed ({type(exc).__name__}: {exc}); run scaling-report {recorder.run_id}"
        print(redact_url(error), file=sys.stderr, flush=True)


def finish_study(sweeper, recorder, specs, ref_lrs: dict[int, float], wall: float, interrupted: bool,
                 not_trained: set[int]) -> dict:
    """Close the study's record, print its summary (and report), and return it; exit 3 when the
    tracking server is still down (the journal keeps every write), 130 after an interrupt."""
    n_train = getattr(sweeper, "n_train", {})
    full = sum(_budget_samples(s, n_train.get(data_key(s.config["data"]), 0)) for s in specs.values())
    # all attempts, from MLflow; a twin's samples were its source's (scaling.twins)
    trained = sum(max(v, 0) for i, v in recorder.logged_samples.items() if i not in not_trained)
    recorded = False
    try:
        with interrupts.deferred():  # a Ctrl-C is taken once every record is written (a second: at once)
            recorder.drain()  # every trial run exists before the summary names them
            best = best_per_batch_size(recorder, specs)
            counts = recorder.finish(len(specs), full, trained, best, interrupted=interrupted)
        recorded = True
        print_summary(recorder, specs, best, counts, wall, full, trained, ref_lrs)
        if sweeper.conf.report and recorder.enabled and not interrupted:
            _report(recorder)
    except RuntimeError as exc:  # the tracking server is still down: the journal keeps everything
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    except KeyboardInterrupt:  # after the trials: Tune no longer takes it (study_runner)
        if not recorded:
            print(f"error: interrupted while the study's record was written: {RESUME}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        if not interrupted:
            later = f": scaling-report {recorder.run_id} prints its summary and report" if recorder.enabled else ""
            print(f"error: interrupted after the study was recorded{later}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    if recorder.enabled:  # the study run in the MLflow UI, after its report, so that it is what a user sees
        print(ui_hint(recorder.uri, recorder.exp_id, recorder.run_id), flush=True)
    if interrupted:
        print(f"interrupted: {RESUME}", flush=True)
        raise SystemExit(130)
    return {"study_run_id": recorder.run_id, "counts": counts, "best": best}


def _budget_samples(spec: TrialSpec, n_train: int) -> int:
    """Return the samples a trial trains on its full budget: whole steps of batch_size, as train.py counts them."""
    b = int(spec.config["batch_size"])
    return epochs_to_steps(float(spec.config["epochs"]), n_train / b) * b if n_train >= b else 0


def print_summary(recorder, specs, best: dict, counts: dict, wall: float, full: int, trained: int,
                  ref_lrs: dict[int, float]) -> None:
    """Print per batch size: best LR, best validation loss and accuracy, peak memory; and the UI command."""
    from rich.table import Table

    from scaling.tables import console_for, print_table

    table = Table(title=f"study {recorder.study_name}: best trial per batch size")
    for col in ("batch size", "best lr (effective)", "lr×", "rule", "best val/loss", "val/acc", "peak MB", "status"):
        table.add_column(col, justify="right")
    for b in sorted(best):
        entry = best[b]
        m = recorder.last_metrics.get(entry["trial"], {})  # a resumed trial's come from its relogged history
        lr = effective_lr(as_attributes(specs[entry["trial"]].config), ref_lrs.get(entry["trial"]))
        table.add_row(str(b), f"{lr:.4g}", f"{entry['lr_multiplier']:g}", entry["rule"],
                      f"{entry['best/val_loss']:.4f}", f"{m.get('val/acc', math.nan):.3f}",
                      f"{m.get('mem/peak_mb', math.nan):.0f}", recorder.status.get(entry["trial"], "?"))
    if best:  # else an empty frame (a study interrupted before any trial finished)
        print_table(console_for(), table)
    oom = sorted({int(s.config["batch_size"]) for i, s in specs.items() if recorder.status.get(i) == "oom"})
    if oom:
        fit = sorted({int(s.config["batch_size"]) for i, s in specs.items()
                      if recorder.status.get(i) in ("completed", "pruned", "early_stopped", "diverged")})
        fitting = [b for b in fit if b < oom[0]]
        print(f"out of memory at batch sizes {oom}; largest batch size that fit: {fitting[-1] if fitting else 'none'}")
    frac = trained / max(full, 1)
    done = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none started"
    print(f"{sum(counts.values())} trials in {wall:.0f}s: {done} | samples trained {trained:,} of the full "
          f"grid's {full:,} ({frac:.0%})")
