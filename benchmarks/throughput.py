"""Rows 1 and 5: training samples/s of `run_trial` against a hand-written loop, and the cost of GNS.

Both sides train the same model (scaling.models.build_model from the default config: the MLP)
on the same in-memory MNIST-1D tensors with one torch thread. Only the training steps are
timed: run_trial reports time/samples_per_s from its per-step timer (evaluation excluded), and
the hand loop times its step loop alone.
"""
from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Ctx, Row, log, paired, summarize

BASE = ["mlflow.enabled=false", "threads=1", "device=cpu"]


def _setup():
    import torch

    from scaling.cli import compose
    from scaling.data import load_dataset

    torch.set_num_threads(1)
    cfg = compose(BASE)
    return compose, load_dataset(cfg.data)


def _trial_sps(compose, data, overrides: list[str]) -> float:
    from scaling.train import run_trial

    result = run_trial(compose(BASE + overrides), dataset=data)
    assert result.status == "completed", (overrides, result.status, result.reason)
    return float(result.metrics["time/samples_per_s"])


def hand_loop_sps(cfg: Any, data, epochs: int) -> float:
    """Train cfg's model for `epochs` with the plainest loop; return training samples/s."""
    import torch
    import torch.nn.functional as F

    from scaling.config import effective_lr
    from scaling.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=effective_lr(cfg), momentum=cfg.optimizer.momentum)
    B, n = cfg.batch_size, data.n_train
    steps = n // B  # drop the ragged tail, as run_trial does
    g = torch.Generator().manual_seed(cfg.seed)
    orders = [torch.randperm(n, generator=g) for _ in range(epochs)]
    x, y = data.x_train, data.y_train
    t0 = time.perf_counter()
    for order in orders:
        for s in range(steps):
            idx = order[s * B:(s + 1) * B]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return steps * epochs * B / (time.perf_counter() - t0)


def trial_throughput(ctx: Ctx) -> list[Row]:
    """Row 1: run_trial samples/s / hand loop samples/s at batch 32 and 512 (target >= 0.95)."""
    compose, data = _setup()
    repeats = 3 if ctx.quick else 7
    rows = []
    for B, epochs in ((32, 1), (512, 4)):  # ~1 s of training per measurement
        over = [f"batch_size={B}", f"epochs={epochs}", f"eval_every={epochs}"]
        cfg = compose(BASE + over)
        log(f"throughput: batch {B}, {repeats} alternating pairs")
        pairs = paired(lambda: _trial_sps(compose, data, over), lambda: hand_loop_sps(cfg, data, epochs),
                       repeats, warmup=1)
        r = summarize([a / b for a, b in pairs])
        trial, hand = summarize([a for a, _ in pairs]), summarize([b for _, b in pairs])
        rows.append(Row(f"1. trial throughput, batch {B}", f"{trial.median:,.0f} samples/s",
                        f"{hand.median:,.0f} samples/s (hand loop)", r.median, ">= 0.95x", r.median >= 0.95,
                        r.spread, data={"ratios": r.values, "run_trial_sps": trial.values, "hand_sps": hand.values,
                                        "epochs": epochs, "n_train": data.n_train}))
    return rows


def gns_overhead(ctx: Ctx) -> list[Row]:
    """Row 5: time per sample with gns.enabled=true vs off, both with micro_batch_size=B/4 (target <= 1.10)."""
    compose, data = _setup()
    repeats = 3 if ctx.quick else 5
    rows = []
    for B, epochs in ((128, 1), (512, 3)):
        over = [f"batch_size={B}", f"micro_batch_size={B // 4}", f"epochs={epochs}", f"eval_every={epochs}"]
        log(f"gns: batch {B}, micro-batch {B // 4}, {repeats} alternating pairs")
        pairs = paired(lambda: _trial_sps(compose, data, over + ["gns.enabled=true"]),
                       lambda: _trial_sps(compose, data, over), repeats, warmup=1)
        r = summarize([plain / gns for gns, plain in pairs])  # time ratio = inverse rate ratio
        gns_s, plain_s = summarize([a for a, _ in pairs]), summarize([b for _, b in pairs])
        rows.append(Row(f"5. gns overhead, batch {B} (micro {B // 4})", f"{gns_s.median:,.0f} samples/s (gns)",
                        f"{plain_s.median:,.0f} samples/s (no gns)", r.median, "<= 1.10x", r.median <= 1.10,
                        r.spread, data={"ratios": r.values, "gns_sps": gns_s.values, "plain_sps": plain_s.values}))
    return rows
