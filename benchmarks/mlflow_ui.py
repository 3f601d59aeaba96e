"""Row 4b (context, no target): the MLflow UI as the tool starts it (`make ui`, the study's last
line: scaling.tracking.UI_COMMAND, one web worker and no job runner) against `mlflow ui` with
MLflow's defaults (4 web workers, a job runner and its huey consumers), over the benchmark's store.

Each start is timed to the first HTTP 200 from /health, then left SETTLE_S longer, since what
MLflow starts beside the web server goes on starting after that. CPU is the whole machine's busy
time over that window (machine_cpu: the processes come and go); memory is the RSS of the
server's process group at its end.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from benchmarks.common import Ctx, Row, log, machine_cpu, paired, script, summarize
from benchmarks.studyrun import tracking_uri
from scaling.tracking import ui_command

SETTLE_S = 12.0
JOBS_VAR = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def _group(pgid: int) -> list[Path]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:  # field 5: the process group
                found.append(stat.parent)
        except (OSError, ValueError, IndexError):
            continue
    return found


def _rss_mb(proc_dir: Path) -> float:
    try:
        line = next(x for x in (proc_dir / "status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def _start(ctx: Ctx, lean: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != JOBS_VAR}
    if lean:
        assignments, args = ui_command(tracking_uri(ctx), port)
        env.update(assignments)
    else:
        args = ["mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", tracking_uri(ctx)]
    args[0] = script("mlflow")
    busy0, t0 = machine_cpu()[0], time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError(f"{' '.join(map(str, args))} did not answer /health (exit {proc.poll()})")
            time.sleep(0.1)
        health_s = time.perf_counter() - t0
        time.sleep(SETTLE_S)
        members = _group(proc.pid)
        rss = sum(_rss_mb(d) for d in members)
        cpu = machine_cpu()[0] - busy0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # our own child's session only
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"health_s": health_s, "cpu_s": cpu, "rss_mb": rss, "processes": len(members)}


def ui_start(ctx: Ctx) -> list[Row]:
    """Row 4b: CPU (and memory, time to /health) of the tool's UI start against MLflow's default."""
    # one pair: two pairs gave 0.15 and 0.15 (2026-11-23); a ~6x gap needs no more to be read
    log(f"mlflow-ui: `make ui`'s command vs `mlflow ui` defaults, one pair, {SETTLE_S:g} s settle")
    pairs = paired(lambda: _start(ctx, lean=True), lambda: _start(ctx, lean=False), 1)
    of = lambda side, key: summarize([p[side][key] for p in pairs])  # noqa: E731
    cpu = summarize([a["cpu_s"] / b["cpu_s"] for a, b in pairs])
    lean_cpu, default_cpu = of(0, "cpu_s"), of(1, "cpu_s")
    note = (f"to /health {of(0, 'health_s').median:.1f} s vs {of(1, 'health_s').median:.1f} s; memory "
            f"{of(0, 'rss_mb').median:.0f} MB in {pairs[0][0]['processes']} processes vs "
            f"{of(1, 'rss_mb').median:.0f} MB in {pairs[0][1]['processes']}; CPU is the machine's busy time "
            f"until {SETTLE_S:g} s after /health")
    return [Row("4b. MLflow UI start, make ui / mlflow ui defaults: CPU (context, no target)",
                f"{lean_cpu.median:.1f} s CPU (one worker, no jobs)", f"{default_cpu.median:.1f} s CPU (defaults)",
                cpu.median, "-", None, cpu.spread, note=note, data={"pairs": pairs})]
