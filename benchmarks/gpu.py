"""GPU rows, run only where CUDA is visible: the cifar10_resnet preset on one GPU.

G1. The preset's single trial (ResNet-20, bf16 autocast, SGD momentum) through `run_trial`, against
    the plainest bf16 loop on the same GPU, model, data and batch: samples/s ratio >= 0.9. Each
    side also reports its peak CUDA memory and the GPU utilisation NVML saw while it trained.
G2. Packing: the same 8 short trials as a real study with `resources.gpu=0.25` (4 trials share
    the GPU) and with `resources.gpu=1` (one at a time): trials per hour >= 2.5x.

Data: CIFAR-10 itself where `SCALING_CIFAR_ROOT` names a folder holding `cifar-10-batches-py`;
otherwise CIFAR-10-shaped random images (50,000 + 10,000 uint8 3x32x32) written in CIFAR's own
on-disk format, so the preset's loader reads them as it would the real set. Speed, memory and
utilisation depend on the shapes, not the pixels, so these rows hold for the real set; accuracy
does not, and no accuracy is reported from random images.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import REPO, Ctx, Row, log, not_measurable, paired, run_timed, summarize
from benchmarks.studyrun import RUN_ID_RE, read_back, tracking_uri
from benchmarks.throughput import _CpuReporter  # marks the training window; run_trial's own timer gives samples/s

# Shorter than the preset's 30 epochs, so the preset's 2-epoch warmup becomes half an epoch.
PRESET = ["experiment=cifar10_resnet", "mlflow.enabled=false", "device=cuda", "warmup.epochs=0.5"]
BATCH_SIZES = (128, 512, 2048)
PACK_LR_MULTIPLIERS = (0.5, 0.7, 1, 1.4, 2, 2.8, 4, 5.6)  # 8 trials: two rounds of 4 when packed


def cifar_root(ctx: Ctx, n_train: int = 50_000, n_test: int = 10_000) -> tuple[str, str]:
    """Return (data.root, what it holds): the real CIFAR-10 if given, else random images written once."""
    real = os.environ.get("SCALING_CIFAR_ROOT")
    if real:
        return real, "CIFAR-10"
    root = ctx.tmp / "cifar"
    folder = root / "cifar-10-batches-py"
    if not folder.exists():
        import numpy as np

        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        names = [f"data_batch_{i + 1}" for i in range(5)] + ["test_batch"]
        sizes = [n_train // 5] * 5 + [n_test]
        for name, n in zip(names, sizes):
            d = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)], b"filenames": [b"x.png"] * n}
            with open(folder / name, "wb") as f:
                pickle.dump(d, f, protocol=2)
    return str(root), f"CIFAR-10-shaped random images ({n_train:,} + {n_test:,})"


class GpuUtilisation:
    """Sample NVML's GPU utilisation (percent of time a kernel ran) every `period` s in a thread."""

    def __init__(self, period: float = 0.1) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
        self.period, self.samples, self.mem_used_mb = period, [], []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuUtilisation":
        self.samples, self.mem_used_mb = [], []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self.mem_used_mb.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")


def trial_side(cfg, data, util: GpuUtilisation) -> dict[str, float]:
    """run_trial on the GPU: its own samples/s (per-step timer), peak memory and mean utilisation."""
    from scaling.train import run_trial

    with util:
        result = run_trial(cfg, _CpuReporter(), dataset=data)
    assert result.status == "completed", (result.status, result.reason)
    return {"sps": float(result.metrics["time/samples_per_s"]), "peak_mb": float(result.metrics["mem/peak_mb"]),
            "util": util.mean}


def hand_side(cfg, data, util: GpuUtilisation) -> dict[str, float]:
    """The plainest bf16 loop: same model, optimizer settings, data (on the GPU) and batch, no checks."""
    import torch
    import torch.nn.functional as F

    from scaling.config import effective_lr
    from scaling.models import build_model

    dev = torch.device("cuda")
    torch.manual_seed(cfg.seed)
    x, y = data.x_train.to(dev), data.y_train.to(dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(dev)
    o = cfg.optimizer
    opt = torch.optim.SGD(model.parameters(), lr=effective_lr(cfg), momentum=o.momentum, weight_decay=o.weight_decay)
    B, n = cfg.batch_size, data.n_train
    steps, epochs = n // B, int(cfg.epochs)
    orders = [torch.randperm(n, device=dev) for _ in range(epochs)]
    with util:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for order in orders:
            for s in range(steps):
                idx = order[s * B:(s + 1) * B]
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return {"sps": steps * epochs * B / wall, "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "util": util.mean}


def single_trial(ctx: Ctx, root: str, what: str, epochs: int = 2) -> list[Row]:
    """G1 per batch size: run_trial samples/s / hand bf16 loop samples/s (target >= 0.9)."""
    import torch

    from scaling.cli import compose
    from scaling.data import load_dataset

    gpu = torch.cuda.get_device_name(0)
    util = GpuUtilisation()
    repeats = 2 if ctx.quick else 3
    rows = []
    data = None
    for B in BATCH_SIZES:
        cfg = compose(PRESET + [f"data.root={root}", f"batch_size={B}", f"epochs={epochs}", f"eval_every={epochs}"])
        data = data or load_dataset(cfg.data)
        log(f"gpu single trial: batch {B}, {repeats} alternating pairs on {gpu}")
        pairs = paired(lambda: trial_side(cfg, data, util), lambda: hand_side(cfg, data, util), repeats, warmup=1)
        r = summarize([a["sps"] / b["sps"] for a, b in pairs])
        med = {k: statistics.median(p[i][k] for p in pairs) for i, k in ((0, "sps"), (0, "peak_mb"), (0, "util"))}
        hand = {k: statistics.median(p[1][k] for p in pairs) for k in ("sps", "peak_mb", "util")}
        rows.append(Row(f"G1. cifar10_resnet trial, batch {B} (bf16)", f"{med['sps']:,.0f} samples/s (run_trial)",
                        f"{hand['sps']:,.0f} samples/s (hand bf16 loop)", r.median, ">= 0.90x", r.median >= 0.9,
                        r.spread,
                        note=f"{gpu}; {what}; peak memory {med['peak_mb']:,.0f} MB (hand loop {hand['peak_mb']:,.0f} MB);"
                             f" GPU utilisation {med['util']:.0f}% (hand loop {hand['util']:.0f}%)",
                        data={"gpu": gpu, "pairs": pairs, "ratios": r.values, "trial": med, "hand": hand}))
    return rows


def packed_study(ctx: Ctx, root: str, what: str, epochs: int = 3) -> list[Row]:
    """G2: trials per hour of the same 8-trial study at 0.25 GPU per trial vs 1 GPU per trial (>= 2.5x)."""
    def study(gpu_share: float) -> dict[str, Any]:
        n = ctx.cache["n_studies"] = ctx.cache.get("n_studies", 0) + 1
        name = f"bench-gpu-{gpu_share:g}-{n}"
        cwd = ctx.tmp / name
        cwd.mkdir(parents=True)
        argv = [sys.executable, "-m", "scaling.train", "-m", "experiment=cifar10_resnet", f"data.root={root}",
                "batch_size=128", f"lr_multiplier={','.join(map(str, PACK_LR_MULTIPLIERS))}",
                f"epochs={epochs}", "warmup.epochs=0.5", "eval_every=1", "hydra.sweeper.asha.enabled=false", "hydra.sweeper.report=false",
                f"hydra.sweeper.resources.gpu={gpu_share:g}", "hydra.sweeper.resources.cpu=2",
                f"hydra.sweeper.study_name={name}", f"hydra.sweeper.storage_path={ctx.tmp / 'studies'}",
                f"mlflow.tracking_uri={tracking_uri(ctx)}", "mlflow.experiment=bench-gpu"]
        log(f"gpu packed study {name}: {len(PACK_LR_MULTIPLIERS)} trials at {gpu_share:g} GPU each")
        with GpuUtilisation(0.2) as util:
            t = run_timed(argv, cwd=cwd, timeout=500, env={"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
        if t.rc != 0:
            raise RuntimeError(f"study exited {t.rc}:\n{t.output[-3000:]}")
        m = RUN_ID_RE.search(t.output)
        out = {"wall_s": t.wall_s, "util": util.mean, "mem_used_max_mb": max(util.mem_used_mb, default=0)}
        out.update(read_back(ctx, m.group(1), t.launched) if m else {})
        n_done = sum(out.get("trial_statuses", {}).values())
        out["trials_per_hour"] = n_done * 3600 / out["trials_span_s"] if out.get("trials_span_s") else float("nan")
        log(f"gpu packed study {name}: {t.wall_s:.1f}s wall, {out['trials_per_hour']:.0f} trials/h, "
            f"utilisation {out['util']:.0f}%")
        return out

    pairs = paired(lambda: study(0.25), lambda: study(1.0), 1)
    r = summarize([a["trials_per_hour"] / b["trials_per_hour"] for a, b in pairs])
    a, b = pairs[0]
    return [Row(f"G2. packed study, 4 x 0.25 GPU vs 1 x 1 GPU ({len(PACK_LR_MULTIPLIERS)} trials, batch 128)",
                f"{a['trials_per_hour']:,.0f} trials/h (packed)", f"{b['trials_per_hour']:,.0f} trials/h (1 per GPU)",
                r.median, ">= 2.50x", r.median >= 2.5, r.spread,
                note=f"{what}; {epochs} epochs per trial; trials/h over first trial start to last trial end; "
                     f"wall {a['wall_s']:.0f} s vs {b['wall_s']:.0f} s; GPU utilisation {a['util']:.0f}% vs "
                     f"{b['util']:.0f}%; GPU memory used at most {a['mem_used_max_mb']:,.0f} MB vs "
                     f"{b['mem_used_max_mb']:,.0f} MB",
                data={"pairs": pairs, "ratios": r.values})]


def _gpu_or_reason(name: str, target: str) -> Optional[Row]:
    import torch

    return None if torch.cuda.is_available() else not_measurable(name, target, "no CUDA device on this machine")


def trial_rows(ctx: Ctx) -> list[Row]:
    """G1 where a CUDA device is visible; one n/a row naming the reason elsewhere."""
    na = _gpu_or_reason("G1. cifar10_resnet trial vs hand bf16 loop", ">= 0.90x")
    if na:
        return [na]
    rows = single_trial(ctx, *cifar_root(ctx))
    for r in rows:
        log(f"{r.name}: {r.ratio:.2f} [{r.spread}] {r.measured} vs {r.baseline}; {r.note}")
    return rows


def packing_rows(ctx: Ctx) -> list[Row]:
    """G2 where a CUDA device is visible, under CUDA MPS with --mps; one n/a row elsewhere."""
    na = _gpu_or_reason("G2. packed study, 4 x 0.25 GPU vs 1 x 1 GPU", ">= 2.50x")
    if na:
        return [na]
    root, what = cifar_root(ctx)
    if not ctx.cache.get("mps"):
        return packed_study(ctx, root, what)
    with mps_daemon(ctx.tmp / "mps"):
        rows = packed_study(ctx, root, what + "; under CUDA MPS (both studies)")
    rows[0].name += " [MPS]"
    return rows


@contextlib.contextmanager
def mps_daemon(folder: Path):
    """Run CUDA's Multi-Process Service for the block: kernels of the packed trials' processes then
    run side by side instead of in turns (time slices), which is what small trials need."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise RuntimeError("--mps: nvidia-cuda-mps-control is not on PATH")
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for sub in ("pipe", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-d"], env=env, check=True)
    saved = {k: os.environ.get(k) for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")}
    os.environ.update({k: env[k] for k in saved})  # the studies' processes (and Ray's workers) inherit it
    try:
        yield
    finally:
        subprocess.run([exe], input="quit\n", text=True, env=env, check=False)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":  # a quick look without the table: python -m benchmarks.gpu
    import tempfile

    c = Ctx(quick=True, tmp=Path(tempfile.mkdtemp(prefix="scaling-gpu-")))
    for row in trial_rows(c) + packing_rows(c):
        print(row)
