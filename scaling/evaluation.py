"""A trial's evaluation: val/loss and val/acc over the whole validation split, in chunks, summed over
a data-parallel group's ranks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from scaling.data import Dataset
from scaling.distributed import Group

EVAL_CHUNK = 4096  # validation samples per forward pass in evaluate()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, amp_dtype=None, chunk: int = EVAL_CHUNK,
             group: Optional[Group] = None) -> dict[str, float]:
    """Return val/loss and val/acc over the whole validation split.

    In a data-parallel group each rank evaluates its shard and the totals are summed over the ranks
    (one all-reduce), so every rank returns the same numbers.
    """
    group = group or Group()
    was_training = model.training
    model.eval()
    part = group.shard(len(data.y_val))
    totals = eval_totals(model, data.x_val[part], data.y_val[part], amp_dtype, chunk)
    model.train(was_training)
    loss, correct = group.sum_(totals).tolist()
    n = len(data.y_val)
    return {"val/loss": loss / n, "val/acc": correct / n}


@torch.no_grad()
def eval_totals(model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, amp_dtype, chunk: int) -> torch.Tensor:
    """Return (loss sum, correct count) of `model` over x_val in chunks: this process's part only."""
    totals = torch.zeros(2, device=x_val.device)
    for i in range(0, len(y_val), chunk):
        x, y = x_val[i:i + chunk], y_val[i:i + chunk]
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
    return totals
