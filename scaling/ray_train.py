"""Ray Train inside a Ray Tune trial: a data-parallel trial's W ranks as a TorchTrainer started from the
Tune function trainable, rank 0's reporter calls relayed to the trial through a Ray queue, and the run
ended (placement group removed, workers killed) whenever the trial ends, stopped by ASHA included.

scaling.distributed holds what both launchers share (the process group the trial loop sees, the relay
of rank 0's calls) and starts this one when the trial runs in Ray.
"""
from __future__ import annotations

import atexit
import contextlib
import tempfile
import threading
import uuid
from typing import Any, Optional

import torch

from scaling.distributed import backend_of, relay, run_rank
from scaling.reporters import Reporter


def launch_ray(job: dict, workers: int, reporter: Reporter, cpus: float, gpus: float, storage_path: Optional[str]):
    """Run the job's `workers` ranks as a Ray Train run started from this Tune trial, replay rank 0's calls
    on `reporter`, and return its TrialResult; the run is ended however the trial ends."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    backend = backend_of(job["cfg"], gpus > 0)  # before any actor starts
    channel = Queue(actor_options={"num_cpus": 0})
    job = {**job, "channel": channel, "threads": max(1, int(cpus))}
    own_storage = storage_path is None
    storage_path = storage_path or tempfile.mkdtemp(prefix="scaling-dp-")
    trainer = (TorchTrainer if _has_state_api() else _trainer_without_cleaner(TorchTrainer))(
        _ray_rank, train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}),
        torch_config=TorchConfig(backend=backend),
        # A fresh name per attempt: Train would otherwise resume an earlier attempt's run from storage.
        # No Train-level retries: Tune retries the whole trial from its last checkpoint.
        run_config=RunConfig(name=f"dp-{uuid.uuid4().hex[:8]}", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=0)))
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's thread by running()
            failure.append(exc)

    thread = threading.Thread(target=fit, name="scaling-train-fit", daemon=True)
    thread.start()
    run = _TrainRun(thread, channel, storage_path if own_storage else None)
    # Tune ends a stopped trial's actor (`__ray_terminate__`) without waiting for this thread, whose
    # finally would then never run: Train's controller died with the actor and its placement group
    # stayed, holding the workers' CPUs, and the next data-parallel trial waited for them forever.
    # Train's own PlacementGroupCleaner cannot help: it asks the state API, which a local study's head
    # does not start (local_ray._lean_head). The actor runs atexit handlers as it exits.
    atexit.register(run.end, False)

    def get(timeout: float) -> Optional[tuple]:
        while True:
            try:
                event = channel.get(block=timeout > 0, timeout=timeout or None)
            except Empty:
                return None
            if event[0] != "actor":
                return event
            run.workers.append(event[1:])  # each worker's handle and placement group: how a stopped trial ends its run

    def running() -> bool:
        if thread.is_alive():
            return True
        if failure:
            raise failure[0]
        return False

    done = False
    try:
        result = relay(get, reporter, running)
        done = True
        return result
    finally:
        run.end(done)
        atexit.unregister(run.end)


def _has_state_api() -> bool:
    """Whether the cluster runs Ray's dashboard, which serves the state API (a local study's head does not,
    nor does a cluster started with --include-dashboard=false, as cluster/slurm/study.sbatch starts it)."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    try:
        return internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                            namespace=ray_constants.KV_NAMESPACE_DASHBOARD) is not None
    except Exception:  # noqa: BLE001 - Ray's internals differ: keep Train's defaults
        return True


def _trainer_without_cleaner(base: type) -> type:
    """`base` (TorchTrainer) without Train's PlacementGroupCleaner, on a cluster without the state API.

    The cleaner is a detached actor that asks the state API whether Train's controller is alive. Without
    the dashboard that call waited ~40 s for an address the GCS never had, so each run's end waited the
    controller's 12 s stop timeout for it ("Failed to stop PlacementGroupCleaner gracefully") while the
    trial held its CPUs, and the cleaner's process outlived the run by ~40 s. _TrainRun.end removes the
    run's placement group itself (see launch_ray)."""

    class Trainer(base):
        def _create_default_callbacks(self):  # Ray Train's own list, less the cleaner
            return [c for c in super()._create_default_callbacks() if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


class _TrainRun:
    """The end of a Ray Train run started from a Tune trial, run once by whichever comes first: the
    trial's own end, or the exit of the trial's actor."""

    def __init__(self, thread: threading.Thread, channel: Any, scratch: Optional[str]):
        self.thread, self.channel, self.scratch = thread, channel, scratch
        self.workers: list[tuple] = []  # (actor, placement group) per worker, as each announces itself
        self._lock, self._ended = threading.Lock(), False

    def end(self, finished: bool) -> None:
        """End the run: wait for it if it `finished` (its workers are returning), else stop it now."""
        import ray

        with self._lock:  # a second caller waits here until the run has ended
            if self._ended:
                return
            self._ended = True
            self.thread.join(timeout=60 if finished else 0)  # give Train time to wrap up
            # stopped by Tune (ASHA), failed, or slow to end: end the run now. A failed run's thread may have
            # ended already while its placement group stays (a dead controller's does: see launch_ray)
            if not finished or self.thread.is_alive():
                for group in {g for _, g in self.workers if g is not None}:  # the one group of the run
                    with contextlib.suppress(Exception):  # ends its workers and frees their resources at once
                        ray.util.remove_placement_group(group)
                for actor, _ in self.workers:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
                self.thread.join(timeout=60)
            with contextlib.suppress(Exception):
                ray.kill(self.channel.actor)
            if self.scratch is not None:
                import shutil

                shutil.rmtree(self.scratch, ignore_errors=True)


def _ray_rank(config: dict) -> None:
    """Ray Train's per-worker function: announce this worker's actor, then run its rank of the trial."""
    import ray

    torch.set_num_threads(config["threads"])
    channel = config["channel"]
    channel.put(("actor", ray.get_runtime_context().current_actor, ray.util.get_current_placement_group()))
    run_rank(config, channel.put)
