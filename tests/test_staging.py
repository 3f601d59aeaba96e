"""Staging folders (scaling.staging): what a process killed mid-copy leaves in the temp folder is found
and removed by the next one, and nothing of a process that still runs is touched. Real processes, a
real MLflow store."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest


@pytest.fixture
def temp(tmp_path, monkeypatch):
    """Make tmp_path this process's temp folder (tempfile.gettempdir(), which the staging uses)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_checkpoint_staging_removes_the_folders_of_ended_processes_only(temp):
    """A worker ended while tune.report waited (a pause, a stop at a rung, a kill) never removed its
    checkpoint folder: /tmp kept a state.pt per report. Staging is one folder per process, and the
    next checkpoint on the node removes those of processes that have ended, not of running ones."""
    from scaling.staging import CHECKPOINT_PREFIX, checkpoint_staging, remove_stale_staging

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (int(ended.stdout), running.pid):
            (temp / f"{CHECKPOINT_PREFIX}{pid}").mkdir()
            (temp / f"{CHECKPOINT_PREFIX}{pid}" / "state.pt").write_bytes(b"x")
        (temp / "unrelated-123").mkdir()
        mine = checkpoint_staging()
        assert mine == str(temp / f"{CHECKPOINT_PREFIX}{os.getpid()}") and os.listdir(mine) == []
        assert sorted(p.name for p in temp.iterdir()) == sorted(
            [f"{CHECKPOINT_PREFIX}{running.pid}", f"{CHECKPOINT_PREFIX}{os.getpid()}", "unrelated-123"])
        running.kill()
        running.wait()
        remove_stale_staging()  # what the study's driver runs once Ray has stopped
        assert sorted(p.name for p in temp.iterdir()) == sorted([f"{CHECKPOINT_PREFIX}{os.getpid()}", "unrelated-123"])
    finally:
        running.kill()


def test_a_study_end_waits_for_its_ending_workers_and_takes_a_zombie_for_ended(temp):
    """Ray stops a study's workers after its driver has asked it to: at the study's end they were often
    still running (state R) when the driver removed the ended ones' folders, and theirs stayed. The
    driver now waits (bounded) for the workers that reported to it; a zombie (ended, not yet reaped by
    its parent) counts as ended, and a process that goes on past the bound keeps its folder."""
    from scaling.staging import CHECKPOINT_PREFIX, remove_stale_staging

    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for until the end: a zombie
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another study's
    try:
        for pid in (ending.pid, zombie.pid, other.pid):
            (temp / f"{CHECKPOINT_PREFIX}{pid}").mkdir()
        deadline = time.monotonic() + 10
        while open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never ended"
            time.sleep(0.01)
        t0 = time.monotonic()
        remove_stale_staging(wait_for=[ending.pid, zombie.pid])
        assert 0.2 < time.monotonic() - t0 < 3.0  # it waited for the ending one, not for the zombie's bound
        assert [p.name for p in temp.iterdir()] == [f"{CHECKPOINT_PREFIX}{other.pid}"]
        t0 = time.monotonic()
        remove_stale_staging(wait_for=[other.pid], wait_s=0.3)  # past the bound: it goes on, the folder stays
        assert time.monotonic() - t0 < 1.0
        assert [p.name for p in temp.iterdir()] == [f"{CHECKPOINT_PREFIX}{other.pid}"]
    finally:
        for proc in (ending, zombie, other):
            proc.kill()
            proc.wait()


def test_log_text_records_the_artifact_and_leaves_no_folder(temp):
    """The text MLflow's log_text would record, through a folder of this process's, removed after."""
    from mlflow.tracking import MlflowClient

    from scaling.staging import log_text

    client = MlflowClient(f"sqlite:///{temp}/mlflow.db")
    run = client.create_run(client.create_experiment("staging", artifact_location=str(temp / "art")))
    log_text(client, run.info.run_id, "a: 1\nb: two\n", "config.yaml")
    log_text(client, run.info.run_id, "{}", "report/x.json")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "report"}
    assert (temp / "art" / run.info.run_id / "artifacts" / "config.yaml").read_text() == "a: 1\nb: two\n"
    assert (temp / "art" / run.info.run_id / "artifacts" / "report" / "x.json").read_text() == "{}"
    assert sorted(p.name for p in temp.iterdir()) == ["art", "mlflow.db"]


def test_a_process_killed_mid_artifact_leaves_a_folder_the_next_one_removes(temp):
    """MLflow's log_text stages in a TemporaryDirectory: a process killed before the copy returned left
    tmpXXXX/config.yaml in /tmp for ever (one after most kill tests). A staging folder carries its pid."""
    from scaling.staging import artifact_folder

    child = subprocess.Popen([sys.executable, "-c", "import time\nfrom scaling.staging import artifact_folder\n"
                              "with artifact_folder() as f:\n    print(f, flush=True)\n    time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(temp)})
    try:
        left = child.stdout.readline().strip()
    finally:
        child.kill()
        child.wait()
    assert os.path.dirname(left) == str(temp) and os.path.isdir(left)  # the kill left it
    with artifact_folder() as mine:
        assert os.path.isdir(mine) and not os.path.exists(left)
    assert list(temp.iterdir()) == []


def test_a_folder_an_earlier_process_of_the_same_pid_left_does_not_stop_an_artifact(temp):
    """The sweep spares this process's own pid, so a folder that an ended process of the same pid (pids
    are reused) left under that name stays: a new artifact gets a folder of its own beside it."""
    from scaling.staging import ARTIFACT_PREFIX, artifact_folder

    (temp / f"{ARTIFACT_PREFIX}{os.getpid()}-0").mkdir()
    with artifact_folder() as folder:
        assert os.path.isdir(folder) and os.path.basename(folder).startswith(f"{ARTIFACT_PREFIX}{os.getpid()}-")
        assert os.listdir(folder) == []
    assert [p.name for p in temp.iterdir()] == [f"{ARTIFACT_PREFIX}{os.getpid()}-0"]
