"""scaling.heap: large imports run with the cyclic collector paused, and what they load is frozen."""
from __future__ import annotations

import gc
import importlib
import subprocess
import sys
import threading

import pytest

from scaling.heap import imports_without_gc


@pytest.fixture(autouse=True)
def collector_on():
    """Each test starts with the collector on, as a process does, and leaves it so."""
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def _new_module(tmp_path, monkeypatch, name: str) -> str:
    """Write a module that allocates 5,000 tracked objects at import, importable by `name`."""
    (tmp_path / f"{name}.py").write_text("KEPT = [[i] for i in range(5000)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # and gone again after the test
    return name


def test_the_collector_is_paused_in_the_block_and_what_an_import_loaded_is_frozen_after(tmp_path, monkeypatch):
    name = _new_module(tmp_path, monkeypatch, "heap_probe_import")
    before = gc.get_freeze_count()
    with imports_without_gc():
        assert not gc.isenabled()
        kept = importlib.import_module(name).KEPT
    assert gc.isenabled()
    assert gc.get_freeze_count() >= before + len(kept)
    assert not any(any(x is k for k in kept[:3]) for x in gc.get_objects())  # frozen: out of every generation


def test_a_block_that_imports_nothing_new_freezes_nothing():
    """A notebook's second MLflow client, a reused worker's next trial: the library is loaded already,
    and what the session holds now must stay collectable when it is dropped later."""
    import json  # noqa: F401 - loaded already, as a second block finds its library

    before = gc.get_freeze_count()
    with imports_without_gc():
        import json  # noqa: F401,F811
        made = [[i] for i in range(5000)]
    # the count may fall (a frozen object freed meanwhile), never rise by what the block made
    assert gc.isenabled() and gc.get_freeze_count() <= before
    assert any(x is made[0] for x in gc.get_objects())  # still in a generation the collector scans


def test_a_block_that_raises_still_turns_the_collector_back_on():
    with pytest.raises(KeyError), imports_without_gc():
        raise KeyError("mid-import")
    assert gc.isenabled()


def test_nested_blocks_pause_once_and_a_collector_the_caller_had_off_stays_off():
    with imports_without_gc():
        with imports_without_gc():
            pass
        assert not gc.isenabled()  # the outer block is still importing
    assert gc.isenabled()
    gc.disable()
    with imports_without_gc():
        pass
    assert not gc.isenabled()


def test_blocks_in_two_threads_keep_the_collector_paused_until_the_last_ends():
    """The study driver imports Ray Tune while its start thread imports Ray: the first block to end
    must not turn the collector back on under the other."""
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with imports_without_gc():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with imports_without_gc():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # this block ended, the other thread's has not
    release.set()
    thread.join(10)
    assert gc.isenabled()


def _full_collections_during_torch_import(wrapped: bool) -> tuple[int, bool]:
    """Import Ray Tune, then torch (what a trial worker does), in a fresh interpreter; return the full
    collections during torch's import and whether the collector was on after it."""
    code = f"""
import gc
import ray.tune
from scaling.heap import imports_without_gc
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "start" and info["generation"] == 2 else None)
if {wrapped}:
    with imports_without_gc():
        import torch
else:
    import torch
print(len(full), gc.isenabled())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    count, enabled = out.stdout.split()
    return int(count), enabled == "True"


def test_torch_imported_after_ray_tune_runs_no_full_collection_in_the_block():
    """Without the block the collector walks Ray's objects and torch's again and again (the cost that
    benchmark row 2 measured); with it, none, and the collector is on again after."""
    assert _full_collections_during_torch_import(wrapped=False)[0] >= 1
    assert _full_collections_during_torch_import(wrapped=True) == (0, True)
