"""Console entry points: scaling-train, scaling-study (and, via their modules, report and lr-find).

Each entry point checks the command line *before* Hydra starts (scaling.preflight): it composes
the config, validates it and probes the tracking store, so a typo ends in one line naming the key
and the value (exit 2), with no output folder, no MLflow run and no Ray process left behind.
HYDRA_FULL_ERROR=1 shows the full traceback instead.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from scaling import interrupts
from scaling.config import ConfigError, redact_url, register_configs
from scaling.console import MULTIRUN_FLAGS
from scaling.split import plan_split
from scaling.validation import validate

# In the package, so that a wheel (`pip install .`, not only `-e`) carries it (pyproject package-data)
CONF_DIR = Path(__file__).resolve().parent / "conf"
INFO_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "-i", "-sc", "--shell-completion",
              "-p", "--package", "--resolve"}


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit; with HYDRA_FULL_ERROR=1 re-raise for the traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and sys.exc_info()[0] is not None:
        raise
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def one_line(exc: BaseException) -> str:
    """Return a one-line description of a Hydra/OmegaConf composition error."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, OverrideParseException):
        return f"{exc.override}: {str(exc).strip().splitlines()[0]} (see Hydra's override grammar)"
    head = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MissingConfigException) and exc.options:
        # Hydra names the missing file `missing_cfg_file` ("optimizer/foo"); there is no `config_name`
        # attribute, and reading one turned every unknown group option into an AttributeError traceback.
        missing = exc.missing_cfg_file or ""
        group = missing.rpartition("/")[0]  # "hydra/launcher/nope" is an option of hydra/launcher
        return f"{head.split(': ', 1)[-1]} (options for {group}: {', '.join(sorted(exc.options))})"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        return f"{head.rstrip('.')}: {first}" + (f" (key: {key})" if key and key not in first else "")
    return _joined(str(exc)) or head


def _joined(message: str) -> str:
    """Return a multi-line message as one line: a first line that ends in ':' only introduces the reason
    on the next (Hydra's "In 'experiment/x': ConfigKeyError raised while composing config:"), so the two
    are joined; OmegaConf's indented detail lines are left out but for the key they name."""
    lines = message.strip().splitlines()
    reason = [line.strip() for line in lines if line.strip() and not line.startswith(" ")]
    if not reason:
        return ""
    line = reason[0]
    if line.endswith(":") and len(reason) > 1:
        line = _COMPOSING.sub(": ", f"{line} {reason[1]}")
    key = next((k.split(":", 1)[1].strip() for k in lines if k.strip().startswith("full_key:")), "")
    return line + (f" (key: {key})" if key and key not in line else "")


# Hydra's wording between where a composition failed and why; the reason says it better
_COMPOSING = re.compile(r": \w+ raised while composing config: ")


def compose(overrides: Sequence[str], config_name: str = "config") -> Any:
    """Return the composed config for `overrides`, as Hydra would build it for a single run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def record_trial(cfg: Any, *, progress: bool = True, parent_run_id: Optional[str] = None,
                 ref_lr: Optional[float] = None, tags: Optional[dict[str, str]] = None):
    """Run one trial with MLflow recording (and a progress bar); return (TrialResult, run_id).

    ref_lr replaces scaling.ref_lr (an LR range test's result); tags go onto the trial's run.
    """
    from scaling.heap import imports_without_gc

    with imports_without_gc():  # torch
        from scaling.devices import check_device
        from scaling.reporters import MultiReporter, ProgressReporter
        from scaling.train import TrialResult, run_trial

    check_device(cfg)  # a trial that cannot run on this machine: one line, before MLflow opens its store
    reporters = []
    mlflow_reporter = None
    if cfg.mlflow.enabled:
        from scaling.tracking import MlflowTrialReporter

        mlflow_reporter = MlflowTrialReporter(cfg, parent_run_id=parent_run_id, ref_lr=ref_lr, extra_tags=tags)
        reporters.append(mlflow_reporter)
    if progress:
        from scaling.recorded import trial_run_name

        reporters.append(ProgressReporter(cfg.epochs, desc=trial_run_name(cfg)))
    reporter = MultiReporter(*reporters)
    try:
        if plan_split(cfg).workers > 1:  # data-parallel: one local process per worker (scaling.distributed)
            from scaling.distributed import run_data_parallel

            result = run_data_parallel(cfg, reporter, ref_lr=ref_lr)
        else:
            result = run_trial(cfg, reporter, ref_lr=ref_lr)
    except ConfigError:
        raise
    except Exception as exc:  # a crash is recorded as `error`, then re-raised for the caller
        result = TrialResult("error", reason=redact_url(f"{type(exc).__name__}: {exc}"))
        reporter.finish(result)
        raise
    except KeyboardInterrupt:  # the run ends KILLED and `interrupted`, as a study's trials do, not running for ever
        with interrupts.deferred():
            reporter.finish(TrialResult("interrupted", reason=interrupts.cause()))
        raise
    return result, (mlflow_reporter.run_id if mlflow_reporter else None)


def end_line(result: Any, run_id: Optional[str], cfg: Any) -> str:
    """Return the closing line of a single run: status, final metrics and where it is recorded."""
    m = result.metrics
    parts = [f"trial {result.status}"]
    for key in ("val/loss", "val/acc", "train/loss", "epoch", "time/samples_per_s", "mem/peak_mb"):
        if key in m:
            parts.append(f"{key}={m[key]:.4g}")
    if result.target:
        parts.append(f"target reached at {int(result.target['target/samples'])} samples")
    if result.reason:
        parts.append(f"({result.reason})")
    if run_id:
        parts.append(f"| mlflow run {run_id} in '{cfg.mlflow.experiment}' at {redact_url(cfg.mlflow.tracking_uri)}")
    return " ".join(parts)


def _from_launch_dir(cfg: Any) -> Any:
    """Return cfg with its relative paths (a sqlite store, data.root, data.cache_dir) anchored at the
    folder the command was launched from: hydra.job.chdir=true runs the task in its output folder,
    where `sqlite:///mlflow.db` would otherwise make a new store per run."""
    from hydra.utils import get_original_cwd
    from omegaconf import open_dict

    try:
        launch = get_original_cwd()
    except ValueError:  # not under Hydra (a test calling the task directly)
        return cfg
    if os.path.abspath(launch) == os.getcwd():
        return cfg
    uri = cfg.mlflow.tracking_uri
    with open_dict(cfg):
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            cfg.mlflow.tracking_uri = "sqlite:///" + os.path.join(launch, uri[len("sqlite:///"):])
        for key in ("root", "cache_dir"):
            path = os.path.expanduser(str(cfg.data[key]))
            cfg.data[key] = path if os.path.isabs(path) else os.path.join(launch, path)
    return cfg


def _train_task(cfg: Any) -> Optional[float]:
    interrupts.started()  # a Ctrl-C is a KeyboardInterrupt again (the guard is the entry point's)
    cfg = _from_launch_dir(cfg)
    try:
        validate(cfg)
        _note_unused_grid()
        progress = sys.stderr.isatty() or os.environ.get("SCALING_PROGRESS") == "1"
        ref_lr, found = None, {}
        if cfg.scaling.ref_lr == "auto" or cfg.schedule.from_lr_find:  # the LR comes from a range test first
            from scaling.lr_finder import trial_ref_lr

            ref_lr, found = trial_ref_lr(cfg, progress=progress)
            print(f"lr range test: {found['lr_find.suggestion']}={found['lr_find.lr']:.4g} at "
                  f"bs={found['lr_find.batch_size']} -> ref_lr={ref_lr:.4g}", flush=True)
        result, run_id = record_trial(cfg, progress=progress, ref_lr=ref_lr,
                                      tags={k: str(v) for k, v in found.items()})
    except ConfigError as exc:
        fail(str(exc))
    print(end_line(result, run_id, cfg), flush=True)
    return result.metrics.get("val/loss")


def _note_unused_grid() -> None:
    """Say so when a single run's preset defines a grid: Hydra applies hydra.sweeper.params only to a
    multirun, so `scaling-train experiment=optimizers` trains one trial of it, silently."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    params = hc.sweeper.get("params") or {}
    if hc.mode == RunMode.RUN and params:
        preset = hc.runtime.choices.get("experiment")
        print(f"note: {f'experiment={preset}' if preset else 'the config'} defines a grid over {', '.join(params)}; "
              "this is one trial of it: add -m (or run scaling-study) for the grid", flush=True)


def _run_hydra(task, argv: Sequence[str]) -> None:
    import hydra

    from scaling.preflight import hydra_argv

    # `--yes` is ours, not Hydra's: it answers the large-grid question in advance
    argv = hydra_argv(["hydra.sweeper.confirm=false" if a == "--yes" else a for a in argv])
    register_configs()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()


def train_main(argv: Optional[Sequence[str]] = None) -> None:
    """`scaling-train [overrides]`: one recorded trial; `-m` sweeps with the configured sweeper."""
    from scaling.preflight import preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    preflight(argv)
    _run_hydra(_train_task, argv)


def study_argv(argv: Sequence[str]) -> list[str]:
    """Return scaling-study's command line as Hydra gets it: the default preset and -m added where not given."""
    argv = list(argv)
    if not any(a.lstrip("+").startswith("experiment=") for a in argv):
        argv = ["experiment=default_study", *argv]
    if not any(a in MULTIRUN_FLAGS for a in argv) and not any(a.split("=")[0] in INFO_FLAGS for a in argv):
        argv = ["--multirun", *argv]
    return argv


def study_main(argv: Optional[Sequence[str]] = None) -> None:
    """`scaling-study [overrides]`: the multirun of the default study preset (or `experiment=...`)."""
    argv = study_argv(sys.argv[1:] if argv is None else argv)
    from scaling.preflight import preflight

    preflight(argv)
    _run_hydra(_train_task, argv)


def report_main(argv: Optional[Sequence[str]] = None) -> None:
    """`scaling-report [STUDY]`: the study report (see scaling.report)."""
    from scaling.report import main

    main(argv)


def lr_find_main(argv: Optional[Sequence[str]] = None) -> None:
    """`scaling-lr-find [overrides]`: the LR range test (see scaling.lr_finder)."""
    from scaling.lr_finder import main

    main(argv)


def _console(main: Callable[[], None]) -> Callable[[], None]:
    """Return `main` as a console script that skips the interpreter's teardown at its end.

    After a study, Python spends ~1.2 s (2 cores) freeing the modules of torch, Ray and MLflow
    one object at a time, memory the OS takes back at once. The script instead runs what a
    normal exit runs (non-daemon threads joined, atexit handlers: Ray's shutdown, MLflow's,
    logging's flush), flushes stdout and stderr, and ends with os._exit and main's exit code.
    A Ctrl-C that reached it is one line and exit 130; an exception other than SystemExit takes
    Python's own path (traceback, teardown).
    """
    def entry() -> None:
        try:
            main()
            code: Any = 0
        except SystemExit as exc:
            code = exc.code
        except KeyboardInterrupt:  # a Ctrl-C that no part of the command handled itself: no traceback
            print("error: interrupted", file=sys.stderr, flush=True)
            code = 130
        _exit_now(code)

    entry.__doc__ = main.__doc__
    return entry


def _exit_now(code: Any) -> None:
    import atexit
    import logging
    import threading

    if code is not None and not isinstance(code, int):  # sys.exit("message"), as Python reports it
        print(code, file=sys.stderr)
        code = 1
    # What Python's own exit does first: threading's exit hooks (concurrent.futures and loky stop
    # their pools there; joblib's launcher hangs without them), then non-daemon threads joined.
    threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


# The console scripts (through scaling.console, which guards Ctrl-C first); the *_main functions stay
# plain calls for Python callers.
train_entry, study_entry = _console(train_main), _console(study_main)
report_entry, lr_find_entry = _console(report_main), _console(lr_find_main)


if __name__ == "__main__":
    from scaling.console import train

    train()
