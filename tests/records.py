"""A study read back from its real MLflow store, the way the tests check it."""
from __future__ import annotations

from pathlib import Path


def client_for(path: Path):
    """Return an MlflowClient on the SQLite store `path`/mlflow.db (what a study in `path` writes)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")


def study_records(tracking_uri: str, experiment: str = "scaling"):
    """Return (client, study runs, trial runs) of `experiment` in the store at `tracking_uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    kind = lambda k: [r for r in runs if r.data.tags.get("scaling.kind") == k]  # noqa: E731
    return client, kind("study"), kind("trial")


def evaluated_samples(batch_size: int, steps_per_epoch: float, total_steps: int, eval_every: float = 0.25) -> list[int]:
    """Return the samples seen at each evaluation a completed trial records (its metrics' step axis):
    the loop's schedule (scaling.train.eval_steps, checked on its own in test_train) at this batch size."""
    from scaling.train import eval_steps

    return sorted(s * batch_size for s in eval_steps(eval_every, steps_per_epoch, total_steps))
