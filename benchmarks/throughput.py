"""Rows 1 and 5: training samples/s of `run_trial` against a hand-written loop, and the cost of GNS.

Both sides train the same model (scaling.models.build_model from the default config: the MLP)
on the same in-memory MNIST-1D tensors with one torch thread. Wall figures are training only:
run_trial reports time/samples_per_s from its per-step timer (evaluation excluded), and the
hand loop times its step loop alone.

On a shared machine, other processes' load makes wall time noisy. Each side therefore also
measures its thread's CPU time over the training window (run_trial: reporter.start() to the
single report() after the final evaluation; the hand loop: its steps plus one evaluate(), so
both windows hold one evaluation). When the CPU share of the wall time shows the machine was
contended (< CONTENDED), the row is judged on the CPU-time ratio and says so.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import CONTENDED, Ctx, Row, log, paired, summarize

BASE = ["mlflow.enabled=false", "threads=1", "device=cpu"]


@dataclass
class Rate:
    wall_sps: float  # samples/s over wall time (run_trial's own time/samples_per_s)
    cpu_sps: float  # samples/s over this thread's CPU time
    share: float  # CPU time / wall time over the window: 1.0 on an idle machine


class _CpuReporter:
    """Reporter marking the training window: start() just before the first step, report() after the last."""

    def start(self, info: dict) -> None:
        self.t_cpu, self.t_wall = time.thread_time(), time.perf_counter()

    def report(self, metrics: dict, checkpoint=None) -> None:
        self.cpu, self.wall = time.thread_time() - self.t_cpu, time.perf_counter() - self.t_wall

    def finish(self, result: Any) -> None:
        pass


def _setup():
    import torch

    from scaling.cli import compose
    from scaling.data import load_dataset

    torch.set_num_threads(1)
    return compose, load_dataset(compose(BASE).data)


def trial_rate(compose, data, overrides: list[str]) -> Rate:
    """Run run_trial (one evaluation, at the end) and return its training rates."""
    from scaling.train import run_trial

    rep = _CpuReporter()
    result = run_trial(compose(BASE + overrides), rep, dataset=data)
    assert result.status == "completed", (overrides, result.status, result.reason)
    samples = result.metrics["samples"]
    return Rate(float(result.metrics["time/samples_per_s"]), samples / rep.cpu, rep.cpu / rep.wall)


def hand_rate(cfg: Any, data, epochs: int) -> Rate:
    """Train cfg's model for `epochs` with the plainest loop; return its training rates."""
    import torch
    import torch.nn.functional as F

    from scaling.config import effective_lr
    from scaling.models import build_model
    from scaling.evaluation import evaluate

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=effective_lr(cfg), momentum=cfg.optimizer.momentum)
    B, n = cfg.batch_size, data.n_train
    steps = n // B  # the plainest loop drops each epoch's ragged tail; the rates are per sample either way
    g = torch.Generator().manual_seed(cfg.seed)
    orders = [torch.randperm(n, generator=g) for _ in range(epochs)]
    x, y = data.x_train, data.y_train
    c0, t0 = time.thread_time(), time.perf_counter()
    for order in orders:
        for s in range(steps):
            idx = order[s * B:(s + 1) * B]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    wall = time.perf_counter() - t0
    evaluate(model, data)  # in the CPU window only, to match run_trial's
    cpu, wall_eval = time.thread_time() - c0, time.perf_counter() - t0
    return Rate(steps * epochs * B / wall, steps * epochs * B / cpu, cpu / wall_eval)


def ratio_row(name: str, pairs: list[tuple[Rate, Rate]], *, a_label: str, b_label: str, target: float,
              higher_is_better: bool) -> Row:
    """Build a row from (A, B) pairs: ratio A/B of rates (or B/A, a time ratio, when lower is better)."""
    def r(a: float, b: float) -> float:
        return a / b if higher_is_better else b / a

    wall = summarize([r(a.wall_sps, b.wall_sps) for a, b in pairs])
    cpu = summarize([r(a.cpu_sps, b.cpu_sps) for a, b in pairs])
    share = statistics.median([s for a, b in pairs for s in (a.share, b.share)])
    contended = share < CONTENDED
    use = cpu if contended else wall
    a_med = statistics.median(a.wall_sps for a, _ in pairs)
    b_med = statistics.median(b.wall_sps for _, b in pairs)
    ok = use.median >= target if higher_is_better else use.median <= target
    basis = "CPU-time ratio (machine contended)" if contended else "wall ratio"
    return Row(name, f"{a_med:,.0f} samples/s ({a_label})", f"{b_med:,.0f} samples/s ({b_label})", use.median,
               f"{'>=' if higher_is_better else '<='} {target:.2f}x", ok, use.spread,
               note=f"judged on the {basis}; wall {wall.median:.2f} [{wall.spread}], CPU time {cpu.median:.2f} "
                    f"[{cpu.spread}], CPU share of wall {share:.2f}",
               data={"wall_ratios": wall.values, "cpu_ratios": cpu.values, "cpu_share": share,
                     "a": [vars(a) for a, _ in pairs], "b": [vars(b) for _, b in pairs]})


def trial_throughput(ctx: Ctx) -> list[Row]:
    """Row 1: run_trial samples/s / hand loop samples/s at batch 32 and 512 (target >= 0.95)."""
    compose, data = _setup()
    repeats = 3 if ctx.quick else 7
    rows = []
    for B, epochs in ((32, 1), (512, 3)):  # ~0.5-1 s of training per measurement
        over = [f"batch_size={B}", f"epochs={epochs}", f"eval_every={epochs}"]
        cfg = compose(BASE + over)
        log(f"throughput: batch {B}, {repeats} alternating pairs")
        pairs = paired(lambda: trial_rate(compose, data, over), lambda: hand_rate(cfg, data, epochs),
                       repeats, warmup=1)
        rows.append(ratio_row(f"1. trial throughput, batch {B}", pairs, a_label="run_trial", b_label="hand loop",
                              target=0.95, higher_is_better=True))
    return rows


def gns_overhead(ctx: Ctx) -> list[Row]:
    """Row 5: time per sample with gns.enabled=true vs off, both with micro_batch_size=B/4 (target <= 1.10)."""
    compose, data = _setup()
    repeats = 3 if ctx.quick else 5
    rows = []
    for B, epochs in ((128, 1), (512, 3)):
        over = [f"batch_size={B}", f"micro_batch_size={B // 4}", f"epochs={epochs}", f"eval_every={epochs}"]
        log(f"gns: batch {B}, micro-batch {B // 4}, {repeats} alternating pairs")
        pairs = paired(lambda: trial_rate(compose, data, over + ["gns.enabled=true"]),
                       lambda: trial_rate(compose, data, over), repeats, warmup=1)
        rows.append(ratio_row(f"5. gns overhead, batch {B} (micro {B // 4})", pairs, a_label="gns",
                              b_label="no gns", target=1.10, higher_is_better=False))
    return rows
