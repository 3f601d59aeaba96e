"""Rows 6 and 7: time to a config error (`scaling-study batch_size=-1`) and `scaling-train --help`.

These have absolute targets (a user waits for them), so the ratio column is measured / target.
Each command alternates with a bare `python -c pass`, whose time is shown as the baseline: it
tells how loaded the machine was while the command ran.
"""
from __future__ import annotations

import sys

from benchmarks.common import Ctx, Row, log, paired, run_timed, script, summarize


def _command_row(ctx: Ctx, name: str, argv: list[str], limit_s: float, want_rc: str) -> Row:
    cwd = ctx.tmp / "startup"
    cwd.mkdir(exist_ok=True)
    repeats = 3
    log(f"{name}: {' '.join(argv[1:])}, {repeats} alternating pairs")
    pairs = paired(lambda: run_timed(argv, cwd=cwd, timeout=60), lambda: run_timed([sys.executable, "-c", "pass"]),
                   repeats)
    cmd, bare = summarize([a.wall_s for a, _ in pairs]), summarize([b.wall_s for _, b in pairs])
    rcs = [a.rc for a, _ in pairs]
    rc_ok = all(rc != 0 for rc in rcs) if want_rc == "non-zero" else all(rc == 0 for rc in rcs)
    last = pairs[-1][0].output.strip().splitlines()
    return Row(name, f"{cmd.median:.2f} s (exit {rcs[0]})", f"{bare.median:.2f} s (python -c pass)",
               cmd.median / limit_s, f"<= {limit_s:g} s, exit {want_rc}", cmd.median <= limit_s and rc_ok,
               f"{cmd.lo / limit_s:.2f}-{cmd.hi / limit_s:.2f}",
               note=f"exit codes {rcs}; last output line: {last[-1][:120] if last else ''!r}",
               data={"seconds": cmd.values, "bare_python_s": bare.values, "exit_codes": rcs})


def config_error(ctx: Ctx) -> list[Row]:
    """Row 6: `scaling-study batch_size=-1` exits non-zero within 3 s (median of 3)."""
    return [_command_row(ctx, "6. time to a config error", [script("scaling-study"), "batch_size=-1"], 3.0, "non-zero")]


def help_time(ctx: Ctx) -> list[Row]:
    """Row 7: `scaling-train --help` within 2 s (median of 3)."""
    return [_command_row(ctx, "7. scaling-train --help", [script("scaling-train"), "--help"], 2.0, "0")]
