"""Large imports without the garbage collector's full scans (stdlib only).

Importing torch, `ray.tune` or MLflow allocates a few hundred thousand objects that live until the
process exits. CPython's cyclic collector runs as they are allocated, and each full collection walks
every object tracked so far, the libraries imported before included, and frees almost nothing (a few
thousand objects of import-time garbage). A trial worker imports torch after Ray and Ray Tune; there the
collector took ~0.3 s of the ~1 s import, and the collection at the trial's start (PeakMemory.reset)
another ~0.1 s (`benchmarks/README.md`, "Garbage collection and setup_worker.py"); in the study driver,
MLflow's import and store took 1.0 s instead of 1.5 s with it paused (c757a07). So the imports run with
the collector paused, and what they loaded is then moved to the collector's permanent generation
(`gc.freeze`), which later collections skip: the pattern CPython's documentation gives for a process's
long-lived start-up objects. Everything alive at the block's end is frozen, not only what it loaded: the
import-time garbage with it (1-2 MB a library: torch's 1.3 MB, MLflow's 1.7 MB, by the size of what a
collection would have freed) is never freed, a cost once per process, not per trial. A block that
imported nothing (the library was loaded already: a notebook's second MLflow client, a reused worker's
next trial) freezes nothing, so objects a long session makes and drops later stay collectable.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import threading
from typing import Iterator

_lock = threading.Lock()
_state = {"depth": 0, "was_enabled": False, "modules": 0}  # nested or concurrent blocks (Ray's start thread) pause once


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Run the block (imports) with the cyclic collector paused, then, if it imported a module, freeze
    every object alive.

    Blocks may nest or run at once in several threads: the collector is paused from the first one's
    start to the last one's end, and turned back on only if it was on before the first (a caller that
    disabled it keeps it disabled)."""
    with _lock:
        if _state["depth"] == 0:
            _state["was_enabled"], _state["modules"] = gc.isenabled(), len(sys.modules)
            gc.disable()
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                if len(sys.modules) > _state["modules"]:
                    gc.freeze()  # before enabling: the objects allocated while paused are all still in gen 0
                if _state["was_enabled"]:
                    gc.enable()
