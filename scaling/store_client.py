"""The MLflow client every command records with: each of its calls runs whole (interrupts.whole).

A Ctrl-C (or SIGTERM) raised as a KeyboardInterrupt inside a call could land inside MLflow's SQLite
transaction, after SQLAlchemy took the store's write lock and before anything released it: the
interrupted run's own last writes (`trial.status=interrupted`, KILLED) then failed with "database is
locked", and the run stayed RUNNING (4 of 70 single runs interrupted mid-evaluation with busy loops
beside them; 0 of 40 since). Each call now finishes first; the signal then goes to whatever handles
it. A call costs no more (log_batch 1.00× MLflow's own client, benchmarks/README.md). Imported by
store.make_client, once MLflow is wanted.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from scaling import interrupts


class WholeCallsClient(MlflowClient):
    """An MlflowClient whose public methods take a Ctrl-C only once they return (or raise)."""

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr
        return _whole(attr)


def _whole(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with interrupts.whole():
            return method(*args, **kwargs)

    return call
