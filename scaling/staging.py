"""Temporary folders for files on their way to a study's storage, named by the process that made them,
so that what a killed process leaves behind is found and removed by the next one.

A file written to a TemporaryDirectory and then copied out is left in the temp folder for good when its
process dies before the copy returns: a trial worker ended while tune.report waits with its checkpoint
(ASHA pausing or stopping it at a rung, Ray's shutdown), or a driver killed while MLflow's `log_text`
copies an artifact (`MlflowClient._log_artifact_helper` writes there first). This machine's /tmp held
60 `tmp*/state.pt` folders after a day of test runs, and a `tmp*/config.yaml` after most kill tests.
Here every such folder is `<temp>/scaling-<kind>-<pid>[-<random>]`: `remove_stale_staging` removes those
whose pid has ended, at each checkpoint on the node and at a study's end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Iterator

CHECKPOINT_PREFIX = "scaling-ckpt-"
ARTIFACT_PREFIX = "scaling-art-"
PREFIXES = (CHECKPOINT_PREFIX, ARTIFACT_PREFIX)
STAGING_WAIT_S = 3.0  # how long a study's end waits for its workers to end before removing their folders


def checkpoint_staging() -> str:
    """Return this process's folder for a checkpoint on its way to the study's storage, empty, after
    removing those of processes that are gone. One folder per process bounds what a worker ended
    mid-report leaves (one checkpoint)."""
    remove_stale_staging()
    mine = os.path.join(tempfile.gettempdir(), f"{CHECKPOINT_PREFIX}{os.getpid()}")
    shutil.rmtree(mine, ignore_errors=True)
    os.makedirs(mine)
    return mine


@contextlib.contextmanager
def artifact_folder() -> Iterator[str]:
    """Yield a new, empty folder of this process's for files on their way to MLflow; removed after (and,
    before, those of processes that have ended: a single run or a range test is nobody's study)."""
    remove_stale_staging()
    folder = tempfile.mkdtemp(prefix=f"{ARTIFACT_PREFIX}{os.getpid()}-")  # unique: an ended process of this
    try:  # pid may have left one (the sweep above spares this pid's)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log_text(client: Any, run_id: str, text: str, artifact_file: str) -> None:
    """MlflowClient.log_text, staged in artifact_folder() (see the module's docstring)."""
    with artifact_folder() as folder:
        path = os.path.join(folder, os.path.basename(artifact_file))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        client.log_artifact(run_id, path, os.path.dirname(artifact_file) or None)


def remove_stale_staging(wait_for: Iterable[int] = (), wait_s: float = STAGING_WAIT_S) -> None:
    """Remove the staging folders of this node's processes that have ended, after waiting up to wait_s
    for the processes `wait_for` (a study's own workers, which Ray is ending) to end."""
    deadline = time.monotonic() + wait_s
    pending = {pid for pid in wait_for if pid != os.getpid()}
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if _alive(pid)}
        if pending:
            time.sleep(0.02)
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = _pid_of(name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _pid_of(name: str) -> int | None:
    """Return the pid a staging folder's name carries, None for any other name."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            pid = name[len(prefix):].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def _alive(pid: int) -> bool:
    """Return whether process pid runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # "pid (comm) S ...": the state follows the last ")"
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (macOS): as os.kill said
        return True
