"""Whether a trial fits its training set: a batch no larger than it, a warmup that leaves steps after
it, schedule lengths of at least the steps they need, all at the trial's batch size. `validate()`
checks them for generated data, whose size the config gives (generated_n_train); the study's driver
and the trial check them once a file's size is known.

Like scaling.validation, this imports neither torch, ray nor mlflow.
"""
from __future__ import annotations

from typing import Any, Optional

from scaling.config import ConfigError, epochs_to_steps, warmup_steps_of


def check_batch_fits(key: str, batch_size: int, n_train: int) -> None:
    """Raise ConfigError when a batch is larger than the training set."""
    if batch_size > n_train:
        raise ConfigError(key, batch_size, f"is larger than the training set ({n_train} samples)")


def check_fits_data(cfg: Any, n_train: int) -> None:
    """Raise ConfigError when a trial cannot train on n_train samples: its batch is larger,
    warmup.epochs, in whole steps at this batch size, leaves no step after it, or a schedule length
    is too short to take effect (_check_schedule_lengths).

    validate() checks this for generated data, whose size it knows; the study's driver and the
    trial check it for files. Both lengths round to whole steps on their own, so a warmup shorter
    than `epochs` can still take every step of a short run at a large batch size (2 epochs of
    1,600 samples at B = 1024).
    """
    check_batch_fits("batch_size", cfg.batch_size, n_train)
    spe = n_train / cfg.batch_size
    total, warmup = epochs_to_steps(cfg.epochs, spe), warmup_steps_of(cfg, spe)
    if cfg.warmup.epochs > 0 and warmup >= total:
        steps = f"{warmup} step{'s' if warmup != 1 else ''}"
        raise ConfigError("warmup.epochs", cfg.warmup.epochs,
                          f"is {steps} at batch_size={cfg.batch_size} ({n_train} training samples), "
                          f"which leaves no step of the {total} that epochs={cfg.epochs} gives after it")
    _check_schedule_lengths(cfg, n_train)


def _check_schedule_lengths(cfg: Any, n_train: int) -> None:
    """Raise ConfigError for a step decay shorter than one step, or a cyclic cycle shorter than two
    (up and down), at this batch size: the schedule could not do what its lengths say."""
    s, spe = cfg.schedule, n_train / cfg.batch_size
    where = f"at batch_size={cfg.batch_size} ({n_train} training samples)"
    if s.name == "step" and s.step_epochs * spe < 1:
        raise ConfigError("schedule.step_epochs", s.step_epochs,
                          f"is {s.step_epochs * spe:.3g} steps {where}: a decay needs at least one step")
    if s.name == "cyclic" and (cycle := epochs_to_steps(s.cycle_epochs, spe)) < 2:
        raise ConfigError("schedule.cycle_epochs", s.cycle_epochs,
                          f"is {cycle} step {where}: a cycle needs at least 2 (up and down)")


DIGITS_SAMPLES = 1797  # scikit-learn's bundled digits, all of which data.py uses


def generated_n_train(d: Any) -> Optional[int]:
    """Return the training-set size of a generated dataset (as load_dataset splits it), None for files."""
    if d.name not in ("mnist1d", "synthetic", "digits"):
        return None
    n = DIGITS_SAMPLES if d.name == "digits" else d.n_samples
    n_train = n - int(round(n * d.val_fraction))
    return n_train if d.max_train_samples is None else min(n_train, d.max_train_samples)
