"""Typed config schemas, registered in Hydra's ConfigStore, and the checks Hydra cannot do.

Hydra rejects unknown keys and wrong types when the config is composed, because
`conf/config.yaml` extends the `trial_schema` node registered here. `validate()` then checks
the values (signs, ranges, names, cross-field rules) before anything is imported or
trained, so a bad value costs a second, not a Ray start-up.

This module imports neither torch, ray nor mlflow: `scaling-study batch_size=-1` must fail fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING  # noqa: F401  (re-exported for presets)

RULE_EXPONENTS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
DATASETS = ("mnist1d", "digits", "synthetic", "mnist", "fashion_mnist", "cifar10")
MODELS = ("mlp", "cnn", "resnet")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")
INITS = ("default", "xavier", "he")
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
SCHEDULES = ("constant", "step", "exponential", "cosine", "onecycle", "cyclic")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("min", "max")
WARMUP_STARTS = ("ref", "zero")
BACKENDS = ("auto", "gloo", "nccl")
# Every metric the trial loop reports; a target on anything else could never be met.
REPORTED_METRICS = (
    "train/loss", "val/loss", "val/acc", "lr", "samples", "step", "epoch",
    "time/elapsed_s", "time/samples_per_s", "mem/peak_mb", "mem/eval_peak_mb", "gns/b_simple",
)


class ConfigError(ValueError):
    """A config value a user can fix; its message is one line naming the key and the value."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")

    def __reduce__(self):  # copy and pickle (Ray ships a trial's or a rank's error to the driver)
        return type(self), (self.key, self.value, self.problem)


@dataclass
class DataConfig:
    name: str = "mnist1d"
    """Dataset: mnist1d | digits | synthetic (generated offline) or mnist | fashion_mnist | cifar10 (read from root)."""
    n_samples: int = 24000
    """Samples to generate, for mnist1d and synthetic (train + validation)."""
    val_fraction: float = 0.2
    """Fraction held out for validation, split with `seed`."""
    seed: int = 0
    """Seed of the data itself and of the split; kept apart from the trial seed so all trials see the same data."""
    root: str = "data"
    """Folder holding torchvision-format datasets (mnist, fashion_mnist, cifar10)."""
    download: bool = False
    """Let torchvision download into root (needs internet and torchvision)."""
    cache_dir: str = "${oc.env:SCALING_CACHE,'~/.cache/scaling'}"
    """Where generated datasets are cached, keyed by their arguments."""
    n_features: int = 40
    """Input dimension of the synthetic task."""
    n_classes: int = 10
    """Classes of the synthetic task."""
    noise: float = 0.5
    """Label noise scale of the synthetic teacher (logit noise std)."""
    max_train_samples: Optional[int] = None
    """Truncate the training split (smoke runs of large datasets)."""


@dataclass
class ModelConfig:
    name: str = "mlp"
    """Architecture: mlp | cnn | resnet."""
    width: int = 256
    """Hidden units (mlp) or base channels (cnn, resnet)."""
    depth: int = 2
    """Hidden layers (mlp), conv layers (cnn) or residual blocks per stage (resnet)."""
    activation: str = "relu"
    """relu | tanh | sigmoid | gelu."""
    init: str = "default"
    """Weight init: default (torch's) | xavier | he."""


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    """sgd | adam | adamw | adagrad | rmsprop, all from torch.optim."""
    momentum: float = 0.9
    """SGD and RMSprop momentum."""
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    alpha: float = 0.99
    """RMSprop smoothing constant."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value (null: off)."""


@dataclass
class ScheduleConfig:
    name: str = "constant"
    """constant | step | exponential | cosine | onecycle | cyclic; runs after the warmup."""
    step_epochs: float = 1.0
    """step: decay every this many epochs."""
    gamma: float = 0.5
    """step: factor per decay; exponential: factor per epoch."""
    min_lr_fraction: float = 0.0
    """cosine: final LR as a fraction of the peak."""
    pct_start: float = 0.3
    """onecycle: fraction of the schedule spent rising."""
    div_factor: float = 25.0
    """onecycle: initial LR = max_lr / div_factor."""
    final_div_factor: float = 1e4
    """onecycle: final LR = initial LR / final_div_factor."""
    base_lr_fraction: float = 0.25
    """cyclic: base_lr = max_lr x this (Smith: 1/4 to 1/3)."""
    cycle_epochs: float = 2.0
    """cyclic: length of one full cycle (up and down), in epochs."""
    from_lr_find: bool = False
    """onecycle/cyclic: take max_lr from an LR range test instead of the effective LR."""


@dataclass
class ScalingConfig:
    rule: str = "linear"
    """How the LR follows the batch size: none | linear | sqrt."""
    ref_batch_size: int = 128
    """Batch size at which ref_lr holds."""
    ref_lr: Any = 0.05
    """LR at ref_batch_size (a float, or 'auto': run the LR range test first)."""


@dataclass
class WarmupConfig:
    epochs: float = 0.0
    """Linear warmup length in epochs (0: none)."""
    start: str = "ref"
    """Warmup starts from ref: ref_lr x lr_multiplier (Goyal et al.) | zero."""


@dataclass
class TargetConfig:
    metric: str = "val/acc"
    """Metric whose first crossing of `value` defines the cost to target."""
    value: float = 0.9
    mode: str = "max"
    """max: reached when metric >= value; min: when metric <= value."""


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None
    """Evaluations without improvement of val/loss before stopping (null: off)."""
    min_delta: float = 0.0


@dataclass
class DivergenceConfig:
    factor: float = 5.0
    """A training loss above factor x the initial loss, or a non-finite one, is divergence."""


@dataclass
class GnsConfig:
    enabled: bool = False
    """Estimate the gradient noise scale B_simple online (needs micro-batches)."""
    ema: float = 0.95
    """Smoothing of the |G|^2 and tr(Sigma) estimates."""


@dataclass
class MemoryConfig:
    limit_mb: Optional[float] = None
    """Per-trial memory ceiling; beyond it the trial ends as `oom` (CUDA: allocator fraction)."""


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    """Where runs go; relative sqlite paths resolve against the launch directory."""
    experiment: str = "scaling"
    enabled: bool = True


@dataclass
class ParallelConfig:
    """Data-parallel workers per trial; the global batch (so the scaling rule) is the same however it is split."""

    workers: int = 1
    """Data-parallel workers (ranks) per trial; with max_micro_batch, the fewest to start from."""
    max_micro_batch: Optional[int] = None
    """Per-worker micro-batch limit (null: off). Above it a trial first adds workers, up to max_workers,
    then accumulates gradients; excludes micro_batch_size."""
    max_workers: int = 1
    """Most workers max_micro_batch may give a trial."""
    backend: str = "auto"
    """torch.distributed backend: auto (gloo on CPU, nccl on CUDA) | gloo | nccl."""


@dataclass(frozen=True)
class Split:
    """How one optimizer step's batch is split: workers x micro_batch x accumulation == batch_size."""

    workers: int
    micro_batch: int
    accumulation: int

    def __str__(self) -> str:
        return f"{self.workers}x{self.micro_batch}x{self.accumulation}"


LR_FIND_MODES = ("exp", "linear")
LR_FIND_SUGGESTIONS = ("valley", "steep", "minimum/10")
LR_FIND_MIN_ITERS = 10  # below this fastai's trims (first 10%, last 5) leave nothing to suggest from


@dataclass
class LrFindConfig:
    """The LR range test (Smith 2015; fastai's lr_find): scaling-lr-find, scaling.ref_lr=auto, schedule.from_lr_find."""

    start_lr: float = 1e-6
    """LR of the first iteration."""
    end_lr: float = 10.0
    """LR of iteration num_iters - 1, if the loss has not diverged before."""
    num_iters: int = 100
    """Optimizer steps of the sweep; the training data is cycled as often as needed."""
    mode: str = "exp"
    """exp: the LR grows geometrically (fastai) | linear: arithmetically (Smith 2015)."""
    smooth: float = 0.05
    """Weight of the newest loss in the smoothed loss (fastai's EMA beta = 1 - smooth); 1: no smoothing."""
    diverge_factor: float = 4.0
    """Stop once the smoothed loss exceeds this factor x its minimum so far (fastai: 4)."""
    suggestion: str = "valley"
    """The suggestion used by ref_lr=auto, from_lr_find and the batch-size fit: valley | steep | minimum/10."""
    val_every: Optional[int] = None
    """Smith's variant: also measure the validation loss every this many iterations (null: off)."""
    batch_sizes: Optional[list[int]] = None
    """scaling-lr-find: one range test per batch size (null: batch_size); `batch_size=32,256` fills it."""


@dataclass
class TrialConfig:
    """The public contract of a trial: every top-level key here is a study axis."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    gns: GnsConfig = field(default_factory=GnsConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    batch_size: int = 128
    micro_batch_size: Optional[int] = None
    """Per-worker micro-batch: gradient accumulation when below batch_size / parallel.workers (null: one)."""
    lr_multiplier: float = 1.0
    """Multiplies the rule's LR; the study's LR axis."""
    lr: Optional[float] = None
    """null: derived from the scaling rule; a number bypasses the rule."""
    epochs: float = 4.0
    """Training budget in epochs (fractions allowed)."""
    eval_every: float = 0.5
    """Evaluate (and report) every this many epochs."""
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    threads: Optional[int] = None
    """torch intra-op threads (null: torch's default). Small models run fastest on 1."""
    name: str = "trial"
    """Free-form label; used in run names, never in paths."""


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can extend it (`defaults: [trial_schema]`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)


# --------------------------------------------------------------------------- validation


def _positive(key: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    bad_type = not isinstance(value, (int, float)) or isinstance(value, bool)
    if not bad_type and integer and not float(value).is_integer():
        bad_type = True
    if bad_type or math.isnan(value) or math.isinf(value):
        raise ConfigError(key, value, "must be a finite " + ("integer" if integer else "number"))
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, value, "must be " + ("non-negative" if allow_zero else "positive"))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"unknown; choose one of {', '.join(choices)}")


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
    split = _validate_parallel(cfg)
    _positive("lr_multiplier", cfg.lr_multiplier)
    if cfg.lr is not None:
        _positive("lr", cfg.lr)
    _positive("epochs", cfg.epochs)
    _positive("eval_every", cfg.eval_every)
    if cfg.eval_every > cfg.epochs:
        raise ConfigError("eval_every", cfg.eval_every, f"must not exceed epochs={cfg.epochs}")
    _positive("seed", cfg.seed, integer=True, allow_zero=True)
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
    if not isinstance(cfg.target.value, (int, float)) or math.isnan(cfg.target.value):
        raise ConfigError("target.value", cfg.target.value, "must be a number")
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
            raise ConfigError("gns.enabled", True,
                              "needs at least 2 micro-batches per step: set micro_batch_size below batch_size")
    if cfg.memory.limit_mb is not None:
        _positive("memory.limit_mb", cfg.memory.limit_mb)

    _validate_data(cfg.data, cfg.batch_size)
    _validate_model(cfg.model)
    _validate_optimizer(cfg.optimizer)
    _validate_schedule(cfg.schedule)

    _choice("mlflow.tracking_uri", cfg.mlflow.tracking_uri.split(":", 1)[0] if ":" in cfg.mlflow.tracking_uri else "file",
            ("sqlite", "file", "http", "https", "postgresql", "mysql", "databricks"))
    if not cfg.mlflow.experiment.strip():
        raise ConfigError("mlflow.experiment", cfg.mlflow.experiment, "must not be empty")
    _validate_lr_find(cfg)


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


def plan_split(cfg: Any) -> Split:
    """Return how a step's batch_size samples are split: workers x micro_batch x accumulation.

    Without parallel.max_micro_batch: parallel.workers workers, each taking micro_batch_size samples
    (null: its whole share) per forward pass. With it: the fewest workers from parallel.workers up to
    max(workers, max_workers) (dividing batch_size) whose share fits the limit; if none fits, the most
    of them, then the fewest accumulation steps that bring the micro-batch under the limit.
    """
    p, B = cfg.parallel, int(cfg.batch_size)
    if p.max_micro_batch is None:
        w = int(p.workers)
        micro = int(cfg.micro_batch_size or B // w)
        return Split(w, micro, B // (w * micro))
    limit = int(p.max_micro_batch)
    ws = [w for w in range(int(p.workers), max(int(p.workers), int(p.max_workers)) + 1) if B % w == 0]
    w = next((w for w in ws if B // w <= limit), ws[-1])
    share = B // w
    acc = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= limit)
    return Split(w, share // acc, acc)


def _validate_data(d: Any, batch_size: int) -> None:
    _choice("data.name", d.name, DATASETS)
    _fraction("data.val_fraction", d.val_fraction, open_low=True)
    _positive("data.seed", d.seed, integer=True, allow_zero=True)
    if d.name in ("mnist1d", "synthetic"):
        _positive("data.n_samples", d.n_samples, integer=True)
        n_train = d.n_samples - int(round(d.n_samples * d.val_fraction))
        if d.max_train_samples is not None:
            n_train = min(n_train, d.max_train_samples)
        if batch_size > n_train:
            raise ConfigError("batch_size", batch_size, f"is larger than the training set ({n_train} samples)")
    if d.name == "synthetic":
        _positive("data.n_features", d.n_features, integer=True)
        _positive("data.n_classes", d.n_classes, integer=True)
        if d.n_classes < 2:
            raise ConfigError("data.n_classes", d.n_classes, "must be at least 2")
        _positive("data.noise", d.noise, allow_zero=True)
    if d.max_train_samples is not None:
        _positive("data.max_train_samples", d.max_train_samples, integer=True)


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
    _fraction("schedule.base_lr_fraction", s.base_lr_fraction, open_low=True)
    _positive("schedule.cycle_epochs", s.cycle_epochs)


def _generated_n_train(d: Any) -> Optional[int]:
    """Return the training-set size of a generated dataset (as load_dataset splits it), None for files."""
    if d.name not in ("mnist1d", "synthetic"):
        return None
    n_train = d.n_samples - int(round(d.n_samples * d.val_fraction))
    return n_train if d.max_train_samples is None else min(n_train, d.max_train_samples)


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
    n_train = _generated_n_train(cfg.data)
    if f.batch_sizes is not None:
        if len(f.batch_sizes) == 0:
            raise ConfigError("lr_find.batch_sizes", list(f.batch_sizes), "must list at least one batch size")
        for b in f.batch_sizes:
            _positive("lr_find.batch_sizes", b, integer=True)
            if n_train is not None and b > n_train:
                raise ConfigError("lr_find.batch_sizes", b, f"is larger than the training set ({n_train} samples)")
        if len(set(f.batch_sizes)) < len(f.batch_sizes):
            raise ConfigError("lr_find.batch_sizes", list(f.batch_sizes), "lists a batch size twice")
    if cfg.scaling.ref_lr == "auto" and n_train is not None and cfg.scaling.ref_batch_size > n_train:
        raise ConfigError("scaling.ref_batch_size", cfg.scaling.ref_batch_size,
                          f"is larger than the training set ({n_train} samples), and scaling.ref_lr=auto "
                          "runs the LR range test at it")
    if cfg.schedule.from_lr_find:
        if cfg.schedule.name not in ("onecycle", "cyclic"):
            raise ConfigError("schedule.from_lr_find", True,
                              f"applies to schedule=onecycle or cyclic only, not {cfg.schedule.name}")
        if cfg.lr is not None:
            raise ConfigError("lr", cfg.lr, "bypasses schedule.from_lr_find's range test; set one of them")


# --------------------------------------------------------------------------- derived values


def lr_exponent(rule: str) -> float:
    """Return alpha of the rule: lr grows as (batch_size / ref_batch_size) ** alpha."""
    return RULE_EXPONENTS[rule]


def effective_lr(cfg: Any, ref_lr: Optional[float] = None) -> float:
    """Return the LR a trial trains with: `lr` if set, else ref_lr x multiplier x (B / B_ref) ** alpha."""
    if cfg.lr is not None:
        return float(cfg.lr)
    s = cfg.scaling
    base = float(ref_lr if ref_lr is not None else s.ref_lr)
    return base * cfg.lr_multiplier * (cfg.batch_size / s.ref_batch_size) ** lr_exponent(s.rule)


def warmup_start_lr(cfg: Any, ref_lr: Optional[float] = None) -> float:
    """Return the LR the warmup starts from: ref_lr x multiplier (Goyal et al.), or 0."""
    if cfg.warmup.start == "zero":
        return 0.0
    if cfg.lr is not None and cfg.scaling.ref_lr == "auto" and ref_lr is None:
        return float(cfg.lr)
    base = float(ref_lr if ref_lr is not None else cfg.scaling.ref_lr)
    return base * cfg.lr_multiplier
