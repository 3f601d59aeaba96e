"""Rows 6 and 7: time to a config error (`scaling-study batch_size=-1`) and `scaling-train --help`.

These have absolute targets (a user waits for them), so the ratio column is measured / target.
Each command alternates with a bare `python -c pass`, whose time is shown as the baseline: it
tells how loaded the machine was while the command ran. Both commands are one CPU-bound
process, so when a CPU-bound probe run between them gets less than CONTENDED of a core, the
row is judged on the child's CPU time (what an idle core would take) instead of its wall time.
"""
from __future__ import annotations

import json
import statistics
import sys

from benchmarks.common import CONTENDED, Ctx, Row, cpu_share, log, paired, run_timed, script, summarize


def _command_row(ctx: Ctx, name: str, argv: list[str], limit_s: float, want_rc: str) -> Row:
    cwd = ctx.tmp / "startup"
    cwd.mkdir(exist_ok=True)
    repeats = 3
    log(f"{name}: {' '.join(argv[1:])}, {repeats} alternating pairs")
    shares: list[float] = []

    def bare():
        shares.append(cpu_share())  # is the machine contended right now?
        return run_timed([sys.executable, "-c", "pass"])

    pairs = paired(lambda: run_timed(argv, cwd=cwd, timeout=60), bare, repeats)
    cmd, bare = summarize([a.wall_s for a, _ in pairs]), summarize([b.wall_s for _, b in pairs])
    cpu = summarize([a.cpu_s for a, _ in pairs])
    share = statistics.median(shares)
    use = cpu if share < CONTENDED else cmd  # a CPU-bound start-up: CPU time is what an idle core would take
    rcs = [a.rc for a, _ in pairs]
    rc_ok = all(rc != 0 for rc in rcs) if want_rc == "non-zero" else all(rc == 0 for rc in rcs)
    last = pairs[-1][0].output.strip().splitlines()
    basis = "CPU time (machine contended)" if use is cpu else "wall time"
    return Row(name, f"{use.median:.2f} s{' CPU' if use is cpu else ''} (exit {rcs[0]})",
               f"{bare.median:.2f} s (python -c pass)", use.median / limit_s, f"<= {limit_s:g} s, exit {want_rc}",
               use.median <= limit_s and rc_ok, f"{use.lo / limit_s:.2f}-{use.hi / limit_s:.2f}",
               note=f"judged on {basis}, CPU share of a probe {share:.2f}; wall {cmd.median:.2f} s "
                    f"[{cmd.lo:.2f}-{cmd.hi:.2f}], CPU {cpu.median:.2f} s; exit codes {rcs}; "
                    f"last line: {last[-1][:100] if last else ''!r}",
               data={"seconds": cmd.values, "cpu_seconds": cpu.values, "bare_python_s": bare.values,
                     "exit_codes": rcs})


def config_error(ctx: Ctx) -> list[Row]:
    """Row 6: `scaling-study batch_size=-1` exits non-zero within 3 s (median of 3)."""
    return [_command_row(ctx, "6. time to a config error", [script("scaling-study"), "batch_size=-1"], 3.0, "non-zero")]


def help_time(ctx: Ctx) -> list[Row]:
    """Row 7: `scaling-train --help` within 2 s (median of 3)."""
    return [_command_row(ctx, "7. scaling-train --help", [script("scaling-train"), "--help"], 2.0, "0")]


_RAY_PROBE = """
import json, logging, os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray._private import ray_constants
ray_constants.ENABLE_RAY_CLUSTER = False
from scaling.local_ray import init_ray
t0 = time.perf_counter()
if sys.argv[1] == "lean":
    init_ray(None, 2, None)
else:  # what init_ray passes to ray.init, without its leaner head
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
t1 = time.perf_counter()
ray.shutdown()
print(json.dumps({"init_s": t1 - t0, "shutdown_s": time.perf_counter() - t1}))
"""


def local_ray(ctx: Ctx) -> list[Row]:
    """Row 2c (context for 2 and 2b, no target): a study's local Ray, start and stop, as
    `init_ray` starts it (no API server, monitors or prestarted workers) against plain ray.init."""
    repeats = 2 if ctx.quick else 3
    log(f"local ray: init + shutdown, lean vs plain, {repeats} alternating pairs")

    def probe(kind: str) -> dict:
        t = run_timed([sys.executable, "-c", _RAY_PROBE, kind], timeout=120)
        if t.rc != 0:
            raise RuntimeError(f"ray probe ({kind}) exited {t.rc}:\n{t.output[-2000:]}")
        return json.loads(t.output.strip().splitlines()[-1])

    pairs = paired(lambda: probe("lean"), lambda: probe("plain"), repeats)
    total = summarize([(a["init_s"] + a["shutdown_s"]) / (b["init_s"] + b["shutdown_s"]) for a, b in pairs])
    fmt = lambda side, k: "/".join(f"{p[side][k]:.2f}" for p in pairs)  # noqa: E731
    lean = statistics.median(a["init_s"] + a["shutdown_s"] for a, _ in pairs)
    plain = statistics.median(b["init_s"] + b["shutdown_s"] for _, b in pairs)
    return [Row("2c. local Ray start + stop (context, no target)", f"{lean:.2f} s (init_ray)",
                f"{plain:.2f} s (plain ray.init)", total.median, "-", None, total.spread,
                note=f"ray.init {fmt(0, 'init_s')} s vs {fmt(1, 'init_s')} s; ray.shutdown "
                     f"{fmt(0, 'shutdown_s')} s vs {fmt(1, 'shutdown_s')} s (lean vs plain, per pair)",
                data={"pairs": pairs})]
