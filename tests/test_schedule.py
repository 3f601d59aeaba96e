"""LR schedules: explicit per-step tables, closed forms, warnings, checkpoint resume."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from scaling.config import SCHEDULES as SCHEDULE_NAMES, ConfigError, ScheduleConfig
from scaling.schedule import SCHEDULES, build_schedule

# Any warning (e.g. 'Detected call of lr_scheduler.step() before optimizer.step()') fails a test.
pytestmark = pytest.mark.filterwarnings("error")

# The tiny case: lr 0.1, warmup from 0.01, 4 steps per epoch, 12 steps in all.
LR, START, SPE, TOTAL = 0.1, 0.01, 4, 12
TINY = {
    "constant": {},
    "step": {"step_epochs": 1.0, "gamma": 0.5},
    "exponential": {"gamma": 0.5},
    "cosine": {"min_lr_fraction": 0.1},
    "onecycle": {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
    "cyclic": {"base_lr_fraction": 0.25, "cycle_epochs": 1.0},
}
WARM = [0.01, 0.0325, 0.055, 0.0775]  # 0.01 + 0.09 * t / 4
# LR used by optimizer steps t = 0..11, without warmup and with 4 warmup steps (8 main steps).
EXPECTED = {
    ("constant", 0): [0.1] * 12,
    ("constant", 4): WARM + [0.1] * 8,
    ("step", 0): [0.1] * 4 + [0.05] * 4 + [0.025] * 4,
    ("step", 4): WARM + [0.1] * 4 + [0.05] * 4,
    # 0.1 * 0.5 ** (k / 4)
    ("exponential", 0): [0.1, 0.0840896, 0.0707107, 0.0594604, 0.05, 0.0420448,
                         0.0353553, 0.0297302, 0.025, 0.0210224, 0.0176777, 0.0148651],
    ("exponential", 4): WARM + [0.1, 0.0840896, 0.0707107, 0.0594604, 0.05, 0.0420448, 0.0353553, 0.0297302],
    # 0.01 + 0.09 * (1 + cos(pi * k / T)) / 2, T = 12 or 8
    ("cosine", 0): [0.1, 0.0984667, 0.0939711, 0.0868198, 0.0775, 0.0666469,
                    0.055, 0.0433531, 0.0325, 0.0231802, 0.0160289, 0.0115333],
    ("cosine", 4): WARM + [0.1, 0.0965746, 0.0868198, 0.0722208, 0.055, 0.0377792, 0.0231802, 0.0134254],
    # up from 0.01 to 0.1 by step 0.25 * T - 1, then cosine down to 0.01 / 100 at step T - 1
    ("onecycle", 0): [0.01, 0.055, 0.1, 0.0969876, 0.0883139, 0.075025,
                      0.0587237, 0.0413763, 0.025075, 0.0117861, 0.0031124, 0.0001],
    ("onecycle", 4): WARM + [0.01, 0.1, 0.093308, 0.075025, 0.05005, 0.025075, 0.006792, 0.0001],
    # triangle between 0.025 and 0.1, 4 steps per cycle
    ("cyclic", 0): [0.025, 0.0625, 0.1, 0.0625] * 3,
    ("cyclic", 4): WARM + [0.025, 0.0625, 0.1, 0.0625] * 2,
}


def make(name: str, warmup_steps: int, *, lr: float = LR, start: float = START, total: int = TOTAL,
         spe: int = SPE, optimizer: str = "sgd", **overrides):
    """Return (param, optimizer, schedule) for a one-parameter problem."""
    cfg = OmegaConf.structured(ScheduleConfig(name=name, **{**TINY[name], **overrides}))
    p = torch.nn.Parameter(torch.zeros(2))
    opt = (torch.optim.SGD([p], lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adagrad([p], lr=lr))
    sched = build_schedule(opt, cfg, lr=lr, warmup_start_lr=start, warmup_steps=warmup_steps,
                           total_steps=total, steps_per_epoch=spe)
    return p, opt, sched


def run(p, opt, sched, n: int) -> list[float]:
    """Return the LR each of the next n optimizer steps uses, stepping as a training loop does."""
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return lrs


def test_registry_matches_config():
    assert tuple(SCHEDULES) == SCHEDULE_NAMES


@pytest.mark.parametrize("name,warmup", sorted(EXPECTED))
def test_tables(name, warmup):
    assert run(*make(name, warmup), TOTAL) == pytest.approx(EXPECTED[name, warmup], abs=1e-7)


@pytest.mark.parametrize("start,table", [
    (0.0, [0.0, 0.025, 0.05, 0.075, 0.1, 0.1]),
    (0.4, [0.4, 0.325, 0.25, 0.175, 0.1, 0.1]),  # Goyal: start from the reference LR, above lr
])
def test_warmup_start(start, table):
    assert run(*make("constant", 4, start=start, total=6), 6) == pytest.approx(table, abs=1e-12)


def closed_form(name: str, cfg: ScheduleConfig, lr: float, k: int, steps: int, spe: int) -> float:
    """Return the main schedule's LR at its step k of `steps`, from the formulas in the docs."""
    if name == "constant":
        return lr
    if name == "step":  # the j-th decay after j x step_epochs epochs, to the nearest step
        return lr * cfg.gamma ** sum(round(j * cfg.step_epochs * spe) <= k for j in range(1, k + 2))
    if name == "exponential":
        return lr * cfg.gamma ** (k / spe)
    if name == "cosine":
        low = cfg.min_lr_fraction * lr
        return low + (lr - low) * (1 + math.cos(math.pi * k / steps)) / 2
    if name == "onecycle":
        low, peak_at = lr / cfg.div_factor, cfg.pct_start * steps - 1
        a, b, pct = ((low, lr, k / peak_at) if k <= peak_at
                     else (lr, low / cfg.final_div_factor, (k - peak_at) / (steps - 1 - peak_at)))
        return b + (a - b) * (1 + math.cos(math.pi * pct)) / 2
    cycle = round(cfg.cycle_epochs * spe)
    x, half = k % cycle, cycle // 2  # an odd cycle goes down one step longer than up
    up = x / half if x <= half else (cycle - x) / (cycle - half)
    return cfg.base_lr_fraction * lr + (1 - cfg.base_lr_fraction) * lr * up


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("warmup", [0, 9])
def test_closed_form_with_config_defaults(name, warmup):
    """Uneven lengths (7 steps per epoch, 50 steps, 9 warmup) and the schema's own defaults."""
    cfg, lr, start, total, spe = ScheduleConfig(name=name), 0.3, 0.05, 50, 7
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = build_schedule(opt, OmegaConf.structured(cfg), lr=lr, warmup_start_lr=start,
                           warmup_steps=warmup, total_steps=total, steps_per_epoch=spe)
    want = [start + (lr - start) * t / warmup for t in range(warmup)]
    want += [closed_form(name, cfg, lr, k, total - warmup, spe) for k in range(total - warmup)]
    assert run(p, opt, sched, total) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_step_decays_after_whole_multiples_of_step_epochs_at_fractional_steps_per_epoch():
    """9.375 steps an epoch (2,400 samples at batch 256): a decay every 0.25 epoch is 15 decays in
    the 38 steps of 4 epochs, at steps 2, 5, 7, 9, 12, ..., not one every round(2.34) = 2 steps (18)."""
    spe, total = 9.375, 38
    p, opt, sched = make("step", 0, spe=spe, total=total, step_epochs=0.25, gamma=0.5)
    lrs = run(p, opt, sched, total)
    decays = [t for t in range(1, total) if lrs[t] < lrs[t - 1]]
    assert decays == [2, 5, 7, 9, 12, 14, 16, 19, 21, 23, 26, 28, 30, 33, 35]
    assert lrs[-1] == pytest.approx(LR * 0.5 ** 15)


@pytest.mark.parametrize("cycle_epochs,cycle", [(0.5, 5), (1.0, 9), (0.25, 2)])
def test_every_cycle_reaches_max_lr_and_base_lr(cycle_epochs, cycle):
    """At 9.375 steps an epoch a cycle of 5 or 9 steps is odd: each must still train at max_lr once."""
    spe, total = 9.375, 38
    p, opt, sched = make("cyclic", 0, spe=spe, total=total, cycle_epochs=cycle_epochs, base_lr_fraction=0.25)
    lrs = run(p, opt, sched, total)
    for start in range(0, total - cycle + 1, cycle):
        one = lrs[start:start + cycle]
        assert max(one) == pytest.approx(LR) and one[0] == pytest.approx(0.25 * LR), one


@pytest.mark.parametrize("name,key", [("step", "step_epochs"), ("cyclic", "cycle_epochs")])
def test_a_length_shorter_than_the_schedule_can_take_is_refused(name, key):
    with pytest.raises(ValueError, match=key):
        make(name, 0, spe=9.375, total=38, **{key: 0.05})


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("warmup", [0, 4])
def test_no_warnings_and_momentum_untouched(name, warmup):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p, opt, sched = make(name, warmup)
        run(p, opt, sched, TOTAL)
        sched.get_last_lr()
    assert [str(w.message) for w in caught] == []
    assert opt.param_groups[0]["momentum"] == 0.9  # onecycle/cyclic must not cycle momentum


@pytest.mark.parametrize("name", ["onecycle", "cyclic"])
def test_works_without_momentum(name):
    """Adagrad has no momentum: torch's cycle_momentum=True would raise here."""
    assert run(*make(name, 4, optimizer="adagrad"), TOTAL) == pytest.approx(EXPECTED[name, 4], abs=1e-7)


def test_second_schedule_on_same_optimizer_starts_fresh():
    """A stale initial_lr (left by an earlier scheduler) must not leak into the next one."""
    p, opt, _ = make("cosine", 4, lr=0.5)
    sched = build_schedule(opt, OmegaConf.structured(ScheduleConfig(name="cyclic", cycle_epochs=1.0)),
                           lr=LR, warmup_start_lr=START, warmup_steps=0, total_steps=TOTAL, steps_per_epoch=SPE)
    assert run(p, opt, sched, TOTAL) == pytest.approx(EXPECTED["cyclic", 0], abs=1e-7)


def _roundtrip(state: dict) -> dict:
    """Return `state` after torch.save / torch.load(weights_only=True), as a checkpoint sees it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("warmup", [0, 4])
@pytest.mark.parametrize("stop", [2, 4, 7])
@pytest.mark.parametrize("schedule_first", [False, True])
def test_resume_from_state_dict(name, warmup, stop, schedule_first):
    reference = run(*make(name, warmup), TOTAL)
    p, opt, sched = make(name, warmup)
    run(p, opt, sched, stop)
    saved = _roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})

    p2, opt2, sched2 = make(name, warmup)  # a fresh process builds everything the same way
    p2.data.copy_(p.data)
    if schedule_first:
        sched2.load_state_dict(saved["sched"])
        opt2.load_state_dict(saved["opt"])
    else:
        opt2.load_state_dict(saved["opt"])
        sched2.load_state_dict(saved["sched"])
    assert run(p2, opt2, sched2, TOTAL - stop) == reference[stop:]


def test_unknown_name_raises():
    cfg = OmegaConf.create({"name": "linear"})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="schedule.name"):
        build_schedule(opt, cfg, lr=0.1, warmup_start_lr=0.0, warmup_steps=0, total_steps=10, steps_per_epoch=5)


def test_warmup_must_leave_steps():
    with pytest.raises(ValueError, match="no step after warmup"):
        make("constant", 12)


def test_onecycle_raises_past_total_steps():
    """torch's OneCycleLR allows total_steps scheduler steps, no more: the trainer must count right."""
    p, opt, sched = make("onecycle", 4)
    run(p, opt, sched, TOTAL)
    with pytest.raises(ValueError, match="Tried to step"):
        run(p, opt, sched, 1)
