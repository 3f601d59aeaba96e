"""hydra/launcher=slurm: Hydra's submitit SLURM launcher, with a failed submission ending in one line.

When sbatch refuses the grid (no SLURM configuration on this machine, an unknown partition), the
plugin ends in two chained tracebacks and leaves the sweep folder with submitit's pickles behind.
Here the command ends with `error: hydra/launcher=slurm: sbatch failed: <sbatch's last line>`
(exit 1; HYDRA_FULL_ERROR=1 shows the traceback) and removes what this submission created. A
trial that fails on the cluster is not a submission failure: its error passes through unchanged.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from hydra_plugins.hydra_submitit_launcher import submitit_launcher


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """The plugin's SlurmLauncher; a submission that sbatch refuses ends in one line, its folder removed."""

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        # Hydra sets the launcher up before its sweeper makes the sweep folder: note what is already there
        self._sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self._new_root = first_missing(self._sweep_dir)
        self._before = set() if self._new_root is not None else entries(self._sweep_dir)
        self._launched = False

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]  # submitit needs both
        if missing:
            self._refuse(f"{' and '.join(missing)} not found on PATH: no SLURM client here "
                         "(hydra/launcher=slurm_local runs the same jobs on this machine)")
        real_stderr = sys.stderr
        sys.stderr = WithoutSubmititEcho(real_stderr)
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        except Exception as exc:  # noqa: BLE001 - only sbatch's refusal is ours to report
            reason = submission_error(exc)
            if reason is None:
                raise
            self._refuse(f"sbatch failed: {reason}")
        finally:
            sys.stderr = real_stderr
        self._launched = True
        return returns

    def _refuse(self, reason: str) -> None:
        """Remove what this submission created (unless an earlier batch ran) and end with one line."""
        from scaling.cli import fail  # here: Hydra imports this module at every start-up

        if not self._launched:  # an earlier batch's results stay where they are
            self._remove_created()
        fail(f"hydra/launcher=slurm: {reason}", code=1)

    def _remove_created(self) -> None:
        """Remove what this submission added: the sweep folder it made, or its new entries in an old one."""
        if self._new_root is not None:
            shutil.rmtree(self._new_root, ignore_errors=True)
            return
        for path in sorted(entries(self._sweep_dir) - self._before, reverse=True):  # .submitit/x before .submitit
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def submission_error(exc: BaseException) -> Optional[str]:
    """Return sbatch's reason when `exc` is a refused submission, else None (a trial's own failure)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    if isinstance(exc, FailedSubmissionError):
        return str(exc).strip().splitlines()[0]
    cause = exc.__cause__
    if isinstance(exc, FailedJobError) and isinstance(cause, subprocess.CalledProcessError) and cause.cmd[0] == "sbatch":
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {cause.returncode}"  # sbatch's last line: its fatal one
    return None


def first_missing(path: Path) -> Optional[Path]:
    """Return the outermost folder on `path` that does not exist yet (what a mkdir -p would make), or None."""
    missing = None
    for folder in (path.absolute(), *path.absolute().parents):
        if folder.exists():
            return missing
        missing = folder
    return missing


def entries(sweep_dir: Path) -> set[Path]:
    """Return what a submission may add to an existing sweep folder: its entries, and those of .submitit."""
    return set(sweep_dir.glob("*")) | set(sweep_dir.glob(".submitit/*"))


class WithoutSubmititEcho:
    """sys.stderr, less the copy of a failed command's stderr that submitit prints before raising it.

    submitit's CommandFunction prints sbatch's stderr and then raises FailedJobError with the same
    text, so dropping the print loses nothing: the error line, or the traceback, carries it.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        if sys._getframe(1).f_globals.get("__name__") == "submitit.core.utils":
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding: the real stream's
        return getattr(self._stream, name)
