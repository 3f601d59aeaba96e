"""An existing Ray cluster, for real: a head and a worker node (two raylets on this host).

The study joins it with `hydra.sweeper.ray.address=<head>:<port>`, its trials run on both
nodes (each trial run is tagged with `ray.node_id`), and the driver alone writes MLflow. The
cluster uses Ray's token authentication and listens on 127.0.0.1 only; it is stopped by the
process groups the test started (never `ray stop`, which would stop every Ray on the machine).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from cluster_procs import BIN, RayCluster, is_loopback, listeners
from records import study_records

pytestmark = pytest.mark.slow

TINY = ["epochs=1", "eval_every=0.25", "data.n_samples=3000", "model.width=32", "threads=1",
        "hydra.sweeper.asha.grace_period=0.25", "hydra.sweeper.report=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start_head(num_cpus=1, resources={"head_node": 1})
        c.add_node(num_cpus=1, resources={"worker_node": 1})
        c.wait_for_nodes(2)
        yield c
    finally:
        c.stop()
    left = subprocess.run(["pgrep", "-f", "|".join(c.temp_dirs)], capture_output=True, text=True).stdout.split()
    assert not left, f"Ray processes outlived the test's cluster: {left}"


def test_cluster_has_two_nodes_on_loopback(cluster):
    tags = sorted(next(k for k in n["resources"] if k.endswith("_node")) for n in cluster.nodes_info)
    assert tags == ["head_node", "worker_node"]
    addresses = listeners(cluster.pids())
    assert addresses and all(is_loopback(a) for a in addresses), addresses


def test_study_on_an_existing_cluster_runs_trials_on_every_node(cluster, tmp_path):
    db = tmp_path / "mlflow.db"
    args = [str(BIN / "scaling-train"), "-m", "batch_size=32,64,128,256", *TINY,
            f"hydra.sweeper.ray.address={cluster.address}", "hydra.sweeper.resources.cpu=1",
            "hydra.sweeper.study_name=two-nodes", f"mlflow.tracking_uri=sqlite:///{db}"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **cluster.env, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client, studies, trials = study_records(f"sqlite:///{db}")
    assert len(studies) == 1 and len(trials) == 4
    assert {t.data.tags["trial.status"] for t in trials} == {"completed"}
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {studies[0].info.run_id}
    used = {t.data.tags["ray.node_id"] for t in trials}
    assert used == {n["id"] for n in cluster.nodes_info}, "the trials did not spread over both nodes"
    # the driver only disconnected: the cluster it joined is still up for the next study
    assert len(cluster.alive_nodes()) == 2


def _dashboard_missing() -> str:
    try:
        from ray._private.utils import get_dashboard_dependency_error

        return str(get_dashboard_dependency_error() or "")
    except ImportError as exc:
        return str(exc)


@pytest.mark.skipif(bool(_dashboard_missing()), reason="`ray job submit` needs the jobs API: pip install 'ray[default]'")
def test_ray_job_submit_runs_a_study_from_the_working_dir(tmp_path):
    """The documented `ray job submit --working-dir . -- scaling-study ...`, against a jobs API on 127.0.0.1."""
    from mlflow.tracking import MlflowClient

    from cluster_procs import ROOT_DIR, ray_cli

    c = RayCluster(tmp_path)
    try:
        c.start_head(num_cpus=2, dashboard=True)
        addresses = listeners(c.pids())
        assert all(is_loopback(a) for a in addresses), addresses
        db = tmp_path / "mlflow.db"
        proc = subprocess.run(
            ray_cli("job", "submit", f"--address={c.dashboard_url}", "--working-dir", ROOT_DIR, "--",
                    "scaling-study", "batch_size=32,64", "lr_multiplier=1", "scaling.rule=linear", "warmup.epochs=0",
                    *TINY, "hydra.sweeper.ray.address=auto", f"hydra.sweeper.storage_path={tmp_path / 'studies'}",
                    f"mlflow.tracking_uri=sqlite:///{db}"),
            cwd=ROOT_DIR, capture_output=True, text=True, timeout=300, env={**os.environ, **c.env})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        runs = client.search_runs([client.get_experiment_by_name("scaling").experiment_id], max_results=100)
        assert sorted(r.data.tags.get("scaling.kind") for r in runs) == ["study", "trial", "trial"]
    finally:
        c.stop()
