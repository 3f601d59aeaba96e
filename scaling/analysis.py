"""What a study shows: tables and fits over its trials (loaded by `load_study`, see study_data).

Here the LR side (the best LR per batch size and its scaling law, the rules against the tuned LR,
where LRs diverge) and `analyze`, which gathers every table and fit of a report; what reaching the
target costs (cost to target, critical batch size, memory) is in scaling.costs, and the shared
reduction both use (median over seeds, best configuration per batch size) in scaling.reduction.
Every function is small and pure over DataFrames, so it unit-tests without MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from scaling import fits
from scaling.costs import (cost_to_target, critical_batch, first_evaluation_note, memory_table,  # noqa: F401
                           recommend, regime, targeted)
from scaling.reduction import COSTS, USABLE, batch_list, best_config, config_columns, usable  # noqa: F401
from scaling.study_data import (DEFAULT_TRACKING_URI, LR, Study, StudyError, Target, load_study,  # noqa: F401
                                rule_bypassed, trials_frame, typed)


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
    untuned = f" (one LR tried at B={batch_list(one)}: sweep lr_multiplier there)" if one else ""
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


# ---------------------------------------------------------------- scaling rules, divergence, noise scale
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
                f"at B={batch_list(one[one < 2].index)}: sweep lr_multiplier"]
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
