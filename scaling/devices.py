"""Where a trial runs: its device, its autocast dtype, and the one-time costs that torch pays in a
process's first pass, paid here outside the trial's memory window so that its peak is the trial's own.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from scaling.config import ConfigError
from scaling.data import Dataset
from scaling.distributed import Group
from scaling.evaluation import EVAL_CHUNK, eval_totals
from scaling.models import build_model
from scaling.optim import build_optimizer
from scaling.split import check_backend, plan_split


def resolve_device(name: str) -> torch.device:
    """Return the torch device for `auto` | `cpu` | `cuda`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "no CUDA device is visible to this process")
    return torch.device(name)


def check_device(cfg: Any) -> torch.device:
    """Return the trial's device; raise ConfigError for device=cuda without a GPU, or for
    parallel.backend=nccl when the trial's ranks would run on the CPU (what validate() cannot tell)."""
    device = resolve_device(cfg.device)
    if plan_split(cfg).workers > 1:  # one worker starts no process group
        check_backend(cfg.parallel.backend, cfg.device, device.type == "cuda")
    return device


def amp_dtype_of(precision: str) -> Optional[torch.dtype]:
    """Return autocast's dtype for `precision` (None for fp32: autocast off)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


_WARMED: set = set()  # what warm_up and warm_up_shapes have paid for in this process


def warm_up(cfg, device: torch.device) -> None:
    """Pay torch's one-time costs (lazy imports, kernel caches) once per process and optimizer,
    outside the memory window: on CPU they otherwise land in the first trial's peak (~80 MB
    against a few MB for a small MLP), which made a reused worker's first trial look huge."""
    key = (device.type, cfg.optimizer.name, cfg.precision)
    if device.type != "cpu" or key in _WARMED:
        return
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), 1e-3)
    amp_dtype = amp_dtype_of(cfg.precision)
    for _ in range(2):
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 0, 1]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _WARMED.add(key)


def warm_up_shapes(cfg, data: Dataset, device: torch.device, group: Group) -> None:
    """Run the trial's model once at its micro-batch and evaluation shapes, once per process and shape,
    outside the memory window. On CPU torch keeps per-shape state after the first pass at a shape:
    a worker's first trial at a batch size measured more than a later one at the same size (MNIST-1D
    MLP, width 128: bf16 13.6 MB then 1.3 MB, fp32 4.6 then 2.8), so the peak depended on trial order."""
    micro, part = plan_split(cfg).micro_batch, group.shard(len(data.y_val))
    n_val, chunk = part.stop - part.start, EVAL_CHUNK
    # the same on every rank (not n_val): all of them run the warm-up's collectives, or none
    key = (device.type, cfg.optimizer.name, cfg.precision, repr(cfg.model), micro, len(data.y_val), group.world)
    if device.type != "cpu" or key in _WARMED:
        return
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    net = group.wrap(model, device)  # DDP and gloo's first collectives: ~70 MB of one-time buffers per rank
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), 1e-3)
    amp_dtype = amp_dtype_of(cfg.precision)
    with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        F.cross_entropy(net(data.x_train[:micro]), data.y_train[:micro]).backward()
    optimizer.step()
    group.max(group.sum(0.0, device), device)  # the step's loss and the memory check's all-reduces
    model.eval()
    for n in {min(chunk, n_val), n_val % chunk} - {0}:  # evaluate()'s chunk lengths, through its own passes
        eval_totals(model, data.x_val[part][:n], data.y_val[part][:n], amp_dtype, chunk)
    _WARMED.add(key)
