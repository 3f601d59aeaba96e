"""Data-parallel trials: one trial on several workers, with the global batch (so the scaling rule) unchanged.

A trial whose plan (`config.plan_split`) has W > 1 workers runs `train.run_trial` once per rank of a
torch.distributed process group. The trial loop needs only `Group`: DistributedDataParallel over the
ranks, each rank's contiguous shard of every global batch (all ranks draw the same seeded
permutation, so the shards' union is exactly the single-worker batch), `no_sync()` on all but the
last micro-batch, one all-reduce of the step's loss (the divergence check sees the global mean, so
every rank stops at the same step), and an evaluation that shards the validation set and sums the
ranks' totals (W times less work than every rank evaluating it all, and every rank gets the same
numbers, so early stopping and target checks agree without another message).

Only rank 0 reports. `run_data_parallel` starts the ranks and replays rank 0's reporter calls on the
caller's reporter (MLflow, Ray Tune...), so a data-parallel trial is recorded like any other:

- inside Ray (a Tune trial): a Ray Train TorchTrainer (Train V2, this Ray's default) started from the
  Tune function trainable, which Ray documents as the way to nest Train in Tune now that
  `Tuner(TorchTrainer)` is deprecated. Ray Train places the W workers in its own placement group (one
  bundle of cpu/gpu per worker; the Tune trial itself holds no CPU/GPU, see
  study_runner._trial_resources) and sets up gloo/nccl. `ray.train.report` is a barrier of all workers
  and carries checkpoints as Train paths, so rank 0 instead sends its reporter calls through a
  `ray.util.queue.Queue` to the trial, which replays them as `tune.report` with a Tune checkpoint:
  ASHA, checkpoints, retries and resume work as for a single-worker trial. When Tune stops the trial
  (ASHA), the trial removes the Train run's placement group and kills its workers, which ends the run
  and frees its resources, also when Tune ends the trial's actor first (`scaling.ray_train._TrainRun`).
- outside Ray (plain `scaling-train`): W local processes (torch.multiprocessing spawn) joined by gloo
  (nccl on CUDA) through a TCPStore on 127.0.0.1 with a port the OS picks, reporting through a queue.

Limits: BatchNorm statistics are per rank and micro-batch (as with gradient accumulation); the
online gradient noise scale (gns.enabled) is refused with W > 1. The Ray launcher is scaling.ray_train,
imported only when a trial runs in Ray: this module, and train.py, which uses `Group`, stay free of ray.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from scaling.config import ConfigError
from scaling.reporters import Reporter
from scaling.split import check_backend, plan_split
from scaling.validation import validate

# --------------------------------------------------------------------------- inside the trial loop


class Group:
    """This process's place in its trial's data-parallel group: rank 0 of 1 when there is none."""

    def __init__(self) -> None:
        on = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if on else 1
        self.rank = dist.get_rank() if on else 0

    @classmethod
    def for_trial(cls, cfg: Any) -> "Group":
        """Return the current group, checking that its size is the trial's planned worker count."""
        group, workers = cls(), plan_split(cfg).workers
        if group.world != workers:
            raise ConfigError("parallel.workers", workers,
                              f"needs a process group of that size, this process has {group.world} rank(s): "
                              "run the trial through scaling.distributed.run_data_parallel")
        return group

    def device(self, device: torch.device) -> torch.device:
        """Return the rank's own device: on CUDA the current one (the launcher set it per rank)."""
        if self.world > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Return the model wrapped in DistributedDataParallel across the group (itself alone)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, n: int) -> slice:
        """Return this rank's contiguous part of n items (parts differ by at most one item)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def no_sync(self, net: torch.nn.Module, last: bool):
        """Return a context that holds back DDP's gradient all-reduce unless this is the last micro-batch."""
        return net.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def sum(self, value: float, device: torch.device) -> float:
        """Return the sum of `value` over the ranks (one all-reduce; identical on every rank)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks, in place (one all-reduce), and return it."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def max(self, value: float, device: torch.device) -> float:
        """Return the largest `value` of the ranks (one all-reduce; identical on every rank)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()


# --------------------------------------------------------------------------- starting the ranks


def run_data_parallel(cfg: Any, reporter: Optional[Reporter] = None, workers: Optional[int] = None, *,
                      dataset: Any = None, resume: Optional[dict] = None, ref_lr: Optional[float] = None,
                      checkpoints: bool = False, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                      launcher: str = "auto", storage_path: Optional[str] = None):
    """Run one trial on `workers` data-parallel ranks; return rank 0's TrialResult.

    `reporter` receives rank 0's calls (start, every report, finish) in this process; with
    `checkpoints` each report carries a checkpoint() of the trial state. launcher: `ray` (Ray Train;
    the default when Ray is initialised here, e.g. in a Tune trial) | `local` (spawned processes;
    `dataset` is handed to them, Ray workers load it themselves) | `auto`.
    """
    from omegaconf import DictConfig, OmegaConf

    validate(cfg)
    split = plan_split(cfg)
    workers = workers or split.workers
    if workers != split.workers:
        raise ConfigError("parallel.workers", workers, f"differs from the trial's plan {split} (workers x micro x acc)")
    reporter = reporter or Reporter()
    container = OmegaConf.to_container(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True)
    if launcher == "auto":
        launcher = "ray" if "ray" in sys.modules and sys.modules["ray"].is_initialized() else "local"
    job = dict(cfg=container, resume=resume, ref_lr=ref_lr, checkpoints=checkpoints)
    if launcher == "ray":
        from scaling.ray_train import launch_ray

        return launch_ray(job, workers, reporter, cpus_per_worker, gpus_per_worker, storage_path)
    if launcher == "local":
        return _launch_local(job, workers, reporter, dataset)
    raise ValueError(f"launcher={launcher!r}: choose auto, ray or local")


def backend_of(cfg: dict, cuda: bool) -> str:
    """Return the process group's backend (ConfigError for nccl on ranks without CUDA)."""
    backend = cfg["parallel"]["backend"]
    check_backend(backend, cfg["device"], cuda)
    return backend if backend != "auto" else ("nccl" if cuda and cfg["device"] != "cpu" else "gloo")


class _ChannelReporter(Reporter):
    """Rank 0's reporter: sends each call to the launching process, which replays it (see relay)."""

    def __init__(self, put: Callable[[tuple], None], checkpoints: bool) -> None:
        self.put, self.checkpoints = put, checkpoints

    def start(self, info: dict[str, Any]) -> None:
        self.put(("start", info))

    def report(self, metrics: dict[str, float], checkpoint: Optional[Callable[[], dict]] = None) -> None:
        state = None
        if self.checkpoints and checkpoint is not None:
            buf = io.BytesIO()  # bytes, not tensors: a queue must not hand over shared memory of a dying process
            torch.save(checkpoint(), buf)
            state = buf.getvalue()
        self.put(("report", metrics, state))

    def finish(self, result: Any) -> None:
        self.put(("finish", result))


def run_rank(job: dict, put: Callable[[tuple], None], dataset: Any = None) -> None:
    """Run one rank of the trial in an initialised process group; rank 0 reports through `put`."""
    from omegaconf import OmegaConf

    from scaling.train import run_trial

    rank = dist.get_rank()
    reporter = _ChannelReporter(put, job["checkpoints"]) if rank == 0 else None
    result = run_trial(OmegaConf.create(job["cfg"]), reporter, dataset=dataset, resume=job["resume"],
                       ref_lr=job["ref_lr"])
    if result.status == "oom":
        # Out of memory on one rank only (ranks agree on every other way to end): leave the group so the
        # others fail at their next collective instead of waiting for this rank until the timeout.
        if rank != 0:
            put(("oom", result))
        dist.destroy_process_group()


def relay(get: Callable[[float], Optional[tuple]], reporter: Reporter, running: Callable[[], bool]):
    """Replay rank 0's reporter calls on `reporter` until it finishes; return its TrialResult.

    `get(timeout)` returns the next event or None; `running()` says whether the ranks still run and
    raises their error if one failed. A run that failed after some rank ran out of memory ends as oom.
    """
    oom, error = None, None
    while True:
        event = get(0.2)
        if event is None:
            if error is None:
                try:
                    if running():
                        continue
                except Exception as exc:  # noqa: BLE001 - a failed rank: drain the queue, then decide
                    error = exc
            event = get(0.0)
            if event is None:
                break
        kind = event[0]
        if kind == "start":
            reporter.start(event[1])
        elif kind == "report":
            state = event[2]
            reporter.report(event[1], None if state is None else
                            (lambda s=state: torch.load(io.BytesIO(s), weights_only=False)))
        elif kind == "finish":
            reporter.finish(event[1])
            return event[1]
        elif kind == "oom":
            oom = event[1]
    if oom is not None:
        reporter.finish(oom)
        return oom
    if error is not None:
        raise error
    raise RuntimeError("the data-parallel ranks ended without a result")


# ---- outside Ray: local processes


def _launch_local(job: dict, workers: int, reporter: Reporter, dataset: Any):
    import multiprocessing
    import queue as queues

    import torch.multiprocessing as tmp

    cuda = torch.cuda.is_available() and job["cfg"]["device"] != "cpu"
    if cuda and torch.cuda.device_count() < workers:
        raise ConfigError("parallel.workers", workers, f"exceeds the {torch.cuda.device_count()} visible CUDA devices")
    backend_of(job["cfg"], cuda)  # before any process starts
    queue = multiprocessing.get_context("spawn").Queue()
    # The rendezvous lives here, on loopback, on a port the OS picks: no race for a "free" port.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    threads = job["cfg"].get("threads") or max(1, (os.cpu_count() or 1) // workers)
    procs = tmp.spawn(_local_rank, args=(workers, store.port, job, queue, dataset, threads, cuda),
                      nprocs=workers, join=False)

    def get(timeout: float) -> Optional[tuple]:
        try:
            return queue.get(timeout=timeout) if timeout else queue.get_nowait()
        except queues.Empty:
            return None

    try:
        result = relay(get, reporter, lambda: not procs.join(timeout=0))
        with contextlib.suppress(Exception):  # rank 0 has finished: a late failure of another rank changes nothing
            procs.join(timeout=60)
        return result
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        for p in procs.processes:
            p.join(timeout=10)
        queue.close()


def _local_rank(rank: int, workers: int, port: int, job: dict, queue, dataset, threads: int, cuda: bool) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own connections stay on loopback too
    torch.set_num_threads(threads)
    if cuda:
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group(backend_of(job["cfg"], cuda), store=store, rank=rank, world_size=workers)
    try:
        run_rank(job, queue.put, dataset)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
