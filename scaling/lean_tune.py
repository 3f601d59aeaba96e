"""Where a study steps around costs of Ray Tune's own: each change keeps what Tune does, without the cost.

- Trial actors on a local head start as plain Ray workers (trial_actors_inherit_env): Tune gives its
  actors a runtime_env of env_vars, and a worker with any runtime_env boots through Ray's
  setup_worker.py, one more Python that imports Ray and then execs the worker.
- Tune's usage tag of a run's callbacks is counted by class name (count_callbacks_by_name), without
  importing MLflow, W&B, Comet and Aim.
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Iterator

# What Ray Tune sets in each trial actor's environment (ray/tune/execution/class_cache.py,
# DEFAULT_ENV_VARS; tests/test_local_ray.py checks it against this Ray's). A local head's workers inherit
# the environment the driver had at Ray's start, so init_ray sets these there first.
TUNE_ACTOR_ENV = {"PL_DISABLE_FORK": "1"}

_local_head: dict = {}  # the local head this process started last: its node id and what its workers inherit


@contextlib.contextmanager
def local_head_env() -> Iterator[None]:
    """Around this process's start of a local head: put TUNE_ACTOR_ENV in the environment its workers
    inherit (where not set), and once it has started, note it (its node id) and the values they inherit."""
    inherited = {key: os.environ.setdefault(key, value) for key, value in TUNE_ACTOR_ENV.items()}
    yield
    import ray

    _local_head.clear()
    _local_head.update(node_id=ray.get_runtime_context().get_node_id(), inherited=inherited)


@contextlib.contextmanager
def trial_actors_inherit_env() -> Iterator[None]:
    """For the Tune run in the block: Tune's trial actors on the local head this process started boot
    as plain Ray workers, with the same environment.

    Tune creates its actor class with runtime_env={"env_vars": DEFAULT_ENV_VARS + the driver's values of
    a few variables it propagates (AWS keys, Ray Train's settings)}, and a worker with a runtime_env starts
    as `python setup_worker.py`, which imports Ray and execs bash, which execs the worker: one more
    Python start per worker before its first trial (a scratch script: an actor ready 0.75 s after it
    was asked for, against 0.50 s with no runtime_env). A local head's workers inherit the
    environment the driver had at its start, which held TUNE_ACTOR_ENV (local_head_env): each of
    Tune's defaults that they inherit with the same value leaves the actors' env_vars for the block,
    which changes no trial's environment. With none left and nothing to propagate, the runtime_env is
    empty and Ray starts the actors without setup_worker.py. Elsewhere (a cluster joined, a Ray this
    process did not start, a default inherited with another value) Tune's env_vars stay whole.
    """
    import ray

    try:
        from ray.tune.execution import class_cache

        defaults = class_cache.DEFAULT_ENV_VARS
        ours = (bool(_local_head) and ray.is_initialized()
                and ray.get_runtime_context().get_node_id() == _local_head["node_id"])
    except (ImportError, AttributeError):  # a Ray without these internals (the project allows ray>=2.9)
        defaults, ours = {}, False
    inherited = _local_head.get("inherited", {}) if ours and isinstance(defaults, dict) else {}
    dropped = {key: value for key, value in defaults.items() if inherited.get(key) == value}
    for key in dropped:
        del defaults[key]
    try:
        yield
    finally:
        defaults.update(dropped)


# Ray Tune's own logger callbacks for other tools, known to its usage tags by class name
INTEGRATION_CALLBACKS = ("WandbLoggerCallback", "MLflowLoggerCallback", "CometLoggerCallback", "AimLoggerCallback")


def count_callbacks_by_name() -> None:
    """Let Ray Tune tag its callbacks' use without importing MLflow, W&B, Comet and Aim.

    `tune.run` tags which callbacks a run uses (`ray.air._internal.usage.tag_callbacks`, whether
    usage stats are on or off), and to learn four class names it imports Tune's integration
    modules, and with them MLflow itself wherever it is installed: ~0.95 s of CPU in the driver
    between `Tuner.fit` and the first trial of a study with `mlflow.enabled=false` (a recorded
    study has imported MLflow by then, while Ray started). This counts by the same names, so the
    tag is the same (tests/test_local_ray.py compares the two). A Ray without these internals (the
    project allows ray>=2.9) keeps its own count.
    """
    try:
        from ray.air._internal import usage
        from ray.tune import Callback
        from ray.tune.logger import LoggerCallback
        from ray.tune.utils.callback import DEFAULT_CALLBACK_CLASSES
    except ImportError:
        return
    if not callable(getattr(usage, "_count_callbacks", None)) or getattr(usage._count_callbacks, "by_name", False):
        return
    names = {*INTEGRATION_CALLBACKS, *(c.__name__ for c in DEFAULT_CALLBACK_CLASSES)}

    def _count_callbacks(callbacks):
        counts: dict[str, int] = collections.defaultdict(int)
        for callback in callbacks or []:
            if not isinstance(callback, Callback):  # Tune rejects it later
                continue
            name = type(callback).__name__
            counts[name if name in names else
                   "CustomLoggerCallback" if isinstance(callback, LoggerCallback) else "CustomCallback"] += 1
        return counts

    _count_callbacks.by_name = True
    usage._count_callbacks = _count_callbacks
