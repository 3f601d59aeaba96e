"""The console scripts of pyproject.toml. Each installs the start-up Ctrl-C guard (scaling.interrupts)
before it imports the command: `scaling.cli` alone imports OmegaConf (~0.1 s, more on a loaded
machine), and a Ctrl-C in that import was Python's KeyboardInterrupt, with its hazards, still.
`scaling-report` and `scaling-lr-find` import MLflow, pandas and matplotlib (torch too) before
they write anything: seconds of imports, guarded the same way."""
from __future__ import annotations

import sys

from scaling import interrupts

MULTIRUN_FLAGS = {"-m", "--multirun"}


def train_starting(argv: list[str]) -> str:
    """Return the line a Ctrl-C before `scaling-train argv` records anything prints."""
    return interrupts.STUDY_NOT_STARTED if MULTIRUN_FLAGS & set(argv) else interrupts.RUN_NOT_STARTED


def _run(message: str, entry: str) -> None:
    """Guard Ctrl-C with `message`, then import the command (scaling.cli's `entry`) and run it."""
    interrupts.guard(message)
    import scaling.cli

    getattr(scaling.cli, entry)()


def train() -> None:
    _run(train_starting(sys.argv[1:]), "train_entry")


def study() -> None:
    _run(interrupts.STUDY_NOT_STARTED, "study_entry")


def report() -> None:
    _run(interrupts.REPORT_NOT_WRITTEN, "report_entry")


def lr_find() -> None:
    _run(interrupts.LR_FIND_NOT_STARTED, "lr_find_entry")
