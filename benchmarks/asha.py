"""Row 3: stratified ASHA against the full grid of the same study, read back from MLflow, in both
variants (hydra.sweeper.asha.variant: stopping, Ray Tune's; promotion, Li et al.'s).

ASHA (grace 0.1 epoch, reduction factor 3: rungs at 0.1, 0.3, 0.9) must train <= 1/3 of the
full grid's samples, and its best val/loss per batch size must be within 2% of the full grid's.
Promotion decisions depend on the order results arrive in; with 2 workers on this grid they
came out the same run to run, so one ASHA run is made (two with --repeat-asha) to stay in time.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import time

from benchmarks.common import Ctx, Row, log, run_timed, stop_session, summarize
from benchmarks.studyrun import BATCH_SIZES, LR_MULTIPLIERS, SAMPLES_RE, full_grid_reference, run_study, study_argv

KILL_AFTER = 14  # trials ended when the driver is killed (of 32)


def _regret(asha_best: dict, full_best: dict) -> dict[int, float]:
    """Return asha best / full-grid best - 1 per batch size (inf where ASHA kept no finite trial)."""
    out = {}
    for b, ref in full_best.items():
        got = asha_best.get(b, math.inf)
        out[int(b)] = got / ref - 1 if math.isfinite(got) else math.inf
    return out


VARIANTS = {"stopping": ("3a", "3b", []), "promotion": ("3e", "3f", ["hydra.sweeper.asha.variant=promotion"])}


def asha_vs_grid(ctx: Ctx) -> list[Row]:
    """Rows 3a/3b (stopping-based ASHA, Ray Tune's) and 3e/3f (promotion-based, scaling.asha_promotion),
    each against the same full grid."""
    full = full_grid_reference(ctx)
    rows = []
    for variant, (samples_row, best_row, extra) in VARIANTS.items():
        runs = [run_study(ctx, asha=True, extra=extra) for _ in range(ctx.cache.get("asha_runs", 1))]
        if variant == "stopping":
            ctx.cache["asha_study"] = runs[0]
        rows += _variant_rows(variant, samples_row, best_row, runs, full)
    return rows


def _variant_rows(variant: str, samples_row: str, best_row: str, runs: list[dict], full: dict) -> list[Row]:
    frac = summarize([r["samples_trained"] / r["samples_full_grid"] for r in runs])
    regrets = [_regret(r["best_per_batch_size"], full["best_per_batch_size"]) for r in runs]
    worst = summarize([1 + max(rg.values()) for rg in regrets])
    worst_run = max(range(len(runs)), key=lambda i: max(regrets[i].values()))
    wb = max(regrets[worst_run], key=regrets[worst_run].get)
    wall = summarize([r["wall_s"] / full["wall_s"] for r in runs])
    printed_ok = all(r.get("printed_trained") == int(r["samples_trained"]) for r in runs)
    trained = sorted(int(r["samples_trained"]) for r in runs)
    data = {"variant": variant, "asha_runs": runs,
            "full_grid": {k: full[k] for k in ("name", "study_run_id", "wall_s", "samples_full_grid",
                                                 "best_per_batch_size")},
            "fractions": frac.values, "regret_per_batch_size": regrets}
    return [
        Row(f"{samples_row}. asha ({variant}) samples trained / full grid", f"{trained[len(trained) // 2]:,} samples",
            f"{int(full['samples_full_grid']):,} (full grid)", frac.median, "<= 0.333", frac.median <= 1 / 3,
            frac.spread, note=f"asha wall / full-grid wall = {wall.median:.2f} [{wall.spread}]; printed line "
                              f"{'agrees' if printed_ok else 'DISAGREES'} with MLflow samples/trained", data=data),
        Row(f"{best_row}. asha ({variant}) best val/loss per batch size vs full grid",
            f"{runs[worst_run]['best_per_batch_size'].get(wb, math.nan):.4f} (batch {wb}, worst)",
            f"{full['best_per_batch_size'][wb]:.4f} (full grid)", worst.median,
            "<= 1.02x", worst.median <= 1.02, worst.spread,
            note="ratio = 1 + worst regret over batch sizes; per batch size: " + "; ".join(
                " ".join(f"{b}:{v:+.1%}" for b, v in sorted(rg.items())) for rg in regrets)),
    ]


def _killed_and_resumed(ctx: Ctx) -> dict:
    """Run the ASHA study, kill its driver (and the Ray it started) once KILL_AFTER trials have
    ended, resume it with hydra.sweeper.resume=true; return what the resume printed."""
    n = len(BATCH_SIZES) * len(LR_MULTIPLIERS)
    name = f"bench-asha-resume-{int(time.time())}"
    cwd = ctx.tmp / name
    cwd.mkdir(parents=True)
    argv = study_argv(ctx, name, asha=True)
    log(f"study {name}: asha, driver killed after {KILL_AFTER}/{n} trials, then resumed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if f"done {KILL_AFTER}/{n}" in line:
                break
    finally:
        stop_session(proc)
    t = run_timed([*argv, "hydra.sweeper.resume=true"], cwd=cwd, timeout=400)
    if t.rc != 0:
        raise RuntimeError(f"resumed study exited {t.rc}:\n{t.output[-3000:]}")
    done = re.search(r"(\d+)/\d+ trials already finished", t.output)
    restored = re.search(r"ASHA: rung values of (\d+) finished trials restored", t.output)
    trained = SAMPLES_RE.search(t.output)
    return {"finished_before": int(done.group(1)) if done else None,
            "restored": int(restored.group(1)) if restored else None,
            "samples_trained": int(trained.group(1).replace(",", "")) if trained else math.nan}


def asha_resumed(ctx: Ctx) -> list[Row]:
    """Row 3c (context, no target): samples trained by an ASHA study killed and resumed, against the
    same study uninterrupted (the asha group's run, or a fresh one)."""
    whole = ctx.cache.get("asha_study") or run_study(ctx, asha=True)
    r = _killed_and_resumed(ctx)
    ratio = r["samples_trained"] / whole["samples_trained"]
    return [Row("3c. asha killed + resumed: samples / uninterrupted (context)", f"{r['samples_trained']:,} samples",
                f"{int(whole['samples_trained']):,} (uninterrupted)", ratio, "-", None,
                note=f"{r['finished_before']} trials had ended at the kill; rung values of {r['restored']} "
                     "restored from MLflow", data={"resumed": r, "uninterrupted": whole["samples_trained"]})]
