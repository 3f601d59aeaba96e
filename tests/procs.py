"""Process helpers for tests that start real servers and studies: loopback only, stopped by id."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def two_second_trials(overrides) -> list[str]:
    """`overrides` with trials of ~2 s each on 2 cores (width 1024, 16,000 training samples), for a test
    that signals or kills something mid-study. At the tiny sizes a study of 4-6 trials one at a time
    ended all of them within one second of its progress clock, so an action taken once "done 1/6" or
    "done 2/6" was seen could come after the study's end (CI, 2026-11-25: exit 0 where 130 was due)."""
    kept = [o for o in overrides if not o.startswith(("data.n_samples=", "model.width="))]
    return [*kept, "data.n_samples=20000", "model.width=1024"]


def make_dry_run(*args: str) -> str:
    """Return what `make -n ARGS` in the checkout would run, one command a line (continuations joined),
    without make's own "Nothing to be done" lines. Not as make's child: a suite run by `make test` must
    not pass its MAKEFLAGS on."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=Path(__file__).resolve().parent.parent,
                         env=env, capture_output=True, text=True, check=True).stdout
    lines = dry.replace("\\\n", " ").splitlines()
    return "\n".join(line for line in lines if line.strip() and not line.startswith("make: "))


def start_group(args, cwd, log: Path, env=None) -> subprocess.Popen:
    """Start `args` in a new process group (so it and its children can be stopped together)."""
    out = open(log, "w")
    return subprocess.Popen([str(a) for a in args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def stop_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Stop the process group that `proc` leads and every process under it: only what this test started.

    A local study's Ray runs in a session of its own (scaling.local_ray._own_session), out of the group's
    reach. Its GCS and raylet die with the driver (PR_SET_PDEATHSIG), but the raylet's agents and trial
    workers outlived a SIGKILL of the group by up to ~60 s, so they are stopped here too, by pid."""
    import psutil

    try:
        under = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        under = []
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for child in under:
        with contextlib.suppress(psutil.Error):
            child.send_signal(sig)
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




def wait_until_recorded(proc: subprocess.Popen, db: Path, query: str, timeout: float = 120) -> None:
    """Wait until `query` (a count) is non-zero in the SQLite store `db`, or `proc` has ended, or `timeout`
    has passed. The store is read read-only, as it is being written."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            # closed before the caller acts, so no reader holds a lock while the command writes its
            # last records (the "database is locked" seen in CI on 2026-11-25 was the signal landing
            # inside MLflow's own write: scaling/store_client.py)
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
                if con.execute(query).fetchall()[0][0]:
                    return
        except sqlite3.Error:
            continue  # not created yet


def interrupt_once_recorded(proc: subprocess.Popen, db: Path, query: str, timeout: float = 120,
                            sig: int = signal.SIGINT) -> tuple[str, str]:
    """Send `proc` one `sig` once `query` (a count) is non-zero in the SQLite store `db`, or once it has ended
    or `timeout` has passed; return its (stdout, stderr)."""
    try:
        wait_until_recorded(proc, db, query, timeout)
        proc.send_signal(sig)
        return proc.communicate(timeout=60)
    finally:
        proc.kill()


class Terminal:
    """`args` run with a pseudo-terminal as their controlling terminal (`setsid --ctty`), its output
    drained; `hang_up()` closes it, as a lost SSH connection or a closed window does: the kernel sends
    SIGHUP to the session's leader, the command."""

    def __init__(self, args, cwd, env=None):
        import threading

        master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(["setsid", "--ctty", *map(str, args)], cwd=cwd, stdin=slave, stdout=slave,
                                         stderr=slave, env={**os.environ, **(env or {})})
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.output, self._closing = bytearray(), threading.Event()
        self._reader = threading.Thread(target=self._drain, args=(master,), daemon=True)
        self._reader.start()

    def _drain(self, master: int) -> None:
        """Read what the command writes (a full terminal would block it) until hang_up() or its end."""
        import select

        try:
            while not self._closing.is_set():
                if select.select([master], [], [], 0.1)[0]:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO: every end of the terminal's other side is closed
                        break
                    if not chunk:
                        break
                    self.output += chunk
        finally:
            os.close(master)

    def hang_up(self) -> None:
        self._closing.set()
        self._reader.join(timeout=10)

    def text(self) -> str:
        return self.output.decode(errors="replace")
