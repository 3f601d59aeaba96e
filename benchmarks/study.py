"""Rows 2 and 4: a real study's wall time against the ideal (the same trials in a plain loop,
divided by the concurrency), its start-up, its fixed part and its part per second of training
(2d, 2e), against a bare Ray Tune script of the same trials (2f), and the cost of recording it in
MLflow."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional

from benchmarks.common import Ctx, Row, Summary, cores, not_measurable, paired, summarize
from benchmarks.studyrun import BATCH_SIZES, CONCURRENCY, EPOCHS, LR_MULTIPLIERS, run_bare, run_loop, run_study

STARTUP_ALLOWANCE_S = 5.0
WALL_TARGET = 1.25  # row 2: (wall - allowance) / ideal
# Rows 2d and 2e: the same grid at a second length, so that wall = fixed + slope x ideal can be solved
# for both. At 1 epoch the ideal is ~4 s, so row 2's single ratio mostly measures the fixed part.
LONG_EPOCHS = 4
LONG_PAIR_WALLS = 4.0  # the long study and loop, in 1-epoch study walls (86 s against 22 s at 1a270e8)


def study_wall(ctx: Ctx) -> list[Row]:
    """Row 2: (study wall - 5 s) / (plain loop / 2) <= 1.25; row 2b: start-up <= 5 s; rows 2d and 2e:
    the slope (<= 1.25) and the fixed part (<= 5 s) of the study's wall against the ideal."""
    studies = ctx.cache.setdefault("full_grid_studies", [])

    def study():
        s = run_study(ctx, asha=False)
        studies.append(s)
        return s

    t = time.perf_counter()
    pairs = paired(study, lambda: run_loop(ctx), 1)
    pair_s = time.perf_counter() - t
    long_s = LONG_PAIR_WALLS * ctx.study_wall_s()
    # The second pair (loop first, then study) only if the long pair and the later groups still fit
    # the budget (Ctx.fits); --quick runs one pair.
    skipped = not ctx.quick and not ctx.fits(pair_s + long_s, "study")
    if not ctx.quick and not skipped:
        loop, second = paired(lambda: run_loop(ctx), study, 1)[0]  # B then A this time
        pairs.append((second, loop))
    split = _fixed_and_proportional(ctx, pairs, long_s)
    ratios = summarize([(s["wall_s"] - STARTUP_ALLOWANCE_S) / lp["ideal_s"] for s, lp in pairs])
    net = summarize([(s["wall_s"] - s["startup_s"]) / lp["ideal_s"] for s, lp in pairs])
    span = summarize([s["trials_span_s"] / lp["ideal_s"] for s, lp in pairs])
    wall = statistics.median(s["wall_s"] for s, _ in pairs)
    ideal = summarize([lp["ideal_s"] for _, lp in pairs])
    startup = summarize([s["startup_s"] for s, _ in pairs])
    to_line = [s["to_study_line_s"] for s, _ in pairs if s.get("to_study_line_s") is not None]
    same = all(_same_best(s["best_per_batch_size"], lp["best_per_batch_size"]) for s, lp in pairs)
    # CPU-bound? The least wall the study's CPU allows on these cores, against the target's line
    cpu = summarize([s["machine_cpu_s"] for s, _ in pairs])
    floor, line = cpu.median / cores(), STARTUP_ALLOWANCE_S + WALL_TARGET * ideal.median
    steal = max(s["steal_s"] for s, _ in pairs)
    n = len(BATCH_SIZES) * len(LR_MULTIPLIERS)
    data = {"pairs": [{"study": s, "loop": lp} for s, lp in pairs], "ratios": ratios.values,
            "ratio_after_measured_startup": net.values, "startup_s": startup.values, "concurrency": CONCURRENCY,
            "study_machine_cpu_s": cpu.values, "cores": cores(), "cpu_floor_s": floor, "target_line_s": line}
    rows = [
        Row(f"2. study wall ({n} trials, {CONCURRENCY} workers)", f"{wall:.1f} s",
            f"{ideal.median:.1f} s ideal (loop / {CONCURRENCY})", ratios.median,
            f"<= {WALL_TARGET:g}x after {STARTUP_ALLOWANCE_S:g} s", ratios.median <= WALL_TARGET, ratios.spread,
            note=f"(wall - measured start-up) / ideal = {net.median:.2f} [{net.spread}]; first trial start to "
                 f"last trial end / ideal = {span.median:.2f} [{span.spread}]; "
                 f"best val/loss per batch size {'matches' if same else 'DIFFERS from'} the plain loop's; "
                 f"whole-machine CPU during the study {cpu.median:.1f} s [{cpu.lo:.1f}-{cpu.hi:.1f}] (steal up to "
                 f"{steal:.1f} s), so at least {floor:.1f} s of wall on {cores()} cores, against the target's "
                 f"{line:.1f} s ({STARTUP_ALLOWANCE_S:g} s + {WALL_TARGET:g} x ideal)"
                 + ("; one pair only: the second did not fit --budget" if skipped else ""),
            data=data),
        _within_allowance("2b. study start-up (launch to first trial start)", startup,
                          note="launch to the 'study ...' line: " + ", ".join(f"{x:.1f} s" for x in to_line),
                          data={"startup_s": startup.values, "to_study_line_s": to_line}),
    ]
    return rows + split


def _fixed_and_proportional(ctx: Ctx, pairs: list, long_s: float) -> list[Row]:
    """Rows 2d and 2e: solve wall = fixed + slope x ideal from the grid at two lengths.

    Row 2's target is "<= 1.25x the ideal, plus <= 5 s fixed start-up": two conditions. One grid
    length cannot tell them apart (1.25 x a 4 s ideal leaves 1 s for everything beyond 5 s), so the
    same 32 trials also run at LONG_EPOCHS epochs, study then loop, and each short pair with the long
    one gives a slope (the study's wall per second of ideal: what it costs per unit of training) and an
    intercept (what it costs whatever the training: start-up, the workers' boots, the shutdown).
    """
    n2d, n2e = "2d. study wall per second of ideal (slope)", "2e. study wall's fixed part (intercept)"
    if not ctx.fits(long_s, "study"):
        why = "did not fit --budget"
        return [not_measurable(n2d, f"<= {WALL_TARGET:g}x", why), not_measurable(n2e, f"<= {STARTUP_ALLOWANCE_S:g} s", why)]
    long_study, long_loop = paired(lambda: run_study(ctx, asha=False, epochs=LONG_EPOCHS),
                                   lambda: run_loop(ctx, LONG_EPOCHS), 1)[0]
    fits = fit_fixed_and_slope([(s["wall_s"], lp["ideal_s"]) for s, lp in pairs],
                               (long_study["wall_s"], long_loop["ideal_s"]))
    slope, fixed = summarize([f[0] for f in fits]), summarize([f[1] for f in fits])
    short_walls = ", ".join(f"{s['wall_s']:.1f}" for s, _ in pairs)
    short_ideals = ", ".join(f"{lp['ideal_s']:.1f}" for _, lp in pairs)
    walls = (f"walls {short_walls} s at {EPOCHS} epoch against {long_study['wall_s']:.1f} s at {LONG_EPOCHS}; ideals "
             f"{short_ideals} s against {long_loop['ideal_s']:.1f} s (the long pair once, each short pair with it)")
    data = {"long_epochs": LONG_EPOCHS, "long_study": long_study, "long_loop": long_loop, "slopes": slope.values,
            "fixed_s": fixed.values}
    return [
        Row(n2d, f"{slope.median:.2f} s per s", "1 s per s (the plain loop / 2)", slope.median, f"<= {WALL_TARGET:g}x",
            slope.median <= WALL_TARGET, slope.spread, note=walls, data=data),
        _within_allowance(n2e, fixed, note="start-up, the workers' boots and the shutdown; per short pair: "
                                           + ", ".join(f"{x:.1f} s" for x in fixed.values)),
    ]


def _within_allowance(name: str, seconds: Summary, note: str, data: Optional[dict] = None) -> Row:
    """A row of seconds judged against the 5 s start-up allowance (rows 2b and 2e)."""
    a = STARTUP_ALLOWANCE_S
    return Row(name, f"{seconds.median:.1f} s", f"{a:g} s allowance", seconds.median / a, f"<= {a:g} s",
               seconds.median <= a, f"{seconds.lo / a:.2f}-{seconds.hi / a:.2f}", note=note, data=data or {})


def fit_fixed_and_slope(short: list[tuple[float, float]], long: tuple[float, float]) -> list[tuple[float, float]]:
    """Return (slope, fixed) of wall = fixed + slope x ideal through each short (wall, ideal) and long."""
    long_wall, long_ideal = long
    fits = []
    for wall, ideal in short:
        if not long_ideal > ideal:
            raise ValueError(f"the long grid's ideal ({long_ideal:.2f} s) must exceed the short one's ({ideal:.2f} s)")
        slope = (long_wall - wall) / (long_ideal - ideal)
        fits.append((slope, wall - slope * ideal))
    return fits


def _same_best(a: dict, b: dict, rel: float = 1e-4) -> bool:
    a, b = {int(k): v for k, v in a.items()}, {int(k): v for k, v in b.items()}
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=rel) for k in a)


@dataclass
class _WallAndCpu:
    """Two runs compared side by side: A / B ratios of wall and whole-machine CPU, and medians of each."""

    wall: Summary
    cpu: Summary
    a_wall: float
    b_wall: float
    a_cpu: float
    b_cpu: float

    @classmethod
    def of(cls, pairs: list[tuple[dict, dict]]) -> "_WallAndCpu":
        med = lambda side, key: statistics.median(p[side][key] for p in pairs)  # noqa: E731
        return cls(summarize([a["wall_s"] / b["wall_s"] for a, b in pairs]),
                   summarize([a["machine_cpu_s"] / b["machine_cpu_s"] for a, b in pairs]),
                   med(0, "wall_s"), med(1, "wall_s"), med(0, "machine_cpu_s"), med(1, "machine_cpu_s"))

    def cpu_note(self, label: str) -> str:
        return (f"whole-machine CPU {label} = {self.cpu.median:.2f} [{self.cpu.spread}] ({self.a_cpu:.1f} s against "
                f"{self.b_cpu:.1f} s on {cores()} cores)")


def tool_vs_bare_tune(ctx: Ctx) -> list[Row]:
    """Row 2f (context, no target): the study (MLflow off) against the same trials as a bare Ray Tune
    script (benchmarks.baretune): what the tool adds on top of Ray Tune and torch themselves."""
    name = f"2f. study wall / bare Ray Tune script ({len(BATCH_SIZES) * len(LR_MULTIPLIERS)} trials, MLflow off)"
    pairs = paired(lambda: run_study(ctx, asha=False, mlflow=False), lambda: run_bare(ctx), 1 if ctx.quick else 2,
                   more=lambda s: ctx.fits(s, "tune"))
    c = _WallAndCpu.of(pairs)
    studies = ctx.cache.get("full_grid_studies") or []  # row 2's, recorded in MLflow
    same = ("not compared (row 2 did not run)" if not studies else
            "matches the study's" if all(_same_best(b["best_per_batch_size"], studies[0]["best_per_batch_size"])
                                         for _, b in pairs) else "DIFFERS from the study's")
    return [Row(name, f"{c.a_wall:.1f} s (study)", f"{c.b_wall:.1f} s (bare Tune)", c.wall.median, "-", None,
                c.wall.spread, note=f"{c.cpu_note('study / bare')}; the bare script's best val loss per batch size {same}"
                                    + _short(ctx, pairs, 2),
                data={"ratios": c.wall.values, "cpu_ratios": c.cpu.values, "pairs": pairs})]


def mlflow_overhead(ctx: Ctx) -> list[Row]:
    """Row 4: the same study with mlflow.enabled=true vs false (target <= 1.03x)."""
    # 4 pairs: a study's wall varies by +-10% from run to run here (two pairs measured 1.03-1.31);
    # at least 2, the last two only if they fit the budget
    repeats = 1 if ctx.quick else 4
    return [_mlflow_on_off(ctx, "4. mlflow overhead (study wall, on / off)", EPOCHS, repeats, limit=1.03,
                           more=lambda s: ctx.fits(s, "mlflow"), least=2)]


def mlflow_overhead_long(ctx: Ctx) -> list[Row]:
    """Row 4c (context; opt-in, `--only mlflow-long`, ~2 min): row 4 on the grid at LONG_EPOCHS epochs.

    MLflow's cost is mostly fixed (its import and the store's opening) and per trial (its run, config
    and one batch of values), not per second of training, so its share of a study falls as the trials
    get longer; row 4's 1-epoch trials (~0.3 s of training each) are its worst case. On / off seconds
    at both lengths tell the fixed and per-trial part from a part that grows with training."""
    return [_mlflow_on_off(ctx, f"4c. mlflow overhead at {LONG_EPOCHS} epochs (study wall, on / off)", LONG_EPOCHS,
                           1 if ctx.quick else 2)]


def _mlflow_on_off(ctx: Ctx, name: str, epochs: int, repeats: int, limit: Optional[float] = None, **more) -> Row:
    """The study at `epochs` with MLflow on and off, alternating (`more`: paired's budget arguments), as a
    row (the target: wall on / off <= `limit`, if any); its note gives what MLflow costs in seconds."""
    pairs = paired(lambda: run_study(ctx, asha=False, mlflow=True, epochs=epochs),
                   lambda: run_study(ctx, asha=False, mlflow=False, epochs=epochs), repeats, **more)
    c = _WallAndCpu.of(pairs)  # CPU: what MLflow costs whichever process spends it; the cores the trials fill pay
    wall = statistics.median(a["wall_s"] - b["wall_s"] for a, b in pairs)
    cpu = statistics.median(a["machine_cpu_s"] - b["machine_cpu_s"] for a, b in pairs)
    note = (f"{c.cpu_note('on / off')}; on - off: {wall:.1f} s of wall, {cpu:.1f} s of CPU (median over pairs)"
            + _short(ctx, pairs, repeats))
    return Row(name, f"{c.a_wall:.1f} s (mlflow on)", f"{c.b_wall:.1f} s (mlflow off)", c.wall.median,
               "-" if limit is None else f"<= {limit:g}x", None if limit is None else c.wall.median <= limit,
               c.wall.spread, note=note,
               data={"epochs": epochs, "ratios": c.wall.values, "cpu_ratios": c.cpu.values, "pairs": pairs})


def _short(ctx: Ctx, pairs: list, wanted: int) -> str:
    """The note's words when --budget cut a row's pairs short."""
    if ctx.quick or len(pairs) >= wanted:
        return ""
    return f"; {len(pairs)} of {wanted} pairs: the rest did not fit --budget"
