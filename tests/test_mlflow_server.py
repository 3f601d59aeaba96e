"""The team setup: one shared `mlflow server`, studies record to it over HTTP, reports read from it.

The server runs on 127.0.0.1 with a SQLite backend and proxied artifacts (clients upload
through the server, so they need no access to its disk); the test starts it and stops it by
its process group.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from cluster_procs import BIN, MlflowServer, is_loopback, listeners
from records import study_records

pytestmark = pytest.mark.slow

TINY = ["epochs=1", "eval_every=0.25", "data.n_samples=3000", "model.width=32", "threads=1",
        "hydra.sweeper.asha.grace_period=0.25"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield s
    finally:
        s.stop()


def run(args, cwd, timeout=300):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_server_listens_on_loopback_only(server):
    addresses = listeners(server.pids())
    assert addresses and all(is_loopback(a) for a in addresses), addresses


def test_study_records_to_the_server_and_the_report_reads_from_it(server, tmp_path):
    proc = run([BIN / "scaling-train", "-m", "batch_size=32,64", "lr_multiplier=0.5,2", *TINY,
                "hydra.sweeper.report=false", "hydra.sweeper.study_name=shared-server",
                f"mlflow.tracking_uri={server.url}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists(), "recorded locally, not on the server"
    assert "View run" not in proc.stdout + proc.stderr, proc.stdout[-3000:]  # no two lines (and a GET) per run end

    client, studies, trials = study_records(server.url)
    assert len(studies) == 1 and len(trials) == 4
    assert studies[0].data.tags["trial.status"] == "completed"
    # the server serves the UI: the study ends with the run's page there, not an `mlflow ui` to start
    page = f"{server.url}/#/experiments/{studies[0].info.experiment_id}/runs/{studies[0].info.run_id}"
    assert proc.stdout.strip().splitlines()[-1] == f"the study run in the MLflow UI: {page}"
    assert "mlflow ui" not in proc.stdout
    with urllib.request.urlopen(page.split("#")[0], timeout=30) as r:  # the page the fragment routes in
        assert r.status == 200 and b"<html" in r.read(4096).lower()

    # a teammate's machine: only the URL, nothing local
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report = run([BIN / "scaling-report", "shared-server", "--tracking-uri", server.url], elsewhere)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert "Study shared-server" in report.stdout
    names = [a.path for a in client.list_artifacts(studies[0].info.run_id, "report")]
    assert any(n.endswith(".png") for n in names), names
    # uploaded through the server: the files are in the server's artifact store
    assert list(server.artifacts.rglob("report/*.png"))


def test_basic_auth_server_refuses_anonymous_writes_and_records_with_credentials(tmp_path):
    """The documented shared deployment: `mlflow server --app-name basic-auth`, users by name and password."""
    import urllib.error
    import urllib.request

    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (the dev extra)")
    password = "test-" + os.urandom(8).hex()
    server = MlflowServer(tmp_path, extra_args=("--app-name", "basic-auth"),
                          env={"MLFLOW_AUTH_ADMIN_PASSWORD": password,
                               "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()})
    try:
        request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        proc = subprocess.run([str(BIN / "scaling-train"), "epochs=0.5", "eval_every=0.5", "data.n_samples=2000",
                               "model.width=32", "threads=1", f"mlflow.tracking_uri={server.url}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **creds, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"at {server.url}" in proc.stdout

        # the credentials in the URI instead: they work, and the password is nowhere the tool writes
        secret = server.url.replace("http://", f"http://admin:{password}@")
        study = run([BIN / "scaling-train", "-m", "batch_size=32,64", *TINY, "hydra.sweeper.report=false",
                     f"mlflow.tracking_uri={secret}"], tmp_path)
        assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
        hidden = server.url.replace("http://", "http://admin:***@")
        assert f"the study run in the MLflow UI: {hidden}/#/experiments/" in study.stdout
        client, studies, runs = study_records(secret)  # runs: the trial above as well
        assert len(studies) == 1
        trials = [t for t in runs if t.data.tags.get("mlflow.parentRunId") == studies[0].info.run_id]
        assert len(trials) == 2
        for t in trials:
            assert t.data.params["mlflow.tracking_uri"] == hidden
            config = client.download_artifacts(t.info.run_id, "config.yaml", str(tmp_path / t.info.run_id[:8]))
            assert hidden in Path(config).read_text()
        for r in [*studies, *runs]:
            recorded = json.dumps([r.data.params, r.data.tags])
            assert password not in recorded, recorded[:3000]
        assert password not in study.stdout + study.stderr
    finally:
        server.stop()
