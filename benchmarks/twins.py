"""Row 3d (context): the default study with its twins run once (scaling.twins) against every point run.

The default study's grid names 32 of its 128 points twice: below ref_batch_size a `ref` warmup is
flat, so its warmup-0.5 points train what its warmup-0 points train. The same study, at 1 epoch to
stay in time, runs with hydra.sweeper.run_twins=false (the default) and true, alternating; the row
gives the samples trained (and, as a note, the wall time) of the first over the second, and whether
both found the same best val/loss per batch size.
"""
from __future__ import annotations

import time

from benchmarks.common import Ctx, Row, log, paired, run_timed, script, summarize
from benchmarks.studyrun import EXPERIMENT, RUN_ID_RE, SAMPLES_RE, read_back, tracking_uri


def _run(ctx: Ctx, run_twins: bool) -> dict:
    name = f"bench-default-{'all' if run_twins else 'twins-once'}-{int(time.time() * 1000)}"
    cwd = ctx.tmp / name
    cwd.mkdir(parents=True)
    argv = [script("scaling-study"), "epochs=1", f"hydra.sweeper.run_twins={str(run_twins).lower()}",
            "hydra.sweeper.report=false", f"hydra.sweeper.study_name={name}",
            f"hydra.sweeper.storage_path={ctx.tmp / 'studies'}", f"mlflow.tracking_uri={tracking_uri(ctx)}",
            f"mlflow.experiment={EXPERIMENT}"]
    log(f"default study (1 epoch), run_twins={run_twins}")
    t = run_timed(argv, cwd=cwd, timeout=400)
    if t.rc != 0:
        raise RuntimeError(f"study exited {t.rc}:\n{t.output[-3000:]}")
    trained, full = (int(g.replace(",", "")) for g in SAMPLES_RE.search(t.output).groups())
    best = read_back(ctx, RUN_ID_RE.search(t.output).group(1), t.launched)["best_per_batch_size"]
    log(f"  {t.wall_s:.1f}s wall, {trained:,} of {full:,} samples")
    return {"wall_s": t.wall_s, "trained": trained, "full": full, "best": best}


def twins_once(ctx: Ctx) -> list[Row]:
    # One pair: the samples ratio is what the row gives, and ASHA's decisions here gave the same
    # figure (0.77 [0.77-0.77]) in every full run with two pairs; each pair costs ~4 study walls.
    pairs = paired(lambda: _run(ctx, False), lambda: _run(ctx, True), repeats=1)
    samples = summarize([a["trained"] / b["trained"] for a, b in pairs])
    wall = summarize([a["wall_s"] / b["wall_s"] for a, b in pairs])
    same = all(a["best"] == b["best"] for a, b in pairs)
    a, b = pairs[0]
    return [Row("3d. context: default study (1 epoch), twins run once / every point run: samples trained",
                f"{a['trained']:,} samples", f"{b['trained']:,} (every point run)", samples.median, "-", None,
                samples.spread, note=f"wall {wall.median:.2f} [{wall.spread}]; best val/loss per batch size "
                                     f"{'identical' if same else 'DIFFERS'} ({a['best']} vs {b['best']})",
                data={"pairs": pairs})]
