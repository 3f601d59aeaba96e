"""The checks Hydra cannot do: a composed trial config's values.

Hydra rejects unknown keys and wrong types when the config is composed (`scaling.config` holds
the schema). `validate()` checks the values (signs, ranges, names, cross-field rules) and raises
ConfigError for the first one a user got wrong, naming the key and the value, before anything
is imported or trained, the keys that split a step's batch included (`scaling.split.plan_split`
turns them into workers x micro-batch x accumulation).

This module imports neither torch, ray nor mlflow: `scaling-study batch_size=-1` must fail fast.
"""
from __future__ import annotations

import math
import os
from typing import Any

from scaling.config import (ACTIVATIONS, BACKENDS, DATASETS, DEVICES, INITS, LR_FIND_MIN_ITERS, LR_FIND_MODES,
                            LR_FIND_SUGGESTIONS, METRIC_DIRECTIONS, METRIC_RANGES, MODELS, MODES, OPTIMIZERS,
                            PRECISIONS, REPORTED_METRICS, RULE_EXPONENTS, SCHEDULES, WARMUP_STARTS, ConfigError, Split,
                            TrialConfig)
from scaling.data_fit import check_batch_fits, check_fits_data, generated_n_train
from scaling.split import plan_split


MAX_SEED = 2**32 - 1


def _positive(key: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    bad_type = not isinstance(value, (int, float)) or isinstance(value, bool)
    if not bad_type and integer and not float(value).is_integer():
        bad_type = True
    if bad_type or math.isnan(value) or math.isinf(value):
        raise ConfigError(key, value, "must be a finite " + ("integer" if integer else "number"))
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, value, "must be " + ("non-negative" if allow_zero else "positive"))


def _seed(key: str, value: Any) -> None:
    _positive(key, value, integer=True, allow_zero=True)
    if value > MAX_SEED:  # numpy's generators take 32-bit seeds
        raise ConfigError(key, value, f"must be at most {MAX_SEED} (2**32 - 1)")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"unknown; choose one of {', '.join(choices)}")


def _direction(key: str, mode: str, metric_key: str, metric: str) -> None:
    """Refuse a mode that judges `metric` against the way it gets better (a lower val/acc, a higher loss)."""
    better = METRIC_DIRECTIONS.get(metric)
    if better is not None and mode != better:  # after _choice: mode is min or max
        raise ConfigError(key, mode, f"judges {metric_key}={metric} the wrong way round ({metric} is better "
                          f"{'higher' if better == 'max' else 'lower'}): use {key}={better}")


def _fraction(key: str, value: float, *, open_low: bool = False) -> None:
    _positive(key, value, allow_zero=not open_low)
    if value >= 1:
        raise ConfigError(key, value, "must be below 1")


def _check_keys(cfg: Any, schema: type = None, prefix: str = "") -> None:
    """Raise ConfigError for a key the schema does not know (Hydra's `+key=` skips that check)."""
    import dataclasses

    schema = schema or TrialConfig
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key == "hydra" and not prefix:  # Hydra's own node, when a caller kept it
            continue
        if key not in fields:
            raise ConfigError(prefix + str(key), cfg[key], "is not a config key")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and hasattr(cfg[key], "keys"):
            _check_keys(cfg[key], sub, f"{prefix}{key}.")


def validate(cfg: Any) -> None:
    """Raise ConfigError for the first value a user got wrong; pure, imports nothing heavy."""
    if hasattr(cfg, "keys"):
        _check_keys(cfg)
    _positive("batch_size", cfg.batch_size, integer=True)
    if cfg.micro_batch_size is not None:
        _positive("micro_batch_size", cfg.micro_batch_size, integer=True)
        if cfg.batch_size % cfg.micro_batch_size:
            raise ConfigError("micro_batch_size", cfg.micro_batch_size,
                              f"must divide batch_size={cfg.batch_size}")
    _validate_gns_split(cfg)
    split = _validate_parallel(cfg)
    _positive("lr_multiplier", cfg.lr_multiplier)
    if cfg.lr is not None:
        _positive("lr", cfg.lr)
    _positive("epochs", cfg.epochs)
    _positive("eval_every", cfg.eval_every)
    if cfg.eval_every > cfg.epochs:
        raise ConfigError("eval_every", cfg.eval_every, f"must not exceed epochs={cfg.epochs}")
    _seed("seed", cfg.seed)
    _choice("device", cfg.device, DEVICES)
    if cfg.threads is not None:
        _positive("threads", cfg.threads, integer=True)
    _choice("precision", cfg.precision, PRECISIONS)

    s = cfg.scaling
    _choice("scaling.rule", s.rule, tuple(RULE_EXPONENTS))
    _positive("scaling.ref_batch_size", s.ref_batch_size, integer=True)
    if s.ref_lr != "auto":
        if isinstance(s.ref_lr, str):
            try:
                float(s.ref_lr)
            except ValueError:
                raise ConfigError("scaling.ref_lr", s.ref_lr, "must be a positive number or 'auto'") from None
            raise ConfigError("scaling.ref_lr", s.ref_lr, "must be a number, not a quoted string")
        _positive("scaling.ref_lr", s.ref_lr)

    _positive("warmup.epochs", cfg.warmup.epochs, allow_zero=True)
    _choice("warmup.start", cfg.warmup.start, WARMUP_STARTS)
    if cfg.warmup.epochs >= cfg.epochs:
        raise ConfigError("warmup.epochs", cfg.warmup.epochs, f"must be shorter than epochs={cfg.epochs}")

    _choice("target.metric", cfg.target.metric, REPORTED_METRICS)
    _choice("target.mode", cfg.target.mode, MODES)
    _direction("target.mode", cfg.target.mode, "target.metric", cfg.target.metric)
    if not isinstance(cfg.target.value, (int, float)) or not math.isfinite(cfg.target.value):
        raise ConfigError("target.value", cfg.target.value, "must be a finite number")
    low, high = METRIC_RANGES.get(cfg.target.metric, (-math.inf, math.inf))
    if not low < cfg.target.value <= high:  # never met, or met at the first evaluation
        value, metric = cfg.target.value, cfg.target.metric
        what = "is a fraction, in (0, 1]" if high == 1.0 else "is positive"
        hint = f" ({value:g}% is {value / 100:g})" if high == 1.0 and 1 < value <= 100 else ""
        raise ConfigError("target.value", value, f"cannot be met as meant: {metric} {what}{hint}")
    if cfg.target.metric == "gns/b_simple" or (cfg.target.metric.startswith("gns/") and not cfg.gns.enabled):
        raise ConfigError("target.metric", cfg.target.metric, "is not a convergence metric")
    if cfg.early_stopping.patience is not None:
        _positive("early_stopping.patience", cfg.early_stopping.patience, integer=True)
    _positive("early_stopping.min_delta", cfg.early_stopping.min_delta, allow_zero=True)
    _positive("divergence.factor", cfg.divergence.factor)
    if cfg.divergence.factor <= 1:
        raise ConfigError("divergence.factor", cfg.divergence.factor, "must be above 1")
    if cfg.gns.enabled:
        _fraction("gns.ema", cfg.gns.ema)
        if split.workers > 1:
            raise ConfigError("gns.enabled", True, f"is not supported with {split.workers} data-parallel workers "
                              "(parallel.workers / max_micro_batch): the estimator needs one process's micro-batches")
        if split.accumulation < 2:
            raise ConfigError("gns.enabled", True, "needs at least 2 micro-batches per step: set gns.micro_batches "
                              "(one split for every batch size), or micro_batch_size below batch_size")
    if cfg.memory.limit_mb is not None:
        _positive("memory.limit_mb", cfg.memory.limit_mb)

    _validate_data(cfg.data)
    n_train = generated_n_train(cfg.data)
    if n_train is not None:
        check_fits_data(cfg, n_train)
    _validate_model(cfg.model)
    _validate_optimizer(cfg.optimizer)
    _validate_schedule(cfg.schedule)

    _validate_tracking_uri(cfg.mlflow.tracking_uri)
    if not cfg.mlflow.experiment.strip():
        raise ConfigError("mlflow.experiment", cfg.mlflow.experiment, "must not be empty")
    _validate_lr_find(cfg)


def _validate_gns_split(cfg: Any) -> None:
    """Check gns.micro_batches where it sets the split (the noise scale on, one worker: the gns checks in
    validate() refuse more)."""
    k = cfg.gns.micro_batches
    if not cfg.gns.enabled or k is None:
        return
    _positive("gns.micro_batches", k, integer=True)
    if k < 2:
        raise ConfigError("gns.micro_batches", k, "must be at least 2: the estimator compares the micro-batches' "
                                                  "gradients with their step's")
    if cfg.micro_batch_size is not None:
        raise ConfigError("gns.micro_batches", k, f"excludes micro_batch_size={cfg.micro_batch_size}; set one of them")
    if cfg.parallel.max_micro_batch is not None:
        raise ConfigError("gns.micro_batches", k,
                          f"excludes parallel.max_micro_batch={cfg.parallel.max_micro_batch}; set one of them")
    if cfg.parallel.workers == 1 and cfg.batch_size % k:
        raise ConfigError("gns.micro_batches", k, f"must divide batch_size={cfg.batch_size}")


def _validate_parallel(cfg: Any) -> Split:
    """Check the parallel node against batch_size and micro_batch_size; return the split."""
    p, B = cfg.parallel, cfg.batch_size
    _positive("parallel.workers", p.workers, integer=True)
    _positive("parallel.max_workers", p.max_workers, integer=True)
    _choice("parallel.backend", p.backend, BACKENDS)
    if p.backend == "nccl" and cfg.device == "cpu":
        raise ConfigError("parallel.backend", p.backend, "needs CUDA; use gloo (or auto) with device=cpu")
    if B % p.workers:
        raise ConfigError("parallel.workers", p.workers, f"must divide batch_size={B}")
    if p.max_micro_batch is not None:
        _positive("parallel.max_micro_batch", p.max_micro_batch, integer=True)
        if cfg.micro_batch_size is not None:
            raise ConfigError("parallel.max_micro_batch", p.max_micro_batch,
                              f"excludes micro_batch_size={cfg.micro_batch_size}; set one of them")
    elif cfg.micro_batch_size is not None and B % (p.workers * cfg.micro_batch_size):
        raise ConfigError("micro_batch_size", cfg.micro_batch_size,
                          f"times parallel.workers={p.workers} (= {p.workers * cfg.micro_batch_size}) "
                          f"must divide batch_size={B}")
    return plan_split(cfg)


def _validate_data(d: Any) -> None:
    _choice("data.name", d.name, DATASETS)
    _fraction("data.val_fraction", d.val_fraction, open_low=True)
    _seed("data.seed", d.seed)
    if d.max_train_samples is not None:
        _positive("data.max_train_samples", d.max_train_samples, integer=True)
    if d.name in ("mnist1d", "synthetic"):
        _positive("data.n_samples", d.n_samples, integer=True)
        if int(round(d.n_samples * d.val_fraction)) < 1:
            raise ConfigError("data.n_samples", d.n_samples,
                              f"leaves no validation sample at data.val_fraction={d.val_fraction}")
    if d.name == "synthetic":
        _positive("data.n_features", d.n_features, integer=True)
        _positive("data.n_classes", d.n_classes, integer=True)
        if d.n_classes < 2:
            raise ConfigError("data.n_classes", d.n_classes, "must be at least 2")
        _positive("data.noise", d.noise, allow_zero=True)


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def _validate_tracking_uri(uri: str) -> None:
    """Check an MLflow tracking URI's form (check_tracking_uri in scaling.tracking then tries to reach it)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else "file"
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError("mlflow.tracking_uri", uri,
                          f"has an unknown scheme {scheme!r}; choose one of {', '.join(TRACKING_SCHEMES)}")
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError("mlflow.tracking_uri", uri, "is a file store, which MLflow refuses unless "
                          "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db")
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
        if path is None:
            raise ConfigError("mlflow.tracking_uri", uri, "must be sqlite:///relative.db or sqlite:////absolute.db")
        if path in ("", ":memory:") or path.endswith("/"):
            raise ConfigError("mlflow.tracking_uri", uri, "names no database file, and an in-memory store keeps nothing")
        if path.startswith("~"):
            raise ConfigError("mlflow.tracking_uri", uri, "starts with ~, which MLflow does not expand: give the path")


def _validate_model(m: Any) -> None:
    _choice("model.name", m.name, MODELS)
    _positive("model.width", m.width, integer=True)
    _positive("model.depth", m.depth, integer=True, allow_zero=m.name == "mlp")
    _choice("model.activation", m.activation, ACTIVATIONS)
    _choice("model.init", m.init, INITS)


def _validate_optimizer(o: Any) -> None:
    _choice("optimizer.name", o.name, OPTIMIZERS)
    _positive("optimizer.momentum", o.momentum, allow_zero=True)
    if o.momentum >= 1:
        raise ConfigError("optimizer.momentum", o.momentum, "must be below 1")
    if o.nesterov and (o.name != "sgd" or o.momentum == 0):
        raise ConfigError("optimizer.nesterov", o.nesterov, "needs optimizer=sgd with momentum > 0")
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    _fraction("optimizer.beta1", o.beta1)
    _fraction("optimizer.beta2", o.beta2)
    _positive("optimizer.eps", o.eps)
    _fraction("optimizer.alpha", o.alpha)
    if o.grad_clip is not None:
        _positive("optimizer.grad_clip", o.grad_clip)


def _validate_schedule(s: Any) -> None:
    _choice("schedule.name", s.name, SCHEDULES)
    _positive("schedule.step_epochs", s.step_epochs)
    _positive("schedule.gamma", s.gamma)
    if s.gamma > 1:
        raise ConfigError("schedule.gamma", s.gamma, "must be at most 1 (a decay)")
    _positive("schedule.min_lr_fraction", s.min_lr_fraction, allow_zero=True)
    if s.min_lr_fraction > 1:
        raise ConfigError("schedule.min_lr_fraction", s.min_lr_fraction, "must be at most 1")
    _fraction("schedule.pct_start", s.pct_start, open_low=True)
    _positive("schedule.div_factor", s.div_factor)
    _positive("schedule.final_div_factor", s.final_div_factor)
    # onecycle's max_lr is the effective LR (lr.effective): a start or an end above it would train,
    # and not record, a higher peak
    if s.div_factor < 1:
        raise ConfigError("schedule.div_factor", s.div_factor, "must be at least 1: the cycle would start "
                          "above max_lr (the effective LR), at max_lr / div_factor")
    if s.div_factor * s.final_div_factor < 1:
        raise ConfigError("schedule.final_div_factor", s.final_div_factor,
                          f"must be at least 1 / schedule.div_factor={s.div_factor:g}: the cycle would end above "
                          "max_lr (the effective LR), at max_lr / (div_factor x final_div_factor)")
    _fraction("schedule.base_lr_fraction", s.base_lr_fraction, open_low=True)
    _positive("schedule.cycle_epochs", s.cycle_epochs)


def _validate_lr_find(cfg: Any) -> None:
    f = cfg.lr_find
    _positive("lr_find.start_lr", f.start_lr)
    _positive("lr_find.end_lr", f.end_lr)
    if f.start_lr >= f.end_lr:
        raise ConfigError("lr_find.start_lr", f.start_lr, f"must be below lr_find.end_lr={f.end_lr!r}")
    _choice("lr_find.mode", f.mode, LR_FIND_MODES)
    _positive("lr_find.smooth", f.smooth)
    if f.smooth > 1:
        raise ConfigError("lr_find.smooth", f.smooth, "must be at most 1 (1: no smoothing)")
    _positive("lr_find.num_iters", f.num_iters, integer=True)
    window = max(LR_FIND_MIN_ITERS, math.ceil(1 / f.smooth - 1e-9))  # an EMA's memory: ~1/smooth iterations
    if f.num_iters < window:
        raise ConfigError("lr_find.num_iters", f.num_iters,
                          f"must be at least {window}, the smoothing window (1/lr_find.smooth, and at least "
                          f"{LR_FIND_MIN_ITERS})")
    _positive("lr_find.diverge_factor", f.diverge_factor)
    if f.diverge_factor <= 1:
        raise ConfigError("lr_find.diverge_factor", f.diverge_factor, "must be above 1")
    _choice("lr_find.suggestion", f.suggestion, LR_FIND_SUGGESTIONS)
    if f.val_every is not None:
        _positive("lr_find.val_every", f.val_every, integer=True)
        if f.val_every > f.num_iters:
            raise ConfigError("lr_find.val_every", f.val_every, f"must not exceed lr_find.num_iters={f.num_iters}")
    n_train = generated_n_train(cfg.data)
    if f.batch_sizes is not None:
        if len(f.batch_sizes) == 0:
            raise ConfigError("lr_find.batch_sizes", list(f.batch_sizes), "must list at least one batch size")
        for b in f.batch_sizes:
            _positive("lr_find.batch_sizes", b, integer=True)
            if n_train is not None:
                check_batch_fits("lr_find.batch_sizes", b, n_train)
        if len(set(f.batch_sizes)) < len(f.batch_sizes):
            raise ConfigError("lr_find.batch_sizes", list(f.batch_sizes), "lists a batch size twice")
    if cfg.scaling.ref_lr == "auto" and n_train is not None and cfg.scaling.ref_batch_size > n_train:
        raise ConfigError("scaling.ref_batch_size", cfg.scaling.ref_batch_size,
                          f"is larger than the training set ({n_train} samples), and scaling.ref_lr=auto "
                          "runs the LR range test at it")
    if cfg.lr is not None and cfg.scaling.ref_lr == "auto":
        raise ConfigError("lr", cfg.lr, "bypasses scaling.ref_lr=auto's range test; set one of them")
    if cfg.schedule.from_lr_find:
        if cfg.schedule.name not in ("onecycle", "cyclic"):
            raise ConfigError("schedule.from_lr_find", True,
                              f"applies to schedule=onecycle or cyclic only, not {cfg.schedule.name}")
        if cfg.lr is not None:
            raise ConfigError("lr", cfg.lr, "bypasses schedule.from_lr_find's range test; set one of them")


# --------------------------------------------------------------------------- derived values
def at_batch_size(cfg: Any, batch_size: int) -> Any:
    """Return cfg with `batch_size` (a copy when it differs): the range test's batch sizes
    (lr_find.batch_sizes) replace the trial's, which the range test then never uses."""
    if int(cfg.batch_size) == int(batch_size):
        return cfg
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.merge(cfg, {"batch_size": int(batch_size)})
    import dataclasses

    return dataclasses.replace(cfg, batch_size=int(batch_size))


