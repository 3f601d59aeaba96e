"""Ctrl-C: at start-up it ends the command at once (one line, exit 130, nothing raised mid-import);
later, records that must land whole (a new store, a study's last writes) take it when they are done.

Python turns SIGINT into a KeyboardInterrupt raised at whatever bytecode the main thread runs next.
While a study starts that is mostly importlib's (torch, Ray, MLflow and Hydra: seconds on 2 cores),
and there the exception does harm. Raised in the weakref callback that drops a module lock, it comes
after the callback has taken the global import lock and before its `try` releases it, and a callback's
exception is only printed ("Exception ignored in: <function _get_module_lock.<locals>.cb>"): the
Ctrl-C is lost, the lock stays held, and Ray's start thread, importing, waits on it for ever; so did the
driver (CI, 2026-11-24: no line and no exit 120 s after a Ctrl-C at 1.5 s). Raised elsewhere
mid-import it can leave that module's own lock held (local_ray.abandon_ray).

So from its entry point until a command has something to record, SIGINT runs `end_now`, which
raises nothing: it writes the line, runs the clean-ups registered (`on_end`: the stop of the Ray
being started), each in a thread given a bound, and ends the process with os._exit. Nothing on disk
needs keeping then. `deferred()` blocks (a new SQLite store, a dataset's cache file, at any time the
study's last records) take a first Ctrl-C at their end, as a KeyboardInterrupt raised in plain code,
their clean-up intact. `hold()` defers every later Ctrl-C (a study creating its MLflow run; a second
still ends it at once), and `started()` hands SIGINT back to Python (and Tune) where the command can
record an interruption, raising the one deferred; `python_handles()` takes it back from Tune after a
run.

SIGTERM (`kill`, `scancel`, a batch system's time limit or preemption) is a Ctrl-C: `guard` makes it run
whatever SIGINT's handler is at that moment, so at start-up it ends the command in one line, and once a
study runs Ray Tune stops the trials and the study is recorded `interrupted`, to be resumed. Before, a
study printed Ray's stack dump and exited (SystemExit) with its and its trials' MLflow runs RUNNING.
So is SIGHUP, the hang-up of the terminal a command runs in (an SSH connection lost, a window closed),
which ended the process at once with its runs RUNNING; the lines it still prints go to /dev/null, as the
terminal is gone. A command started under `nohup` ignores SIGHUP, and still does.

Every call of a tracking client (store.make_client) runs in `whole()`: a Ctrl-C waits for the call,
then goes to the handler in place, so no KeyboardInterrupt lands inside MLflow's SQLite transaction.

Only the stdlib is imported here: the entry point (scaling.console) installs it first, for every
console script (`scaling-report` until it writes, `scaling-lr-find` until its first record).
"""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import stat
import sys
import threading
import traceback
from typing import Callable, Iterator, Sequence

STUDY_NOT_STARTED = "interrupted before the study started: nothing was recorded"
RUN_NOT_STARTED = "interrupted before the run started: nothing was recorded"
REPORT_NOT_WRITTEN = "interrupted before the report was written: nothing was written"
LR_FIND_NOT_STARTED = "interrupted before any range test was recorded: nothing was recorded"
_state: dict = {"guarding": False, "holding": False, "pending": False, "message": "", "on_end": [], "signal": None}
CLEANUP_WAIT_S = 15.0


def guard(message: str) -> None:
    """From now on (main thread only) a Ctrl-C ends the process with `error: {message}` and exit 130."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state.update(guarding=True, holding=False, pending=False, message=message, on_end=[])
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:  # SIG_IGN: started under nohup, and kept so
        signal.signal(signal.SIGHUP, on_hangup)


def cause() -> str:
    """What interrupted the command, for a run's `trial.reason`: "SIGTERM" or "SIGHUP" once one came,
    else "Ctrl-C"."""
    return _state["signal"] or "Ctrl-C"


def on_sigterm(signum: int, frame) -> None:
    """SIGTERM (or SIGHUP) does what a Ctrl-C would do now (see the module's docstring)."""
    _state["signal"] = signal.Signals(signum).name
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:  # nothing takes a Ctrl-C: the signal ends the process, as by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # SIG_IGN: the process is ending already (end_now)


def on_hangup(signum: int, frame) -> None:
    """The terminal hung up: what is still printed goes to /dev/null (a write to the terminal fails
    with EIO once it is gone), then the hang-up is a Ctrl-C, as SIGTERM is. A character device stands
    for the terminal: isatty fails on one that hung up, and a pipe or file is kept."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
    finally:
        os.close(null)
    on_sigterm(signum, frame)


def on_end(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` (in a thread, bounded) before a Ctrl-C at start-up ends the process."""
    if _state["guarding"]:
        _state["on_end"].append(cleanup)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Take a first Ctrl-C that comes during the block at its end, as a KeyboardInterrupt raised in plain
    code: for writes that must finish, or clean up after themselves, to leave nothing half-written. A
    second ends the block at once, as a guarded start-up's Ctrl-C or a KeyboardInterrupt. Main thread
    only (elsewhere the block runs as it is: Python delivers SIGINT to the main thread)."""
    with _deferring(redeliver=False):
        yield


@contextlib.contextmanager
def whole() -> Iterator[None]:
    """Hand a first Ctrl-C that comes during the block, at its end, to the handler the block found: a
    KeyboardInterrupt where Python's is in place, Ray Tune's stop in a study, a held or one-line end
    while one starts. For a tracking store's calls: a KeyboardInterrupt raised inside MLflow's SQLite
    transaction left its lock held, and the run's last write, its interrupted status, failed with
    "database is locked" (4 of 70 single runs interrupted under load). Inside a deferring block (this
    one's or `deferred()`'s), nothing more: the outer block takes the Ctrl-C."""
    with _deferring(redeliver=True):
        yield


@contextlib.contextmanager
def _deferring(redeliver: bool) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread() or \
            getattr(signal.getsignal(signal.SIGINT), "defers", False):
        yield  # off the main thread no signal arrives; in an outer block, that block defers it
        return
    came: list = []

    def later(signum: int, frame) -> None:
        if not came:
            came.append(frame)
            return
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C: what the caller's handler does
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    later.defers = True  # type: ignore[attr-defined]
    previous = signal.signal(signal.SIGINT, later)
    try:
        yield
    finally:  # a Ctrl-C that came is taken even where the block failed
        signal.signal(signal.SIGINT, previous)
        if came and redeliver and callable(previous):
            previous(signal.SIGINT, came[0])
        elif came and (not redeliver or previous != signal.SIG_IGN):
            raise KeyboardInterrupt


def hold() -> None:
    """Defer every Ctrl-C from now until `started()` (the study run is being created)."""
    if _state["guarding"]:
        _state["holding"] = True


def started() -> None:
    """Give SIGINT back to Python's KeyboardInterrupt; raise the Ctrl-C deferred, if one came."""
    if not _state["guarding"]:
        return
    pending = _state["pending"]
    _state.update(guarding=False, holding=False, pending=False, on_end=[])
    python_handles()
    if pending:
        raise KeyboardInterrupt


def python_handles() -> None:
    """Make a Ctrl-C Python's KeyboardInterrupt again (from the main thread; elsewhere nothing changes).

    Ray Tune sets its own handler for a run and puts the old one back only when a Ctrl-C stops the
    run: after a run that ended by itself, a Ctrl-C only set a flag that nothing read any more."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def end_now(message: str = "", cleanups: Sequence[Callable[[], None]] = ()) -> None:
    """End the process as a Ctrl-C at start-up does: `error: {message}` (the guard's by default), the
    clean-ups run (`cleanups`, else those given to on_end; each in a thread, given CLEANUP_WAIT_S),
    exit 130 without Python's exit handlers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C changes nothing now
    message = message or _state["message"] or "interrupted"
    os.write(2, f"error: {message}\n".encode())  # not print: the main thread may be mid-write to stderr
    for cleanup in cleanups or _state["on_end"]:
        # A thread of _thread's: threading.Thread takes threading's own lock, which the interrupted
        # main thread may hold. Each is bounded: an import lock left held (see above) can block it for
        # ever, and what Ray started dies with the process anyway (local_ray.start_ray).
        done = _thread.allocate_lock()
        done.acquire()
        _thread.start_new_thread(_run_then_release, (cleanup, done))
        done.acquire(timeout=CLEANUP_WAIT_S)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(130)


def _on_sigint(signum: int, frame) -> None:
    if _state["holding"] and not _state["pending"]:  # the first Ctrl-C waits; a second ends it at once
        _state["pending"] = True
        return
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # where it was, for whoever debugs the start-up
        os.write(2, "".join(["Ctrl-C at start-up, in:\n", *traceback.format_stack(frame)]).encode())
    end_now("interrupted again: ended at once" if _state["pending"] else "")


def _run_then_release(cleanup: Callable[[], None], done) -> None:
    try:
        cleanup()
    except BaseException:  # noqa: BLE001 - the process ends next either way
        pass
    finally:
        done.release()
