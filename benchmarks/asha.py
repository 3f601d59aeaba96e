"""Row 3: stratified ASHA against the full grid of the same study, read back from MLflow.

ASHA (grace 0.1 epoch, reduction factor 3: rungs at 0.1, 0.3, 0.9) must train <= 1/3 of the
full grid's samples, and its best val/loss per batch size must be within 2% of the full grid's.
Promotion decisions depend on the order results arrive in; with 2 workers on this grid they
came out the same run to run, so one ASHA run is made (two with --repeat-asha) to stay in time.
"""
from __future__ import annotations

import math

from benchmarks.common import Ctx, Row, summarize
from benchmarks.studyrun import full_grid_reference, run_study


def _regret(asha_best: dict, full_best: dict) -> dict[int, float]:
    """Return asha best / full-grid best - 1 per batch size (inf where ASHA kept no finite trial)."""
    out = {}
    for b, ref in full_best.items():
        got = asha_best.get(b, math.inf)
        out[int(b)] = got / ref - 1 if math.isfinite(got) else math.inf
    return out


def asha_vs_grid(ctx: Ctx) -> list[Row]:
    full = full_grid_reference(ctx)
    runs = [run_study(ctx, asha=True) for _ in range(ctx.cache.get("asha_runs", 1))]
    frac = summarize([r["samples_trained"] / r["samples_full_grid"] for r in runs])
    regrets = [_regret(r["best_per_batch_size"], full["best_per_batch_size"]) for r in runs]
    worst = summarize([1 + max(rg.values()) for rg in regrets])
    worst_run = max(range(len(runs)), key=lambda i: max(regrets[i].values()))
    wb = max(regrets[worst_run], key=regrets[worst_run].get)
    wall = summarize([r["wall_s"] / full["wall_s"] for r in runs])
    printed_ok = all(r.get("printed_trained") == int(r["samples_trained"]) for r in runs)
    trained = sorted(int(r["samples_trained"]) for r in runs)
    data = {"asha_runs": runs, "full_grid": {k: full[k] for k in ("name", "study_run_id", "wall_s",
                                                                 "samples_full_grid", "best_per_batch_size")},
            "fractions": frac.values, "regret_per_batch_size": regrets}
    return [
        Row("3a. asha samples trained / full grid", f"{trained[len(trained) // 2]:,} samples",
            f"{int(full['samples_full_grid']):,} (full grid)", frac.median, "<= 0.333", frac.median <= 1 / 3,
            frac.spread, note=f"asha wall / full-grid wall = {wall.median:.2f} [{wall.spread}]; printed line "
                              f"{'agrees' if printed_ok else 'DISAGREES'} with MLflow samples/trained", data=data),
        Row("3b. asha best val/loss per batch size vs full grid",
            f"{runs[worst_run]['best_per_batch_size'].get(wb, math.nan):.4f} (batch {wb}, worst)",
            f"{full['best_per_batch_size'][wb]:.4f} (full grid)", worst.median,
            "<= 1.02x", worst.median <= 1.02, worst.spread,
            note="ratio = 1 + worst regret over batch sizes; per batch size: " + "; ".join(
                " ".join(f"{b}:{v:+.1%}" for b, v in sorted(rg.items())) for rg in regrets)),
    ]
