"""Learning-rate schedules of a trial: a linear warmup, then the main schedule `cfg.schedule` names.

The LR at optimizer step t (t = 0 is the LR the first `optimizer.step()` uses) is

    warmup_start_lr + (lr - warmup_start_lr) * t / warmup_steps     for t < warmup_steps
    main(t - warmup_steps)                                          for t >= warmup_steps

where main runs over the remaining `total_steps - warmup_steps` steps. constant, step, exponential
and cosine start at `lr`; onecycle starts at lr / div_factor and cyclic at base_lr_fraction * lr,
as their papers define. warmup_start_lr is 0 or at most lr (scaling.config.warmup_start_lr), though
the schedule itself would ramp down from a start above lr too. Lengths in the config are epochs; steps_per_epoch
(n_train / batch_size, not floored) converts them to the nearest whole step: step's k-th decay at
k x step_epochs (so decays do not drift), cyclic's whole cycle, which rises for its first half (rounded
down) and falls for the rest. Call `schedule.step()` once after every `optimizer.step()`.

Everything is torch.optim.lr_scheduler: LambdaLR for the warmup, the torch class for the main
schedule, chained by SequentialLR, so state_dict()/load_state_dict() are torch's. To resume,
build a fresh optimizer and schedule the same way, then load both states (after building, which
resets the optimizer's LR): exponential and cosine compute the next LR from the optimizer's
current one, and OneCycleLR keeps its LRs in the param groups, so the optimizer state is needed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import lr_scheduler as sched

from scaling.config import ConfigError, epochs_to_steps

Scheduler = sched.LRScheduler


def _constant(opt: torch.optim.Optimizer, cfg: Any, lr: float, steps: int, spe: float) -> Scheduler:
    """Return a schedule holding the LR at `lr`."""
    return sched.LambdaLR(opt, lambda _: 1.0)


def _step(opt: torch.optim.Optimizer, cfg: Any, lr: float, steps: int, spe: float) -> Scheduler:
    """Return MultiStepLR: x gamma after every step_epochs epochs, the k-th decay at k x step_epochs
    to the nearest step."""
    # Not StepLR: its one rounded step_size drifts by k rounding errors by the k-th decay (step_epochs
    # 0.25 at 9.375 steps an epoch decays every 2 steps, 18 times in 4 epochs instead of 15).
    if cfg.step_epochs * spe < 1:  # scaling.data_fit.check_fits_data refuses it, naming the key
        raise ValueError(f"step_epochs={cfg.step_epochs} is under one step at {spe:g} steps an epoch")
    milestones, k = [], 1
    while (at := epochs_to_steps(k * cfg.step_epochs, spe)) < steps:
        milestones.append(at)
        k += 1
    return sched.MultiStepLR(opt, milestones=milestones, gamma=cfg.gamma)


def _exponential(opt: torch.optim.Optimizer, cfg: Any, lr: float, steps: int, spe: float) -> Scheduler:
    """Return ExponentialLR: x gamma per epoch, spread evenly over the epoch's steps."""
    return sched.ExponentialLR(opt, gamma=cfg.gamma ** (1.0 / spe))


def _cosine(opt: torch.optim.Optimizer, cfg: Any, lr: float, steps: int, spe: float) -> Scheduler:
    """Return CosineAnnealingLR from lr down to min_lr_fraction * lr at the last step + 1."""
    return sched.CosineAnnealingLR(opt, T_max=steps, eta_min=cfg.min_lr_fraction * lr)


def _onecycle(opt: torch.optim.Optimizer, cfg: Any, lr: float, steps: int, spe: float) -> Scheduler:
    """Return OneCycleLR: cosine up from lr / div_factor to lr at step pct_start * steps - 1, then down."""
    # cycle_momentum=False: Adagrad has no momentum (torch would raise), and momentum is a study
    # axis of its own that the schedule must not move.
    return sched.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=float(cfg.pct_start),
                            div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
                            cycle_momentum=False)


def _cyclic(opt: torch.optim.Optimizer, cfg: Any, lr: float, steps: int, spe: float) -> Scheduler:
    """Return triangular CyclicLR between base_lr_fraction * lr and lr, cycle_epochs per cycle."""
    cycle = epochs_to_steps(cfg.cycle_epochs, spe)
    if cycle < 2:  # scaling.data_fit.check_fits_data refuses it, naming the key
        raise ValueError(f"cycle_epochs={cfg.cycle_epochs} is {cycle} step at {spe:g} steps an epoch")
    # Whole-step halves, so that every cycle trains at max_lr: float halves of an odd cycle never land
    # on the peak (a 5-step cycle peaked at 0.85 x max_lr with base_lr_fraction 0.25).
    up = cycle // 2
    # cycle_momentum=False: not every optimizer has momentum (Adagrad), and it is a study axis.
    return sched.CyclicLR(opt, base_lr=cfg.base_lr_fraction * lr, max_lr=lr, step_size_up=up,
                          step_size_down=cycle - up, mode="triangular", cycle_momentum=False)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, Any, float, int, float], Scheduler]] = {
    "constant": _constant, "step": _step, "exponential": _exponential,
    "cosine": _cosine, "onecycle": _onecycle, "cyclic": _cyclic,
}


def _warmup(opt: torch.optim.Optimizer, lr: float, start: float, steps: int) -> Scheduler:
    """Return LambdaLR going linearly from `start` at t = 0 towards `lr` at t = steps."""
    return sched.LambdaLR(opt, lambda t: (start + (lr - start) * t / steps) / lr)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any, *, lr: float, warmup_start_lr: float,
                   warmup_steps: int, total_steps: int, steps_per_epoch: float) -> Scheduler:
    """Return the warmup + main LR schedule over `total_steps` optimizer steps, set to step 0.

    The optimizer's LR is set to the LR of step 0 on return. OneCycleLR raises if stepped more
    than total_steps times, so total_steps must count every optimizer step the run takes.
    """
    if cfg.name not in SCHEDULES:
        raise ConfigError("schedule.name", cfg.name, f"unknown; choose one of {', '.join(SCHEDULES)}")
    if not lr > 0 or warmup_start_lr < 0 or warmup_steps < 0 or steps_per_epoch < 1:
        raise ValueError(f"need lr > 0, warmup_start_lr >= 0, warmup_steps >= 0, steps_per_epoch >= 1; got "
                         f"{lr=}, {warmup_start_lr=}, {warmup_steps=}, {steps_per_epoch=}")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps} leaves no step after warmup_steps={warmup_steps}")
    # Schedulers take their base LR from group["initial_lr"], which only the first one built on
    # an optimizer sets; a stale one would also make CyclicLR's step 0 use it as base_lr.
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
        group.pop("initial_lr", None)
    build_main = SCHEDULES[cfg.name]
    if warmup_steps == 0:
        return build_main(optimizer, cfg, float(lr), total_steps, steps_per_epoch)
    # Order matters: the warmup must read initial_lr before OneCycleLR overwrites it with
    # lr / div_factor. SequentialLR then resets the LR and replays the warmup's step 0; at the
    # milestone it sets the main schedule to its step 0 with `_update_lr(0)`, right for
    # OneCycleLR/CyclicLR's absolute LRs too (tested). Torch before pytorch#149392 (2025) called
    # `.step(0)` there instead: same LRs, plus one EPOCH_DEPRECATION_WARNING.
    warmup = _warmup(optimizer, float(lr), float(warmup_start_lr), warmup_steps)
    main = build_main(optimizer, cfg, float(lr), total_steps - warmup_steps, steps_per_epoch)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
