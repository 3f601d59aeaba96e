"""The MLflow schema: study runs, trial runs, their names, params, tags and metric keys.

Every write goes through `MlflowClient` with explicit run ids (no fluent global run), so the
same reporter records a trial in-process (`scaling-train`) or from the study driver, which is
the single writer for all trials of a study. MLflow's step axis is **samples seen**.
"""
from __future__ import annotations

import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from scaling.config import ConfigError, redact_url
from scaling.recorded import config_yaml, recorded_config, trial_params, trial_run_name
from scaling.reporters import Reporter
from scaling.staging import log_text
from scaling.store import make_client, sqlite_path

STATUS_TAG = "trial.status"
RUN_STATUS = {"error": "FAILED", "interrupted": "KILLED"}  # MLflow's run status per trial.status; else FINISHED
KIND_TAG = "scaling.kind"  # "trial" | "study" | "lr_find"
STUDY_TAG = "scaling.study_id"
PACKAGES = ("scaling", "torch", "ray", "mlflow", "hydra-core", "numpy")
BATCH_LIMITS = {"params": 100, "tags": 100, "metrics": 1000, "all": 1000}  # MLflow's, per log_batch request
MAX_VALUE = 6000  # characters of a param value (MLflow's limit; tags allow 8000)


# `mlflow ui` (an alias of `mlflow server`) starts, by default, 4 web workers, MLflow 3's job runner
# and 7 huey consumers for its GenAI jobs, which a scaling study never submits: on 2 cores ~50 s of
# CPU and ~3 GB of memory before it answers. One worker without jobs: ~8 s and ~0.5 GB (README).
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
UI_ARGV = ["mlflow", "ui", "--workers", "1", "--host", "127.0.0.1"]
# as a shell line, on port 5000 without its store: what `make ui` runs, and the study prints
UI_COMMAND = " ".join([*(f"{k}={v}" for k, v in UI_ENV.items()), *UI_ARGV, "--port", "5000"])


def ui_command(backend_store_uri: str, port: int = 5000) -> tuple[dict[str, str], list[str]]:
    """Return the UI's command over `backend_store_uri` on `port`, as (its environment, its argv)."""
    return dict(UI_ENV), [*UI_ARGV, "--port", str(port), "--backend-store-uri", backend_store_uri]


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """Return the line that takes a user to run `run_id` in the MLflow UI.

    A tracking server serves the UI itself, so its URL to the run; a local store needs `mlflow ui`
    over it first (UI_COMMAND), then the same page on 127.0.0.1:5000.
    """
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    uri = redact_url(uri)
    if uri.startswith(("http:", "https:")):
        return f"the study run in the MLflow UI: {uri.rstrip('/')}/{page}"
    return f"{UI_COMMAND} --backend-store-uri {uri}   # then open http://127.0.0.1:5000/{page}"


def provenance_tags() -> dict[str, str]:
    """Return tags naming what produced a number: git revision and package versions."""
    tags = {}
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        if rev:
            tags["git.revision"] = rev
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def check_experiment(uri: str, name: str) -> None:
    """Raise ConfigError if experiment `name` is deleted in the store at `uri` (creating nothing).

    A single run checks this before Hydra makes its output folder; a study's recorder, before Tune
    starts (get_experiment_id).
    """
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return  # a new store holds no experiment yet
    get_experiment_id(make_client(uri), name, create=False)


def check_store_exists(uri: str, run_id: str) -> None:
    """Refuse to resume study run `run_id` from a SQLite store that no longer exists (opening it would
    create an empty one)."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise ConfigError("hydra.sweeper.resume", True, f"the study's MLflow run {run_id} cannot be read: "
                          f"mlflow.tracking_uri={redact_url(uri)} names no existing store (moved, deleted, or not "
                          "the one the study was recorded in); resume with mlflow.tracking_uri where the study was "
                          "recorded, or start it afresh without resume")


def check_study_run(client, uri: str, experiment: str, run_id: str) -> None:
    """Refuse to resume study run `run_id` where the store lacks it, it was deleted, or it lies in another
    experiment than `experiment` (its trials would be searched for there, none found, all run again)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError("hydra.sweeper.resume", True, f"the study's MLflow run {run_id} is not in "
                          f"{redact_url(uri)}; resume with mlflow.tracking_uri where the study was recorded, "
                          "or start it afresh without resume") from None
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError("hydra.sweeper.resume", True, f"the study's MLflow run {run_id} was deleted; restore it "
                          "(mlflow runs restore --run-id) or start the study afresh without resume")
    recorded_in = client.get_experiment(run.info.experiment_id).name
    if recorded_in != experiment:
        raise ConfigError("mlflow.experiment", experiment, f"the study's MLflow run {run_id} is in experiment "
                          f"{recorded_in!r}: resume with mlflow.experiment={recorded_in}")


def get_experiment_id(client, name: str, create: bool = True) -> Optional[str]:
    """Return the experiment id for `name`, creating it (race-safe) when missing, or None when
    missing and not `create`; raise ConfigError if it is deleted."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":  # MLflow refuses runs in it, with a long error
        raise ConfigError("mlflow.experiment", name, "is deleted in the tracking store (restore it with "
                                                     "`mlflow experiments restore`, or name another)")
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment in the store at `uri` keeps its artifacts: for a SQLite store,
    `mlruns/<experiment>` beside the database file; None (the store's own default) otherwise.

    MLflow's default for a database store is `./mlruns` under the working directory of whichever
    process created the store, so a study launched from another folder (a SLURM job, a notebook, a
    test) would scatter its config artifacts away from its `mlflow.db`. Beside the database they
    travel with it, and `mlflow ui` in that folder finds them either way (each experiment records
    its own location). The name is kept to file-safe characters.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return str(db.resolve().parent / "mlruns" / safe)


def log_batch(client, run_id: str, params: Optional[dict[str, str]] = None, metrics: Sequence[Any] = (),
              tags: Optional[dict[str, str]] = None) -> None:
    """Log params, then metrics, then tags, in as few requests as MLflow's limits allow.

    Everything lands in that order (a request applies its params, metrics and tags in turn), so the
    last param (`LAST_TRIAL_PARAM`) and the last tag land only once all before them have.
    """
    from mlflow.entities import Param, RunTag

    entities = ([Param(k, str(v)[:MAX_VALUE]) for k, v in (params or {}).items()] + list(metrics)
                + [RunTag(k, str(v)[:MAX_VALUE]) for k, v in (tags or {}).items()])
    request: dict[str, list] = {"params": [], "metrics": [], "tags": []}
    for e in entities:
        kind = "params" if isinstance(e, Param) else "tags" if isinstance(e, RunTag) else "metrics"
        if len(request[kind]) == BATCH_LIMITS[kind] or sum(map(len, request.values())) == BATCH_LIMITS["all"]:
            client.log_batch(run_id, **request, synchronous=True)
            request = {"params": [], "metrics": [], "tags": []}
        request[kind].append(e)
    if any(request.values()):
        client.log_batch(run_id, **request, synchronous=True)


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log params in order, in batches of 100 (MLflow's per-request limit)."""
    log_batch(client, run_id, params=params)


def metric_list(metrics: dict[str, Any], step: int, timestamp_ms: int) -> list[Any]:
    """Return one evaluation's numeric values as MLflow Metrics at `step` (samples seen)."""
    from mlflow.entities import Metric

    return [Metric(k, float(v), timestamp_ms, int(step)) for k, v in metrics.items() if _is_number(v)]


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: Optional[int] = None) -> None:
    """Log one evaluation's metrics in one request, at MLflow step = samples seen."""
    log_batch(client, run_id, metrics=metric_list(metrics, step, timestamp_ms or int(time.time() * 1000)))


def _is_number(v: Any) -> bool:  # NaN and inf included: MLflow stores them
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def not_logged(summary: dict[str, float], last: dict[str, float], step: int) -> dict[str, float]:
    """Return the summary values a trial's last evaluation did not already log at `step`: logging them
    again doubled the points of best/val_loss, samples, ... at a trial's last step."""
    if int(last.get("samples", -1)) != step:
        return dict(summary)
    return {k: v for k, v in summary.items() if last.get(k) != v}


class MlflowTrialReporter(Reporter):
    """Records one trial as one MLflow run (optionally nested under a study run)."""

    def __init__(self, cfg: Any, *, client=None, parent_run_id: Optional[str] = None,
                 run_id: Optional[str] = None, extra_tags: Optional[dict[str, str]] = None,
                 ref_lr: Optional[float] = None, on_run: Optional[Callable[[str], None]] = None) -> None:
        self.cfg, self.ref_lr = cfg, ref_lr
        self.client = client or make_client(cfg.mlflow.tracking_uri)
        self.parent_run_id, self.run_id = parent_run_id, run_id
        self.extra_tags = extra_tags or {}
        self.on_run = on_run
        self.last: dict[str, float] = {}  # the last evaluation logged

    def start(self, info: dict[str, Any]) -> None:
        if self.run_id is not None:  # resumed: the run already holds params and earlier metrics
            self.client.set_terminated(self.run_id, status="RUNNING")
            return
        tags = {KIND_TAG: "trial", STATUS_TAG: "running", **provenance_tags(), **self.extra_tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        exp_id = get_experiment_id(self.client, self.cfg.mlflow.experiment)
        run = self.client.create_run(exp_id, run_name=trial_run_name(self.cfg), tags=tags)
        self.run_id = run.info.run_id
        if self.on_run:
            self.on_run(self.run_id)
        params = trial_params(self.cfg, self.ref_lr)
        params.update({f"derived.{k}": str(v) for k, v in info.items()})
        log_params(self.client, self.run_id, params)
        log_text(self.client, self.run_id, config_yaml(recorded_config(self.cfg)), "config.yaml")

    def report(self, metrics: dict[str, float], checkpoint=None) -> None:
        log_metrics(self.client, self.run_id, metrics, step=int(metrics["samples"]))
        self.last = dict(metrics)

    def finish(self, result: Any) -> None:
        if self.run_id is None:  # failed before start(): still leave a record of what happened
            self.start({})
        summary = {k: v for k, v in (result.target or {}).items()}
        summary["mem/peak_mb"] = result.metrics.get("mem/peak_mb", result.info.get("mem/peak_mb", 0.0))
        if result.best_val_loss != float("inf"):
            summary["best/val_loss"] = result.best_val_loss
        step = int(result.metrics.get("samples", self.last.get("samples", 0)))  # an oom has no metrics: its last step
        log_metrics(self.client, self.run_id, not_logged(summary, self.last, step), step=step)
        self.client.set_tag(self.run_id, STATUS_TAG, result.status)
        if result.reason:
            self.client.set_tag(self.run_id, "trial.reason", result.reason[:5000])
        self.client.set_terminated(self.run_id, status=RUN_STATUS.get(result.status, "FINISHED"))


def runs_of(client, experiment: str, filter_string: str = "") -> Iterable[Any]:
    """Yield every run of `experiment` matching `filter_string` (all pages)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return
