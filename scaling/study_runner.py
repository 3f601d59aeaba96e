"""Drives one study: Ray start-up checks, the MLflow study run, the Tune run (or its resume), the summary."""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from scaling.config import ConfigError, effective_lr, epochs_to_steps, redact_url
from scaling.grid import Grid, stratum_keys
from scaling.local_ray import check_cluster, count_callbacks_by_name, stop_ray_aside
from scaling.recorded import as_attributes
from scaling.study import TrialSpec, _callback_class, best_per_batch_size, data_key, trainable
from scaling.tracking import import_mlflow, ui_hint
from scaling.twins import find_twins, mirror_twins, whole_strata
from scaling.validation import check_fits_data, plan_split

STATE_FILE = "scaling_study.json"


def _specs(grid: Grid, configs: list) -> dict[int, TrialSpec]:
    specs = {}
    for i, (point, cfg) in enumerate(zip(grid.points, configs)):
        container = OmegaConf.to_container(cfg, resolve=True)
        # Ray workers run in their own trial folders: relative data paths must not move with them
        container["data"]["root"] = os.path.abspath(os.path.expanduser(container["data"]["root"]))
        given = dict(o.split("=", 1) for o in point)
        axes = {}
        for k in grid.axis_names:
            value = OmegaConf.select(cfg, k.lstrip("+~"))
            # a group axis (optimizer=adam) is named by its choice, not by the composed node
            axes[k] = given[k] if OmegaConf.is_config(value) or value is None else value
        specs[i] = TrialSpec(i, container, axes, list(point))
    return specs


def _storage(sweeper, name: str) -> Path:
    return sweeper.storage_root() / name


def _write_state(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path / STATE_FILE)  # atomic: a kill never leaves a half-written state


def _scheduler(sweeper, grid: Grid, specs: dict[int, TrialSpec]):
    a = sweeper.conf.asha
    if not a.enabled:
        return None
    from scaling.asha import StratifiedASHA
    from scaling.asha_promotion import PromotingASHA

    budget = max(float(s.config["epochs"]) for s in specs.values())
    kind = PromotingASHA if a.variant == "promotion" else StratifiedASHA
    return kind(metric=a.metric, mode=a.mode, time_attr="epoch", max_t=budget,
                grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                group_by=[f"point.{_bare(k)}" for k in stratum_keys(grid.axis_names, a.group_by)],
                axes=[f"point.{_bare(k)}" for k in grid.axis_names], stratified=a.stratified)


def _trial_resources(workers: dict[int, int], res) -> Any:
    """Return Tune's resource request per trial, from the trial's data-parallel plan.

    A single-worker trial holds resources.cpu/gpu itself. A trial of W > 1 workers is only the driver
    of a Ray Train run, and Ray Train reserves the W workers' resources itself, in its own placement
    group with one bundle of resources.cpu/gpu per worker (Train V2 cannot borrow the trial's). The
    driver therefore asks Tune for no CPU or GPU: holding any would starve that placement group and
    deadlock a full node. Tune refuses an empty request, so it takes a token 1 byte of memory.
    """
    from ray import tune

    single = tune.PlacementGroupFactory([{"CPU": res.cpu, "GPU": res.gpu}])
    driver = tune.PlacementGroupFactory([{"memory": 1}])
    return lambda config: driver if workers[int(config["point"]["index"])] > 1 else single


def _max_concurrent(sweeper, workers: dict[int, int]) -> Any:
    """Return the cap on running trials: the configured one, or with data-parallel trials (whose Tune
    request holds no CPU/GPU) as many as single-worker trials could run, so drivers do not pile up."""
    import ray

    m, res = sweeper.conf.max_concurrent, sweeper.conf.resources
    if m is not None or max(workers.values()) == 1:
        return m
    total = ray.cluster_resources()
    fits = [total.get(k, 0) // v for k, v in (("CPU", res.cpu), ("GPU", res.gpu)) if v > 0]
    return max(1, int(min(fits))) if fits else None


def _bare(key: str) -> str:
    """Return an override key without Hydra's +/~ prefixes and @package suffix."""
    return key.lstrip("+~").split("@")[0]


def _workers(config: dict) -> int:
    """Return a trial's data-parallel ranks (plan_split of the keys it reads: a whole config is ~30 ms)."""
    keys = ("parallel", "batch_size", "micro_batch_size")
    return plan_split(OmegaConf.create({k: config.get(k) for k in keys})).workers


def run_study(sweeper, grid: Grid, configs: list, ray_started: Future) -> dict:
    """Run (or resume) the study (on the Ray that `start_ray` is starting) and return its summary."""
    import ray.tune  # noqa: F401 - ~1 s of imports, paid while Ray is still starting (benchmark row 2b)

    specs = _specs(grid, configs)
    workers = {i: _workers(s.config) for i, s in specs.items()}  # data-parallel ranks
    name = sweeper.study_name(grid)
    storage = _storage(sweeper, name)
    state_path = storage / STATE_FILE
    state = json.loads(state_path.read_text()) if sweeper.conf.resume and state_path.exists() else {}
    if sweeper.conf.resume and not state:
        print(f"note: hydra.sweeper.resume=true found no earlier run of study {name} in {storage.parent}, so it "
              "starts afresh (a study's name comes from its preset and overrides; hydra.sweeper.study_name "
              "fixes it)", flush=True)
    recorder = _open_record(sweeper, grid, configs[0], specs, workers, name, storage, state, ray_started)
    scheduler = _scheduler(sweeper, grid, specs)
    twins = {} if sweeper.conf.run_twins else find_twins({i: s.config for i, s in specs.items()})
    if scheduler is not None:  # ASHA judges a trial within its stratum
        twins = whole_strata(twins, {i: scheduler.stratum_of({"point": _point(s)}) for i, s in specs.items()})
    recorder = mirror_twins(recorder, twins, specs)
    # the twins recorded from their source, in any attempt: samples/trained leaves them out
    not_trained = set(getattr(recorder, "mirrored", ())) | set(state.get("mirrored", []))
    if not_trained:
        _write_state(storage, {**json.loads(state_path.read_text()), "mirrored": sorted(not_trained)})
    if state and scheduler is not None:
        _seed_asha(scheduler, recorder, specs)
    callback = _callback_class()(recorder, specs, scheduler)
    checkpoints = _latest_checkpoints(storage) if state else {}
    _relog_from_checkpoints(recorder, checkpoints, specs)
    points = _points_to_run(sweeper, specs, recorder, scheduler, checkpoints)
    if getattr(scheduler, "pauses_at_rungs", False):  # Tune may create trials lazily: say how many will come
        scheduler.expect(scheduler.stratum_of({"point": p}) for p in points)
    t0 = time.time()
    interrupted = False
    # The Tuner holds Ray objects (the trial configs with_parameters put in the object store). Let go
    # of it before Ray has stopped, and Python may free them later, while ray.shutdown runs in its
    # thread: Ray's core worker then ends the process ("The core worker has already been shutdown";
    # 2 of 3 default studies exited 1 so when the Tuner was a temporary, 0 of 5 since). So it lives
    # until Ray has stopped.
    tuner = None
    try:
        if points:
            tuner = _tuner(sweeper, specs, workers, scheduler, callback, storage, points)
            tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    wall = time.time() - t0
    stopping = stop_ray_aside()
    try:
        return _finish(sweeper, recorder, specs, callback, wall, interrupted, not_trained=not_trained)
    finally:
        stopping.join()
        del tuner  # after Ray has stopped, as before this function was split


def _open_record(sweeper, grid: Grid, first, specs: dict[int, TrialSpec], workers: dict[int, int], name: str,
                 storage: Path, state: dict, ray_started: Future):
    """Wait for Ray, create (or reopen) the study's MLflow run and say which study this is; return its recorder."""
    from scaling.cli import fail
    from scaling.study_record import StudyRecorder

    if first.mlflow.enabled:
        import_mlflow(first.mlflow.tracking_uri)  # while Ray is still starting (creates nothing): the wait below shrinks
    try:
        check_cluster(sweeper, ray_started, max(workers.values()),
                      needs_gpu=any(s.config["device"] == "cuda" for s in specs.values()))
        recorder = StudyRecorder(first.mlflow.tracking_uri, first.mlflow.experiment, study_name=name,
                                 run_id=state.get("study_run_id"), enabled=first.mlflow.enabled)
    except ConfigError as exc:
        fail(str(exc))
    sweep_dir = str(Path(sweeper.config.hydra.sweep.dir).resolve())
    study_params = {"grid": grid.describe(), "sweeper": OmegaConf.to_container(sweeper.conf, resolve=True),
                    "strata": stratum_keys(grid.axis_names, sweeper.conf.asha.group_by)}
    recorder.start(study_params, {"scaling.sweep_dir": sweep_dir, "scaling.storage": str(storage)})
    _write_state(storage, {"study_run_id": recorder.run_id, "name": name, "n_trials": len(specs)})
    recorder.use_journal(storage / "mlflow_journal.jsonl")
    recorder.flush()
    _resolve_auto_ref_lr(specs, recorder)
    if state:
        print(f"resuming study {name} (mlflow run {recorder.run_id}); "
              f"{len(recorder.finished_indices())}/{len(specs)} trials already finished", flush=True)
    else:
        where = f"mlflow run {recorder.run_id}" if recorder.enabled else "not recorded (mlflow.enabled=false)"
        print(f"study {name}: {len(specs)} trials | {where} | sweep dir {sweep_dir}", flush=True)
    return recorder


def _points_to_run(sweeper, specs: dict[int, TrialSpec], recorder, scheduler, checkpoints: dict) -> list[dict]:
    """Return the grid points of the trials not yet finished (twins recorded from their source aside),
    in the order Tune should start them."""
    mirrored = getattr(recorder, "mirrored", set())
    todo = [i for i in specs if i not in recorder.finished_indices() and i not in mirrored]
    # Asynchronous ASHA judges each trial against those that reached a rung before it: in grid
    # order (LRs ascending) every newcomer beats the earlier, slower LRs and nothing is pruned
    # (measured: 0.93 of the full grid trained, against 0.30 in a shuffled order). With ASHA the
    # rule's own LR goes first in every stratum and the others follow outwards (StratifiedASHA's
    # docstring says why); Tune fills some slots in list order, so the list is ordered too.
    random.Random(sweeper.conf.sample_seed).shuffle(todo)
    if scheduler is not None:
        todo.sort(key=lambda i: scheduler.lr_distance({"point": _point(specs[i])}))  # stable: the shuffle breaks ties
    return [{**_point(specs[i]), **({"resume_from": checkpoints[i]} if i in checkpoints else {})} for i in todo]


def _tuner(sweeper, specs: dict[int, TrialSpec], workers: dict[int, int], scheduler, callback, storage: Path,
           points: list[dict]):
    """Return the Tune run over `points`.

    A resume is a fresh Tune run over the unfinished trials (not Tuner.restore): the MLflow record
    is the source of truth for what finished, and each unfinished trial restarts from its own last
    checkpoint, found by its stable folder name.
    """
    from ray import tune

    count_callbacks_by_name()  # else Tune imports MLflow here, even for a study that records nothing
    res = sweeper.conf.resources
    configs_by_index = {i: s.config for i, s in specs.items()}
    run = tune.with_resources(tune.with_parameters(trainable, configs=configs_by_index), _trial_resources(workers, res))
    attempt = len(list(storage.glob("tune-*")))
    return tune.Tuner(
        run,
        param_space={"point": tune.grid_search(points), "cpus": res.cpu, "gpus": res.gpu,
                     "checkpoint": sweeper.conf.checkpoint,
                     "checkpoint_interval_s": sweeper.conf.checkpoint_interval_s,
                     "report_at": scheduler.rungs if scheduler is not None else [],
                     # a paused trial resumes from the checkpoint at its rung
                     "checkpoint_at_rungs": getattr(scheduler, "pauses_at_rungs", False)},
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True,
                                    max_concurrent_trials=_max_concurrent(sweeper, workers),
                                    trial_dirname_creator=lambda t: f"trial_{t.config['point']['index']:05d}"),
        run_config=tune.RunConfig(name=f"tune-{attempt}", storage_path=str(storage), callbacks=[callback],
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=sweeper.conf.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _resolve_auto_ref_lr(specs: dict[int, TrialSpec], recorder) -> None:
    """Run the LR range test once per distinct (data, model, optimizer, ref batch) for ref_lr=auto.

    The chosen LR replaces `auto` in each trial's config and is recorded in the study run.
    """
    from omegaconf import OmegaConf

    from scaling.lr_finder import resolve_ref_lr

    found: dict[str, float] = {}
    for spec in specs.values():
        c = spec.config
        if c["scaling"]["ref_lr"] != "auto":
            continue
        key = json.dumps([c["data"], c["model"], c["optimizer"], c["scaling"]["ref_batch_size"], c["lr_find"],
                          c["seed"]], sort_keys=True, default=str)
        if key not in found:
            run_id = recorder.run_id if not found else None  # the first curve and plot go into the study run
            found[key], _ = resolve_ref_lr(OmegaConf.create(c), client=recorder.client if run_id else None,
                                           run_id=run_id)
            print(f"scaling.ref_lr=auto: the range test at batch size {c['scaling']['ref_batch_size']} "
                  f"chose ref_lr={found[key]:.4g}", flush=True)
        c["scaling"]["ref_lr"] = found[key]
    if found and recorder.enabled:
        values = sorted(set(found.values()))
        recorder.client.set_tag(recorder.run_id, "scaling.ref_lr_auto", ",".join(f"{v:.6g}" for v in values))


def _seed_asha(scheduler, recorder, specs: dict[int, TrialSpec]) -> None:
    """Give a resumed study's ASHA the rung values of the trials that earlier attempts finished.

    A trial that was running when the driver died restarts from its checkpoint and reports again
    from there only; its rungs below the checkpoint stay unrecorded (it is judged from the next)."""
    from scaling.asha import BAD_STATUSES

    seeded = 0
    for i in sorted(recorder.finished_indices()):
        rows = recorder.metric_history(i, (scheduler.metric, "epoch"))
        history = [(r["epoch"], r.get(scheduler.metric, math.nan)) for r in rows if "epoch" in r]
        bad = recorder.status[i] in BAD_STATUSES
        finished = recorder.status[i] in ("completed", "early_stopped")  # ended by itself, not pruned
        seeded += scheduler.seed(f"resumed-{i}", {"point": _point(specs[i])}, history, bad=bad, finished=finished) > 0
    print(f"ASHA: rung values of {seeded} finished trials restored", flush=True)


def _latest_checkpoints(storage: Path) -> dict[int, str]:
    """Return, per trial index, the newest checkpoint left by earlier attempts of this study."""
    found: dict[int, tuple[float, str]] = {}
    for state in storage.glob("tune-*/trial_*/checkpoint_*/state.pt"):
        index = int(state.parent.parent.name.split("_")[1])
        mtime = state.stat().st_mtime
        if index not in found or mtime > found[index][0]:
            found[index] = (mtime, str(state))
    return {i: path for i, (_, path) in found.items()}


def _relog_from_checkpoints(recorder, checkpoints: dict[int, str], specs: dict[int, TrialSpec]) -> None:
    """Log evaluations a killed driver saved in a checkpoint but never recorded (idempotent by step)."""
    if not checkpoints:  # a fresh study: the driver must not pay torch's import (~1.2 s of CPU)
        return
    import torch

    for i, path in checkpoints.items():
        if i in recorder.finished_indices():
            continue
        history = torch.load(path, weights_only=False)["loop"].get("history", [])
        if history:
            recorder.trial_started(i, specs[i].config)
        for metrics in history:
            recorder.trial_metrics(i, metrics)


def _point(spec: TrialSpec) -> dict:
    """Return the trial's Tune config: its index and its axis values, nested (the strata read them)."""
    point: dict = {"index": spec.index}
    for key, value in spec.axes.items():
        node = point
        *parents, leaf = _bare(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return point


def prepare_data(configs: list) -> dict[str, int]:
    """Generate each distinct dataset once, in the driver, so trials only read the cache; return n_train per dataset.

    Raise ConfigError for a trial that could never run on its data: validate() knows the size of a
    generated dataset only, and such a trial would fail every attempt Tune gives it.
    """
    from scaling.data import count_train

    n_train: dict[str, int] = {}
    for c in configs:
        key = data_key(c.data)
        if key not in n_train:
            n_train[key] = count_train(c.data)
        check_fits_data(c, n_train[key])
    return n_train


def _finish(sweeper, recorder, specs, callback, wall: float, interrupted: bool, not_trained: set[int]) -> dict:
    n_train = getattr(sweeper, "n_train", {})
    full = sum(_budget_samples(s, n_train.get(data_key(s.config["data"]), 0)) for s in specs.values())
    # all attempts, from MLflow; a twin's samples were its source's (scaling.twins)
    trained = sum(max(v, 0) for i, v in recorder.logged_samples.items() if i not in not_trained)
    try:
        recorder.drain()  # every trial run exists before the summary names them
        best = best_per_batch_size(recorder, specs)
        counts = recorder.finish(len(specs), full, trained, best, interrupted=interrupted)
    except RuntimeError as exc:  # the tracking server is still down: the journal keeps everything
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    print_summary(recorder, specs, best, counts, wall, full, trained)
    if sweeper.conf.report and recorder.enabled and not interrupted:
        try:
            from scaling.report import report_study

            report_study(recorder.uri, recorder.run_id)
        except Exception as exc:  # noqa: BLE001 - the study is recorded; a failed report must not hide that
            error = f"error: the report failed ({type(exc).__name__}: {exc}); run scaling-report {recorder.run_id}"
            print(redact_url(error), file=sys.stderr, flush=True)
    if recorder.enabled:  # the study run in the MLflow UI, after its report, so that it is what a user sees
        print(ui_hint(recorder.uri, recorder.exp_id, recorder.run_id), flush=True)
    if interrupted:
        print("interrupted: run the same command with hydra.sweeper.resume=true to finish the study", flush=True)
        raise SystemExit(130)
    return {"study_run_id": recorder.run_id, "counts": counts, "best": best}


def _budget_samples(spec: TrialSpec, n_train: int) -> int:
    """Return the samples a trial trains on its full budget: whole steps of batch_size, as train.py counts them."""
    b = int(spec.config["batch_size"])
    return epochs_to_steps(float(spec.config["epochs"]), n_train / b) * b if n_train >= b else 0


def print_summary(recorder, specs, best: dict, counts: dict, wall: float, full: int, trained: int) -> None:
    """Print per batch size: best LR, best validation loss and accuracy, peak memory; and the UI command."""
    from rich.table import Table

    from scaling.tables import console_for, print_table

    table = Table(title=f"study {recorder.study_name}: best trial per batch size")
    for col in ("batch size", "best lr (effective)", "lr×", "rule", "best val/loss", "val/acc", "peak MB", "status"):
        table.add_column(col, justify="right")
    for b in sorted(best):
        entry = best[b]
        m = recorder.last_metrics.get(entry["trial"], {})  # a resumed trial's come from its relogged history
        lr = effective_lr(as_attributes(specs[entry["trial"]].config))
        table.add_row(str(b), f"{lr:.4g}", f"{entry['lr_multiplier']:g}", entry["rule"],
                      f"{entry['best/val_loss']:.4f}", f"{m.get('val/acc', math.nan):.3f}",
                      f"{m.get('mem/peak_mb', math.nan):.0f}", recorder.status.get(entry["trial"], "?"))
    print_table(console_for(), table)
    oom = sorted({int(s.config["batch_size"]) for i, s in specs.items() if recorder.status.get(i) == "oom"})
    if oom:
        fit = sorted({int(s.config["batch_size"]) for i, s in specs.items()
                      if recorder.status.get(i) in ("completed", "pruned", "early_stopped", "diverged")})
        fitting = [b for b in fit if b < oom[0]]
        print(f"out of memory at batch sizes {oom}; largest batch size that fit: {fitting[-1] if fitting else 'none'}")
    frac = trained / max(full, 1)
    print(f"{sum(counts.values())} trials in {wall:.0f}s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f" | samples trained {trained:,} of the full grid's {full:,} ({frac:.0%})")
