"""Shared fixtures: real Hydra composition, a throwaway data cache, tiny trials, a tmp MLflow store."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Set before anything composes a config: `data.cache_dir` defaults to ${oc.env:SCALING_CACHE,...},
# so generated datasets land here instead of ~/.cache, and subprocesses inherit it.
_CACHE = tempfile.mkdtemp(prefix="scaling-test-cache-")
os.environ["SCALING_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Every Ray a test starts (in this process or in a `scaling-study` it runs) keeps its session folder,
# logs and all, under $RAY_TMPDIR/ray, /tmp/ray by default: ~200 folders and ~70 MB a suite run, kept
# for ever. Here they go to a folder of this process's, removed at its exit, after Ray's own exit
# handler (registered later, run first) has stopped the Ray it started. Short, for Ray's unix sockets.
_RAY_TMP = tempfile.mkdtemp(prefix="scaling-ray-")
os.environ["RAY_TMPDIR"] = _RAY_TMP
atexit.register(shutil.rmtree, _RAY_TMP, ignore_errors=True)

# A trial that runs in well under a second on one loaded CPU core: 1600 training samples,
# 50 steps of 32, two evaluations, a 32-wide MLP, no MLflow.
TINY = ("data.n_samples=2000", "epochs=1", "eval_every=0.5", "batch_size=32", "model.width=32",
        "mlflow.enabled=false", "threads=1")


def _compose(*overrides: str):
    from scaling.cli import compose

    return compose(list(overrides))


@pytest.fixture(scope="session")
def compose_cfg():
    """Return compose_cfg(*overrides) -> the config Hydra composes for a single run."""
    return _compose


@pytest.fixture
def tiny() -> list[str]:
    """Return the overrides of a sub-second trial (a fresh list: tests may append)."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_data():
    """Return the tiny trials' MNIST-1D split, generated once per session (pass it as `dataset=`)."""
    from scaling.data import load_dataset

    return load_dataset(_compose(*TINY).data)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """Return a fresh MLflow sqlite store in the test's tmp dir."""
    return f"sqlite:///{tmp_path}/mlflow.db"
