"""Run the benchmark groups, print one table and the machine, save bench-results/latest.json."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from benchmarks import asha, gpu, mlflow_ui, startup, study, throughput, twins
from benchmarks.common import REPO, Ctx, Row, cpu_share, load_average, log, machine, ray_sessions_in, table

# Run (and table) order follows the row numbers.
GROUPS = {
    "throughput": throughput.trial_throughput,
    "study": study.study_wall,
    "ray": startup.local_ray,
    "tune": study.tool_vs_bare_tune,
    "asha": asha.asha_vs_grid,
    "asha-resume": asha.asha_resumed,
    "twins": twins.twins_once,
    "mlflow": study.mlflow_overhead,
    "mlflow-long": study.mlflow_overhead_long,
    "mlflow-ui": mlflow_ui.ui_start,
    "gns": throughput.gns_overhead,
    "config-error": startup.config_error,
    "help": startup.help_time,
    "gpu": gpu.trial_rows,
    "gpu-pack": gpu.packing_rows,
}
# Context groups that run only when named (--only): row 4c's two 4-epoch pairs (~2 min) would not
# leave a full run its 10 minutes.
OPT_IN = ("mlflow-long",)


def selected(only: list[str]) -> list[str]:
    """Return the groups to run, in run order (Ctx.reserve_after reads what is still to come): those
    named in `only` (each item may comma-separate several), or every group but the opt-in ones."""
    names = [n.strip() for arg in only for n in arg.split(",") if n.strip()]
    if only and not names:  # --only "" named nothing: not the whole ~9-minute suite
        raise ValueError("--only names no benchmark; choose from " + ", ".join(GROUPS))
    names = names or [g for g in GROUPS if g not in OPT_IN]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    return [n for n in GROUPS if n in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these groups (repeat or comma-separate): {', '.join(GROUPS)} "
                        f"({', '.join(OPT_IN)} runs only when named)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run; wider spreads)")
    p.add_argument("--out", default=str(REPO / "bench-results" / "latest.json"), help="where to write the JSON")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (study outputs, mlflow.db)")
    p.add_argument("--repeat-asha", type=int, default=1, metavar="N", help="ASHA study runs (each ~1 min)")
    p.add_argument("--mps", action="store_true", help="run gpu-pack's studies under CUDA MPS (started and stopped here)")
    p.add_argument("--budget", type=float, default=570, metavar="S",
                   help="seconds the suite aims to finish in: rows 2, 2f and 4 drop repeats past their first "
                        "(row 4: past its second) that would not leave the later groups their time")
    args = p.parse_args(argv)
    try:
        names = selected(args.only)
    except ValueError as exc:
        p.error(str(exc))

    info = machine()
    info["cpu_share_start"] = round(cpu_share(0.5), 2)
    print(f"machine: {info['cpu']}, {info['cores_usable']}/{info['cores']} cores usable, GPU: {info['gpu']}, "
          f"load average {info['load_avg_start']}, CPU share of a probe {info['cpu_share_start']} | "
          f"python {info['python']}, torch {info.get('torch')}, ray {info.get('ray')}, mlflow {info.get('mlflow')} "
          f"| git {info.get('git', '?')}", flush=True)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the running child's session is killed and the
    # scratch folder removed (Python's default for it exits at once, leaving both behind).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="scaling-bench-")).resolve()
    t0 = time.perf_counter()
    ctx = Ctx(quick=args.quick, tmp=tmp, cache={"asha_runs": max(1, args.repeat_asha), "groups": names, "mps": args.mps},
              deadline=t0 + args.budget)
    rows: list[Row] = []
    try:
        with ray_sessions_in(tmp):
            for name in names:
                t = time.perf_counter()
                try:
                    rows += GROUPS[name](ctx)
                except Exception as exc:  # noqa: BLE001 - one broken group must not hide the others
                    traceback.print_exc()
                    first = (str(exc).splitlines() or [""])[0][:100]
                    rows.append(Row(name, f"error: {type(exc).__name__}: {first}", "-", None, "-", False))
                log(f"{name} done in {time.perf_counter() - t:.0f}s")
    finally:
        if args.keep:
            log(f"scratch folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    info["load_avg_end"], info["cpu_share_end"] = load_average(), round(cpu_share(0.5), 2)

    print(table(rows))
    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        print("notes:\n" + "\n".join(notes))
    print(f"ratio column: median [min-max over repeats]; {total:.0f}s in all ({'quick' if args.quick else 'full'}); "
          f"load average at end {info['load_avg_end']}, CPU share {info['cpu_share_end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "mode": "quick" if args.quick else "full", "groups": names,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - total)),
                               "duration_s": total, "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    print(f"results: {out}")
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
