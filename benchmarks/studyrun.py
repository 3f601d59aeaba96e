"""The benchmark study (4 batch sizes x 8 LR multipliers, 1 epoch on 12k MNIST-1D samples), run as
a real `scaling-train -m` subprocess or as a plain in-process loop, and read back from MLflow.

Every study run gets its own working folder (outputs, Ray storage) and study name; all share one
MLflow database in the scratch folder, created before any timing so no run pays the migration.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.common import REPO, Ctx, log, run_timed, script

BATCH_SIZES = (16, 64, 256, 1024)
# The default study's LR sweep (scaling/conf/experiment/default_study.yaml): 8 log-spaced multipliers around
# the rule's LR. With 6, async ASHA has too few LRs per stratum to prune: its first arrivals always go on.
LR_MULTIPLIERS = (0.125, 0.25, 0.5, 1, 2, 4, 8, 16)
# eval_every = grace_period = 0.1 gives ASHA rungs at 0.1, 0.3 and 0.9 epochs (reduction factor 3).
EPOCHS = 1
FIXED = ["eval_every=0.1", "data.n_samples=12000", "threads=1", "device=cpu"]

CONCURRENCY = 2
EXPERIMENT = "bench"
RUN_ID_RE = re.compile(r"mlflow run ([0-9a-f]{32})")
SAMPLES_RE = re.compile(r"samples trained ([\d,]+) of the full grid's ([\d,]+)")


def fixed(epochs: int = EPOCHS) -> list[str]:
    """Return the overrides every trial of the benchmark study shares, at `epochs` epochs."""
    return [f"epochs={epochs}", *FIXED]


def tracking_uri(ctx: Ctx) -> str:
    """Return the shared sqlite URI, creating the database (schema migration) on first use."""
    if "tracking_uri" not in ctx.cache:
        uri = f"sqlite:///{ctx.tmp / 'mlflow.db'}"  # tmp is absolute: sqlite:////abs/path
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments()
        ctx.cache["tracking_uri"] = uri
    return ctx.cache["tracking_uri"]


def study_argv(ctx: Ctx, name: str, *, asha: bool, mlflow: bool = True, extra: Sequence[str] = (),
               epochs: int = EPOCHS) -> list[str]:
    grid = [f"batch_size={','.join(map(str, BATCH_SIZES))}", f"lr_multiplier={','.join(map(str, LR_MULTIPLIERS))}"]
    sweeper = [f"hydra.sweeper.asha.enabled={str(asha).lower()}", "hydra.sweeper.resources.cpu=1",
               f"hydra.sweeper.ray.num_cpus={CONCURRENCY}", "hydra.sweeper.report=false",
               f"hydra.sweeper.study_name={name}", f"hydra.sweeper.storage_path={ctx.tmp / 'studies'}"]
    if asha:
        sweeper += ["hydra.sweeper.asha.grace_period=0.1", "hydra.sweeper.asha.reduction_factor=3"]
    return [script("scaling-train"), "-m", *grid, *fixed(epochs), *sweeper, f"mlflow.tracking_uri={tracking_uri(ctx)}",
            f"mlflow.experiment={EXPERIMENT}", f"mlflow.enabled={str(mlflow).lower()}", *extra]


def run_study(ctx: Ctx, *, asha: bool, mlflow: bool = True, extra: Sequence[str] = (),
              epochs: int = EPOCHS, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run the benchmark study as a subprocess (`env`: variables to set in it); return wall time, start-up
    and what MLflow recorded."""
    n = ctx.cache["n_studies"] = ctx.cache.get("n_studies", 0) + 1
    name = f"bench-{'asha' if asha else 'grid'}-{n}-{int(time.time())}"
    cwd = ctx.tmp / name
    cwd.mkdir(parents=True)
    argv = study_argv(ctx, name, asha=asha, mlflow=mlflow, extra=extra, epochs=epochs)
    log(f"study {name}: {len(BATCH_SIZES) * len(LR_MULTIPLIERS)} trials of {epochs} epoch(s), asha={asha}, "
        f"mlflow={mlflow}" + "".join(f", {k}={v}" for k, v in (env or {}).items()))
    t = run_timed(argv, cwd=cwd, env=env, timeout=400, marks={"study_line": r"^study \S+: \d+ trials"})
    if t.rc != 0:
        raise RuntimeError(f"study exited {t.rc}:\n{t.output[-3000:]}")
    out: dict[str, Any] = {"name": name, "wall_s": t.wall_s, "to_study_line_s": t.marks.get("study_line"),
                           "machine_cpu_s": t.machine_cpu_s, "steal_s": t.steal_s}
    m = RUN_ID_RE.search(t.output)
    out["study_run_id"] = m.group(1) if m else None
    s = SAMPLES_RE.search(t.output)
    if s:
        out["printed_trained"], out["printed_full"] = (int(g.replace(",", "")) for g in s.groups())
    if mlflow and out["study_run_id"]:
        out.update(read_back(ctx, out["study_run_id"], t.launched))
    start = out.get("startup_s", math.nan)  # from the trial runs' start times: none without MLflow
    log(f"study {name}: {t.wall_s:.1f}s wall" + (f", first trial started {start:.1f}s after launch"
                                                  if math.isfinite(start) else ""))
    return out


def read_back(ctx: Ctx, study_run_id: str, launched: float) -> dict[str, Any]:
    """Return the study's samples metrics, per-batch-size best val/loss and first trial start, from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(ctx))
    study = client.get_run(study_run_id)
    exp = study.info.experiment_id
    runs = client.search_runs([exp], f"tags.`scaling.study_id` = '{study_run_id}'", max_results=1000)
    best: dict[int, float] = {}
    statuses: dict[str, int] = {}
    for r in runs:
        st = r.data.tags.get("trial.status", "?")
        statuses[st] = statuses.get(st, 0) + 1
        loss = r.data.metrics.get("best/val_loss", math.nan)
        if st in ("diverged", "oom", "error") or not math.isfinite(loss):
            continue
        b = int(r.data.params["batch_size"])
        best[b] = min(best.get(b, math.inf), loss)
    first_start = min((r.info.start_time for r in runs), default=None)
    last_end = max((r.info.end_time or 0 for r in runs), default=0)
    m = study.data.metrics
    return {"samples_trained": m.get("samples/trained"), "samples_full_grid": m.get("samples/full_grid"),
            "best_per_batch_size": dict(sorted(best.items())), "trial_statuses": statuses, "n_trial_runs": len(runs),
            "startup_s": first_start / 1000 - launched if first_start else math.nan,
            # first trial start to last trial end, and the sum of the trial runs' own durations
            "trials_span_s": (last_end - first_start) / 1000 if first_start and last_end else math.nan,
            "trial_runs_sum_s": sum(((r.info.end_time or 0) - r.info.start_time) / 1000 for r in runs)}


def loop_configs(epochs: int = EPOCHS) -> list[Any]:
    """Return the composed trial configs of the benchmark study, in grid order."""
    from scaling.cli import compose

    return [compose([f"batch_size={b}", f"lr_multiplier={m}", *fixed(epochs), "mlflow.enabled=false"])
            for b, m in itertools.product(BATCH_SIZES, LR_MULTIPLIERS)]


def run_loop(ctx: Ctx, epochs: int = EPOCHS) -> dict[str, Any]:
    """Run the trials back to back in a fresh process (run_trial loads the cached data itself, as
    workers do); the time is measured inside it, from the first trial to the last."""
    log(f"plain loop: {len(BATCH_SIZES) * len(LR_MULTIPLIERS)} trials of {epochs} epoch(s) back to back in one process")
    t = run_timed([sys.executable, "-m", "benchmarks.studyrun", str(epochs)], cwd=REPO, timeout=400)
    if t.rc != 0:
        raise RuntimeError(f"plain loop exited {t.rc}:\n{t.output[-3000:]}")
    out = json.loads(t.output.strip().splitlines()[-1])
    out["ideal_s"] = out["loop_s"] / CONCURRENCY
    out["machine_cpu_s"], out["steal_s"] = t.machine_cpu_s, t.steal_s
    log(f"plain loop: {out['loop_s']:.1f}s, ideal with {CONCURRENCY} workers {out['ideal_s']:.1f}s")
    return out


def bare_spec(ctx: Ctx, epochs: int = EPOCHS) -> str:
    """Write (once) the benchmark study's trials and data for benchmarks.baretune; return the spec's path."""
    key = f"bare_spec_{epochs}"
    if key not in ctx.cache:
        from scaling.data import load_dataset

        configs = loop_configs(epochs)
        data = load_dataset(configs[0].data)  # the study's own split (every trial shares data and seed)
        ctx.cache[key] = str(write_bare_spec(ctx.tmp / f"bare-{epochs}", configs, data, CONCURRENCY))
    return ctx.cache[key]


def write_bare_spec(folder: Path, configs: Sequence[Any], data: Any, concurrency: int) -> Path:
    """Write what benchmarks.baretune reads into `folder` (the data as tensors, the trials, its Ray
    storage); return the spec's path."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / "data.pt"
    torch.save({k: getattr(data, k) for k in ("x_train", "y_train", "x_val", "y_val")}, data_path)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"trials": bare_trials(configs), "data_path": str(data_path),
                                "concurrency": concurrency, "storage_path": str(folder / "ray")}))
    return spec


def bare_trials(configs: Sequence[Any]) -> list[dict[str, Any]]:
    """Return what benchmarks.baretune needs of each trial config (it builds the default MLP only)."""
    from scaling.config import effective_lr

    trials = []
    for c in configs:
        m, o = c.model, c.optimizer
        if (m.name, m.depth, m.activation, m.init, o.name, o.nesterov, c.schedule.name, c.warmup.epochs) != \
                ("mlp", 2, "relu", "default", "sgd", False, "constant", 0):
            raise ValueError(f"the bare Tune script trains a 2-layer ReLU MLP with constant-LR SGD; got model "
                             f"{m.name}/{m.depth}/{m.activation}/{m.init}, optimizer {o.name}, schedule {c.schedule.name}")
        trials.append({"batch_size": c.batch_size, "lr": effective_lr(c), "momentum": o.momentum,
                       "weight_decay": o.weight_decay, "width": m.width, "seed": c.seed, "epochs": c.epochs,
                       "eval_every": c.eval_every})
    return trials


def run_bare(ctx: Ctx, epochs: int = EPOCHS) -> dict[str, Any]:
    """Run the same trials as a bare Ray Tune script (benchmarks.baretune); return its wall and CPU."""
    spec = bare_spec(ctx, epochs)
    log(f"bare Ray Tune: {len(BATCH_SIZES) * len(LR_MULTIPLIERS)} trials of {epochs} epoch(s), {CONCURRENCY} workers")
    t = run_timed([sys.executable, "-m", "benchmarks.baretune", spec], cwd=REPO, timeout=400)
    if t.rc != 0:
        raise RuntimeError(f"bare Ray Tune script exited {t.rc}:\n{t.output[-3000:]}")
    out = json.loads(t.output.strip().splitlines()[-1])
    out.update(wall_s=t.wall_s, machine_cpu_s=t.machine_cpu_s, steal_s=t.steal_s)
    log(f"bare Ray Tune: {t.wall_s:.1f}s wall, {t.machine_cpu_s:.1f}s of CPU")
    return out


def _loop_main(epochs: int) -> None:
    import torch

    from scaling.train import run_trial

    torch.set_num_threads(1)
    configs = loop_configs(epochs)
    statuses: dict[str, int] = {}
    best: dict[int, float] = {}
    t0 = time.perf_counter()
    for cfg in configs:
        r = run_trial(cfg)
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status not in ("diverged", "oom", "error") and math.isfinite(r.best_val_loss):
            best[cfg.batch_size] = min(best.get(cfg.batch_size, math.inf), r.best_val_loss)
    wall = time.perf_counter() - t0
    print(json.dumps({"loop_s": wall, "statuses": statuses, "best_per_batch_size": best}))


def full_grid_reference(ctx: Ctx) -> dict[str, Any]:
    """Return a full-grid study run (the study group's first one, or a fresh one)."""
    if not ctx.cache.get("full_grid_studies"):
        ctx.cache["full_grid_studies"] = [run_study(ctx, asha=False)]
    return ctx.cache["full_grid_studies"][0]


if __name__ == "__main__":  # the plain loop of run_loop, in its own process: python -m benchmarks.studyrun EPOCHS
    arg = sys.argv[1] if len(sys.argv) > 1 else str(EPOCHS)
    if not arg.isdigit() or int(arg) < 1:
        sys.exit(f"error: EPOCHS={arg!r}: must be a positive whole number (python -m benchmarks.studyrun EPOCHS)")
    _loop_main(int(arg))
