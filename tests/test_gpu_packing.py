"""Packing small trials on GPUs: the resource arithmetic, checked with Ray's fake GPUs on CPU.

`ray.num_gpus=1` makes the local Ray advertise one GPU that does not exist; Ray then hands out
fractions of it exactly as on a GPU box. The trials themselves still train on the CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def max_overlap(runs) -> int:
    """Return the largest number of trial runs that were running at the same moment."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs],
                    key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("gpu_share, most", [(0.5, 2), (1.0, 1)])
def test_fractional_gpus_bound_the_trials_that_run_together(tmp_path, gpu_share, most):
    proc = subprocess.run(
        [str(BIN / "scaling-train"), "-m", "lr_multiplier=0.5,1,2,4", "batch_size=32", "epochs=1", "eval_every=0.5",
         "data.n_samples=3000", "model.width=32", "hydra.sweeper.asha.enabled=false", "hydra.sweeper.report=false",
         "hydra.sweeper.ray.num_gpus=1", "hydra.sweeper.ray.num_cpus=4", "hydra.sweeper.resources.cpu=0.5",
         f"hydra.sweeper.resources.gpu={gpu_share}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("scaling").experiment_id])
            if r.data.tags.get("scaling.kind") == "trial"]
    assert len(runs) == 4 and all(r.data.tags["trial.status"] == "completed" for r in runs)
    assert all(r.data.tags["ray.gpu_ids"] == "0" for r in runs), "each trial got a share of the one GPU"
    assert max_overlap(runs) == most, f"expected {most} trials at once on one GPU at {gpu_share} each"
