"""A study's MLflow record read back as tidy frames: one typed row per trial, histories on demand.

`load_study` finds the study run (by id, name or "latest") and its trial runs; `Study.trials`
has every resolved config key as a typed column, the status, and each metric's last value;
`Study.history(metric)` fetches a metric's history per trial once, when first asked for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from scaling.config import redact_url
from scaling.grid import bare_key

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # scaling/conf/config.yaml mlflow.tracking_uri (a test checks they agree)
LR = "lr.effective"


class StudyError(Exception):
    """A study that cannot be found, or holds nothing to analyse; the message is one line."""


@dataclass(frozen=True)
class Target:
    """A target value of a metric; `source` says where it came from (configured, common, given)."""

    metric: str
    value: float
    mode: str = "min"
    source: str = "configured"

    def reached(self, values):
        """Return whether each value meets the target."""
        return np.asarray(values) >= self.value if self.mode == "max" else np.asarray(values) <= self.value

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.mode == 'max' else '<='} {self.value:.4g}"


@dataclass
class Study:
    """One study: its run's name, params and tags, and `trials`, one typed row per trial."""

    run_id: str
    name: str
    trials: pd.DataFrame
    axes: list[str] = field(default_factory=list)
    status: str = "completed"
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    tracking_uri: str = ""
    fetch: Optional[Callable[[str, str], list]] = field(default=None, repr=False)  # (trial, metric) -> [(step, value)]
    _cache: dict = field(default_factory=dict, repr=False)

    def history(self, metric: str, trials: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """Return a long frame (trial, samples, value) of `metric`, fetched once per trial."""
        rows = []
        for t in self.trials["trial"] if trials is None else trials:
            if (metric, t) not in self._cache:
                self._cache[(metric, t)] = self.fetch(t, metric) if self.fetch else []
            rows += [(t, int(s), float(v)) for s, v in self._cache[(metric, t)]]
        return pd.DataFrame(rows, columns=["trial", "samples", "value"])

    @property
    def configured_target(self) -> Optional[Target]:
        """Return the target the trials were configured with (the most common one), or None."""
        cols = ["target.metric", "target.value", "target.mode"]
        if not set(cols) <= set(self.trials) or self.trials.empty:
            return None
        metric, value, mode = self.trials[cols].astype(str).value_counts().index[0]
        return Target(metric, float(value), mode, "configured")


# ---------------------------------------------------------------- loading
def typed(column: pd.Series) -> pd.Series:
    """Return a column of MLflow param strings as int, float, bool or str ("null" -> missing)."""
    raw = column.where(column.notna() & (column != "null"), None)
    vals = raw.dropna().astype(str)
    if vals.empty:
        return raw
    if vals.isin(["True", "False"]).all():
        return raw.map({"True": True, "False": False, None: None})
    num = pd.to_numeric(vals, errors="coerce")
    if num.isna().any():
        return raw
    if len(vals) == len(raw) and vals.str.fullmatch(r"-?\d+").all():
        return pd.to_numeric(raw).astype("int64")
    return pd.to_numeric(raw, errors="coerce").astype(float)


# run_name, not name: the config's own `name` (the preset's) is a param column of the same frame
HEAD = ("trial", "run_name", "status", "reason", "same_as")  # same_as: a twin's source (scaling.twins), else ""


def trials_frame(records: Sequence[dict], axes: Sequence[str] = ()) -> pd.DataFrame:
    """Return one row per trial from dicts with trial, run_name, status, reason, same_as, params and metrics.

    Params become typed columns under their config keys; metrics keep their names (their last
    logged value), except one named like a param (`lr`), which becomes `lr/last`.
    """
    head = pd.DataFrame([{k: r.get(k, "") for k in HEAD} for r in records], columns=list(HEAD))
    params = pd.DataFrame([r.get("params", {}) for r in records], index=head.index).apply(typed)
    metrics = pd.DataFrame([r.get("metrics", {}) for r in records], index=head.index, dtype=float)
    metrics = metrics.rename(columns={c: f"{c}/last" for c in metrics if c in params})
    df = pd.concat([head, params, metrics], axis=1)
    if "micro_batch_size" in df and "batch_size" in df:
        df["micro_batch_size"] = _micro_batch(df)
    df = df.sort_values([c for c in ("batch_size", LR, "seed") if c in df]).reset_index(drop=True)
    df.attrs["axes"] = list(dict.fromkeys(c for a in axes for c in _axis_of(df, a)))
    return df


def _micro_batch(df: pd.DataFrame) -> pd.Series:
    """Return each trial's micro-batch as it ran: its split's (`derived.split`, workers x micro x accumulation),
    which holds what parallel.max_micro_batch and parallel.workers chose; where none is recorded,
    micro_batch_size, null meaning the whole batch. The setting alone put a max_micro_batch=16 trial at
    batch 64 (split 1x16x4) in the memory table's row for micro-batch 64, beside the 1x64x1 trials."""
    setting = pd.to_numeric(df["micro_batch_size"]).fillna(df["batch_size"])
    if "derived.split" not in df:
        return setting.astype("int64")
    ran = pd.to_numeric(df["derived.split"].astype("string").str.split("x").str[1], errors="coerce")
    return ran.fillna(setting).astype("int64")


def _axis_of(df: pd.DataFrame, axis: str) -> list[str]:
    """Return the columns of one swept axis: its own, or for a config group (`model`) the columns that tell its
    options apart: `model.name` where it does, else every `model.*` column that varies (a user's two configs
    of one architecture, `name: mlp` in both, differ only in their width or depth)."""
    if axis in df:
        return [axis]
    varying = [c for c in df if c.startswith(f"{axis}.") and df[c].nunique(dropna=False) > 1]
    name = f"{axis}.name"
    if name in df and (not varying or df.groupby(varying, dropna=False).ngroups == df[name].nunique(dropna=False)):
        return [name]
    return varying


def rule_bypassed(trials: pd.DataFrame) -> pd.Series:
    """Return whether each trial set `lr=` (param lr.rule_bypassed), so that its LR is no scaling rule's."""
    flag = trials["lr.rule_bypassed"].eq(True) if "lr.rule_bypassed" in trials else False
    return (trials["lr"].notna() if "lr" in trials else pd.Series(False, index=trials.index)) | flag


def _axis_keys(grid_json: Optional[str]) -> list[str]:
    """Return the config keys of the study's swept axes (a group's as its name: `model`)."""
    if not grid_json:
        return []
    grid = json.loads(grid_json)
    return [bare_key(key) for key in [*grid.get("axes", {}), *grid.get("sampled", {})]]


def load_study(study: Optional[str] = None, tracking_uri: Optional[str] = None,
               experiment: str = "scaling") -> Study:
    """Return the study named by run id, run name, or None / "latest" (the newest), from MLflow.

    Raises StudyError (one line) when the store, the experiment or the study does not exist.
    """
    from scaling.store import make_client, sqlite_path
    from scaling.tracking import KIND_TAG, STATUS_TAG, STUDY_TAG
    from scaling.twins import SAME_AS_TAG

    uri = tracking_uri or DEFAULT_TRACKING_URI
    db = sqlite_path(uri)
    if db is not None and (not db.is_file() or db.stat().st_size == 0):  # reading must not create a store
        raise StudyError(f"no MLflow store at {uri} (pass --tracking-uri, or run from the study's folder)")
    client = make_client(uri)
    run = _find_study_run(client, study, redact_url(uri), experiment, KIND_TAG)  # the uri is for messages
    runs, token = [], None
    while True:  # every trial of the study, all pages
        page = client.search_runs([run.info.experiment_id], f"tags.{STUDY_TAG} = '{run.info.run_id}'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    records = [{"trial": r.info.run_id, "run_name": r.info.run_name, "status": r.data.tags.get(STATUS_TAG, "running"),
                "reason": r.data.tags.get("trial.reason", ""), "same_as": r.data.tags.get(SAME_AS_TAG, ""),
                "params": r.data.params, "metrics": r.data.metrics}
               for r in runs]
    trials = trials_frame(records, _axis_keys(run.data.params.get("grid")))

    def fetch(trial: str, metric: str) -> list:
        return [(m.step, m.value) for m in client.get_metric_history(trial, metric)]

    return Study(run.info.run_id, run.info.run_name, trials, trials.attrs["axes"],
                 run.data.tags.get(STATUS_TAG, "unknown"), dict(run.data.params), dict(run.data.tags), uri, fetch)


def _find_study_run(client, study: Optional[str], uri: str, experiment: str, kind_tag: str):
    exp = client.get_experiment_by_name(experiment)
    if study and len(study) == 32 and all(c in "0123456789abcdef" for c in study):
        try:
            run = client.get_run(study)
        except Exception:  # noqa: BLE001 - MLflow raises its own error for an unknown id
            run = None
        if run is not None:
            if run.data.tags.get(kind_tag) != "study":
                raise StudyError(f"run {study} is not a study run ({kind_tag}={run.data.tags.get(kind_tag)})")
            return run
    if exp is None:
        raise StudyError(f"no experiment '{experiment}' at {uri}")
    found = client.search_runs([exp.experiment_id], f"tags.{kind_tag} = 'study'", max_results=200,
                               order_by=["attributes.start_time DESC"])
    if study in (None, "", "latest"):
        if not found:
            raise StudyError(f"no study in experiment '{experiment}' at {uri}")
        return found[0]
    named = [r for r in found if r.info.run_name == study]
    if not named:
        elsewhere = _experiments_holding(client, study, kind_tag)
        if elsewhere:
            hint = " or ".join(f"--experiment '{e}'" for e in elsewhere[:3])
            raise StudyError(f"no study '{study}' in experiment '{experiment}' at {uri}; it is in {hint}")
        names = ", ".join(dict.fromkeys(r.info.run_name for r in found[:5])) or "none"
        raise StudyError(f"no study '{study}' in experiment '{experiment}' at {uri} (latest studies: {names})")
    return named[0]


def _experiments_holding(client, study: str, kind_tag: str) -> list[str]:
    """Return the names of the experiments that hold a study run named `study` (a study recorded under
    mlflow.experiment=... is not in the report's default experiment)."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(experiments), f"tags.{kind_tag} = 'study'", max_results=1000) if experiments else []
    return list(dict.fromkeys(experiments[r.info.experiment_id] for r in runs if r.info.run_name == study))
