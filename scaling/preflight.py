"""The command line's check before Hydra starts: parse, compose, validate, probe the store.

Every entry point calls `preflight(argv)` first, so a typo ends in one line naming the key and
the value (exit 2), with no output folder, no MLflow run and no Ray process left behind. It
builds what `hydra.main` would build (search path, `-cn`/`-cp`/`-cd`), composes the run or the
multirun the same way, and turns Hydra's multi-line errors into `scaling.cli.one_line`'s one line.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import open_dict

from scaling import interrupts
from scaling.cli import CONF_DIR, fail, one_line
from scaling.config import ConfigError, register_configs
from scaling.validation import validate


def hydra_argv(argv: Sequence[str]) -> list[str]:
    """Return argv with Hydra's flags, each with its value, ahead of the overrides (both in their order).

    Hydra's argparse takes the overrides as one run of positionals: `a=1 -m b=2` is refused, and so
    was scaling-study's own `experiment=` put ahead of a user's `-cn NAME`. A bare `--info` gets its
    default value (`all`) spelled out, so that argparse does not read the first override as it.
    With `--hydra-help` only the overrides of Hydra's own config are kept: Hydra composes its help
    from that config alone, where any other override fails (a traceback; scaling-study adds one).
    """
    from hydra._internal.utils import get_args_parser

    actions = {flag: a for a in get_args_parser()._actions for flag in a.option_strings}
    flags, overrides, rest = [], [], list(argv)
    while rest:
        arg = rest.pop(0)
        action = actions.get(arg)
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        flags.append(arg)
        # `-cn NAME` takes the next word; `--info` only when it is one of its choices
        if action is not None and action.nargs is None and rest:
            flags.append(rest.pop(0))
        elif action is not None and action.nargs == "?":
            flags.append(rest.pop(0) if rest and rest[0] in (action.choices or ()) else action.const)
    if "--hydra-help" in flags:
        overrides = [o for o in overrides if re.match(r"[+~]*hydra[./=]", o)]
    return flags + overrides


def parse_args(argv: Sequence[str]) -> Any:
    """Return Hydra's parse of the command line (a Namespace); a usage error becomes one line."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.error = fail  # type: ignore[method-assign]
    return parser.parse_args(hydra_argv(argv))


def main_hydra(args: Any) -> Any:
    """Return the Hydra instance hydra.main would build for `args`: scaling/conf/, or -cp, plus -cd."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path, detect_task_name

    if args.config_dir is not None and not os.path.isdir(args.config_dir):
        raise ConfigError("--config-dir", args.config_dir, "is not a directory")
    register_configs()
    search_path = create_automatic_config_search_path(None, __name__, args.config_path or str(CONF_DIR))
    if args.config_dir is not None:
        from hydra.core.config_search_path import SearchPathQuery

        search_path.prepend("command-line", f"file://{os.path.abspath(args.config_dir)}", SearchPathQuery("schema"))
    return Hydra.create_main_hydra2(detect_task_name(None, __name__), search_path)


def preflight(argv: Sequence[str], check: Callable[[Any], None] = validate) -> None:
    """Exit with one line unless the command line parses, composes, validates and reaches MLflow.

    `check` validates a single run's config (scaling-lr-find validates it at each tested batch size).

    A multirun is composed as Hydra composes it, with each sweep value merged alone; a basic-sweeper
    multirun is also validated at every grid point, since its jobs run one after another (the
    scaling sweeper validates its own grid before anything starts).
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    args = parse_args([a for a in argv if a != "--yes"])
    modes = [flag for flag, on in (("--multirun", args.multirun), ("--cfg", args.cfg), ("--info", args.info),
                                   ("--shell-completion", args.shell_completion)) if on]
    if len(modes) > 1:  # Hydra's own refusal is a ValueError traceback
        fail(f"{' and '.join(modes)}: give one of them (Hydra runs one mode: a run, a multirun, --cfg or --info)")
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.package
            or args.resolve or args.experimental_rerun):
        return  # help and config output need no check
    name = args.config_name or "config"
    _refuse_deletions(args.overrides)
    hydra = None
    try:
        if not args.multirun:
            _refuse_axes(args.overrides)
        hydra = main_hydra(args)
        configs = sweep_configs(hydra, name, args.overrides) if args.multirun else [run_config(hydra, name, args, check)]
        from scaling.store import check_tracking_uri
        from scaling.tracking import check_experiment

        for uri, experiment in dict.fromkeys((c.mlflow.tracking_uri, c.mlflow.experiment)
                                             for c in configs if c.mlflow.enabled):
            check_tracking_uri(uri)
            check_experiment(uri, experiment)
        if not args.multirun:  # a study's driver reads or generates each dataset before its record opens
            from scaling.data import check_sources

            check_sources(configs[0].data)
            from scaling.devices import check_device  # torch: the run imports it next anyway

            check_device(configs[0])  # device=cuda without a GPU, nccl on the CPU: before Hydra's output folder
    except MissingConfigException as exc:
        if exc.missing_cfg_file == name:  # the primary config: Hydra's message names no flag
            fail(f"--config-name={name}: {one_line(exc)}")
        fail(one_line(exc))
    except Exception as exc:  # noqa: BLE001 - every composition error becomes one line
        fail(_blame(hydra, name, args, exc))
    finally:
        GlobalHydra.instance().clear()


def _refuse_deletions(overrides: Sequence[str]) -> None:
    """Exit with one line for `~key` outside hydra.*: every key of the trial config is required, and a
    deleted one failed later as `Key 'seed' not in 'TrialConfig'` (a null one as Hydra's 'does not exist')."""
    line = _deletion(overrides)
    if line:
        fail(line)


def _deletion(overrides: Sequence[str]) -> str:
    """Return the line refusing the first `~key` outside hydra.*, or ''."""
    for override in overrides:
        key = override.partition("=")[0]
        if key.startswith("~") and not key.lstrip("~").startswith(("hydra.", "hydra/")):
            bare = key.lstrip("~")
            return f"{override}: deletes {bare}, but every key of the trial config is required: set it instead ({bare}=...)"
    return ""


def _refuse_axes(overrides: Sequence[str]) -> None:
    """Raise ConfigError for a grid axis given to a single run, which Hydra would ignore without a word."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~").split(".")[:3] == ["hydra", "sweeper", "params"]:
            raise ConfigError(key, value, "sets the grid, which only a multirun sweeps: add -m (a single run "
                                          "would ignore it)")


def _blame(hydra: Any, config_name: str, args: Any, exc: Exception) -> str:
    """Return exc's one line, led by the override that raised it when the line names none.

    Some of OmegaConf's errors name no key: `lr_find.batch_sizes.x=1`, under a node that is null,
    fails with "Unexpected type for root: NoneType". Hydra applies
    the overrides in order, so the first prefix of them that fails to compose ends with the culprit
    (a composition per override, on this error path only).
    """
    from hydra.types import RunMode

    line = one_line(exc)
    if line == "Unexpected type for root: NoneType":
        line = "a node on this path is null here, so no key can be set under it"
    overrides = list(args.overrides)
    preset = _SWEEPER_ONLY.match(line)
    if preset:
        return _scaling_sweeper_only(preset["path"], preset["key"], overrides)
    unknown = _UNKNOWN_KEY.match(line)  # Hydra's "Could not override 'k': ..." names the key, not the value
    if unknown:
        culprit = next((o for o in overrides if o.partition("=")[0].lstrip("+~") == unknown["key"]), None)
        if culprit is not None:
            return f"{culprit}: {unknown['reason']}"
    if hydra is None or isinstance(exc, ConfigError) or any(o.split("=", 1)[0].lstrip("+~") in line for o in overrides):
        return line
    mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
    for i in range(len(overrides)):
        try:
            hydra.compose_config(config_name, overrides[:i + 1], run_mode=mode)
        except Exception as prefix_exc:  # noqa: BLE001 - the first prefix that fails, with the same error
            return f"{overrides[i]}: {line}" if one_line(prefix_exc) == one_line(exc) else line
    return line


# Hydra's line for a key the schema lacks, with one_line's "(key: ...)" when it repeats the key
_UNKNOWN_KEY = re.compile(r"^Could not override '(?P<key>[^']+)': (?P<reason>.*?)(?: \(key: (?P=key)\))?$")
# A preset's hydra.sweeper.* key composed under hydra/sweeper=basic, as scaling.cli.one_line words it
_SWEEPER_ONLY = re.compile(r"^In '(?P<path>[^']+)': Key '\w+' not in 'BasicSweeperConf' \(key: (?P<key>[\w.]+)\)$")


def _scaling_sweeper_only(path: str, key: str, overrides: Sequence[str]) -> str:
    """Return the line for a preset (`experiment/default_study`) that sets a sweeper key only the scaling
    sweeper has, composed under hydra/sweeper=basic: Hydra's own line names neither the choice nor the way out."""
    named = next((o for o in overrides if o.lstrip("+").replace("=", "/", 1) == path), f"'{path}'")
    return (f"{named}: sets {key}, a setting of the scaling sweeper only (hydra/sweeper=basic has max_batch_size "
            "and params); run this preset without hydra/sweeper=basic")


def run_config(hydra: Any, config_name: str, args: Any, check: Callable[[Any], None] = validate) -> Any:
    """Return the config of a single run, validated by `check`."""
    from hydra.types import RunMode

    from scaling.store import check_writable

    cfg = hydra.compose_config(config_name, args.overrides, run_mode=RunMode.RUN)
    check_writable("hydra.run.dir", cfg.hydra.run.dir, Path(cfg.hydra.run.dir).absolute())  # Hydra makes it first
    return _trial(cfg, [], check)


def sweep_configs(hydra: Any, config_name: str, overrides: Sequence[str]) -> list:
    """Check a multirun as Hydra composes it; return the configs whose MLflow store is checked here.

    The basic sweeper runs its jobs one after another, so each of its grid points is composed and
    validated (and returned). The scaling sweeper plans its whole grid, and probes the store,
    before anything starts; here each value of its axes is merged alone, so a value that does not
    compose is named by itself rather than by the trial it belongs to.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from scaling.grid import grid_size, params_overrides

    master = hydra.compose_config(config_name, list(overrides), run_mode=RunMode.MULTIRUN)  # sweeps left out
    sweeper, loader = master.hydra.sweeper, hydra.config_loader
    basic = sweeper._target_.endswith("BasicSweeper")
    # the preset's axes come first; Hydra's basic sweeper reads each value as text, a list included
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] if basic else params_overrides(sweeper.params)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + list(master.hydra.overrides.task))
    grid_size(parsed, num_samples=sweeper.get("num_samples", 1))  # an empty axis or a zero range step, by key
    if basic:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        # No study run to create: the jobs, in this process or a launcher's (SLURM, joblib), are the
        # command's work, and a Ctrl-C while they run is Python's KeyboardInterrupt, not a start-up's end.
        interrupts.started()

        points = BasicSweeper.split_arguments(parsed, None)[0]
        return [_trial(loader.load_sweep_config(master, p), p) for p in points]
    from scaling.grid import is_value_key

    base = copy.deepcopy(master)
    with open_dict(base):
        del base["hydra"]
    axes = {o.get_key_element(): o for o in parsed if o.is_sweep_override()}  # a shell axis replaces a preset's
    for key, o in axes.items():
        if o.is_interval_sweep():
            _merge_draw(o, loader, base)
            continue
        for value in _axis_values(o):
            if is_value_key(loader, key):  # merged as Hydra merges it, into the copy (a millisecond)
                _merge_value(base, f"{key}={value}")
            else:  # a group choice: its own composition
                loader.load_sweep_config(master, [f"{key}={value}"])
    return []


def _merge_value(base: Any, override: str) -> None:
    """Merge one axis value into base; a failure names the override (an axis of hydra.sweeper.params
    is on no command line that `_blame` could search for it)."""
    from scaling.grid import blamed, merge_values

    try:
        merge_values(base, [override])
    except Exception as exc:  # noqa: BLE001 - any merge error: one line naming key and value
        if override in one_line(exc):  # Hydra's "Error merging override k=v: ..." names both already
            raise
        raise blamed(exc, [override], lambda some: merge_values(copy.deepcopy(base), some)) from None


def _merge_draw(override: Any, loader: Any, base: Any) -> None:
    """Merge one draw of an interval sweep into `base`; a ConfigError names the interval if it cannot be."""
    import random

    from scaling.grid import draw, is_value_key, merge_values, sweep_text

    key, text = override.get_key_element(), sweep_text(override)
    if key[:1] in "+~" or "@" in key:
        return  # adds, deletes and packages: the sweeper composes them with the grid
    if not is_value_key(loader, key):
        raise ConfigError(key, text, "is a config group: list its options (a,b), an interval draws numbers")
    value = draw(override, random.Random(0))
    try:
        merge_values(base, [f"{key}={value}"])
    except Exception as exc:  # noqa: BLE001 - the draw's own error, under the interval's name
        hint = "; int(interval(a,b)) draws integers" if "Integer" in str(exc.__cause__ or exc) else ""
        raise ConfigError(key, text, f"its draw {value} does not merge ({one_line(exc)}){hint}") from None


def _axis_values(override: Any) -> list[str]:
    """Return the values of a discrete sweep to merge: every choice, a range's first (all of one type)."""
    from hydra.core.override_parser.types import Transformer

    if override.is_range_sweep():  # range(0,10**8) is not listed: the sweeper refuses such a grid itself
        return [Transformer.str(v) for v in itertools.islice(override.value().range(), 1)]
    return list(override.sweep_string_iterator())


def _trial(cfg: Any, point: Sequence[str], check: Callable[[Any], None] = validate) -> Any:
    """Return `cfg` without its hydra node, validated by `check`; a grid point's error names the trial."""
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        check(cfg)
    except ConfigError as exc:
        if not point:
            raise
        raise ConfigError(exc.key, exc.value, f"{exc.problem} (trial {' '.join(point)})") from None
    return cfg


def plan_study(argv: Sequence[str]) -> Any:
    """Return the scaling sweeper's settings for `scaling-study argv` once its whole grid is planned and
    every trial validated (None under another sweeper); a ValueError's one line names the key and the value.

    For a study submitted to a cluster (cluster/slurm/submit.py): what its job would refuse first is
    refused before it queues. No Ray, no MLflow and no store probe (the job's node may reach stores this
    machine does not), and no question: the job has no terminal, so a grid above max_trials needs --yes.
    """
    import io

    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf

    from scaling.cli import study_argv
    from scaling.sweeper import ScalingSweeper

    args = parse_args(["hydra.sweeper.confirm=false" if a == "--yes" else a for a in study_argv(argv)])
    name = args.config_name or "config"
    deletion = _deletion(args.overrides)
    if deletion:
        raise ValueError(deletion)
    hydra = None
    try:
        hydra = main_hydra(args)
        cfg = hydra.compose_config(name, args.overrides, run_mode=RunMode.MULTIRUN)
        context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg))
        sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context, task_function=None)
        if not isinstance(sweeper, ScalingSweeper):
            sweep_configs(hydra, name, args.overrides)
            return None
        stdin, sys.stdin = sys.stdin, io.StringIO()  # no terminal, as in the job: a large grid is refused
        try:
            sweeper.plan(OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
        finally:
            sys.stdin = stdin
        return sweeper.conf
    except Exception as exc:  # noqa: BLE001 - every composition error becomes one line
        raise ValueError(_blame(hydra, name, args, exc)) from exc
    finally:
        GlobalHydra.instance().clear()
