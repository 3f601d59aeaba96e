"""Typed config schemas, registered in Hydra's ConfigStore, and the LR the scaling rule gives.

Hydra rejects unknown keys and wrong types when the config is composed, because
`scaling/conf/config.yaml` extends the `trial_schema` node registered here. `scaling.validation` then
checks the values (signs, ranges, names, cross-field rules) before anything is imported or
trained, so a bad value costs a second, not a Ray start-up.

This module imports neither torch, ray nor mlflow: `scaling-study batch_size=-1` must fail fast.
"""
from __future__ import annotations

import math
import re
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
# The way each of them gets better; lr, samples, step, epoch and gns/b_simple have none. A target or
# an ASHA judged the other way round runs, and its numbers are wrong (scaling.validation refuses it).
METRIC_DIRECTIONS = {"train/loss": "min", "val/loss": "min", "val/acc": "max", "time/elapsed_s": "min",
                     "time/samples_per_s": "max", "mem/peak_mb": "min", "mem/eval_peak_mb": "min"}
# The values each of them can take, (low, high]: a target outside can never be met, or is met at once
# (a loss or a time is positive; an accuracy is a fraction, so target.value=70 meant 0.7).
METRIC_RANGES = {**{m: (0.0, math.inf) for m in METRIC_DIRECTIONS}, "val/acc": (0.0, 1.0)}


# scheme://user:password@host -> scheme://user:***@host, in a URL or in any text holding one (a Hydra
# override escapes the colons: http\://user\:password@host). RFC 3986 user info holds no '/', so a path
# with an '@' after host:port is left alone.
_PASSWORD = re.compile(r"(://[^/@\s:]+:)[^\s/]*@")


def redact_url(value: Any) -> Any:
    """Return `value` with the password of any URL in it replaced by '***' (a non-string unchanged).

    A tracking URI may carry credentials (postgresql://alice:secret@db/mlflow, http://alice:secret@host);
    the tool prints it and records it in every run, and neither may show the password.
    """
    return _PASSWORD.sub(r"\1***@", value) if isinstance(value, str) else value


class ConfigError(ValueError):
    """A config value a user can fix; its message is one line naming the key and the value (a URL's
    password hidden)."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(redact_url(f"{key}={value!r}: {problem}"))  # a problem may quote the URL too

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
    """A training loss above factor x the initial training loss, or a non-finite one, is divergence;
    so is such a validation loss at an evaluation."""


@dataclass
class GnsConfig:
    enabled: bool = False
    """Estimate the gradient noise scale B_simple online (needs micro-batches)."""
    ema: float = 0.95
    """Smoothing of the |G|^2 and tr(Sigma) estimates."""
    micro_batches: Optional[int] = None
    """Measure with each step split into this many micro-batches (batch_size / micro_batches samples
    each), one setting for a study's every batch size; excludes micro_batch_size and
    parallel.max_micro_batch (null: their split). Ignored while gns.enabled is false."""


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
    """Register the schema so `scaling/conf/config.yaml` can extend it (`defaults: [trial_schema]`)."""
    from hydra.core.config_store import ConfigStore

    _share_config_store(ConfigStore)
    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)


def _share_config_store(store_class: type) -> None:
    """Make a deep copy of Hydra's ConfigStore the store itself.

    Hydra 1.3 deep-copies its config repository each time it builds a CachingConfigRepository:
    once per composition, and once per config group that `--help` lists (75 times for
    `scaling-train --help`). The copy takes the ConfigStore singleton along, with every structured
    config of every installed plugin, and was ~2/3 of `--help`'s time. Nothing is written through
    the copy (ConfigStore.load hands out a deep copy of the node it finds), and Hydra since reads
    the live singleton instead of the copied one (facebookresearch/hydra#2928), so sharing it
    changes the time only: `--help` prints the same text.
    """
    if "__deepcopy__" not in vars(store_class):
        store_class.__deepcopy__ = lambda self, memo: self


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


def lr_from_range_test(cfg: Any) -> bool:
    """True when a trial's LR comes from a range test at its own batch size, run by the trial itself
    (schedule.from_lr_find): its config does not know the LR it trains."""
    return bool(cfg.schedule.from_lr_find) and cfg.lr is None


def first_step_at_or_past(steps: float) -> int:
    """Return the first whole step at or past a length given in (fractional) steps, at least 1: where the
    loop evaluates (train.eval_steps), so that an ASHA rung at that length is judged there. Less 1e-9, as
    k x eval_every x steps_per_epoch lands a float error above a whole step (3 x 0.1 x 10)."""
    return max(1, math.ceil(steps - 1e-9))


def warmup_steps_of(cfg: Any, steps_per_epoch: float) -> int:
    """Return warmup.epochs in whole steps at this batch size, at least one where a warmup is asked for:
    to the nearest step, 0.02 epoch at 9.4 steps an epoch (B = 2048 of 19,200) was no warmup at all,
    silently, while the run's params said warmup.epochs=0.02."""
    return epochs_to_steps(cfg.warmup.epochs, steps_per_epoch, at_least=1 if cfg.warmup.epochs > 0 else 0)


def warmup_start_lr(cfg: Any, ref_lr: Optional[float] = None) -> float:
    """Return the LR the warmup starts from: 0, or (`ref`, Goyal et al.) the LR the scaling rule gives
    the reference batch, i.e. the trained LR x (B_ref / B) ** alpha, and never above the trained LR.

    For the rule's own LR that is ref_lr x multiplier; an explicit `lr` is scaled back the same way
    (with rule=none, `lr` itself: a flat warmup). Below ref_batch_size the rule scales the LR down,
    and Goyal's ramp from the reference LR up to k x it has nothing to ramp: starting there would be
    a cool-down from up to (B_ref / B) x the trained LR (8x at B=16 against 128), so the warmup is
    flat instead; `warmup.start=zero` ramps at every batch size.
    """
    if cfg.warmup.start == "zero":
        return 0.0
    lr, s = effective_lr(cfg, ref_lr), cfg.scaling
    return min(lr, lr * (s.ref_batch_size / cfg.batch_size) ** lr_exponent(s.rule))


def epochs_to_steps(epochs: float, steps_per_epoch: float, at_least: int = 1) -> int:
    """Return a length in epochs as whole optimizer steps (to the nearest, as round() does), at least `at_least`.

    steps_per_epoch is n_train / batch_size, not floored: the trial loop reads its data as one
    stream across epoch boundaries, so e epochs are e x n_train samples at every batch size.
    """
    return max(at_least, round(epochs * steps_per_epoch))
