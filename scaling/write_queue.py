"""Writes to a store that may be slow or down: queued in order, coalesced, applied off the caller's
thread, and journaled to a file while they cannot be applied. The mechanics under
`scaling.study_record.StudyRecorder`, which says what each write is.

Writes are applied by a background thread, in order within each index (a trial). Tune calls the
study's callback on its controller thread, and a trial's `report` waits until that thread has taken
the result: a synchronous SQLite write (5-25 ms of CPU here) there stalls every running trial.

The thread also coalesces: an index's writes are held until one of them is "finished", or for at most
`hold_s`, and then applied together by the subclass's `_apply`. MLflow's cost is mostly per request,
and the driver shares the CPUs with the trials: for the 32 trials of benchmark row 4, one write per
trial instead of one per evaluation and tag takes 1.9 s of the driver's CPU instead of 4.5 s.

If the store goes away, nothing is lost: intents that cannot be applied stay queued (and journaled
to `journal`, replaced atomically) and are retried every `retry_s` while training goes on; a run that
ends or is killed while the store is still down keeps the journal, and the next one replays it first
(`use_journal`). `_apply` must therefore be idempotent: after a failure an index's whole list is
applied again.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from scaling.config import redact_url


class QueuedWriter:
    """The queue, its writer thread and its journal; subclasses implement `_apply` (and `_absorb`)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.pending: deque = deque()  # writes not yet applied to the store, in order
        self.journal: Optional[Path] = None
        self.retry_s = 5.0
        # An index's writes wait at most this long to be sent together: the MLflow UI (and whoever polls
        # it) still sees a trial's progress live, and a busy writer coalesces more by itself.
        self.hold_s = 0.5
        self._retry_at = 0.0
        self._journal_at = 0.0
        self._warned = False
        self._apply_lock = threading.Lock()  # one applier at a time: the writer thread or a drain
        self._wake = threading.Event()
        self._writer: Optional[threading.Thread] = None

    def __getstate__(self) -> dict:  # Ray may pickle callbacks holding a writer: no lock, event or thread
        state = dict(self.__dict__)
        state.update(_apply_lock=None, _wake=None, _writer=None, pending=deque(self.pending))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._apply_lock, self._wake = threading.Lock(), threading.Event()

    def _apply(self, index: int, intents: list[dict]) -> None:
        """Write one index's queued intents, in order; raise when the store fails (they stay queued)."""
        raise NotImplementedError

    def _absorb(self, intent: dict) -> None:
        """Take in what a journaled intent of an earlier run says, before it is applied (bookkeeping)."""

    def _submit(self, intent: dict) -> None:
        """Queue one intent (a dict with "op" and "index"), stamped with the time it happened."""
        if not self.enabled:
            return
        intent["ts"] = int(time.time() * 1000)  # when it happened, whenever it is written
        self.pending.append(intent)  # deque.append is atomic; only the applier pops
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
            self._writer.start()
        if intent["op"] == "finished":  # its trial's writes are due now; others wait for hold_s
            self._wake.set()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(timeout=self.hold_s / 2)
            self._wake.clear()
            with self._apply_lock:
                self._flush(0.0, due_only=True)

    def flush(self, wait_s: float = 0.0) -> bool:
        """Apply every queued write; return True when none is left (retrying up to wait_s)."""
        with self._apply_lock:
            return self._flush(wait_s)

    def _flush(self, wait_s: float, due_only: bool = False) -> bool:
        """Apply queued writes, trial by trial (only the trials whose writes are due, if due_only)."""
        deadline = time.time() + wait_s
        while self.pending:
            if time.time() < self._retry_at:  # the store failed a moment ago
                if time.time() >= deadline:
                    self._save_journal(every_s=1.0)  # what arrived since the failure, for a kill to keep
                    return False
                time.sleep(max(0.0, min(self._retry_at, deadline) - time.time()))
                continue
            taken = [self.pending.popleft() for _ in range(len(self.pending))]
            by_trial: dict[int, list[dict]] = {}
            for intent in taken:
                by_trial.setdefault(intent["index"], []).append(intent)
            now_ms = time.time() * 1000
            done: set[int] = set()
            failed = False
            for i, intents in by_trial.items():
                if due_only and not any(x["op"] == "finished" or x.get("ts", 0) <= now_ms - self.hold_s * 1000
                                        for x in intents):
                    continue
                try:
                    self._apply(i, intents)
                except Exception as exc:  # noqa: BLE001 - the store is down: keep the intents, train on
                    self._failed(exc)
                    failed = True
                    break
                done.add(i)
            # what was not applied goes back in front, in order (new intents only ever join at the end)
            self.pending.extendleft(reversed([x for x in taken if x["index"] not in done]))
            if failed:
                self._save_journal()
                if time.time() >= deadline:
                    return False
                continue
            if done and self._warned:
                print("MLflow reachable again: queued results recorded", file=sys.stderr, flush=True)
                self._warned = False
            if due_only:
                break
        if self.journal is not None and self.journal.exists():
            self._save_journal()  # only a failure writes one; held writes are not journaled
        return not self.pending

    def _failed(self, exc: Exception) -> None:
        self._retry_at = time.time() + self.retry_s
        if not self._warned:
            print(f"warning: MLflow unreachable ({redact_url(str(exc).splitlines()[0])[:200]}); "
                  f"queueing results and retrying every {self.retry_s:g}s", file=sys.stderr, flush=True)
            self._warned = True

    def drain(self) -> None:
        """Apply every queued write, waiting for the store (SCALING_MLFLOW_WAIT_S); else raise RuntimeError."""
        if not self.flush(wait_s=float(os.environ.get("SCALING_MLFLOW_WAIT_S", "120"))):
            raise RuntimeError(f"MLflow still unreachable: {len(self.pending)} results kept in {self.journal}; "
                               "run the same command with hydra.sweeper.resume=true to record them")

    def use_journal(self, path: Path) -> None:
        """Journal unapplied writes to `path`, and queue any left there by an earlier run."""
        self.journal = path
        if not path.exists():
            return
        intents = [json.loads(line) for line in path.read_text().splitlines() if line]
        for intent in intents:  # what the earlier run already knew, before the store hears of it
            self._absorb(intent)
        self.pending.extendleft(reversed(intents))

    def _save_journal(self, every_s: float = 0.0) -> None:
        if self.journal is None or time.time() < self._journal_at + every_s:
            return
        self._journal_at = time.time()
        if not self.pending:
            self.journal.unlink(missing_ok=True)
            return
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(i) + "\n" for i in list(self.pending)))
        os.replace(tmp, self.journal)  # atomic: a kill leaves the old or the new journal, never half
