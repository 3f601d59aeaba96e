"""Data-parallel trials: the split plan, its config errors, and 2 workers x B/2 == 1 worker x B.

The equivalence runs the real trial loop in 2 spawned processes joined by gloo on 127.0.0.1
(scaling.distributed's local launcher); the study test runs a tiny Hydra multirun whose one trial
is a Ray Train run of 2 workers inside a Ray Tune trial, on a local Ray with 2 CPUs.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from scaling.config import ConfigError, Split
from scaling.reporters import RecordingReporter
from scaling.split import plan_split
from scaling.validation import validate

# batch_size, parallel.workers, micro_batch_size, parallel.max_micro_batch, parallel.max_workers -> split
PLANS = [
    (128, 1, None, None, 1, Split(1, 128, 1)),  # the default: one worker, one micro-batch
    (128, 1, 32, None, 1, Split(1, 32, 4)),  # gradient accumulation, as before
    (128, 2, None, None, 1, Split(2, 64, 1)),  # explicit workers: each takes its half
    (128, 2, 16, None, 1, Split(2, 16, 4)),  # workers x accumulation
    (128, 1, None, 128, 4, Split(1, 128, 1)),  # fits the limit: no parallelism
    (128, 1, None, 64, 4, Split(2, 64, 1)),  # the fewest workers that fit
    (512, 1, None, 128, 4, Split(4, 128, 1)),
    (1024, 1, None, 128, 4, Split(4, 128, 2)),  # workers exhausted: then accumulate
    (100, 1, None, 30, 4, Split(4, 25, 1)),  # 3 does not divide 100: skipped
    (96, 1, None, 20, 4, Split(4, 12, 2)),  # no worker count fits: the most, then the fewest accumulation steps
    (7, 1, None, 2, 4, Split(1, 1, 7)),  # a prime batch: only accumulation can split it
    (64, 4, None, 64, 8, Split(4, 16, 1)),  # parallel.workers is the floor
    (256, 2, None, 32, 1, Split(2, 32, 4)),  # max_workers below workers: workers wins
]


@pytest.mark.parametrize("B, workers, micro, limit, max_workers, want", PLANS)
def test_plan_split(B, workers, micro, limit, max_workers, want):
    cfg = types.SimpleNamespace(batch_size=B, micro_batch_size=micro, parallel=types.SimpleNamespace(
        workers=workers, max_micro_batch=limit, max_workers=max_workers, backend="auto"))
    split = plan_split(cfg)
    assert split == want
    assert split.workers * split.micro_batch * split.accumulation == B
    assert limit is None or split.micro_batch <= limit


@pytest.mark.parametrize("overrides, key, value", [
    (["batch_size=32", "parallel.workers=3"], "parallel.workers", "3"),
    (["batch_size=32", "parallel.workers=0"], "parallel.workers", "0"),
    (["batch_size=32", "parallel.workers=2", "micro_batch_size=32"], "micro_batch_size", "32"),
    (["batch_size=48", "parallel.workers=2", "micro_batch_size=16"], "micro_batch_size", "16"),
    (["parallel.max_micro_batch=16", "micro_batch_size=16"], "parallel.max_micro_batch", "16"),
    (["parallel.max_micro_batch=0"], "parallel.max_micro_batch", "0"),
    (["parallel.max_workers=0"], "parallel.max_workers", "0"),
    (["parallel.backend=mpi"], "parallel.backend", "'mpi'"),
    (["parallel.backend=nccl", "device=cpu"], "parallel.backend", "'nccl'"),
    (["gns.enabled=true", "batch_size=64", "micro_batch_size=16", "parallel.workers=2"], "gns.enabled", "True"),
])
def test_bad_parallel_config_is_one_line_naming_key_and_value(compose_cfg, overrides, key, value):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(*overrides))
    message = str(info.value)
    assert info.value.key == key and message.startswith(f"{key}={value}:") and "\n" not in message, message


def test_run_trial_without_a_process_group_refuses_several_workers(compose_cfg, tiny, tiny_data):
    from scaling.train import run_trial

    with pytest.raises(ConfigError, match="run_data_parallel"):
        run_trial(compose_cfg(*tiny, "parallel.workers=2"), dataset=tiny_data)


class CheckpointingReporter(RecordingReporter):
    """Also takes every checkpoint it is offered, as the Tune reporter does."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: list[dict] = []

    def report(self, metrics, checkpoint=None) -> None:
        super().report(metrics, checkpoint)
        if checkpoint is not None:
            self.checkpoints.append(checkpoint())


CURVE = ("train/loss", "val/loss", "val/acc")


@pytest.mark.parametrize("micro, split", [("null", "2x32x1"), ("16", "2x16x2")], ids=["2x32", "2x16x2acc"])
def test_two_workers_give_the_single_worker_loss_curve(compose_cfg, tiny, tiny_data, micro, split):
    """2 gloo processes x B/2 (with or without accumulation) == 1 process x B, same seed, same data order."""
    from scaling.distributed import run_data_parallel
    from scaling.train import run_trial

    common = [*tiny, "batch_size=64", "eval_every=0.25"]
    one = RecordingReporter()
    run_trial(compose_cfg(*common), one, dataset=tiny_data)
    two = CheckpointingReporter()
    result = run_data_parallel(compose_cfg(*common, "parallel.workers=2", f"micro_batch_size={micro}"), two, 2,
                               dataset=tiny_data, checkpoints=True, launcher="local")

    assert result.status == "completed" and two.result is result
    assert (two.info["workers"], two.info["split"]) == (2, split) and one.info["split"] == "1x64x1"
    assert two.info["total_steps"] == one.info["total_steps"] == 1600 // 64
    assert [h["step"] for h in two.history] == [h["step"] for h in one.history] == [7, 13, 19, 25]
    assert [h["samples"] for h in two.history] == [h["samples"] for h in one.history]
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(one.history, two.history)) for k in CURVE}
    print(f"\n{split} vs 1x64x1: max abs diff over {len(one.history)} evaluations: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for a, b in zip(one.history, two.history):
        for k in CURVE:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a["step"])
    # rank 0's checkpoints reach the caller: the plain model's state (no DDP prefix), one per evaluation
    assert len(two.checkpoints) == len(two.history)
    state = two.checkpoints[-1]
    assert state["loop"]["step"] == two.history[-1]["step"] and not any(k.startswith("module.") for k in state["model"])


def test_a_validation_loss_blow_up_ends_the_data_parallel_trial_as_diverged(compose_cfg, tiny, tiny_data):
    """The ranks share the trial loop and the all-reduced val/loss, so they end together, as the single
    process does (tests/test_train.py), on a blow-up in the trial's last step."""
    from scaling.distributed import run_data_parallel

    cfg = compose_cfg(*tiny, "batch_size=1024", "epochs=0.64", "eval_every=0.64", "optimizer=adam", "lr=5",
                      "parallel.workers=2")
    rec = RecordingReporter()
    result = run_data_parallel(cfg, rec, 2, dataset=tiny_data, launcher="local")
    assert result.status == "diverged" and rec.result.status == "diverged"
    assert result.reason.startswith(f"val/loss={result.metrics['val/loss']:.4g} at step 1: above divergence.factor=5")
    assert result.metrics["samples"] == 1024 and rec.history == []


# --------------------------------------------------------------------------- the Ray path

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_study_trials_run_on_two_ray_train_workers_with_the_numbers_and_memory_of_one(tmp_path, compose_cfg, tiny,
                                                                                       tiny_data):
    """A study on a local 2-CPU Ray of one trial on 1 worker (2 micro-batches of 32) and one on 2 Ray Train
    gloo workers (32 each): both give the loss curve of one process with the whole batch of 64, and the
    2-worker trial records its rank's own peak memory. That read ~72 MB against ~1.3 MB for the same model
    and micro-batch on one worker, when DDP's set-up and gloo's first collectives ran inside the window."""
    from records import study_records

    from scaling.train import run_trial

    args = ["batch_size=64", "micro_batch_size=32", "parallel.workers=1,2", "epochs=1", "eval_every=0.5",
            "hydra.sweeper.asha.enabled=false", "data.n_samples=2000", "model.width=32", "threads=1",
            "hydra.sweeper.ray.num_cpus=2", "hydra.sweeper.report=false"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(BIN / "scaling-train"), "-m", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    _, _, trials = study_records(f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_split = {t.data.params["derived.split"]: t.data for t in trials}
    assert sorted(by_split) == ["1x32x2", "2x32x1"], sorted(by_split)
    for split, trial in by_split.items():
        assert trial.tags["trial.status"] == "completed", (split, trial.tags.get("trial.reason"))
    p = by_split["2x32x1"].params
    assert (p["parallel.workers"], p["derived.workers"]) == ("2", "2")
    # the same numbers as one process with the whole batch
    one = RecordingReporter()
    run_trial(compose_cfg(*tiny, "batch_size=64"), one, dataset=tiny_data)
    for split, trial in by_split.items():
        assert trial.metrics["epoch"] == 1.0
        for k in CURVE:
            assert trial.metrics[k] == pytest.approx(one.history[-1][k], rel=1e-5, abs=1e-6), (split, k)
    peak = {split: trial.metrics["mem/peak_mb"] for split, trial in by_split.items()}
    assert peak["2x32x1"] < peak["1x32x2"] + 10, peak  # a rank holds the same model and micro-batch


@pytest.mark.slow
def test_a_study_of_data_parallel_trials_that_asha_stops_runs_every_trial(tmp_path):
    """Trials of 2 Ray Train workers on 2 CPUs run one at a time, and ASHA stops some mid-run.

    Tune ends a stopped trial's actor without waiting for the trial's thread; the Train run's
    placement group then stayed (the local head has no state API for Train's own cleaner), held both
    CPUs, and the next trial waited for them until the timeout.
    """
    from records import study_records

    args = ["batch_size=64", "lr_multiplier=1,2,0.01,0.003", "parallel.workers=2", "micro_batch_size=16",
            "epochs=0.5", "eval_every=0.125", "hydra.sweeper.asha.grace_period=0.125", "data.n_samples=2000",
            "model.width=32", "hydra.sweeper.ray.num_cpus=2", "hydra.sweeper.report=false"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([str(BIN / "scaling-train"), "-m", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the study did not end in 240 s; its last lines: {(exc.stdout or b'')[-600:]!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, studies, trials = study_records(f"sqlite:///{tmp_path / 'mlflow.db'}")
    statuses = sorted(t.data.tags["trial.status"] for t in trials)
    assert len(trials) == 4 and set(statuses) <= {"completed", "pruned"}, statuses
    assert "pruned" in statuses  # the case that left the placement group behind
    assert studies[0].data.metrics["trials/total"] == 4


@pytest.mark.slow
def test_a_study_goes_on_after_a_ray_train_worker_is_killed_mid_trial(tmp_path):
    """SIGKILL one of the first trial's 2 Ray Train workers mid-run: the study must not hang on the
    run's placement group (a probe saw it hold both CPUs after Train's controller failed), Tune retries
    the trial from its checkpoint (hydra.sweeper.max_failures=2 by default), and the next trial runs.

    Killed after the first checkpoint, the run ended with Train's WorkerGroupError in 6 of 6 runs (the
    controller then frees its own placement group), not with the ControllerError of the probe, which
    _TrainRun.end covers by removing the group of every run that did not finish.
    """
    import psutil
    from procs import start_group, stop_group, two_second_trials
    from records import study_records

    # trials of a few seconds (procs.two_second_trials): at 2,000 samples and width 32 a trial has ~37
    # steps, and the kill could land after its training had ended (CI at 72ea2bb, and 1 of 4 runs beside
    # a CPU hog: the study ended 2 s after the kill, with no retry and no "trial.failures")
    args = two_second_trials(["batch_size=64", "lr_multiplier=1,2", "parallel.workers=2", "epochs=1.5",
                              "eval_every=0.25", "hydra.sweeper.asha.enabled=false",
                              "hydra.sweeper.checkpoint_interval_s=0", "hydra.sweeper.ray.num_cpus=2",
                              "hydra.sweeper.report=false"])
    log = tmp_path / "study.log"
    study = start_group([BIN / "scaling-train", "-m", *args], tmp_path, log, env={"HYDRA_FULL_ERROR": "0"})
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".studies/*/tune-0/trial_00000/checkpoint_*")):  # the trial reports
            assert time.time() < deadline and study.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        workers = []
        for p in psutil.Process(study.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # one ended (a zombie) since the listing
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    workers.append(p)
        assert len(workers) == 2, [p.pid for p in workers]
        killed_at = time.time()
        workers[1].kill()  # one rank dies mid-trial; the other waits in a collective
        try:
            study.wait(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the study hung after the kill; its last lines: {log.read_text()[-1500:]}")
        print(f"\nthe study ended {time.time() - killed_at:.0f} s after the kill")
        assert study.returncode == 0, log.read_text()[-3000:]
    finally:
        if study.poll() is None:
            stop_group(study)
    _, studies, trials = study_records(f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_lr = {t.data.params["lr_multiplier"]: t.data.tags for t in trials}
    assert sorted(by_lr) == ["1.0", "2.0"] and all(t["trial.status"] == "completed" for t in by_lr.values()), by_lr
    assert by_lr["1.0"]["trial.failures"] == "1" and by_lr["1.0"]["trial.last_failure"]  # retried once ...
    assert int(by_lr["1.0"]["trial.resumed_from_step"]) > 0  # ... from its checkpoint, not from step 0
    assert "trial.failures" not in by_lr["2.0"]
    assert studies[0].data.metrics["trials/total"] == 2


@pytest.mark.slow
def test_a_failed_train_run_whose_thread_has_ended_still_frees_its_placement_group():
    """Train's ControllerError can end the trial's fit thread while the run's placement group stays (a dead
    controller's is never removed without the state API, which a local head does not start): ending a run
    that did not finish removes its group and kills its workers whether or not its thread is still alive."""
    import threading

    import ray
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from scaling.local_ray import init_ray
    from scaling.ray_train import _TrainRun
    from scaling.staging import _alive  # a zombie counts as ended

    init_ray(None, 2, 0)
    try:
        group = placement_group([{"CPU": 1}, {"CPU": 1}])
        ray.get(group.ready(), timeout=60)

        @ray.remote(num_cpus=1)
        class Rank:
            def pid(self) -> int:
                return os.getpid()

        ranks = [Rank.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                 for i in range(2)]
        pids = ray.get([r.pid.remote() for r in ranks], timeout=60)
        fit = threading.Thread(target=lambda: None)  # the fit thread, ended by the run's failure
        fit.start()
        fit.join()
        assert ray.available_resources().get("CPU", 0) == 0  # the group holds both CPUs

        run = _TrainRun(fit, Queue(actor_options={"num_cpus": 0}), None)
        run.workers.extend((rank, group) for rank in ranks)
        run.end(False)

        assert placement_group_table(group)["state"] == "REMOVED"
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < 2 or any(_alive(p) for p in pids):
            assert time.time() < deadline, (ray.available_resources(), [_alive(p) for p in pids])
            time.sleep(0.1)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_train_run_on_a_head_without_the_state_api_starts_no_placement_group_cleaner(tmp_path):
    """Train's PlacementGroupCleaner asks the state API whether Train's controller lives. Without the
    dashboard (a local study's head, study.sbatch's cluster) that call waited ~40 s, each run's end waited
    the controller's 12 s for the cleaner to stop while the trial held its CPUs, and the cleaner's process
    outlived the run. The trainer the tool builds there leaves it out; Train's own list has it (the setup)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scaling import ray_train
    from scaling.local_ray import init_ray

    def callbacks(trainer) -> set[str]:
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    def _no_training(config: dict) -> None:  # local: pickled by value for Train's workers
        pass

    init_ray(None, 2, 0)
    try:
        assert not ray_train._has_state_api()
        kw = dict(scaling_config=ScalingConfig(num_workers=1),
                  run_config=RunConfig(name="no-cleaner", storage_path=str(tmp_path)))
        assert "PlacementGroupCleanerCallback" in callbacks(TorchTrainer(_no_training, **kw))
        trainer = ray_train._trainer_without_cleaner(TorchTrainer)(_no_training, **kw)
        assert "PlacementGroupCleanerCallback" not in callbacks(trainer)
        trainer.fit()
        started = {a["ActorClassName"] for a in ray._private.state.actors().values()}
        assert "TrainController" in started and "PlacementGroupCleaner" not in started, started
    finally:
        ray.shutdown()
