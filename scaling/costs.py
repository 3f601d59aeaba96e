"""What reaching the target costs: the target, each trial's cost to reach it, the critical batch size fit
over those costs, and memory against time to target with the recommendation it gives.

Built on the shared reduction (scaling.reduction): a configuration's cost is its median over seeds,
a batch size's that of its fastest configuration.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from scaling import fits
from scaling.config import first_step_at_or_past
from scaling.reduction import COSTS, USABLE, batch_list, best_config, config_columns, usable
from scaling.study_data import LR, Study, Target


# ---------------------------------------------------------------- target and cost to target
def logged_costs(trials: pd.DataFrame) -> pd.DataFrame:
    """Return the trials with cost columns from the logged target/* metrics (inf if never reached)."""
    out = trials.copy()
    for col, metric in zip(COSTS, ("target/steps", "target/samples", "target/time_s")):
        out[col] = out[metric] if metric in out else np.nan
    return _unreached_is_inf(out)


def crossing_costs(trials: pd.DataFrame, metric: pd.DataFrame, elapsed: pd.DataFrame, target: Target) -> pd.DataFrame:
    """Return the trials with cost columns at the first evaluation meeting `target`.

    `metric` and `elapsed` are long histories (trial, samples, value) of the target metric
    and of time/elapsed_s.
    """
    hit = metric[target.reached(metric["value"])].groupby("trial")["samples"].min()
    t = elapsed.set_index(["trial", "samples"])["value"]
    out = trials.copy()
    out["samples_to_target"] = out["trial"].map(hit)
    out["steps_to_target"] = out["samples_to_target"] / out["batch_size"]
    out["time_to_target_s"] = [t.get((tr, s), np.nan) if pd.notna(s) else np.nan
                               for tr, s in zip(out["trial"], out["samples_to_target"])]
    return _unreached_is_inf(out)


def _unreached_is_inf(df: pd.DataFrame) -> pd.DataFrame:
    ok = df["status"].isin(USABLE)
    for col in COSTS:
        df[col] = np.where(ok, df[col].fillna(np.inf), np.nan)
    return df


def cost_to_target(trials: pd.DataFrame, by: Sequence[str] = ("batch_size",), rank: str = "steps_to_target") -> pd.DataFrame:
    """Return per `by` the steps, samples and time to target of its fastest configuration.

    Each configuration's cost is its median over seeds (inf when half the seeds or more never
    reach the target); the batch size's cost is the min over configurations. `reached` says
    whether it is finite.
    """
    rest = [c for c in COSTS if c != rank]
    # steps tie often (an evaluation's step count): the faster of the tied configurations is the one shown
    tiebreak = "time_to_target_s" if rank != "time_to_target_s" else "steps_to_target"
    out = best_config(usable(trials), rank, by, also=rest, tiebreak=tiebreak)
    out["reached"] = np.isfinite(out[rank]) if not out.empty else []
    return out


def common_target(trials: pd.DataFrame, best: pd.Series, metric: str, mode: str) -> Target:
    """Return the target every batch size reaches with every seed: the worst batch size's best value.

    `best` holds each trial's best value of `metric` (indexed like `trials`). A configuration's
    value is its worst seed; a batch size's, its best configuration.
    """
    df = usable(trials).assign(_best=best)
    worst_seed = df.groupby(["batch_size", *config_columns(df, ["batch_size"])], dropna=False)["_best"]
    per_config = (worst_seed.max() if mode == "min" else worst_seed.min()).groupby(level=0)
    per_batch = per_config.min() if mode == "min" else per_config.max()
    value = per_batch.max() if mode == "min" else per_batch.min()
    return Target(metric, float(value), mode, "common")


def targeted(study: Study, target: Optional[float | Target] = None) -> tuple[Target, pd.DataFrame, list[str]]:
    """Return (target, trials with cost columns, notes).

    The configured target is used when every batch size reaches it. Otherwise the target is
    the best value the weakest batch size reached (`common_target`), and a note says so.
    A float `target` is a value of the configured metric.
    """
    trials, configured = study.trials, study.configured_target
    notes = []
    if isinstance(target, Target):
        chosen = target
    elif target is not None:
        base = configured or Target("val/loss", 0.0, "min")
        chosen = Target(base.metric, float(target), base.mode, "given")
    elif configured is not None:
        costed = logged_costs(trials)
        costs = cost_to_target(costed)
        if costs["reached"].all():
            return configured, costed, notes
        hit = costs.loc[costs["reached"], "batch_size"].tolist()
        missed = costs.loc[~costs["reached"], "batch_size"].tolist()
        notes.append(f"the configured target {configured} was never reached" if not hit else
                     f"the configured target {configured} was reached at B={batch_list(hit)} but not at B={batch_list(missed)}")
        chosen = None
    else:
        notes.append("no target configured: using val/loss")
        chosen = None
    ids = usable(trials)["trial"].tolist()
    metric = chosen.metric if chosen else (configured.metric if configured else "val/loss")
    hist = study.history(metric, ids)
    if chosen is None:
        mode = configured.mode if configured else "min"
        per_trial = hist.groupby("trial")["value"].agg(mode)
        chosen = common_target(trials, trials["trial"].map(per_trial), metric, mode)
        notes.append(f"costs to target use {chosen}: the best the weakest batch size reached, so every batch size reaches it")
    return chosen, crossing_costs(trials, hist, study.history("time/elapsed_s", ids), chosen), notes


# ---------------------------------------------------------------- critical batch size
def critical_batch(costs: pd.DataFrame) -> tuple[Optional[fits.CriticalBatchFit], list[str]]:
    """Return the fit of steps-to-target S(B) = S_min (1 + B_crit / B) (None with a note when impossible)."""
    ok = costs[costs["reached"]]
    if ok["batch_size"].nunique() < 3:
        return None, [f"critical batch size: needs steps-to-target at 3 or more batch sizes, found {ok['batch_size'].nunique()}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fits.fit_critical_batch_size(ok["batch_size"], ok["steps_to_target"])
    return fit, [f"critical batch size: {w.message}" for w in caught if "B_crit" in str(w.message)]


def first_evaluation(trials: pd.DataFrame) -> pd.Series:
    """Return each trial's samples at its first evaluation (NaN where not recorded), as the loop
    schedules it (train.eval_steps): after the first step at or past eval_every epochs, at least one,
    n_train = samples / epoch."""
    if not {"eval_every", "samples", "epoch"} <= set(trials):
        return pd.Series(np.nan, index=trials.index)
    n_train = trials["samples"] / trials["epoch"].where(trials["epoch"] > 0)
    per_eval = trials["eval_every"] * n_train / trials["batch_size"]
    return per_eval.map(lambda s: first_step_at_or_past(s) if np.isfinite(s) else np.nan) * trials["batch_size"]


def first_evaluation_note(trials: pd.DataFrame, costs: pd.DataFrame) -> list[str]:
    """Return a note naming the batch sizes whose cost to target is their first evaluation's: the
    target was met somewhere before it, so the cost is only an upper bound, which the fit takes as exact."""
    first = trials.assign(_first=first_evaluation(trials)).groupby("batch_size")["_first"].max()
    early = costs[costs["reached"] & (costs["samples_to_target"] <= costs["batch_size"].map(first))]
    if early.empty:
        return []
    return [f"B={batch_list(early['batch_size'])} reached the target at the first evaluation: the cost to target there is "
            "only an upper bound (the critical batch size fit takes it as measured); lower eval_every"]


def regime(batch_size: float, fit: Optional[fits.CriticalBatchFit]) -> str:
    """Return the steps-to-target regime at batch_size on the fitted curve (Shallue et al. 2019).

    Perfect scaling while doubling B still cuts S by 40% or more (B < B_crit / 4); plateau from
    the fit's plateau threshold (less than a 10% cut, B >= 4 B_crit); diminishing returns between.
    """
    if fit is None:
        return ""
    if batch_size < fit.b_crit / 4:
        return "perfect scaling"
    return "plateau" if batch_size >= fit.plateau_threshold else "diminishing returns"


# ---------------------------------------------------------------- memory against time to target
def memory_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Return per (batch size, micro-batch, precision): peak MB, samples/s, time and samples to target, frontier.

    Time to target is the fastest configuration's seed median; peak memory is the largest
    over the group's trials, those that ran out of memory included (what a budget must hold).
    `on_frontier` marks the Pareto frontier
    of (peak MB, time to target).
    """
    by = [c for c in ("batch_size", "micro_batch_size", "precision") if c in trials]
    missing = {c: np.nan for c in ("mem/peak_mb", "time/samples_per_s") if c not in trials}
    u = usable(trials).assign(**missing)
    held = pd.concat([u, trials[trials["status"] == "oom"].assign(**missing)])  # an oom's peak: a budget holds it too
    res = pd.concat([held.groupby(by, dropna=False)["mem/peak_mb"].max().rename("peak_mb"),
                     u.groupby(by, dropna=False)["time/samples_per_s"].median().rename("samples_per_s")], axis=1)
    out = cost_to_target(trials, by, rank="time_to_target_s").merge(res.reset_index(), on=by)
    time = out["time_to_target_s"].where(np.isfinite(out["time_to_target_s"]))
    out["on_frontier"] = fits.pareto_frontier(out["peak_mb"], time) if len(out) else []
    return out


def recommend(memory: pd.DataFrame, budget_mb: Optional[float], axes: Sequence[str] = ()) -> tuple[Optional[pd.Series], str]:
    """Return the row fastest to target within `budget_mb` (any memory when None), and a one-line verdict.

    The verdict also names the row's value of each of `axes` (`lr_multiplier=0.5, optimizer.name=adam`):
    an LR alone is no configuration to run once the grid has other axes.
    """
    ok = memory[np.isfinite(memory["time_to_target_s"])]
    within = ok if budget_mb is None else ok[ok["peak_mb"] <= budget_mb]
    if ok.empty:
        return None, "no configuration reached the target: no recommendation"
    if within.empty:
        return None, f"no configuration that reaches the target fits in {budget_mb:g} MB (the smallest needs {ok['peak_mb'].min():.0f} MB)"
    row = within.loc[within["time_to_target_s"].idxmin()]
    where = "overall (no memory budget given)" if budget_mb is None else f"within {budget_mb:g} MB"
    return row, (f"fastest to target {where}: batch size {row['batch_size']:g}"
                 + (f", micro-batch {row['micro_batch_size']:g}" if "micro_batch_size" in row else "")
                 + (f", {row['precision']}" if "precision" in row else "")
                 + f", lr {row[LR]:.3g}" + _setting(row, axes)
                 + f": {row['time_to_target_s']:.3g} s, {row['peak_mb']:.0f} MB peak")


def _setting(row: pd.Series, axes: Sequence[str]) -> str:
    """Return ` (key=value, ...)` for the row's other axes, or "" when it has none."""
    named = [a for a in axes if a in row and a not in ("batch_size", "micro_batch_size", "precision", LR, "lr")]
    values = [f"{a}={'null' if pd.isna(row[a]) else format(row[a], 'g') if isinstance(row[a], float) else row[a]}"
              for a in named]
    return f" ({', '.join(values)})" if values else ""
