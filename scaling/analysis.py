"""What a study shows: tables and fits over its trials (loaded by `load_study`, see study_data).

Every function here is small and pure over DataFrames, so it unit-tests without MLflow. Two conventions hold
throughout: a configuration's value is the **median over seeds**, and a batch size's value
is that of its best configuration (the **min over the LR grid** and every other axis).
Trials that completed, stopped early or were pruned have results; a diverged trial counts
as the worst value (never best); oom and error trials carry no result.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from scaling import fits
from scaling.study_data import (DEFAULT_TRACKING_URI, LR, Study, StudyError, Target, load_study,  # noqa: F401
                                rule_bypassed, trials_frame, typed)

USABLE = ("completed", "early_stopped", "pruned")
COSTS = ("steps_to_target", "samples_to_target", "time_to_target_s")
_SWEEPABLE = ("batch_size", "lr_multiplier", "lr", "scaling.rule", "warmup.epochs", "micro_batch_size",
              "precision", "optimizer.name", "schedule.name", "model.name", "model.width", "seed")


# ---------------------------------------------------------------- the shared reduction
def config_columns(trials: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Return the columns that name one configuration besides `by`: the LR and the swept axes, not the seed."""
    axes = trials.attrs.get("axes") or [c for c in _SWEEPABLE if c in trials and trials[c].nunique(dropna=False) > 1]
    return [c for c in dict.fromkeys([LR, *axes]) if c in trials and c not in by and c != "seed"]


def best_config(trials: pd.DataFrame, rank: str, by: Sequence[str] = ("batch_size",), mode: str = "min",
                also: Sequence[str] = ()) -> pd.DataFrame:
    """Return per `by` the configuration whose seed-median `rank` is best, with medians of `also`.

    Columns: by, the configuration's columns, rank, also, n_seeds. NaN ranks last.
    """
    by = list(by)
    keys = by + config_columns(trials, by)
    g = trials.groupby(keys, dropna=False)
    agg = g[[rank, *also]].median()
    agg["n_seeds"] = g.size()
    agg = agg.reset_index()
    if agg.empty:
        return agg
    order = (agg[rank] if mode == "min" else -agg[rank]).fillna(np.inf)
    winners = order.groupby([agg[b] for b in by], dropna=False).idxmin()
    return agg.loc[winners.values].sort_values(by).reset_index(drop=True)


def usable(trials: pd.DataFrame) -> pd.DataFrame:
    """Return the trials that carry a result."""
    return trials[trials["status"].isin(USABLE)]


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
    out = best_config(usable(trials), rank, by, also=rest)
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


# ---------------------------------------------------------------- LR: grid, best LR per batch size, scaling law
def lr_grid(trials: pd.DataFrame, metric: str = "best/val_loss") -> pd.DataFrame:
    """Return per (batch size, effective LR) the seed-median `metric` of its best configuration.

    A diverged trial counts as +inf (so a seed median survives one diverged seed of three);
    `diverged` is the fraction of trials at that LR that diverged; `pruned`, the fraction of the
    best configuration's seeds that ASHA stopped, whose value is then one of a shorter budget.
    """
    df = trials[trials["status"].isin((*USABLE, "diverged"))].copy()
    df["value"] = np.where(df["status"] == "diverged", np.inf, df[metric] if metric in df else np.nan)
    out = best_config(df, "value", ["batch_size", LR])
    div = df.assign(d=df["status"] == "diverged").groupby(["batch_size", LR])["d"].mean()
    keys = ["batch_size", *config_columns(df, ["batch_size"])]
    pruned = df.assign(pruned=df["status"] == "pruned").groupby(keys, dropna=False)["pruned"].mean()
    out = out.merge(pruned.reset_index(), on=keys, how="left") if not out.empty else out.assign(pruned=[])
    return out.merge(div.rename("diverged").reset_index(), on=["batch_size", LR])


def best_lr(grid: pd.DataFrame) -> pd.DataFrame:
    """Return per batch size the grid's best LR, its parabola-refined value, the best value and `edge`.

    `edge` is "low" or "high" when the best LR is the smallest or largest tried: the optimum
    then lies outside the grid and the refined LR is only a bound; "only" when one LR was tried,
    which chose nothing, so there is no refined LR (NaN). The parabola goes only through
    values of the full budget: a neighbour ASHA pruned has a higher loss than it would have had,
    which would push the vertex away from it, so the best LR is then the grid's own.
    """
    rows = []
    for b, g in grid.sort_values(LR).groupby("batch_size"):
        lrs, v = g[LR].to_numpy(float), g["value"].to_numpy(float)
        row = {"batch_size": b, "lr_grid": np.nan, "lr_refined": np.nan, "best": np.nan, "edge": "", "n_lrs": len(g)}
        if np.isfinite(v).any():
            i = int(np.argmin(np.where(np.isfinite(v), v, np.inf)))
            edge = "low" if i == 0 else "high" if i == len(v) - 1 else ""
            full = g["pruned"].to_numpy(float) == 0 if "pruned" in g else np.ones(len(v), bool)
            refined = fits.refine_best_lr(lrs, np.where(full, v, np.inf)) if full[i] else lrs[i]
            row.update(lr_grid=lrs[i], lr_refined=refined if len(v) > 1 else np.nan, best=v[i],
                       edge="only" if len(v) == 1 else edge)
        rows.append(row)
    return pd.DataFrame(rows, columns=["batch_size", "lr_grid", "lr_refined", "best", "edge", "n_lrs"])


def lr_law(best: pd.DataFrame) -> tuple[Optional[fits.LrExponentFit], list[str]]:
    """Return the fit of best LR against batch size (None with a note when it cannot be made), over the batch
    sizes that chose among 2 or more LRs: one LR tried is the grid's choice (the rule's, say), not a best."""
    ok = best[np.isfinite(best["lr_refined"]) & (best["n_lrs"] >= 2)]
    one = best.loc[best["n_lrs"] < 2, "batch_size"].tolist()
    untuned = f" (one LR tried at B={_list(one)}: sweep lr_multiplier there)" if one else ""
    if ok["batch_size"].nunique() < 3:
        return None, [f"LR scaling law: not fitted: needs a best LR chosen among 2 or more LRs at 3 or more "
                      f"batch sizes, found {ok['batch_size'].nunique()}{untuned}"]
    fit = fits.fit_lr_exponent(ok["batch_size"], ok["lr_refined"])
    notes = [f"LR scaling law: fitted without the batch sizes that tried one LR{untuned}"] if one else []
    edges = ok[ok["edge"] != ""]
    if len(edges):
        at = ", ".join(f"B={b} ({e})" for b, e in zip(edges["batch_size"], edges["edge"]))
        notes.append(f"the best LR is at the edge of the LR grid for {at}: widen lr_multiplier there; alpha is biased")
    return fit, notes


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
    schedules it (train.eval_steps): after max(1, round(eval_every x n_train / B)) steps, n_train =
    samples / epoch."""
    if not {"eval_every", "samples", "epoch"} <= set(trials):
        return pd.Series(np.nan, index=trials.index)
    n_train = trials["samples"] / trials["epoch"].where(trials["epoch"] > 0)
    return np.maximum(1, np.round(trials["eval_every"] * n_train / trials["batch_size"])) * trials["batch_size"]


def first_evaluation_note(trials: pd.DataFrame, costs: pd.DataFrame) -> list[str]:
    """Return a note naming the batch sizes whose cost to target is their first evaluation's: the
    target was met somewhere before it, so the cost is only an upper bound, which the fit takes as exact."""
    first = trials.assign(_first=first_evaluation(trials)).groupby("batch_size")["_first"].max()
    early = costs[costs["reached"] & (costs["samples_to_target"] <= costs["batch_size"].map(first))]
    if early.empty:
        return []
    return [f"B={_list(early['batch_size'])} reached the target at the first evaluation: the cost to target there is "
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


# ---------------------------------------------------------------- scaling rules, divergence, memory, noise scale
def rule_gaps(trials: pd.DataFrame, metric: str = "best/val_loss") -> pd.DataFrame:
    """Return per (batch size, warmup, rule) the loss at lr_multiplier 1 and its gap to the tuned optimum.

    The tuned optimum is the best over every LR tried at that batch size and warmup (a trial
    that set `lr=` counts there, as an LR tried, but never as its rule's); a batch size and
    warmup that tried one LR has no row. Empty when no lr_multiplier=1 trial follows its rule.
    """
    cols = ["batch_size", "warmup.epochs", "scaling.rule", "loss_at_1", "tuned", "tuned_lr", "gap"]
    if not {"lr_multiplier", "scaling.rule"} <= set(trials):
        return pd.DataFrame(columns=cols)
    df = trials[trials["status"].isin((*USABLE, "diverged"))].copy()
    df["value"] = np.where(df["status"] == "diverged", np.inf, df[metric])
    keys = ["batch_size", *(["warmup.epochs"] if "warmup.epochs" in df else [])]
    at1 = df[np.isclose(df["lr_multiplier"], 1.0) & ~rule_bypassed(df)]  # lr= trained no rule's LR
    if at1.empty:
        return pd.DataFrame(columns=cols)
    base = best_config(at1, "value", [*keys, "scaling.rule"]).rename(columns={"value": "loss_at_1"})
    tuned = best_config(df, "value", keys).rename(columns={"value": "tuned", LR: "tuned_lr"})
    tried = df.groupby(keys, dropna=False)[LR].nunique().rename("n_lrs").reset_index()
    out = base[[*keys, "scaling.rule", "loss_at_1"]].merge(tuned[[*keys, "tuned", "tuned_lr"]], on=keys).merge(tried, on=keys)
    out = out[out["n_lrs"] >= 2]  # one LR tried tunes nothing: its gap would be 0 by construction
    out["gap"] = out["loss_at_1"] - out["tuned"]
    return out.reindex(columns=[c for c in cols if c in out]).sort_values(["scaling.rule", *keys[::-1]])


def rules_note(trials: pd.DataFrame) -> list[str]:
    """Return why the rule comparison is empty: no rule trial at lr_multiplier=1, or one LR tried per batch size."""
    df, n = trials[trials["status"].isin((*USABLE, "diverged"))], int(rule_bypassed(trials).sum())
    if (np.isclose(df["lr_multiplier"], 1.0) & ~rule_bypassed(df)).any():
        one = df.groupby("batch_size")[LR].nunique()
        return [f"rule comparison: needs 2 or more LRs tried at a batch size to tune its rule's LR against, found one "
                f"at B={_list(one[one < 2].index)}: sweep lr_multiplier"]
    if not n:
        return ["rule comparison: needs lr_multiplier=1 in the grid"]
    return [f"rule comparison: no trial trained its scaling.rule's LR at lr_multiplier=1 ({n} of {len(trials)} set "
            "lr=, lr.rule_bypassed=True, which bypasses the rule); sweep lr_multiplier, with 1 in it, instead of lr"]


def divergence_map(trials: pd.DataFrame) -> pd.DataFrame:
    """Return per batch size the smallest diverging effective LR and the largest stable one below it."""
    rows = []
    for b, g in trials.groupby("batch_size"):
        div = g.loc[g["status"] == "diverged", LR]
        ceiling = div.min() if len(div) else np.nan
        ok = g.loc[g["status"].isin(USABLE), LR]
        stable = ok[ok < ceiling] if len(div) else ok
        rows.append({"batch_size": b, "diverges_at": ceiling, "stable_up_to": stable.max() if len(stable) else np.nan,
                     "n_diverged": len(div), "n_trials": len(g)})
    return pd.DataFrame(rows, columns=["batch_size", "diverges_at", "stable_up_to", "n_diverged", "n_trials"])


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


def b_simple(trials: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Return per batch size the median last gns/b_simple over trials with a result, or None if never logged."""
    if "gns/b_simple" not in trials or not np.isfinite(trials["gns/b_simple"]).any():
        return None
    u = usable(trials).dropna(subset=["gns/b_simple"])
    return u.groupby("batch_size")["gns/b_simple"].median().rename("b_simple").reset_index()


# ---------------------------------------------------------------- everything a report shows
@dataclass
class Analysis:
    """Every table and fit of one study's report, and notes on what is missing or was assumed."""

    target: Target
    trials: pd.DataFrame  # with cost columns
    costs: pd.DataFrame  # per batch size
    grid: pd.DataFrame  # per (batch size, LR)
    best: pd.DataFrame  # per batch size: best LR
    lr_fit: Optional[fits.LrExponentFit]
    crit_fit: Optional[fits.CriticalBatchFit]
    rules: pd.DataFrame
    divergence: pd.DataFrame
    memory: pd.DataFrame
    recommendation: Optional[pd.Series]
    verdict: str
    noise: Optional[pd.DataFrame]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Return the per-batch-size table: best LR and loss, costs to target, memory, throughput, regime."""
        mem = self.memory.groupby("batch_size").agg(peak_mb=("peak_mb", "max"), samples_per_s=("samples_per_s", "median"))
        out = (self.best.merge(self.costs[["batch_size", *COSTS]], on="batch_size", how="left")
               .merge(mem.reset_index(), on="batch_size", how="left")
               .merge(self.divergence[["batch_size", "diverges_at"]], on="batch_size", how="left"))
        out["regime"] = [regime(b, self.crit_fit) for b in out["batch_size"]]
        if self.noise is not None:
            out = out.merge(self.noise, on="batch_size", how="left")
        return out


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
                     f"the configured target {configured} was reached at B={_list(hit)} but not at B={_list(missed)}")
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


def analyze(study: Study, memory_budget_mb: Optional[float] = None, target: Optional[float | Target] = None) -> Analysis:
    """Return the study's Analysis; raise StudyError when no trial has a result."""
    trials = study.trials
    if usable(trials).empty:
        counts = ", ".join(f"{s} {n}" for s, n in trials["status"].value_counts().items()) or "no trials"
        raise StudyError(f"study '{study.name}' has no completed trials ({counts}): nothing to report")
    notes = [] if study.status != "running" else ["the study is still running: this covers the trials finished so far"]
    if trials["batch_size"].nunique() == 1:
        notes.append(f"one batch size ({trials['batch_size'].iloc[0]}): no scaling law and no critical batch size; "
                     "sweep batch_size over 3 or more values")
    twins = int((trials["same_as"] != "").sum()) if "same_as" in trials else 0
    if twins:
        notes.append(f"{twins} of {len(trials)} trial runs are twins: each trains what another trial trains (e.g. "
                     "a flat warmup below ref_batch_size) and was recorded from it (tag trial.same_as), so its "
                     "row repeats its source's")
    tgt, costed, more = targeted(study, target)
    notes += more
    costs = cost_to_target(costed)
    grid = lr_grid(costed)
    best = best_lr(grid)
    lr_fit, more = lr_law(best) if trials["batch_size"].nunique() > 1 else (None, [])
    notes += more
    crit_fit, more = critical_batch(costs) if trials["batch_size"].nunique() > 1 else (None, [])
    notes += more + first_evaluation_note(costed, costs)
    rules = rule_gaps(costed)
    if rules.empty and "lr_multiplier" in trials:
        notes += rules_note(trials)
    memory = memory_table(costed)
    rec, verdict = recommend(memory, memory_budget_mb, config_columns(costed, []))
    return Analysis(tgt, costed, costs, grid, best, lr_fit, crit_fit, rules, divergence_map(costed), memory,
                    rec, verdict, b_simple(costed), notes)


def _list(values: Sequence) -> str:
    return ",".join(f"{v:g}" for v in values)
