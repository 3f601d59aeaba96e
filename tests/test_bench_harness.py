"""The benchmark harness's CPU accounting (benchmarks/common.py), which rows 2 and 4 rely on."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from benchmarks.common import REPO, cores, machine_cpu, run_timed


# The child forks a grandchild that outlives the process between them and is never reaped by the
# child, as Ray's workers outlive their raylet: the child's rusage never holds it, the machine's does.
_ORPHAN_SPIN = """
import os, time
r, w = os.pipe()
middle = os.fork()
if middle == 0:
    if os.fork() == 0:  # the grandchild: spins 0.5 s of CPU, then says so
        t = time.process_time()
        while time.process_time() - t < 0.5:
            pass
        os.write(w, b"x")
    os._exit(0)
os.waitpid(middle, 0)  # the middle process only
os.close(w)
os.read(r, 1)  # until the grandchild is done
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat and fork are what this checks")
def test_machine_cpu_counts_what_an_unreaped_grandchild_spends():
    t = run_timed([sys.executable, "-c", _ORPHAN_SPIN], timeout=60)
    assert t.rc == 0
    assert t.cpu_s < 0.4  # the child's rusage: its own start-up, not the grandchild's spin
    assert t.machine_cpu_s >= 0.5  # the grandchild's 0.5 s, whatever else ran meanwhile
    assert t.machine_cpu_s <= t.wall_s * cores() + 0.05  # busy time cannot exceed what the cores had
    assert math.isfinite(t.steal_s) and t.steal_s >= 0


def test_machine_cpu_is_monotone():
    busy0, steal0 = machine_cpu()
    sum(range(2_000_000))
    busy1, steal1 = machine_cpu()
    if math.isnan(busy0):  # no /proc/stat: both NaN, the rows then print nan
        assert math.isnan(busy1)
        return
    assert busy1 >= busy0 and steal1 >= steal0


def test_fixed_part_and_slope_are_recovered_from_two_grid_lengths():
    """Rows 2d and 2e: walls made as 8 s + 1.1 x ideal give back exactly that line, pair by pair."""
    from benchmarks.study import fit_fixed_and_slope

    line = lambda ideal: 8.0 + 1.1 * ideal  # noqa: E731
    fits = fit_fixed_and_slope([(line(3.5), 3.5), (line(3.4), 3.4)], (line(11.8), 11.8))
    assert [(round(s, 9), round(f, 9)) for s, f in fits] == [(1.1, 8.0), (1.1, 8.0)]
    # a study that costs nothing beyond the ideal per unit of training, only a fixed start
    (slope, fixed), = fit_fixed_and_slope([(9.0, 4.0)], (17.0, 12.0))
    assert (slope, fixed) == (1.0, 5.0)
    with pytest.raises(ValueError, match="must exceed"):
        fit_fixed_and_slope([(9.0, 4.0)], (9.5, 4.0))


@pytest.mark.parametrize("epochs", ["x", "0", "-1", "1.5"])
def test_the_plain_loop_refuses_a_bad_epoch_count_in_one_line(epochs):
    from benchmarks.common import REPO

    proc = subprocess.run([sys.executable, "-m", "benchmarks.studyrun", epochs], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: EPOCHS={epochs!r}: must be a positive whole number "
                                        "(python -m benchmarks.studyrun EPOCHS)"]


def test_bare_tune_script_trains_the_same_trials_as_run_trial(tmp_path, compose_cfg, tiny, tiny_data):
    """Row 2f's baseline is fair only if it trains what the study trains: the same best val loss,
    here for two tiny trials through real Ray Tune."""
    import json

    from benchmarks.common import REPO
    from benchmarks.studyrun import write_bare_spec
    from scaling.train import run_trial

    configs = [compose_cfg(*tiny, f"batch_size={b}", "eval_every=0.25") for b in (32, 64)]
    spec = write_bare_spec(tmp_path, configs, tiny_data, concurrency=1)
    t = run_timed([sys.executable, "-m", "benchmarks.baretune", str(spec)], cwd=REPO, timeout=180)
    assert t.rc == 0, t.output[-3000:]
    out = json.loads(t.output.strip().splitlines()[-1])
    assert out["statuses"] == {"completed": 2}
    for cfg in configs:
        want = run_trial(cfg, dataset=tiny_data).best_val_loss
        assert out["best_per_batch_size"][str(cfg.batch_size)] == pytest.approx(want, rel=1e-5)


def test_bare_trials_refuse_what_the_bare_script_cannot_train(compose_cfg, tiny):
    from benchmarks.studyrun import bare_trials

    with pytest.raises(ValueError, match="optimizer adam"):
        bare_trials([compose_cfg(*tiny, "optimizer=adam")])


@pytest.mark.parametrize("args", [[], ["missing.json"], ["a.json", "b.json"]])
def test_bare_tune_script_refuses_a_missing_spec_in_one_line(args):
    t = subprocess.run([sys.executable, "-m", "benchmarks.baretune", *args], capture_output=True, text=True,
                       timeout=60)
    assert t.returncode == 1
    assert t.stderr.strip().startswith("error: SPEC=") and len(t.stderr.strip().splitlines()) == 1


def test_paired_alternates_and_stops_where_the_budget_says():
    from benchmarks.common import paired

    calls, asked = [], []

    def more(pair_s: float) -> bool:
        asked.append(pair_s)
        return len(calls) < 6

    pairs = paired(lambda: calls.append("a") or "a", lambda: calls.append("b") or "b", 4, more=more, least=2)
    assert pairs == [("a", "b")] * 3 and calls == list("abbaab")
    assert len(asked) == 2 and all(s >= 0 for s in asked)  # asked before pairs 3 and 4, never before 1 and 2
    assert len(paired(lambda: 1, lambda: 2, 3, more=lambda s: False)) == 1


def test_budget_reserves_target_groups_in_full_and_context_groups_at_their_least(tmp_path):
    import time

    from benchmarks.common import STUDY_WALLS, Ctx

    groups = ["study", "tune", "mlflow", "help"]  # tune is context; mlflow and help carry targets
    ctx = Ctx(quick=False, tmp=tmp_path, cache={"groups": groups, "full_grid_studies": [{"wall_s": 10.0}]},
              deadline=time.perf_counter() + 1000)
    rest = (STUDY_WALLS["tune"][0] + STUDY_WALLS["mlflow"][1] + STUDY_WALLS["help"][1]) * 10.0
    assert ctx.reserve_after("study") == pytest.approx(rest)
    assert ctx.reserve_after("help") == 0
    assert ctx.fits(1000 - rest - 5, "study") and not ctx.fits(1000 - rest + 5, "study")
    assert not ctx.fits(1001, "help")
    quick = Ctx(quick=True, tmp=tmp_path, cache={"groups": groups}, deadline=time.perf_counter())
    assert quick.fits(1e6, "study")


def test_a_full_run_leaves_out_the_opt_in_groups_and_runs_them_when_named():
    from benchmarks.__main__ import GROUPS, OPT_IN, selected

    assert "mlflow-long" in OPT_IN
    assert selected([]) == [g for g in GROUPS if g not in OPT_IN] and "mlflow" in selected([])
    assert selected(["mlflow-long,study", "mlflow"]) == ["study", "mlflow", "mlflow-long"]  # run order
    with pytest.raises(ValueError, match="unknown benchmark nope"):
        selected(["nope"])
    for nothing in ([""], [","], ["", " "]):  # named nothing: not the whole suite
        with pytest.raises(ValueError, match="--only names no benchmark"):
            selected(nothing)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_suite_leaves_no_child_session_and_no_scratch_folder(tmp_path, sig):
    """Its children run in their own sessions (the terminal's Ctrl-C must not reach a timed study), so
    a suite stopped mid-study left that study training, orphaned; SIGTERM also left the scratch folder."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--only", "study", "--out", str(tmp_path / "r.json")],
                            cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # the timed child leads its own session; the suite's first children are `git` calls for the
        # machine line (in a fresh clone under load, `git status` ran long enough to be taken for it)
        deadline, child = time.monotonic() + 120, None
        while child is None and time.monotonic() < deadline:
            child = next((c for c in psutil.Process(proc.pid).children() if _session(c.pid) == c.pid), None)
            time.sleep(0.2)
        assert child is not None, "the suite started no study in its own session within 120 s"
        time.sleep(3)  # the child (a study or the plain loop) has started its own processes
        session = [p for p in psutil.process_iter() if _session(p.pid) == child.pid]
        assert session and list(tmp_path.glob("scaling-bench-*")), "nothing was running to stop"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) != 0
        time.sleep(1)
        assert [p.pid for p in session if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert list(tmp_path.glob("scaling-bench-*")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


@pytest.mark.slow
def test_a_benchmark_run_leaves_no_ray_session_behind():
    """Row 2c's real Ray starts (lean and plain) with RAY_TMPDIR unset: Ray's sessions go to the run's scratch
    folder, removed with it, not to $TMPDIR/ray (by default /tmp/ray), where ~40 a `make bench` stayed."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="sb-", dir="/tmp")  # short: Ray's unix sockets live below it
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
        env["TMPDIR"] = tmp  # the scratch folder's parent, and where Ray would otherwise put its sessions
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "ray", "--quick", "--out",
                               os.path.join(tmp, "r.json")], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "2c. local Ray start + stop" in proc.stdout
        assert sorted(os.listdir(tmp)) == ["r.json"]  # no ray/, no scaling-bench-* scratch
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
