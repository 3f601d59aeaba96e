"""Shared helpers: side-by-side timing, ratio summaries, timed subprocesses, the table row, the machine.

Every benchmark figure is a ratio of two things measured alternately in the same run (A B, then
B A, ...), so machine load shared by both cancels; we report the median ratio and its min-max.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's console scripts (scaling-train, scaling-study)
CONTENDED = 0.85  # CPU time / wall time below which other processes' load makes wall time meaningless


@dataclass
class Row:
    """One line of the results table; `data` holds the raw numbers for the JSON file."""

    name: str
    measured: str
    baseline: str
    ratio: Optional[float]
    target: str
    passed: Optional[bool]  # None: not measurable
    spread: str = ""  # min-max of the per-repeat ratios
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


# What each group costs, in walls of the 1-epoch benchmark study ("study walls"): (the least it
# runs, what it runs when the budget allows). From the full run at 1a270e8, whose study took 22 s
# on the slowest machine yet; every group there scaled with the study, so walls carry across days.
# Context groups (rows without a target: ray, tune, twins) are reserved for at their least, so that
# a short budget takes their extra pairs before a target row's.
STUDY_WALLS = {
    "throughput": (1.3, 1.3), "study": (5.6, 7.2), "ray": (1.2, 1.2), "tune": (1.75, 1.75),
    "asha": (1.7, 1.7), "asha-resume": (1.4, 1.4), "twins": (3.8, 3.8), "mlflow": (3.6, 7.3),
    "gns": (1.0, 1.0), "config-error": (0.15, 0.15), "help": (0.25, 0.25),
    "mlflow-ui": (3.0, 3.0),  # one pair, ~55 s on 2 cores (2026-11-23; a study wall was ~19 s that day)
    "mlflow-long": (7.7, 7.7),  # two pairs of 4-epoch studies (~1.9 walls each; opt-in, see __main__.OPT_IN)
}
CONTEXT_GROUPS = ("ray", "tune", "twins", "mlflow-ui", "mlflow-long")
STUDY_WALL_S = 20.0  # until row 2 measures it


@contextlib.contextmanager
def ray_sessions_in(folder: Path):
    """Within: every Ray a benchmark starts (its studies' drivers, the start-up scripts: all inherit this
    environment) keeps its session folder, logs and sockets, under `folder`, the run's scratch, which is
    removed after it. By default Ray keeps them in /tmp/ray for ever: ~40 a `make bench`. A RAY_TMPDIR
    already set is the user's choice and stays."""
    if "RAY_TMPDIR" in os.environ:
        yield
        return
    os.environ["RAY_TMPDIR"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("RAY_TMPDIR", None)


@dataclass
class Ctx:
    """What every benchmark group gets: the mode, a scratch folder and a cache shared between groups."""

    quick: bool
    tmp: Path
    cache: dict[str, Any] = field(default_factory=dict)
    deadline: float = float("inf")  # time.perf_counter() by which the suite should be done

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def study_wall_s(self) -> float:
        """The 1-epoch benchmark study's wall on this machine today (row 2's first, or a guess)."""
        studies = self.cache.get("full_grid_studies") or []
        return studies[0]["wall_s"] if studies else STUDY_WALL_S

    def reserve_after(self, group: str) -> float:
        """Seconds the groups still to run after `group` need: target rows at their full repeats,
        context rows at their least."""
        plan = self.cache.get("groups", [])
        later = plan[plan.index(group) + 1:] if group in plan else []
        walls = sum(STUDY_WALLS.get(g, (0, 0))[0 if g in CONTEXT_GROUPS else 1] * (self.cache.get("asha_runs", 1)
                                                                                if g == "asha" else 1) for g in later)
        return walls * self.study_wall_s()

    def fits(self, seconds: float, group: str) -> bool:
        """Whether `seconds` more of `group` leave the later groups their reserve (always, in --quick)."""
        return self.quick or self.time_left() - seconds >= self.reserve_after(group)


COLUMNS = ("benchmark", "measured", "baseline", "ratio", "target", "pass/fail")


def cells(row: Row) -> tuple[str, ...]:
    """The row's cells in the table: the ratio with its spread, the verdict as PASS, FAIL or n/a."""
    ratio = "-" if row.ratio is None or not math.isfinite(row.ratio) else f"{row.ratio:.2f}"
    if row.spread and ratio != "-":
        ratio += f" [{row.spread}]"
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row.passed]
    return row.name, row.measured, row.baseline, ratio, row.target, verdict


def table(rows: list[Row]) -> str:
    """Return the rows as a plain-text table, one line a row."""
    body = [COLUMNS] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    fmt = lambda line: " | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(body[0]), "-+-".join("-" * w for w in widths)] + [fmt(line) for line in body[1:]])


def not_measurable(name: str, target: str, reason: str, detail: str = "") -> Row:
    return Row(name, f"not measurable yet: {reason}", "-", None, target, None, note=detail)


@dataclass
class Summary:
    median: float
    lo: float
    hi: float
    values: list[float]

    @property
    def spread(self) -> str:
        return f"{self.lo:.2f}-{self.hi:.2f}"


def summarize(values: Sequence[float]) -> Summary:
    vals = [float(v) for v in values]
    return Summary(statistics.median(vals), min(vals), max(vals), vals)


def paired(a: Callable[[], Any], b: Callable[[], Any], repeats: int, warmup: int = 0,
           more: Optional[Callable[[float], bool]] = None, least: int = 1) -> list[tuple[Any, Any]]:
    """Run a and b alternately, A B then B A (so drift cancels), after `warmup` discarded pairs.

    With `more`, each pair after the first `least` runs only if more(seconds the last pair took)
    says so (Ctx.fits: the pair still fits the budget)."""
    for _ in range(warmup):
        a(), b()
    pairs: list[tuple[Any, Any]] = []
    pair_s = 0.0
    for i in range(repeats):
        if i >= least and more is not None and not more(pair_s):
            break
        t = time.perf_counter()
        if i % 2 == 0:
            x = a()
            y = b()
        else:
            y = b()
            x = a()
        pairs.append((x, y))
        pair_s = time.perf_counter() - t
    return pairs


@dataclass
class Timed:
    """A finished subprocess: exit code, wall time, launch time (epoch s), output, marks (s after launch)."""

    rc: int
    wall_s: float
    launched: float
    output: str
    marks: dict[str, float]
    cpu_s: float = float("nan")  # the child's own user + system CPU time (not its daemons')
    machine_cpu_s: float = float("nan")  # busy CPU time of the whole machine, launch to exit (see machine_cpu)
    steal_s: float = float("nan")  # CPU time the hypervisor gave to other guests meanwhile


def run_timed(argv: Sequence[str], *, cwd: Optional[Path] = None, env: Optional[dict] = None,
              timeout: float = 600, marks: Optional[dict[str, str]] = None) -> Timed:
    """Run argv, timing it from launch to exit; `marks` maps a name to a regex whose first
    matching output line is timestamped (seconds after launch)."""
    patterns = {k: re.compile(v) for k, v in (marks or {}).items()}
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("SCALING_PROGRESS", None)
    lines: list[str] = []
    seen: dict[str, float] = {}
    launched, t0, (busy0, steal0) = time.time(), time.perf_counter(), machine_cpu()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            for k, p in patterns.items():
                if k not in seen and p.search(line):
                    seen[k] = time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise subprocess.TimeoutExpired(argv, timeout)
        _, status, usage = os.wait4(proc.pid, 0)  # like proc.wait(), plus the child's CPU time
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
    except subprocess.TimeoutExpired:
        stop_session(proc)
        rc, wall, cpu = -9, time.perf_counter() - t0, float("nan")
        lines.append(f"\n[benchmarks] killed after {timeout:.0f}s\n")
    except BaseException:  # Ctrl-C or SIGTERM (see benchmarks.__main__): its own session would outlive us
        stop_session(proc)
        raise
    busy1, steal1 = machine_cpu()
    return Timed(rc, wall, launched, "".join(lines), seen, cpu, busy1 - busy0, steal1 - steal0)


def stop_session(proc: subprocess.Popen) -> None:
    """Kill a child started with start_new_session=True, and its session (a study's Ray with it), and reap it.

    A child in its own session gets none of the terminal's Ctrl-C, so one the suite no longer waits
    for would train on, orphaned, in a scratch folder the suite removes on its way out.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)  # our own child's session only
    proc.wait()


def machine_cpu() -> tuple[float, float]:
    """Return the whole machine's busy and stolen CPU seconds since boot (/proc/stat; NaN elsewhere).

    A study's CPU is spread over processes that outlive their parents' accounting (Ray's workers
    are the raylet's children), so the benchmark counts every core's busy time while it runs. On
    an otherwise idle machine that is the study's CPU, and busy / cores is the least wall time
    it can take there. Busy is user + nice + system + irq + softirq (guest time is inside user);
    steal is time the hypervisor ran other guests on this machine's virtual CPUs.
    """
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return float("nan"), float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def cores() -> int:
    """Return the number of cores this process may run on (all of them where the OS cannot say)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def script(name: str) -> str:
    """Return the path of a console script of this venv (scaling-train, scaling-study)."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def cpu_share(seconds: float = 0.2) -> float:
    """Return the CPU share this process gets for a pure-Python spin: ~1.0 on an idle core,
    ~cores / load on a machine that other processes oversubscribe."""
    c0, t0 = time.thread_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sum(range(1000))
    return (time.thread_time() - c0) / (time.perf_counter() - t0)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """Return the CPU model, core counts, GPU (if any), OS, Python and package versions."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    gpu = "none"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
            gpu = "; ".join(out.splitlines()) or "none"
        except (OSError, subprocess.SubprocessError):
            pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": cores(), "gpu": gpu,
            "os": platform.platform(), "python": platform.python_version(), "load_avg_start": load_average()}
    from importlib import metadata

    for pkg in ("torch", "ray", "mlflow", "hydra-core"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=REPO, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO, timeout=5).stdout.strip()
        info["git"] += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the machine line and the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
