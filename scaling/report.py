"""The study report: a terminal summary, figures and CSV tables, logged as artifacts of the study run.

`scaling-report [STUDY]` reads the study from MLflow (never from local files), so it works on
any machine that reaches the tracking store. The study driver calls `report_study` when a
study ends (hydra.sweeper.report=true). A study it cannot find, or one with no result, ends
in one line and a non-zero exit; a study with something to show gets a report, with notes
on what is missing (one batch size, a target never reached, an LR optimum at the grid's edge).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from scaling import interrupts
from scaling.analysis import DEFAULT_TRACKING_URI, Analysis, Study, StudyError, analyze, load_study
from scaling.config import redact_url
from scaling.fits import RULES
from scaling.tables import console_for, print_table

ARTIFACT_DIR = "report"


@dataclass
class ReportResult:
    """What a report produced: the study and its analysis, the files written, and an error if any."""

    study: Optional[Study] = None
    analysis: Optional[Analysis] = None
    out_dir: Optional[Path] = None
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    error: Optional[str] = None
    exit_code: int = 0

    @property
    def notes(self) -> list[str]:
        return self.analysis.notes if self.analysis else []


def report_study(tracking_uri: Optional[str], study: Optional[str] = None, *, experiment: str = "scaling",
                 memory_budget_mb: Optional[float] = None, out_dir: Optional[str | Path] = None,
                 log_to_mlflow: bool = True, file=None) -> ReportResult:
    """Print the report of `study` (run id, name, or None for the latest), write and log its figures and tables.

    Returns a ReportResult; when nothing can be reported it prints one `error:` line on stderr
    and returns the result with `error` set and a non-zero `exit_code` (it does not raise).
    """
    try:
        s = load_study(study, tracking_uri, experiment)
        a = analyze(s, memory_budget_mb)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return ReportResult(error=str(exc), exit_code=1)
    from scaling.plots import save_figures  # matplotlib: imported while a Ctrl-C still ends the command at once
    from scaling.store import make_client

    out = Path(out_dir) if out_dir is not None else default_out_dir(s)
    # What the report writes lands whole: a Ctrl-C from here on is taken once the figures, the tables
    # and their copies on the study run are all written (~2 s), not between two of them.
    interrupts.started()
    with interrupts.deferred():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = f"--out {out}: cannot hold the report ({exc.strerror})"
            print(f"error: {error}", file=sys.stderr, flush=True)
            return ReportResult(error=error, exit_code=1)
        figures = save_figures(a, s, out, memory_budget_mb)
        tables = write_tables(a, out)
        if log_to_mlflow:
            client = make_client(s.tracking_uri)
            for path in [*figures, *tables]:
                client.log_artifact(s.run_id, str(path), ARTIFACT_DIR)
    result = ReportResult(s, a, out, figures, tables)
    print_report(result, memory_budget_mb, logged=log_to_mlflow, file=file)
    return result


def default_out_dir(study: Study) -> Path:
    """Return `<sweep dir>/report` when the study's sweep folder is here, else `reports/<study name>`."""
    sweep = study.tags.get("scaling.sweep_dir")
    if sweep and Path(sweep).is_dir():
        return Path(sweep) / "report"
    return Path("reports") / study.name


def write_tables(a: Analysis, out_dir: Path) -> list[Path]:
    """Write the report's tables as CSV files in out_dir and return their paths."""
    tables = {"summary": a.summary(), "lr_grid": a.grid, "memory": a.memory, "rules": a.rules,
              "divergence": a.divergence, "trials": a.trials}
    paths = []
    for name, df in tables.items():
        path = Path(out_dir) / f"{name}.csv"
        df.to_csv(path, index=False)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- terminal
def _num(v, spec: str = ".3g", inf: str = "not reached") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return inf
    return format(v, spec)


def _reach(holds_up_to: dict) -> str:
    """Return how far each rule holds, the steepest first and rules of one reach together:
    "; linear holds up to B=512; sqrt and none hold up to B=4096" ("" where none holds)."""
    by_reach: dict[float, list[str]] = {}
    for rule in sorted(holds_up_to, key=RULES.get, reverse=True):
        if holds_up_to[rule]:
            by_reach.setdefault(holds_up_to[rule], []).append(rule)
    parts = []
    for b, rules in by_reach.items():
        names = rules[0] if len(rules) == 1 else f"{', '.join(rules[:-1])} and {rules[-1]}"
        parts.append(f"; {names} {'holds' if len(rules) == 1 else 'hold'} up to B={b:g}")
    return "".join(parts)


def _interval(lo: float, hi: float, n_batch: int, spec: str = ".3g") -> str:
    if hi - lo <= 1e-9 * max(abs(lo), 1.0):  # the bootstrap had nothing to resample
        return f"no interval from {n_batch} batch sizes"
    return f"95% CI {lo:{spec}} to {hi:{spec}}"


def print_report(result: ReportResult, memory_budget_mb: Optional[float] = None, *, logged: bool = True,
                 file=None) -> None:
    """Print the report: per-batch-size table, LR law, critical batch size, rule gaps, recommendation, notes."""
    from rich.table import Table

    s, a = result.study, result.analysis
    console = console_for(file, min_width=100)
    counts = ", ".join(f"{k} {v}" for k, v in s.trials["status"].value_counts().items())
    console.print(f"[bold]Study {s.name}[/bold] (mlflow run {s.run_id}, {s.status}): {len(s.trials)} trials: {counts}")
    console.print(f"Target: {a.target} ({a.target.source})")

    table = Table(title=f"Per batch size (best LR by best/val_loss; costs at the fastest LR to {a.target})")
    heads = ["batch\nsize", "best LR", "refined\nLR", "best\nval/loss", "steps to\ntarget", "samples\nto target",
             "time to\ntarget (s)", "peak\nMB", "samples\nper s", "diverges\nat LR", "regime"]
    summary = a.summary()
    if "b_simple" in summary:
        heads.append("B_simple")
    for h in heads:
        table.add_column(h, justify="left" if h == "regime" else "right")
    for _, r in summary.iterrows():
        edge = " (only LR tried)" if r["edge"] == "only" else f" ({r['edge']} edge)" if r["edge"] else ""
        row = [f"{r['batch_size']:g}", _num(r["lr_grid"]) + edge, _num(r["lr_refined"]), _num(r["best"], ".4f"),
               _num(r["steps_to_target"], ".0f"), _num(r["samples_to_target"], ".0f"), _num(r["time_to_target_s"], ".3g"),
               _num(r["peak_mb"], ".0f"), _num(r["samples_per_s"], ".0f"), _num(r["diverges_at"], ".3g"), r["regime"]]
        if "b_simple" in summary:
            row.append(_num(r["b_simple"], ".3g"))
        table.add_row(*row)
    print_table(console, table)

    f = a.lr_fit
    if f is not None:
        up_to = _reach(f.holds_up_to)
        console.print(f"[bold]LR scaling[/bold]: best LR ~ B^alpha, alpha = {f.alpha:.2f} "
                      f"(95% CI {f.alpha_interval[0]:.2f} to {f.alpha_interval[1]:.2f}, {f.n_points} batch sizes) -> [bold]{f.verdict}[/bold]; "
                      f"consistent with {', '.join(f.consistent) or 'no rule'}{up_to}")
    else:
        console.print("[bold]LR scaling[/bold]: not fitted (see notes)")
    c = a.crit_fit
    if c is not None:
        plateau = f"plateau from B={c.plateau_from:g}" if c.plateau_from else f"no measured B on the plateau (>= {c.plateau_threshold:.3g})"
        console.print(f"[bold]Critical batch size[/bold]: B_crit = {c.b_crit:.3g} ({_interval(*c.b_crit_interval, c.n_points)}); "
                      f"S_min = {c.s_min:.3g} steps, E_min = {c.e_min:.3g} samples; slope at small B = {c.slope_small:.2f} "
                      f"(perfect scaling: -1); {plateau}")
    else:
        console.print("[bold]Critical batch size[/bold]: not fitted (see notes)")
    if a.noise is not None:
        per_b = ", ".join(f"{b:g}: {v:.3g}" for b, v in zip(a.noise["batch_size"], a.noise["b_simple"]))
        console.print(f"[bold]B_simple[/bold] (gradient noise scale, the median over each batch size's trials): {per_b}")
    else:
        console.print("[bold]B_simple[/bold]: not logged (gns.enabled=true gns.micro_batches=4 measures it)")

    if not a.rules.empty:
        rules = Table(title="Scaling rules: val/loss at lr_multiplier=1 vs the LR tuned per batch size")
        cols = [c for c in ("scaling.rule", "warmup.epochs", "batch_size", "loss_at_1", "tuned", "tuned_lr", "gap") if c in a.rules]
        for col in cols:
            rules.add_column(col, justify="right")
        for _, r in a.rules.iterrows():
            rules.add_row(*[str(r[col]) if isinstance(r[col], str) else _num(r[col], ".4g", "diverged") for col in cols])
        print_table(console, rules)
    console.print(f"[bold]Recommendation[/bold]: {a.verdict}")
    for note in a.notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    where = f" (logged to the study run under {ARTIFACT_DIR}/)" if logged else ""
    console.print(f"Figures and tables: {result.out_dir}{where}")


# ---------------------------------------------------------------- command line
def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other entry point, not argparse's usage block
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    """Return the `scaling-report` argument parser."""
    p = _Parser(prog="scaling-report", description="Report a scaling study recorded in MLflow: "
                                "tables, fits and figures (logged as artifacts of the study run).")
    p.add_argument("study", nargs="?", default="latest", help="study run id or name, or 'latest' (default)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
    p.add_argument("--experiment", default="scaling", help="MLflow experiment (default scaling)")
    p.add_argument("--memory-budget", type=_positive, metavar="MB", help="recommend the fastest configuration within MB of peak memory")
    p.add_argument("--out", metavar="DIR", help="folder for figures and CSV tables (default <sweep dir>/report or reports/<study>)")
    p.add_argument("--no-log", action="store_true", help="do not log the figures and tables to MLflow")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`scaling-report [STUDY] [--tracking-uri URI] [--experiment NAME] [--memory-budget MB] [--out DIR]`."""
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.tracking_uri.startswith(("http:", "https:")):  # MLflow's client would retry for minutes
        from scaling.config import ConfigError
        from scaling.store import check_tracking_uri

        try:
            check_tracking_uri(args.tracking_uri)
        except ConfigError as exc:
            print(redact_url(f"error: --tracking-uri {args.tracking_uri}: {exc.problem}"), file=sys.stderr)
            raise SystemExit(1) from None
    try:
        result = report_study(args.tracking_uri, args.study, experiment=args.experiment,
                              memory_budget_mb=args.memory_budget, out_dir=args.out, log_to_mlflow=not args.no_log)
    except Exception as exc:  # noqa: BLE001 - one line, unless HYDRA_FULL_ERROR=1 asks for the traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        line = redact_url((str(exc).strip().splitlines() or [""])[0])  # MLflow's errors quote the URL
        print(f"error: {type(exc).__name__}: {line}", file=sys.stderr)
        raise SystemExit(1)
    if result.error:
        raise SystemExit(result.exit_code)


if __name__ == "__main__":
    main()
