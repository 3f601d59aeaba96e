"""Drives one study: Ray start-up checks, the MLflow study run, the Tune run (or its resume); its end is study_summary."""
from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from scaling import interrupts
from scaling.config import ConfigError
from scaling.grid import Grid, bare_key, grid_digest, mixed_batch_sizes_note, stratum_keys
from scaling.heap import imports_without_gc
from scaling.lean_tune import count_callbacks_by_name, trial_actors_inherit_env
from scaling.local_ray import check_cluster, stop_ray_aside
from scaling.staging import remove_stale_staging
from scaling.study import TrialSpec, data_key, trainable
from scaling.study_callback import callback_class
from scaling.study_record import TERMINAL
from scaling.store import import_mlflow
from scaling.study_summary import finish_study
from scaling.twins import find_twins, mirror_twins, whole_strata
from scaling.split import plan_split
from scaling.data_fit import check_fits_data

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
                group_by=[f"point.{bare_key(k)}" for k in stratum_keys(grid.axis_names, a.group_by)],
                axes=[f"point.{bare_key(k)}" for k in grid.axis_names], stratified=a.stratified)


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


def _reuse_actors(workers: dict[int, int]) -> bool:
    """Return whether Tune may run a trial in the actor of one that ended: not when any is data-parallel.

    Tune hands an ended trial's actor on only if the trial's function thread returns within
    TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s) of the stop, and otherwise ends the next trial as an error.
    A data-parallel trial's thread is still ending its Ray Train run then (the controller tears down
    the worker group and its placement group), so the next trial failed or waited on CPUs that run
    still held. Without reuse Tune ends the actor, and the Train run it owns ends with it.
    """
    return max(workers.values()) == 1


def _workers(config: dict) -> int:
    """Return a trial's data-parallel ranks (plan_split of the keys it reads: a whole config is ~30 ms)."""
    keys = ("parallel", "batch_size", "micro_batch_size")
    return plan_split(OmegaConf.create({k: config.get(k) for k in keys})).workers


def run_study(sweeper, grid: Grid, configs: list, ray_started: Future) -> dict:
    """Run (or resume) the study (on the Ray that `start_ray` is starting) and return its summary."""
    with imports_without_gc():
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
    t0 = time.time()
    callback, not_trained, interrupted = None, set(state.get("mirrored", [])), False
    # The Tuner holds Ray objects (the trial configs with_parameters put in the object store). Let go
    # of it before Ray has stopped, and Python may free them later, while ray.shutdown runs in its
    # thread: Ray's core worker then ends the process ("The core worker has already been shutdown";
    # 2 of 3 default studies exited 1 so when the Tuner was a temporary, 0 of 5 since). So it lives
    # until Ray has stopped.
    tuner = None
    try:  # from here on the study run exists: a Ctrl-C ends it as interrupted
        interrupts.started()  # (raising the one that came while _open_record created the run)
        recorder, scheduler, callback, points, not_trained = _prepare_run(sweeper, grid, specs, recorder, storage,
                                                                           state)
        if points:
            tuner = _tuner(sweeper, specs, workers, scheduler, callback, storage, points)
            with trial_actors_inherit_env():
                tuner.fit()
            interrupts.python_handles()  # Tune leaves its handler: the study's end must hear a Ctrl-C
            # Tune takes the first Ctrl-C (SIGINT) itself: it stops the trials and returns as if the run
            # had ended. A trial it stopped never reported an end, and one it never started has no status.
            interrupted = any(recorder.status.get(p["index"]) not in TERMINAL for p in points)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune took over
        interrupted = True
    wall = time.time() - t0
    stopping = stop_ray_aside()
    try:
        return finish_study(sweeper, recorder, specs, callback.ref_lrs if callback else {}, wall, interrupted,
                            not_trained=not_trained)
    finally:
        stopping.join()
        # the checkpoint folders of the workers Ray is ending (on this node): ending takes it a moment
        remove_stale_staging(wait_for=callback.local_pids if callback else ())
        del tuner  # after Ray has stopped, as before this function was split


def _prepare_run(sweeper, grid: Grid, specs: dict[int, TrialSpec], recorder, storage: Path, state: dict):
    """Return what the Tune run needs: the recorder (mirroring twins), ASHA, the callback, the points to
    run in order, and the trials not trained (twins recorded from their source, in any attempt)."""
    scheduler = _scheduler(sweeper, grid, specs)
    twins = {} if sweeper.conf.run_twins else find_twins({i: s.config for i, s in specs.items()})
    if scheduler is not None:  # ASHA judges a trial within its stratum
        twins = whole_strata(twins, {i: scheduler.stratum_of({"point": _point(s)}) for i, s in specs.items()})
    recorder = mirror_twins(recorder, twins, specs)
    not_trained = set(getattr(recorder, "mirrored", ())) | set(state.get("mirrored", []))
    if not_trained:
        state_path = storage / STATE_FILE
        _write_state(storage, {**json.loads(state_path.read_text()), "mirrored": sorted(not_trained)})
    if state and scheduler is not None:
        _seed_asha(scheduler, recorder, specs)
    callback = callback_class()(recorder, specs, scheduler)
    checkpoints = _latest_checkpoints(storage) if state else {}
    _relog_from_checkpoints(recorder, checkpoints, specs)
    points = _points_to_run(sweeper, specs, recorder, scheduler, checkpoints)
    if getattr(scheduler, "pauses_at_rungs", False):  # Tune may create trials lazily: say how many will come
        scheduler.expect(scheduler.stratum_of({"point": p}) for p in points)
    return recorder, scheduler, callback, points, not_trained


def _open_record(sweeper, grid: Grid, first, specs: dict[int, TrialSpec], workers: dict[int, int], name: str,
                 storage: Path, state: dict, ray_started: Future):
    """Wait for Ray, create (or reopen) the study's MLflow run and say which study this is; return its recorder."""
    from scaling.cli import fail
    from scaling.study_record import StudyRecorder

    if first.mlflow.enabled:
        import_mlflow(first.mlflow.tracking_uri)  # while Ray is still starting (creates nothing): the wait below shrinks
    try:
        _check_same_grid(sweeper, grid, name, state)
        tests = _auto_range_tests(specs)  # while Ray is still starting, and before anything is written
        check_cluster(sweeper, ray_started, max(workers.values()),
                      needs_gpu=any(s.config["device"] == "cuda" for s in specs.values()))
        interrupts.hold()  # the study run is created next: a Ctrl-C waits for it, to end it as interrupted
        recorder = StudyRecorder(first.mlflow.tracking_uri, first.mlflow.experiment, study_name=name,
                                 run_id=state.get("study_run_id"), enabled=first.mlflow.enabled)
    except ConfigError as exc:
        fail(str(exc))
    sweep_dir = str(Path(sweeper.config.hydra.sweep.dir).resolve())
    a = sweeper.conf.asha  # the strata ASHA judges within (_scheduler): none when unstratified or off
    study_params = {"grid": grid.describe(), "sweeper": OmegaConf.to_container(sweeper.conf, resolve=True),
                    "strata": stratum_keys(grid.axis_names, a.group_by) if a.enabled and a.stratified else []}
    recorder.start(study_params, {"scaling.sweep_dir": sweep_dir, "scaling.storage": str(storage)})
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)  # as Hydra's own sweeper does; the report goes there too
    OmegaConf.save(sweeper.config, Path(sweep_dir) / "multirun.yaml")
    _write_state(storage, {"study_run_id": recorder.run_id, "name": name, "n_trials": len(specs),
                           "grid": grid_digest(grid, trained_only=True)})
    recorder.use_journal(storage / "mlflow_journal.jsonl")
    recorder.flush()
    _log_range_tests(tests, recorder)
    if state:
        again = recorder.reopen_errored() if sweeper.conf.resume_errored else []
        print(f"resuming study {name} (mlflow run {recorder.run_id}); "
              f"{len(recorder.finished_indices())}/{len(specs)} trials already finished"
              + (f"; {len(again)} that ended in error train again" if again else ""), flush=True)
    else:
        where = f"mlflow run {recorder.run_id}" if recorder.enabled else "not recorded (mlflow.enabled=false)"
        print(f"study {name}: {len(specs)} trials | {where} | sweep dir {sweep_dir}", flush=True)
    if note := mixed_batch_sizes_note(a, grid.axis_names, study_params["strata"]):
        print(note, flush=True)
    return recorder


def _check_same_grid(sweeper, grid: Grid, name: str, state: dict) -> None:
    """Refuse to resume a study with another grid: trials are matched by their index in the grid, so
    another grid's trial i would be taken for this one's (possible only with a fixed study_name)."""
    digest = grid_digest(grid, trained_only=True)
    if state and state.get("grid", digest) != digest:  # a study started before 2026-11-24 has no digest
        raise ConfigError("hydra.sweeper.resume", True,
                          f"study {name} was started with another grid ({state.get('n_trials')} trials; this one: "
                          f"{len(grid.points)}, other points): give the same grid, or another hydra.sweeper.study_name")


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
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=_reuse_actors(workers),
                                    max_concurrent_trials=_max_concurrent(sweeper, workers),
                                    trial_dirname_creator=lambda t: f"trial_{t.config['point']['index']:05d}"),
        run_config=tune.RunConfig(name=f"tune-{attempt}", storage_path=str(storage), callbacks=[callback],
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=sweeper.conf.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _auto_range_tests(specs: dict[int, TrialSpec]) -> list:
    """Run the LR range test once per distinct (data, model, optimizer, ref batch, lr_find) for
    scaling.ref_lr=auto, put its LR in place of `auto` in each trial's config and return the tests.

    It runs before the study writes anything, so a test too short to suggest an LR ends the study in
    one line with nothing recorded. The seed is not part of the key: every seed of a grid point trains
    the same LRs (the first seed's test), so the report can pool them.
    """
    from omegaconf import OmegaConf

    from scaling.lr_finder import range_test, usable_lr

    found: dict[str, float] = {}
    tests = []
    for spec in specs.values():
        c = spec.config
        if c["scaling"]["ref_lr"] != "auto":
            continue
        key = json.dumps([c["data"], c["model"], c["optimizer"], c["scaling"]["ref_batch_size"], c["lr_find"]],
                         sort_keys=True, default=str)
        if key not in found:
            result = range_test(OmegaConf.create(c), None, c["scaling"]["ref_batch_size"])
            found[key] = usable_lr(result, "scaling.ref_lr", "auto")
            tests.append(result)
            print(f"scaling.ref_lr=auto: the range test at batch size {c['scaling']['ref_batch_size']} "
                  f"chose ref_lr={found[key]:.4g}", flush=True)
        c["scaling"]["ref_lr"] = found[key]
    return tests


def _log_range_tests(tests: list, recorder) -> None:
    """Record the auto ref_lr range tests in the study run: the first one's curve and plot, every LR as a tag."""
    if not tests or not recorder.enabled:
        return
    from scaling.lr_find_cli import log_range_test

    log_range_test(recorder.client, recorder.run_id, tests[0])
    values = sorted({t.lr for t in tests})
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
            recorder.trial_started(i, specs[i].config, axes=specs[i].axes)
        for metrics in history:
            recorder.trial_metrics(i, metrics)


def _point(spec: TrialSpec) -> dict:
    """Return the trial's Tune config: its index and its axis values, by key (`point.batch_size`,
    `point.optimizer.momentum`: the strata read them with asha.get_dotted). Flat, because a config
    group's choice and a key under it can both be axes (optimizer=sgd,adam optimizer.momentum=0.5,0.9)."""
    return {"index": spec.index, **{bare_key(key): value for key, value in spec.axes.items()}}


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
