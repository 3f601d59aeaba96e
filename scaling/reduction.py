"""The shared reduction of a study's trials (study_data.trials_frame) that analysis and costs build on.

Two conventions hold throughout: a configuration's value is the **median over seeds**, and a batch
size's value is that of its best configuration (the **min over the LR grid** and every other axis).
Trials that completed, stopped early or were pruned have results; a diverged trial counts as the
worst value (never best); oom and error trials carry no result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from scaling.study_data import LR

USABLE = ("completed", "early_stopped", "pruned")
COSTS = ("steps_to_target", "samples_to_target", "time_to_target_s")
SWEEPABLE = ("batch_size", "lr_multiplier", "lr", "scaling.rule", "warmup.epochs", "micro_batch_size",
             "precision", "optimizer.name", "schedule.name", "model.name", "model.width", "seed")


def config_columns(trials: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Return the columns that name one configuration besides `by`: the LR and the swept axes, not the seed."""
    axes = trials.attrs.get("axes") or [c for c in SWEEPABLE if c in trials and trials[c].nunique(dropna=False) > 1]
    return [c for c in dict.fromkeys([LR, *axes]) if c in trials and c not in by and c != "seed"]


def best_config(trials: pd.DataFrame, rank: str, by: Sequence[str] = ("batch_size",), mode: str = "min",
                also: Sequence[str] = (), tiebreak: Optional[str] = None) -> pd.DataFrame:
    """Return per `by` the configuration whose seed-median `rank` is best, with medians of `also`.

    Columns: by, the configuration's columns, rank, also, n_seeds. NaN ranks last. Configurations
    tied on `rank` go by the lower median `tiebreak` (one of `also`), else by the grid's order.
    """
    by = list(by)
    keys = by + config_columns(trials, by)
    g = trials.groupby(keys, dropna=False)
    agg = g[[rank, *also]].median()
    agg["n_seeds"] = g.size()
    agg = agg.reset_index()
    if agg.empty:
        return agg
    keyed = agg.assign(_order=(agg[rank] if mode == "min" else -agg[rank]).fillna(np.inf),
                       _tie=agg[tiebreak].fillna(np.inf) if tiebreak else 0.0)
    first = keyed.sort_values(["_order", "_tie"], kind="stable").groupby(by, dropna=False, sort=False).head(1)
    return first.drop(columns=["_order", "_tie"]).sort_values(by).reset_index(drop=True)


def usable(trials: pd.DataFrame) -> pd.DataFrame:
    """Return the trials that carry a result."""
    return trials[trials["status"].isin(USABLE)]


def batch_list(values: Sequence) -> str:
    """Return batch sizes (or any numbers) as `32,64,128`, for notes."""
    return ",".join(f"{v:g}" for v in values)
