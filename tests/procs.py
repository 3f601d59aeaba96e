"""Process helpers for tests that start real servers and studies: loopback only, stopped by id."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


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


