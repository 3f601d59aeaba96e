"""Process helpers for tests that start real servers and studies: loopback only, stopped by id."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(args, cwd, log: Path, env=None) -> subprocess.Popen:
    """Start `args` in a new process group (so it and its children can be stopped together)."""
    out = open(log, "w")
    return subprocess.Popen([str(a) for a in args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def stop_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Stop the process group that `proc` leads: only what this test started."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until `text` appears in `log`; fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended before '{text}':\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for '{text}':\n{log.read_text()[-3000:]}")


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """Start `mlflow server` on 127.0.0.1:port with a SQLite store under `root`; wait until healthy."""
    proc = start_group([BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                        "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
                        "--port", str(port), "--workers", "1"], root, root / f"mlflow-{port}-{time.time():.0f}.log")
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise AssertionError("mlflow server exited at start")
    stop_group(proc)
    raise AssertionError("mlflow server did not become healthy")
