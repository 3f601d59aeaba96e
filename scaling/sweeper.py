"""Hydra sweeper backed by Ray Tune + stratified ASHA: a study *is* a Hydra multirun.

Hydra only loads plugins from the `hydra_plugins` namespace, so `hydra_plugins/scaling_sweeper`
holds a thin subclass of `ScalingSweeper` and registers `hydra/sweeper=scaling`.

Everything a user can get wrong is checked before any MLflow run exists, and all but what needs
the data or the cluster before Ray starts: the grid's size is counted before it is built, every
grid point is composed and validated, the ASHA and resource settings are checked, the tracking
store and the Ray address are probed, each trial's batch is compared with its training set (Ray
is stopped again if that fails), and the GPU request and device=cuda with the cluster.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf, open_dict

from scaling import interrupts
from scaling.config import MODES, REPORTED_METRICS, ConfigError
from scaling.grid import (Grid, blamed, build_grid, grid_digest, grid_size, is_value_key, merge_values,
                          params_overrides, points_digest)
from scaling.split import plan_split
from scaling.validation import _choice, _direction, _positive, validate

log = logging.getLogger(__name__)


@dataclass
class AshaConf:
    enabled: bool = True
    stratified: bool = True
    """Decide promotions within a stratum, so no batch size is pruned whole."""
    group_by: Optional[List[str]] = None
    """Keys defining a stratum (null: every axis except lr_multiplier, lr and seed)."""
    grace_period: float = 1.0
    """Epochs every trial trains before its first rung."""
    reduction_factor: float = 3.0
    metric: str = "val/loss"
    mode: str = "min"
    variant: str = "stopping"
    """`stopping`: a trial is judged on reaching a rung against the values recorded there before it,
    and stopped or continued at once (Ray Tune's ASHA). `promotion`: it waits at the rung (paused,
    checkpointed) until it ranks in the top 1/reduction_factor there (Li et al. 2020): fewer samples,
    a pause and a resume per rung. scaling.asha_promotion says more."""


@dataclass
class RayConf:
    address: Optional[str] = None
    """null (or `local`): start Ray locally, on 127.0.0.1; `auto` or host:port joins an existing cluster."""
    num_cpus: Optional[int] = None
    """The local Ray's CPUs (null: the machine's); a cluster has its own, so it is refused with address."""
    num_gpus: Optional[float] = None


@dataclass
class ResourcesConf:
    cpu: float = 1.0
    """CPUs per trial, or per worker of a data-parallel trial (parallel.*); also torch's thread count."""
    gpu: float = 0.0
    """GPUs per trial (per worker); fractions pack several trials on one GPU."""


@dataclass
class ScalingSweeperConf:
    _target_: str = "hydra_plugins.scaling_sweeper.scaling_sweeper.ScalingSweeper"
    params: Dict[str, Any] = field(default_factory=dict)
    """The grid: key -> Hydra sweep text (choice, range, interval) or a list (a choice of its values);
    shell sweeps add or replace axes.
    An empty dict, not null as in Hydra's BasicSweeperConf: OmegaConf sets no key under a null node, so
    hydra.sweeper.params.batch_size=32,64 and params={...} on the command line failed."""
    num_samples: int = 1
    """Draws of the interval(...) axes (random / log-uniform search)."""
    sample_seed: int = 0
    asha: AshaConf = field(default_factory=AshaConf)
    ray: RayConf = field(default_factory=RayConf)
    resources: ResourcesConf = field(default_factory=ResourcesConf)
    max_concurrent: Optional[int] = None
    max_trials: int = 1000
    """Refuse grids larger than this unless confirm=false or --yes is given."""
    confirm: bool = True
    study_name: Optional[str] = None
    """Names the study (MLflow study run, Ray experiment); null: derived from the grid."""
    storage_path: Optional[str] = None
    """Ray Tune's storage (checkpoints, experiment state); null: .studies in the folder the study starts from."""
    resume: bool = False
    """Finish the unfinished trials of the last run of this study."""
    resume_errored: bool = False
    """With resume: train again the trials that ended in error, each from its last checkpoint (Ray
    Tune's `resume_errored`), say after the bug or the full disk that failed them is fixed."""
    checkpoint: bool = True
    """Checkpoint at evaluations, so a lost worker or a killed study resumes its trials mid-way."""
    checkpoint_interval_s: float = 10.0
    """Skip an evaluation's checkpoint if the trial's last one is younger than this: at most this
    much work is lost, and short trials do not pay a save per evaluation. 0: every evaluation."""
    max_failures: int = 2
    report: bool = True
    """Run the study report at the end (figures become artifacts of the study run)."""
    run_twins: bool = False
    """Run every grid point, even one that trains exactly what another does (a flat warmup, one LR
    under two rule labels): scaling.twins. false: run it once and record both runs from it."""


def sweeper_node() -> DictConfig:
    """Return the node registered as hydra/sweeper=scaling: the schema, with `params` open to new keys.

    Hydra composes in struct mode, where a key a schema lacks is a typo; params' keys are the grid's
    axes, which no schema lists, so `hydra.sweeper.params.batch_size=32,64` and `params={...}` would
    be refused (a typo in an axis name is still refused, when its points are composed)."""
    node = OmegaConf.structured(ScalingSweeperConf)
    OmegaConf.set_struct(node.params, False)
    return node


# What ASHA may judge by: a metric every evaluation reports (Tune fails a trial whose result lacks
# it). mem/eval_peak_mb is reported on CUDA only, gns/b_simple once the noise scale has an estimate.
ASHA_METRICS = tuple(m for m in REPORTED_METRICS if m not in ("mem/eval_peak_mb", "gns/b_simple"))

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}$")


def safe_name(key: str, name: str) -> str:
    """Return `name` if it is safe inside a path (no separators, no `..`, no NUL), else raise."""
    if not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(key, name, "must be 1-128 letters, digits or ._=+- and must not contain '/', '..' or NUL")
    return name


class ScalingSweeper(Sweeper):
    """Runs the multirun's grid as a Ray Tune study with stratified ASHA, recorded in MLflow."""

    def __init__(self, **conf: Any) -> None:
        super().__init__()
        self.conf = OmegaConf.structured(ScalingSweeperConf(**{k: v for k, v in conf.items() if k != "_target_"}))
        self.hydra_context = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config

    # --------------------------------------------------------------- planning (no Ray, no MLflow)
    def plan(self, arguments: List[str]) -> tuple[Grid, list]:
        """Return the grid and one validated trial config per point, or raise ConfigError."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = params_overrides(self.conf.params)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(params + list(arguments))
        self._check_settings()
        self._check_size(grid_size(overrides, num_samples=self.conf.num_samples))
        grid = build_grid(overrides, num_samples=self.conf.num_samples, seed=self.conf.sample_seed)
        configs = self._compose_all(grid)
        if not self.conf.resources.gpu and any(c.parallel.backend == "nccl" and plan_split(c).workers > 1
                                               for c in configs):
            raise ConfigError("parallel.backend", "nccl",  # else every attempt fails inside its trial
                              "needs a GPU per worker, and hydra.sweeper.resources.gpu=0; use gloo or auto")
        a = self.conf.asha
        if a.enabled:
            budget = min(float(c.epochs) for c in configs)
            if a.grace_period > budget:
                raise ConfigError("hydra.sweeper.asha.grace_period", a.grace_period,
                                  f"is longer than the budget epochs={budget:g}; set it to at most {budget:g}, "
                                  "or hydra.sweeper.asha.enabled=false")
            for key in a.group_by or []:
                if OmegaConf.select(configs[0], key, default="__missing__") == "__missing__":
                    raise ConfigError("hydra.sweeper.asha.group_by", key, "is not a config key")
            if a.variant == "promotion":
                self._check_pausable(configs)
        return grid, configs

    def _check_pausable(self, configs: list[DictConfig]) -> None:
        """Raise ConfigError where promotion-based ASHA could not pause and resume its trials."""
        why = "pauses trials at rungs, which needs "
        if not self.conf.checkpoint:
            raise ConfigError("hydra.sweeper.asha.variant", "promotion", why + "hydra.sweeper.checkpoint=true")
        if self.conf.max_concurrent is not None:  # Tune's cap counts a paused trial until it ends
            raise ConfigError("hydra.sweeper.asha.variant", "promotion", why + "hydra.sweeper.max_concurrent=null "
                              "(a paused trial counts against Tune's cap, so the study could stall)")
        if any(plan_split(c).workers > 1 for c in configs):
            raise ConfigError("hydra.sweeper.asha.variant", "promotion", why + "single-worker trials "
                              "(a data-parallel trial's Ray Train run is not paused); use variant=stopping")

    def _check_settings(self) -> None:
        """Raise ConfigError for a sweeper setting that Ray or ASHA would reject only mid-study, or never."""
        c, a = self.conf, self.conf.asha
        _positive("hydra.sweeper.resources.cpu", c.resources.cpu)  # NaN passed `<= 0`, and no trial was ever placed
        _positive("hydra.sweeper.resources.gpu", c.resources.gpu, allow_zero=True)
        _positive("hydra.sweeper.max_failures", c.max_failures, integer=True, allow_zero=True)  # Ray: -1 is unbounded
        if c.max_concurrent is not None:
            _positive("hydra.sweeper.max_concurrent", c.max_concurrent, integer=True)
        if not c.checkpoint_interval_s >= 0:
            raise ConfigError("hydra.sweeper.checkpoint_interval_s", c.checkpoint_interval_s,
                              "must be 0 (every evaluation) or more seconds")
        if c.resume_errored and not c.resume:
            raise ConfigError("hydra.sweeper.resume_errored", True, "needs hydra.sweeper.resume=true: it says which "
                                                                    "finished trials a resume trains again")
        self._check_ray()
        if c.study_name is not None:
            safe_name("hydra.sweeper.study_name", c.study_name)
        if a.enabled:
            _positive("hydra.sweeper.asha.grace_period", a.grace_period)
            if not 1 < a.reduction_factor < math.inf:
                raise ConfigError("hydra.sweeper.asha.reduction_factor", a.reduction_factor,
                                  "must be a finite number above 1")
            _choice("hydra.sweeper.asha.mode", a.mode, MODES)
            _choice("hydra.sweeper.asha.variant", a.variant, ("stopping", "promotion"))
            _choice("hydra.sweeper.asha.metric", a.metric, ASHA_METRICS)
            _direction("hydra.sweeper.asha.mode", a.mode, "hydra.sweeper.asha.metric", a.metric)

    def _check_ray(self) -> None:
        """Raise ConfigError for a local Ray's size that Ray would refuse, or one given with a cluster's
        address (ray.init refuses both together, after the driver has prepared the study)."""
        from scaling.local_ray import starts_local_head

        r = self.conf.ray
        if r.num_cpus is not None:
            _positive("hydra.sweeper.ray.num_cpus", r.num_cpus, integer=True)
        if r.num_gpus is not None:
            _positive("hydra.sweeper.ray.num_gpus", r.num_gpus, allow_zero=True)
        if not starts_local_head(r.address):
            for key, value in (("num_cpus", r.num_cpus), ("num_gpus", r.num_gpus)):
                if value is not None:
                    raise ConfigError(f"hydra.sweeper.ray.{key}", value, "sizes a local Ray only; the cluster at "
                                      f"hydra.sweeper.ray.address={r.address} has its own")

    def _check_size(self, n_trials: int) -> None:
        """Raise ConfigError for a grid larger than max_trials that was not confirmed, before it is built."""
        if n_trials > self.conf.max_trials and self.conf.confirm and not _confirmed(n_trials):
            raise ConfigError("hydra.sweeper.max_trials", self.conf.max_trials,
                              f"the grid has {n_trials} trials; pass --yes (or "
                              "hydra.sweeper.confirm=false) to launch them all")

    def _compose_all(self, grid: Grid) -> list[DictConfig]:
        """Return each point's validated config, composing once per distinct set of group choices.

        Hydra composes a point by building its defaults list and merging every config file of it
        (~0.25 s), then applying the plain `key=value` overrides to the result. Points that differ
        only in plain values share everything before that last step, so each such family is
        composed once, and each point's own values are applied to a copy with Hydra's own
        override code: the same grammar, the same errors, the same result as composing it whole.
        """
        value_axes = [k for k in grid.axis_names if is_value_key(self.hydra_context.config_loader, k)]
        bases: dict[tuple, DictConfig] = {}
        configs = []
        for point in grid.points:
            own = [o for o in point if o.split("=", 1)[0] in value_axes]
            shared = tuple(o for o in point if o not in own)
            if shared not in bases:
                bases[shared] = self._compose(list(shared), validate_it=False)
            configs.append(self._apply_values(bases[shared], own, point))
        return configs

    def _apply_values(self, base: DictConfig, values: list[str], point: list[str]) -> DictConfig:
        cfg = copy.deepcopy(base)
        try:
            merge_values(cfg, values)
        except Exception as exc:  # noqa: BLE001 - becomes one line naming the override
            raise blamed(exc, values, lambda some: merge_values(copy.deepcopy(base), some)) from None
        return self._validated(cfg, point)

    def _compose(self, point: list[str], validate_it: bool = True) -> DictConfig:
        def load(overrides: list[str]) -> DictConfig:
            return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

        try:
            cfg = load(point)
        except Exception as exc:  # noqa: BLE001 - becomes one line naming the override
            raise blamed(exc, point, load) from None
        with open_dict(cfg):
            del cfg["hydra"]
        return self._validated(cfg, point) if validate_it else cfg

    @staticmethod
    def _validated(cfg: DictConfig, point: list[str]) -> DictConfig:
        try:
            validate(cfg)
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.value, f"{exc.problem} (trial {' '.join(point)})") from None
        return cfg

    def storage_root(self) -> Path:
        """Return where Ray Tune keeps this sweep's studies (checkpoints, experiment state, journal)."""
        return Path(self.conf.storage_path or Path.cwd() / ".studies").expanduser().resolve()

    def _check_storage(self) -> None:
        from scaling.store import check_writable

        check_writable("hydra.sweeper.storage_path", str(self.storage_root()), self.storage_root())
        sweep = str(self.config.hydra.sweep.dir)  # the study's multirun.yaml and report go there
        check_writable("hydra.sweep.dir", sweep, Path(sweep).absolute())

    def study_name(self, grid: Grid) -> str:
        """Return the study's name: the configured one, or the preset's name + a hash of the grid's points,
        whatever the order of the fixed overrides (a resume typed in another order finds its study)."""
        if self.conf.study_name:
            return self.conf.study_name
        preset = OmegaConf.select(self.config, "hydra.runtime.choices.experiment", default=None) or "study"
        prefix = safe_name("experiment", str(preset).replace("/", "-"))
        name, ordered = f"{prefix}-{grid_digest(grid)}", f"{prefix}-{points_digest(grid.points)}"
        root = self.storage_root()
        if self.conf.resume and not (root / name).exists() and (root / ordered).exists():
            return ordered  # a study named before 2026-11-24, when the overrides' order changed the hash
        return name

    # --------------------------------------------------------------- running
    def sweep(self, arguments: List[str]) -> Any:
        from scaling.cli import fail, one_line

        ray_started = None
        try:
            grid, configs = self.plan(arguments)
            from scaling.store import check_tracking_uri

            for key in ("tracking_uri", "experiment", "enabled"):  # one study, one record
                values = sorted({str(c.mlflow[key]) for c in configs})
                if len(values) > 1:
                    raise ConfigError(f"mlflow.{key}", values, "must be the same for every trial of a study")
            if configs[0].mlflow.enabled:
                check_tracking_uri(configs[0].mlflow.tracking_uri)
            elif self.conf.resume:
                raise ConfigError("hydra.sweeper.resume", True, "needs mlflow.enabled=true: the MLflow record "
                                                                "is what tells a resume which trials finished")
            self._check_storage()
            from scaling.local_ray import start_ray
            from scaling.study_runner import prepare_data

            ray_started = start_ray(self)  # ~4 s, while the driver prepares the rest
            interrupts.on_end(functools.partial(_abandon, ray_started, 10.0))  # a Ctrl-C from here stops it
            self.n_train = prepare_data(configs)  # every dataset once, in the driver; a missing file fails here
        except KeyboardInterrupt:
            _interrupted(ray_started)
        except Exception as exc:  # noqa: BLE001
            _abandon(ray_started)
            fail(one_line(exc))
        from scaling.study_runner import run_study

        try:
            return run_study(self, grid, configs, ray_started)
        except KeyboardInterrupt:  # before the study run existed: after, run_study records the interruption
            _interrupted(ray_started)


def _abandon(ray_started: Any, wait_s: float = 120.0) -> None:
    """Stop the Ray that start_ray is starting, if any (a refused or interrupted study)."""
    if ray_started is not None:
        from scaling.local_ray import abandon_ray

        abandon_ray(ray_started, wait_s)


def _interrupted(ray_started: Any) -> None:
    """End a study interrupted (Ctrl-C) before its MLflow run existed: one line, Ray stopped, exit 130.

    The KeyboardInterrupt comes from a write that finished first (interrupts.deferred), or from a
    driver run without the entry point's guard. interrupts.end_now bounds Ray's stop and skips the exit
    handlers: an import lock a Ctrl-C left held can block either for ever (CI saw a hang past 120 s).
    """
    from scaling.cli import fail

    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the traceback, as fail() gives it
        _abandon(ray_started, wait_s=10.0)
        fail(interrupts.STUDY_NOT_STARTED, code=130)
    interrupts.end_now(interrupts.STUDY_NOT_STARTED, [functools.partial(_abandon, ray_started, 10.0)])


def _confirmed(n_trials: int) -> bool:
    """Ask on a terminal whether to launch a large grid; never ask without one."""
    if not sys.stdin.isatty():
        return False
    answer = input(f"launch {n_trials} trials? [y/N] ").strip().lower()
    return answer in ("y", "yes")
