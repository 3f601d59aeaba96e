"""How one optimizer step's batch_size samples are split: data-parallel workers x micro-batch x
gradient-accumulation steps (`Split`), from batch_size, micro_batch_size, `parallel.*` and
gns.micro_batches. Pure, imports nothing heavy; scaling.validation checks the keys it reads."""
from __future__ import annotations

from typing import Any

from scaling.config import ConfigError, Split


def check_backend(backend: str, device: str, cuda: bool) -> None:
    """Raise ConfigError for parallel.backend=nccl on ranks without CUDA (`cuda`: whether they use it),
    which fails inside every rank; validate() can tell only for device=cpu, as device=auto needs torch."""
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend", backend,
                          f"needs CUDA, and the ranks run on the CPU (device={device}); use gloo or auto")


def plan_split(cfg: Any) -> Split:
    """Return how a step's batch_size samples are split: workers x micro_batch x accumulation.

    Without parallel.max_micro_batch: parallel.workers workers, each taking micro_batch_size samples
    (null: its whole share, or batch_size / gns.micro_batches while that measures) per forward pass.
    With it: the fewest workers from parallel.workers up to max(workers, max_workers) (dividing
    batch_size) whose share fits the limit; if none fits, the most of them, then the fewest
    accumulation steps that bring the micro-batch under the limit.
    """
    p, B = cfg.parallel, int(cfg.batch_size)
    if p.max_micro_batch is None:
        w = int(p.workers)
        micro = int(cfg.micro_batch_size or B // (w * _gns_micro_batches(cfg)))
        return Split(w, micro, B // (w * micro))
    limit = int(p.max_micro_batch)
    ws = [w for w in range(int(p.workers), max(int(p.workers), int(p.max_workers)) + 1) if B % w == 0]
    w = next((w for w in ws if B // w <= limit), ws[-1])
    share = B // w
    acc = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= limit)
    return Split(w, share // acc, acc)


def _gns_micro_batches(cfg: Any) -> int:
    """Return gns.micro_batches where it sets the split (the noise scale on, micro_batch_size null, one
    worker: validate() refuses the noise scale with more), else 1."""
    gns = getattr(cfg, "gns", None)  # absent from a split's own keys (scaling.study_runner._workers)
    if gns is None or not gns.enabled or gns.micro_batches is None or cfg.micro_batch_size is not None \
            or int(cfg.parallel.workers) != 1:
        return 1
    return max(int(gns.micro_batches), 1)
