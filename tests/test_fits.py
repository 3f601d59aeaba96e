"""Tests for scaling.fits: parameter recovery on synthetic data, intervals, edge cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from scaling.fits import (
    consistent_up_to,
    fit_critical_batch_size,
    fit_lr_exponent,
    pareto_frontier,
    refine_best_lr,
)

NOISE = 0.05  # 5% lognormal multiplicative noise


def _steps(b: np.ndarray, s_min: float, b_crit: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return s_min * (1 + b_crit / b) * np.exp(NOISE * rng.standard_normal(b.size))


@pytest.mark.parametrize("b_crit,s_min,seed", [(50.0, 3000.0, 1), (400.0, 2000.0, 2), (3000.0, 500.0, 3)])
def test_critical_batch_recovered_with_interval(b_crit: float, s_min: float, seed: int) -> None:
    b = np.round(b_crit * 2.0 ** np.arange(-5, 6))  # B_crit/32 .. 32 B_crit
    fit = fit_critical_batch_size(b, _steps(b, s_min, b_crit, seed), n_boot=200, seed=seed)
    assert fit.b_crit == pytest.approx(b_crit, rel=0.10)
    assert fit.s_min == pytest.approx(s_min, rel=0.10)
    assert fit.e_min == pytest.approx(fit.s_min * fit.b_crit)
    assert fit.b_crit_interval[0] <= b_crit <= fit.b_crit_interval[1]
    assert fit.s_min_interval[0] <= s_min <= fit.s_min_interval[1]
    assert fit.n_points == b.size
    # 10% per doubling: S(2B)/S(B) >= 0.9  <=>  B >= 4 B_crit on the fitted curve
    assert fit.plateau_threshold == pytest.approx(4 * fit.b_crit)
    assert fit.plateau_from == b[b >= fit.plateau_threshold].min()
    assert fit.steps(fit.plateau_threshold * 2) / fit.steps(fit.plateau_threshold) == pytest.approx(0.9)


def test_critical_batch_groups_bootstrap_within_batch_size() -> None:
    b_crit, s_min = 256.0, 1000.0
    b = np.repeat(2.0 ** np.arange(3, 14), 3)
    seeds = np.tile([0, 1, 2], b.size // 3)
    fit = fit_critical_batch_size(b, _steps(b, s_min, b_crit, 8), n_boot=200, seed=0, groups=seeds)
    assert fit.b_crit == pytest.approx(b_crit, rel=0.10)
    assert fit.b_crit_interval[0] <= b_crit <= fit.b_crit_interval[1]
    assert fit.n_points == 33


def test_slope_small_is_perfect_scaling_below_b_crit() -> None:
    b = 2.0 ** np.arange(3, 11)  # 8 .. 1024, far below B_crit
    fit = fit_critical_batch_size(b, _steps(b, 100.0, 1e5, 4), n_boot=0)
    assert fit.slope_small == pytest.approx(-1.0, abs=0.15)
    assert fit.plateau_from is None  # no measured batch size reaches 4 B_crit


def test_slope_small_is_flat_on_plateau() -> None:
    b = 2.0 ** np.arange(8, 14)
    fit = fit_critical_batch_size(b, 1000 * (1 + 2.0 / b), n_boot=0)
    assert fit.slope_small == pytest.approx(0.0, abs=0.02)
    assert fit.plateau_from == 256.0


def test_no_bootstrap_gives_point_intervals() -> None:
    b = 2.0 ** np.arange(3, 10)
    fit = fit_critical_batch_size(b, 10 * (1 + 64 / b), n_boot=0)
    assert fit.b_crit == pytest.approx(64, rel=1e-4)
    assert fit.b_crit_interval == (fit.b_crit, fit.b_crit)


@pytest.mark.parametrize("b,s,msg", [
    ([8, 16, 16, 8], [4, 3, 3, 4], "at least 3 distinct batch sizes"),
    ([8, 16, 32], [4, -3, 2], "finite and positive"),
    ([8, 0, 32], [4, 3, 2], "finite and positive"),
    ([8, 16, 32], [4, float("nan"), 2], "NaN"),
    ([8, 16, 32], [4, 3], "differ in length"),
])
def test_critical_batch_rejects_degenerate_input(b, s, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        fit_critical_batch_size(b, s, n_boot=0)


def test_groups_must_allow_resampling() -> None:
    with pytest.raises(ValueError, match="one point"):
        fit_critical_batch_size([8, 16, 32], [4, 3, 2], groups=[0, 0, 0])
    with pytest.raises(ValueError, match="differ in length"):
        fit_critical_batch_size([8, 16, 32], [4, 3, 2], groups=[0, 1])


@pytest.mark.parametrize("alpha,seed", [(0.0, 1), (0.5, 2), (1.0, 3), (0.75, 4)])
def test_lr_exponent_recovered(alpha: float, seed: int) -> None:
    b = 2.0 ** np.arange(4, 12)
    lr = 1e-3 * b ** alpha * np.exp(NOISE * np.random.default_rng(seed).standard_normal(b.size))
    fit = fit_lr_exponent(b, lr, n_boot=300, seed=seed)
    assert fit.alpha == pytest.approx(alpha, abs=0.05)
    assert fit.alpha_interval[0] <= alpha <= fit.alpha_interval[1]
    assert fit.alpha_boot_interval[0] < fit.alpha < fit.alpha_boot_interval[1]
    assert fit.c == pytest.approx(1e-3, rel=0.5)
    if alpha in (0.0, 0.5, 1.0):
        assert fit.verdict == {0.0: "none", 0.5: "sqrt", 1.0: "linear"}[alpha]
        assert fit.verdict in fit.consistent
        assert fit.up_to == b.max()
    else:  # 0.75: neither sqrt nor linear inside the interval; verdict is the nearest
        assert fit.consistent == ()
        assert fit.verdict in ("sqrt", "linear")


def test_lr_exponent_break_found_by_scan() -> None:
    b = 2.0 ** np.arange(4, 14)
    lr = 1e-3 * np.minimum(b, 1024) * np.exp(0.03 * np.random.default_rng(0).standard_normal(b.size))
    # linear holds up to the break; one point past it is not yet enough evidence against it
    assert consistent_up_to(b, lr, 1.0) in (1024.0, 2048.0)
    assert fit_lr_exponent(b, lr, n_boot=0).consistent == ()  # over all points, no rule fits
    exact = fit_lr_exponent(b[:5], 0.1 * b[:5], n_boot=0)
    assert exact.alpha == pytest.approx(1.0) and exact.verdict == "linear" and exact.alpha_boot_interval is None


def test_lr_exponent_errors() -> None:
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_lr_exponent([8, 16], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        fit_lr_exponent([8, 8, 8], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        fit_lr_exponent([8, 16, 32], [0.1, float("nan"), 0.3])


@pytest.mark.parametrize("vertex", [3e-3, 1.7e-2, 5.5e-2])
def test_refine_best_lr_finds_parabola_vertex(vertex: float) -> None:
    lrs = np.geomspace(1e-4, 1.0, 9)
    values = (np.log(lrs) - math.log(vertex)) ** 2 + 0.3
    assert refine_best_lr(lrs, values) == pytest.approx(vertex, rel=1e-9)
    assert refine_best_lr(lrs[::-1], -values[::-1], mode="max") == pytest.approx(vertex, rel=1e-9)


def test_refine_best_lr_edges_and_nan() -> None:
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    assert refine_best_lr(lrs, [1.0, 2.0, 3.0, 4.0]) == 1e-3  # best at the grid edge
    assert refine_best_lr(lrs, [4.0, 3.0, 2.0, float("nan")]) == 1e-1  # diverged neighbour: no refinement
    assert refine_best_lr(lrs, [0.5, float("nan"), 0.9, 0.1], mode="max") == 1e-1
    refined = refine_best_lr(lrs, [3.0, 1.0, 1.2, 5.0])
    assert 1e-3 <= refined <= 1e-1 and refined != 1e-2
    with pytest.raises(ValueError, match="NaN or infinite"):
        refine_best_lr(lrs, [float("nan")] * 4)
    with pytest.raises(ValueError, match="duplicates"):
        refine_best_lr([1e-3, 1e-3, 1e-2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="mode"):
        refine_best_lr(lrs, [1.0] * 4, mode="best")


def test_pareto_frontier() -> None:
    mem = [1.0, 2.0, 3.0, 2.0, 1.0, float("nan"), 4.0]
    time = [5.0, 3.0, 1.0, 4.0, 5.0, 0.1, 1.0]
    # (2,4) dominated by (2,3); (4,1) dominated by (3,1); equal points (1,5) both kept; NaN excluded
    assert pareto_frontier(mem, time).tolist() == [True, True, True, False, True, False, False]
    assert pareto_frontier([], []).tolist() == []


def test_unidentified_b_crit_warns() -> None:
    b = 2.0 ** np.arange(3, 9)
    with pytest.warns(UserWarning, match="do not identify"):
        fit = fit_critical_batch_size(b, 1e6 / b, n_boot=0)  # perfect scaling: B_crit unbounded
    assert fit.e_min == pytest.approx(1e6, rel=1e-2)  # the minimum samples is still identified
