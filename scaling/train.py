"""THE trial loop: one training run at (batch size, learning rate) -> TrialResult.

It knows nothing of Ray or MLflow: every evaluation goes to `reporter.report(metrics)`, and
the caller decides where that lands. Budgets are in epochs (samples), never raw steps.
In a torch.distributed process group it is one data-parallel rank (scaling.distributed starts
the ranks); only rank 0 reports.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from scaling.config import effective_lr, epochs_to_steps, first_step_at_or_past, warmup_start_lr, warmup_steps_of
from scaling.data import Dataset, SampleStream, load_dataset
from scaling.devices import amp_dtype_of, resolve_device, warm_up, warm_up_shapes
from scaling.distributed import Group
from scaling.evaluation import evaluate
from scaling.memory import PeakMemory
from scaling.models import build_model
from scaling.noise import MicroGradNorms, NoiseScale
from scaling.optim import build_optimizer
from scaling.reporters import Reporter
from scaling.schedule import build_schedule
from scaling.split import plan_split
from scaling.data_fit import check_fits_data
from scaling.validation import validate

STATUSES = ("completed", "pruned", "early_stopped", "diverged", "oom", "error")


@dataclass
class TrialResult:
    """What a trial ended as; `metrics` holds the last evaluation."""

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    best_val_loss: float = math.inf
    target: Optional[dict[str, float]] = None  # target/steps, target/samples, target/time_s
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class TrialOOM(Exception):
    """The trial exceeded its memory ceiling (memory.limit_mb) or the device's memory."""



def run_trial(cfg: Any, reporter: Optional[Reporter] = None, *, dataset: Optional[Dataset] = None,
              resume: Optional[dict] = None, ref_lr: Optional[float] = None) -> TrialResult:
    """Train one trial to its budget (or until it diverges, stops early or runs out of memory)."""
    validate(cfg)
    group = Group.for_trial(cfg)  # one rank of W data-parallel workers (W = 1: none)
    reporter = (reporter or Reporter()) if group.rank == 0 else Reporter()
    device = group.device(resolve_device(cfg.device))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda" and cfg.memory.limit_mb is not None:  # the allocator enforces the ceiling on CUDA
        total_mb = torch.cuda.get_device_properties(device).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory.limit_mb / total_mb), device)
    meter = PeakMemory(device)
    try:
        result = _train(cfg, reporter, device, meter, dataset, resume, ref_lr, group)
    except (TrialOOM, MemoryError, torch.OutOfMemoryError) as exc:
        result = TrialResult("oom", reason=f"out of memory at batch_size={cfg.batch_size}: {exc}".strip(": "))
    except RuntimeError as exc:
        if "out of memory" not in str(exc) and "can't allocate memory" not in str(exc):
            raise
        result = TrialResult("oom", reason=f"out of memory at batch_size={cfg.batch_size}: {exc}")
    result.info.setdefault("mem/peak_mb", meter.peak_mb())
    reporter.finish(result)
    return result


def _train(cfg, reporter, device, meter, dataset, resume, ref_lr, group: Group) -> TrialResult:
    run = _set_up(cfg, device, meter, dataset, resume, ref_lr, group)
    reporter.start(run.info)
    return _steps(cfg, run, reporter, device, meter, group)


@dataclass
class _Run:
    """One trial's parts, built by _set_up; lengths are in steps, derived from epochs."""

    data: Dataset
    model: torch.nn.Module
    net: torch.nn.Module  # DistributedDataParallel across the ranks; `model` itself when alone
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    gns: Optional[NoiseScale]
    grad_norms: Optional[MicroGradNorms]
    params: list[torch.Tensor]
    micro: int  # B = workers x micro x n_micro
    n_micro: int
    shard: slice  # this rank's part of every batch
    total_steps: int
    eval_steps: frozenset[int]  # the steps after which it evaluates (eval_steps())
    ref_lr: Optional[float]
    info: dict[str, Any]
    s: _LoopState  # everything a checkpoint must restore besides model/optimizer/schedule

    def checkpoint(self) -> dict:
        """Return a snapshot to resume from, not a view: state_dict() tensors alias the live
        parameters and optimizer buffers, which the next steps update in place, so a reporter that
        keeps the dict in memory (rather than torch.save-ing it at once) would otherwise resume
        from a later state."""
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "schedule": self.schedule.state_dict(), "loop": dict(self.s.__dict__),
                              "ref_lr": self.ref_lr, "gns": self.gns.state_dict() if self.gns else None})


def _set_up(cfg, device, meter, dataset, resume, ref_lr, group: Group) -> _Run:
    """Build data, model, optimizer and schedule (restored from `resume` if given) for one trial."""
    data = (dataset or load_dataset(cfg.data)).to(device)  # small data lives on the device: batches are index slices
    # The window opens after the data is in place: the dataset is shared by every trial of a
    # study (and its size is not a function of the batch size); model, optimizer and
    # activations are what a batch-size comparison needs to see.
    warm_up(cfg, device)
    warm_up_shapes(cfg, data, device, group)
    meter.reset()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    B = cfg.batch_size
    split = plan_split(cfg)  # B = workers x micro x n_micro: each rank takes B / workers of every batch,
    # in n_micro micro-batches (gradient accumulation)
    check_fits_data(cfg, data.n_train)  # validate() knows only a generated dataset's size
    steps_per_epoch = data.n_train / B  # not floored: see scaling.data.SampleStream
    total_steps = epochs_to_steps(cfg.epochs, steps_per_epoch)
    warmup_steps = warmup_steps_of(cfg, steps_per_epoch)
    lr = effective_lr(cfg, ref_lr)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr)
    schedule = build_schedule(optimizer, cfg.schedule, lr=lr, warmup_start_lr=warmup_start_lr(cfg, ref_lr),
                              warmup_steps=warmup_steps, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    gns = NoiseScale(cfg.gns.ema) if cfg.gns.enabled else None
    info = {"lr": lr, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "n_micro": split.accumulation,
            "warmup_steps": warmup_steps, "n_train": data.n_train, "device": str(device),
            "workers": split.workers, "micro_batch": split.micro_batch, "split": str(split)}
    run = _Run(data=data, model=model, net=group.wrap(model, device), optimizer=optimizer, schedule=schedule,
               scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
               amp_dtype=amp_dtype_of(cfg.precision), gns=gns,
               grad_norms=MicroGradNorms() if gns else None,
               params=[p for p in model.parameters() if p.requires_grad], micro=split.micro_batch,
               n_micro=split.accumulation, shard=group.shard(B), total_steps=total_steps,
               eval_steps=eval_steps(cfg.eval_every, steps_per_epoch, total_steps),
               ref_lr=ref_lr, info=info, s=_LoopState())
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        run.s.__dict__.update(resume["loop"])
        if "improved_val_loss" not in resume["loop"]:  # a checkpoint written before the field
            run.s.improved_val_loss = run.s.best_val_loss
        if gns and resume.get("gns"):
            gns.load_state_dict(resume["gns"])
        info["resumed_from_step"] = run.s.step
    return run


def eval_steps(eval_every: float, steps_per_epoch: float, total_steps: int) -> frozenset[int]:
    """Return the steps after which a trial evaluates: the k-th at the first step at or past k x
    eval_every epochs, and the last step; every step where eval_every is a step or less.

    At or past, not nearest: ASHA records a trial at a rung (a multiple of eval_every when
    grace_period is) by its first report at or past it, so an evaluation rounded down to just
    before the rung (0.3 epoch at 37.5 steps an epoch: step 11, 0.293 epoch) left the rung to the
    next one, a whole eval_every later (0.4). Not every round(eval_every x steps_per_epoch) steps
    either: that interval, rounded once, drifts by k rounding errors by the k-th evaluation.
    """
    per_eval = eval_every * steps_per_epoch
    if per_eval <= 1:
        return frozenset(range(1, total_steps + 1))
    ks = range(1, math.ceil(total_steps / per_eval) + 1)
    return frozenset(t for k in ks if (t := first_step_at_or_past(k * per_eval)) < total_steps) | {total_steps}


def _steps(cfg, run: _Run, reporter, device, meter, group: Group) -> TrialResult:
    """Train from run.s.step to the budget, evaluating on schedule; return how the trial ended."""
    # hot-loop constants: an OmegaConf read costs ~10 us, a step of a small model ~300 us
    diverge_factor, grad_clip, fp16 = cfg.divergence.factor, cfg.optimizer.grad_clip, cfg.precision == "fp16"
    autocast = ((lambda: torch.autocast(device.type, dtype=run.amp_dtype)) if run.amp_dtype is not None
                else contextlib.nullcontext)
    data, net, optimizer, schedule, scaler = run.data, run.net, run.optimizer, run.schedule, run.scaler
    gns, grad_norms, params, s, info = run.gns, run.grad_norms, run.params, run.s, run.info
    B, micro, n_micro, shard, n_train = cfg.batch_size, run.micro, run.n_micro, run.shard, data.n_train
    total_steps, evals_at = run.total_steps, run.eval_steps
    t0 = time.perf_counter() - s.elapsed_s
    stream = SampleStream(n_train, cfg.seed, device)
    while s.step < total_steps:
        idx = stream.batch(s.step, B)[shard]  # this rank's contiguous part of the global batch

        # ---- forward/backward with gradient accumulation over n_micro micro-batches
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if grad_norms:
            grad_norms.begin_step(params)
        loss_sum = 0.0
        for m in range(n_micro):
            mi = idx[m * micro:(m + 1) * micro]
            with group.no_sync(net, last=m == n_micro - 1):  # DDP all-reduces the gradients once per step
                with autocast():
                    loss = F.cross_entropy(net(data.x_train[mi]), data.y_train[mi])
                loss_sum += loss.item()  # one sync per micro-batch buys divergence detection within a step
                if n_micro > 1:
                    loss = loss / n_micro
                (scaler.scale(loss) if fp16 else loss).backward()
            if grad_norms:
                grad_norms.after_micro_backward(params)
        # the global mean (one all-reduce across ranks): every rank takes the same decisions below
        train_loss = group.sum(loss_sum, device) / (n_micro * group.world)

        # ---- divergence: a non-finite loss or one above factor x the first loss stops before the step
        s.initial_loss = s.initial_loss if s.initial_loss is not None else train_loss
        if blown := _divergence("train/loss", train_loss, s, diverge_factor):
            return _end(cfg, reporter, s, "diverged", blown, info, meter,
                        _progress(s, B, n_train, optimizer, t0, train_loss))

        # ---- clip and step
        if gns:
            gns.update(*grad_norms.end_step(params, loss_scale=scaler.get_scale() if fp16 else 1.0),
                       b_small=micro, b_big=B, n=n_train)  # SampleStream draws without replacement
        if grad_clip is not None:
            if fp16:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        lr_now = optimizer.param_groups[0]["lr"]
        if fp16:  # the scaler skips steps whose gradients overflowed
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        schedule.step()
        s.step += 1
        s.train_time_s += time.perf_counter() - t_step
        s.loss_acc += train_loss
        s.loss_n += 1
        if s.step == 1:
            _check_memory(cfg, meter, group, device)

        # ---- evaluate, report, and decide whether to stop, on schedule only
        if s.step in evals_at:
            metrics, status, reason = _evaluate_and_report(cfg, run, reporter, device, meter, group, t0, lr_now)
            if status:
                return _end(cfg, reporter, s, status, reason, info, meter, metrics)
    return _end(cfg, reporter, s, "completed", "", info, meter, s.history[-1] if s.history else {})


def _evaluate_and_report(cfg, run: _Run, reporter, device, meter, group: Group, t0: float,
                         lr_now: float) -> tuple[dict[str, float], str, str]:
    """Evaluate, report the metrics (with a checkpoint to resume from); return them, and a status
    to end with ("diverged", "early_stopped", or '') and its reason."""
    s = run.s
    metrics = _progress(s, cfg.batch_size, run.data.n_train, run.optimizer, t0, s.loss_acc / s.loss_n, lr_now)
    with meter.excluded():  # the peak is what training at batch B costs (CUDA; see scaling.memory)
        metrics.update(evaluate(run.model, run.data, run.amp_dtype, group=group))
    metrics["mem/peak_mb"] = meter.peak_mb()
    if meter.is_cuda:
        metrics["mem/eval_peak_mb"] = meter.eval_peak_mb
    if run.gns and run.gns.b_simple is not None:
        metrics["gns/b_simple"] = run.gns.b_simple
    s.loss_acc, s.loss_n = 0.0, 0
    _check_memory(cfg, meter, group, device)
    # The training loss is checked before each step, so a blow-up in the last steps before an evaluation
    # (or in a trial's last step) shows only here. Not reported: it is no result, and Tune would take a
    # trial's last evaluation as its completion.
    if blown := _divergence("val/loss", metrics["val/loss"], s, cfg.divergence.factor):
        return metrics, "diverged", blown
    stop = _update_after_eval(cfg, s, metrics)
    s.elapsed_s = metrics["time/elapsed_s"]
    s.history.append(metrics)  # before report(): the checkpoint taken there must include it
    reporter.report(metrics, run.checkpoint)
    return metrics, "early_stopped" if stop else "", stop


@dataclass
class _LoopState:
    step: int = 0
    initial_loss: Optional[float] = None
    best_val_loss: float = math.inf  # the lowest val/loss so far (the trial's best/val_loss)
    improved_val_loss: float = math.inf  # the last one that beat the one before by early_stopping.min_delta
    bad_evals: int = 0
    target: Optional[dict] = None
    loss_acc: float = 0.0
    loss_n: int = 0
    train_time_s: float = 0.0
    elapsed_s: float = 0.0
    history: list = field(default_factory=list)  # every evaluation: a resumed study re-logs what it missed



def _progress(s: _LoopState, B: int, n_train: int, optimizer, t0: float, train_loss: float,
              lr: Optional[float] = None) -> dict[str, float]:
    return {"train/loss": train_loss, "lr": lr if lr is not None else optimizer.param_groups[0]["lr"],
            "samples": s.step * B, "step": s.step, "epoch": s.step * B / n_train,
            "time/elapsed_s": time.perf_counter() - t0,
            "time/samples_per_s": s.step * B / max(s.train_time_s, 1e-9)}



def _update_after_eval(cfg, s: _LoopState, metrics: dict[str, float]) -> str:
    """Record best loss and first target crossing; return a reason to stop early, or ''."""
    t = cfg.target
    value = metrics.get(t.metric)
    if s.target is None and value is not None and (value >= t.value if t.mode == "max" else value <= t.value):
        s.target = {"target/steps": metrics["step"], "target/samples": metrics["samples"],
                    "target/time_s": metrics["time/elapsed_s"]}
    if s.target:
        metrics.update(s.target)
    loss = metrics["val/loss"]
    s.best_val_loss = min(s.best_val_loss, loss)  # the true minimum: min_delta only counts the stall
    if loss < s.improved_val_loss - cfg.early_stopping.min_delta:
        s.improved_val_loss, s.bad_evals = loss, 0
    else:
        s.bad_evals += 1
    metrics["best/val_loss"] = s.best_val_loss
    patience = cfg.early_stopping.patience
    if patience is not None and s.bad_evals >= patience:
        return f"val/loss did not improve for {patience} evaluations"
    return ""


def _divergence(name: str, loss: float, s: _LoopState, factor: float) -> str:
    """Return why `loss` is divergence (non-finite, or above factor x the first train/loss), or ''."""
    if math.isfinite(loss) and loss <= factor * s.initial_loss:
        return ""
    why = "not finite" if not math.isfinite(loss) else \
        f"above divergence.factor={factor:g} x the first train/loss {s.initial_loss:.4g}"
    return f"{name}={loss:.4g} at step {s.step}: {why}"


def _check_memory(cfg, meter: PeakMemory, group: Group, device: torch.device) -> None:
    limit = cfg.memory.limit_mb
    if limit is None:
        return
    peak = group.max(meter.peak_mb(), device)  # the worst rank's: every rank stops together
    if peak > limit:
        raise TrialOOM(f"peak {peak:.1f} MB exceeds memory.limit_mb={limit:g}")


def _end(cfg, reporter, s: _LoopState, status: str, reason: str, info: dict, meter: PeakMemory,
         metrics: dict) -> TrialResult:
    metrics = dict(metrics or {})
    metrics["mem/peak_mb"] = meter.peak_mb()
    return TrialResult(status, metrics, s.best_val_loss, s.target, reason, info)


if __name__ == "__main__":  # `python -m scaling.train [overrides]` is `scaling-train`, its Ctrl-C/SIGTERM guard included
    from scaling.console import train

    train()
