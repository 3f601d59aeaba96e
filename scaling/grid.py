"""The study grid, from Hydra's own override grammar: sweeps become axes, the rest is fixed.

`batch_size=32,128` and `range(...)` are grid axes; `interval(1e-3,1)` (tagged `log` or not)
is sampled `num_samples` times, as in Shallue et al.'s random LR search; plain `key=value`
overrides apply to every trial. The result is one override list per trial, which Hydra then
composes exactly as it would a single run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from scaling.config import ConfigError, redact_url

# Axes that do not define a stratum: ASHA compares trials that differ only in these.
LR_AXES = ("lr_multiplier", "lr", "seed")


@dataclass
class Grid:
    """One override list per trial, plus what the grid was made of (recorded in the study run)."""

    points: list[list[str]]
    axes: dict[str, list[str]] = field(default_factory=dict)  # discrete axis -> values
    sampled: dict[str, str] = field(default_factory=dict)  # interval axis -> its sweep text
    fixed: list[str] = field(default_factory=list)

    @property
    def axis_names(self) -> list[str]:
        return list(self.axes) + list(self.sampled)

    def describe(self) -> dict[str, Any]:
        """Return a JSON-able summary of the grid."""
        return {"axes": self.axes, "sampled": self.sampled, "fixed": [redact_url(f) for f in self.fixed],
                "n_trials": len(self.points)}


def sweep_text(override: Any) -> str:
    """Return an override's value as typed (`tag(log,interval(0,1))`), without its `key=`."""
    return override.input_line.split("=", 1)[-1]


def draw(override: Any, rng: random.Random) -> str:
    """Return one value of an interval sweep, as override text: uniform, or log-uniform when tagged
    `log`; an integer when both ends are (Hydra's `int(interval(a,b))`, or `int(tag(log,interval(a,b)))`
    for batch sizes; a bare interval is floats)."""
    sweep = override.value()
    lo, hi = float(sweep.start), float(sweep.end)
    if "log" in sweep.tags:
        for end, name in ((lo, "start"), (hi, "end")):  # log(0) raised a bare "math domain error"
            if end <= 0:
                raise ConfigError(override.get_key_element(), sweep_text(override),
                                  f"a log interval needs a positive {name}")
        value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        value = rng.uniform(lo, hi)
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):  # int(interval(..)), log-tagged or not
        return str(int(round(value)))
    return repr(value)


def _last_per_key(overrides: Sequence[Any]) -> dict[str, Any]:
    """Return the overrides by key: a later override of the same key replaces an earlier one."""
    by_key: dict[str, Any] = {}
    for o in overrides:
        by_key[o.get_key_element()] = o  # insertion order kept; later wins
    return by_key


def _axis_length(key: str, o: Any) -> int:
    """Return how many values a discrete sweep has, counting a range without listing it
    (range(0,100000000) as strings would not fit in memory)."""
    from hydra.core.override_parser.types import RangeSweep

    sweep, text = o.value(), sweep_text(o)
    if isinstance(sweep, RangeSweep):
        if not sweep.step:
            raise ConfigError(key, text, "a range's step must not be 0")
        r = sweep.range()  # range, or Hydra's FloatRange: start + i * step short of stop, in Decimal
        n = len(r) if isinstance(r, range) else max(0, math.ceil((r.stop - r.start) / r.step))
    else:
        n = sum(1 for _ in o.sweep_string_iterator())
    if n == 0:
        raise ConfigError(key, text, "sweeps over no values: the grid is empty")
    return n


def grid_size(overrides: Sequence[Any], *, num_samples: int = 1) -> int:
    """Return how many trials build_grid would make of these overrides, without making them."""
    if num_samples < 1:
        raise ConfigError("hydra.sweeper.num_samples", num_samples, "must be at least 1")
    sweeps = [(k, o) for k, o in _last_per_key(overrides).items() if o.is_sweep_override()]
    n = math.prod(_axis_length(k, o) for k, o in sweeps if o.is_discrete_sweep())
    return n * (num_samples if any(not o.is_discrete_sweep() for _, o in sweeps) else 1)


def build_grid(overrides: Sequence[Any], *, num_samples: int = 1, seed: int = 0) -> Grid:
    """Return the trials of a sweep, given Hydra-parsed overrides (params first, then the shell's).

    A later override of the same key replaces an earlier one, so shell sweeps replace preset axes.
    Call grid_size first where the grid may be too large to build.
    """
    grid_size(overrides, num_samples=num_samples)  # a zero step or an empty axis: the same error as there
    by_key, axes, sampled, fixed = _last_per_key(overrides), {}, {}, []
    for key, o in by_key.items():
        if not o.is_sweep_override():
            fixed.append(f"{key}={o.get_value_element_as_str()}")
        elif o.is_discrete_sweep():
            axes[key] = list(o.sweep_string_iterator())
        else:
            sampled[key] = sweep_text(o)
    rng = random.Random(seed)
    interval_overrides = [by_key[k] for k in sampled]
    points = []
    for _ in range(num_samples if sampled else 1):
        draws = [f"{o.get_key_element()}={draw(o, rng)}" for o in interval_overrides]
        for combo in itertools.product(*[[f"{k}={v}" for v in vals] for k, vals in axes.items()]):
            points.append([*fixed, *combo, *draws])
    return Grid(points, axes, sampled, fixed)


def bare_key(key: str) -> str:
    """Return an override key without Hydra's +/~ prefixes and @package suffix (`+warmup.epochs` -> `warmup.epochs`)."""
    return key.split("@")[0].lstrip("+~")


def stratum_keys(axis_names: Sequence[str], group_by: Sequence[str] | None) -> list[str]:
    """Return the keys that define an ASHA stratum: group_by, or every axis but the LR and seed."""
    if group_by is not None:
        return list(group_by)
    return [a for a in axis_names if bare_key(a) not in LR_AXES]


def mixed_batch_sizes_note(asha: Any, axis_names: Sequence[str], strata: Sequence[str]) -> str:
    """Return a note when ASHA (hydra.sweeper.asha) judges trials of different batch sizes against each
    other (group_by without batch_size, or stratified=false), else ''. It then keeps the batch sizes
    that learn fastest per sample and prunes the others whole, so no batch size is sure of its best LR."""
    if not asha.enabled or "batch_size" not in map(bare_key, axis_names) or "batch_size" in map(bare_key, strata):
        return ""
    why = f"group_by={list(asha.group_by)}" if asha.stratified and asha.group_by is not None else "stratified=false"
    return (f"note: ASHA compares trials of different batch sizes at each rung (hydra.sweeper.asha.{why}): a batch "
            "size can be pruned whole; add batch_size to group_by for the best LR of each batch size")


def params_overrides(params: Any) -> list[str]:
    """Return hydra.sweeper.params as overrides, in order: a value is sweep text (`32,64`, `range(..)`),
    a list a choice of its elements (as Hydra's Nevergrad sweeper reads one; Hydra's basic sweeper would
    set the key to the list itself, which no grid means)."""
    from hydra.core.override_parser.types import Override
    from omegaconf import OmegaConf

    overrides = []
    for key, value in (params or {}).items():
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"hydra.sweeper.params.{key}", value, "sweeps over no values: the grid is empty")
            text = ",".join(Override._get_value_element_as_str(v) for v in value)  # one value: a fixed override
        else:
            text = value if isinstance(value, str) else Override._get_value_element_as_str(value)
        overrides.append(f"{key}={text}")
    return overrides


def blamed(exc: BaseException, overrides: Sequence[str], apply: Any) -> ConfigError:
    """Return exc (raised by `apply(overrides)`) as a ConfigError naming the override that raised it, key
    and value once, with its reason: the first whose prefix of `overrides` `apply` fails on (a retry per
    override, on this error path only)."""
    from scaling.cli import one_line

    line = one_line(exc)
    culprit = next((o for i, o in enumerate(overrides) if _fails(apply, overrides[:i + 1])), None)
    if culprit is None:  # failed only all together (should not happen): name the trial
        return ConfigError("trial", " ".join(overrides), line)
    key, _, value = culprit.partition("=")
    head, sep, reason = line.partition(": ")  # "Error merging override k=v: ..." or "Could not override 'k': ..."
    if sep and (culprit in head or f"'{key.lstrip('+~')}'" in head):
        line = reason
    return ConfigError(key, value, line)


def _fails(apply: Any, overrides: Sequence[str]) -> bool:
    try:
        apply(list(overrides))
    except Exception:  # noqa: BLE001 - any error: this prefix holds the culprit
        return True
    return False


def is_value_key(config_loader: Any, key: str) -> bool:
    """Return True for a plain config key of an override (not a config group, no +/~ or @package)."""
    if key[:1] in "+~" or "@" in key or "/" in key:
        return False
    return not config_loader.repository.group_exists(key.replace(".", "/"))


def merge_values(cfg: Any, overrides: Sequence[str]) -> None:
    """Apply plain `key=value` overrides to cfg with Hydra's own override code (its grammar and errors)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(overrides), cfg)


def canonical_points(points: list[list[str]]) -> list[list[str]]:
    """Return the grid's points, each point's overrides in key order (a key given twice: its last value,
    as Hydra applies them). The points keep their order: a trial's index in it is its identity in the
    study's record and checkpoints, so a grid whose points come in another order is another study."""
    def canonical(point: list[str]) -> list[str]:
        last = {override.split("=", 1)[0]: override for override in point}
        return sorted(last.values())

    return [canonical(p) for p in points]


def grid_digest(grid: Grid, trained_only: bool = False) -> str:
    """Return the hash that names a grid's points whatever the order of their fixed overrides; with
    `trained_only`, of what the trials train (the mlflow.* overrides, where they are recorded, left out)."""
    points = canonical_points(grid.points)
    if trained_only:
        points = [[o for o in p if not o.lstrip("+~").startswith("mlflow.")] for p in points]
    return points_digest(points)


def points_digest(points: list[list[str]]) -> str:
    """Return the 8 hex digits that name `points` as given (a study's name before its overrides were put
    in key order: a resume still finds a study by it)."""
    return hashlib.sha1(json.dumps(points, sort_keys=True).encode()).hexdigest()[:8]
