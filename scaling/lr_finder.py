"""The LR range test (Smith 2015/2017; fastai's `lr_find`): raise the LR every step until the loss diverges.

`lr_range_test` is the core: any model, loss, batches and optimizer. One optimizer step per
iteration, the LR rising from start_lr to end_lr (geometrically or linearly, the last LR
reached at iteration num_iters - 1, as torch-lr-finder does). The loss is smoothed with an EMA
and the test stops once the smoothed loss exceeds diverge_factor x its minimum. From the
smoothed curve, trimmed as fastai trims it (the first num_iters // 10 and the last 5 points),
come fastai's three suggestions: valley, steep and minimum/10.

`range_test(cfg)` runs it on a fresh model, optimizer and data built from a trial config,
`resolve_ref_lr(cfg)` turns it into `scaling.ref_lr=auto`, `trial_ref_lr(cfg)` also serves
`schedule.from_lr_find`, and `main` is `scaling-lr-find` (see scaling.lr_find_cli).
torch is imported inside the functions, so the console script rejects a bad command line
before paying for it.

Not torch-lr-finder (a test checks we agree with it, curve for curve): it is a dev-only
dependency, it has only the steepest-gradient suggestion, and it trains and then restores the
caller's model, where a trial wants a fresh one built from its config.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np

from scaling.config import ConfigError, lr_exponent, lr_from_range_test
from scaling.data_fit import check_batch_fits
from scaling.validation import at_batch_size, validate

if TYPE_CHECKING:
    import torch

SUGGESTIONS = ("valley", "steep", "minimum/10")


@dataclass
class RangeTestResult:
    """One range test: the curve, fastai's three suggestions and the one in use."""

    lrs: list[float]
    """LR of every iteration run."""
    losses: list[float]
    """Training loss of each iteration's batch, before its step."""
    smoothed: list[float]
    """EMA of `losses`: what the divergence test and the suggestions read."""
    valley: float
    steep: float
    minimum_div10: float
    suggestion: str = "valley"
    """Which suggestion `lr` returns: valley | steep | minimum/10."""
    stopped_early: bool = False
    """The smoothed loss diverged (or the loss became non-finite) before num_iters."""
    num_iters: int = 0
    batch_size: Optional[int] = None
    val_losses: dict[int, float] = field(default_factory=dict)
    """Iteration -> validation loss after its step (Smith's variant; empty when off)."""

    @property
    def suggestions(self) -> dict[str, float]:
        """Return {valley, steep, minimum/10} -> LR."""
        return {"valley": self.valley, "steep": self.steep, "minimum/10": self.minimum_div10}

    @property
    def lr(self) -> float:
        """Return the suggestion in use (NaN when the curve was too short to suggest anything)."""
        return self.suggestions[self.suggestion]

    @property
    def stop_lr(self) -> Optional[float]:
        """Return the LR at which the test stopped on divergence, None if it ran to the end."""
        return self.lrs[-1] if self.stopped_early else None

    def params(self) -> dict[str, Any]:
        """Return the result's scalars as `lr_find.*` entries (MLflow params, study records)."""
        return {"lr_find.batch_size": self.batch_size, "lr_find.valley": self.valley, "lr_find.steep": self.steep,
                "lr_find.minimum_div10": self.minimum_div10, "lr_find.suggestion": self.suggestion,
                "lr_find.lr": self.lr, "lr_find.iterations": len(self.lrs), "lr_find.stopped_early": self.stopped_early,
                "lr_find.stop_lr": self.stop_lr}

    def describe(self) -> str:
        """Return one line: the three suggestions, the one in use, and where the test stopped."""
        found = " ".join(f"{k}={v:.3g}" for k, v in self.suggestions.items())
        end = (f"diverged at lr={self.stop_lr:.3g} after {len(self.lrs)}/{self.num_iters} iterations"
               if self.stopped_early else f"ran all {self.num_iters} iterations to lr={self.lrs[-1]:.3g}")
        return f"bs={self.batch_size}: {found} -> using {self.suggestion}={self.lr:.3g} ({end})"


def lr_schedule(start_lr: float, end_lr: float, num_iters: int, mode: str = "exp") -> np.ndarray:
    """Return the LR of every iteration: start_lr at 0, end_lr at num_iters - 1 (torch-lr-finder's convention)."""
    r = np.arange(num_iters) / max(num_iters - 1, 1)
    if mode == "exp":
        return start_lr * (end_lr / start_lr) ** r
    if mode == "linear":
        return start_lr + (end_lr - start_lr) * r
    raise ConfigError("lr_find.mode", mode, "unknown; choose one of exp, linear")


def lr_range_test(model: torch.nn.Module, loss_fn: Callable, batches: Iterable, optimizer: torch.optim.Optimizer,
                  start_lr: float = 1e-6, end_lr: float = 10.0, num_iters: int = 100, mode: str = "exp",
                  smooth: float = 0.05, diverge_factor: float = 4.0, *, suggestion: str = "valley",
                  val_fn: Optional[Callable[[torch.nn.Module], float]] = None, val_every: Optional[int] = None,
                  grad_clip: Optional[float] = None, amp_dtype: Optional[torch.dtype] = None,
                  progress: Optional[Callable[[int, float, float], None]] = None) -> RangeTestResult:
    """Return the range test of `model` trained in place (pass a copy to keep it) with `optimizer`.

    batches: (inputs, targets) pairs; re-iterated when exhausted, so a DataLoader reshuffles and a
    list cycles. loss_fn(model(inputs), targets) is the loss. The smoothed loss is
    s_0 = loss_0, s_t = smooth x loss_t + (1 - smooth) x s_{t-1}, the stop test s_t > diverge_factor
    x min(s_0..s_t), both exactly as torch-lr-finder (fastai's EMA, debiased, matches it after a
    few iterations). A non-finite loss stops the test before its step. val_fn(model) is called
    after every val_every-th step (Smith's variant) and only recorded. progress(i, lr, s_i) is
    called after every iteration.
    """
    import torch

    if suggestion not in SUGGESTIONS:
        raise ConfigError("lr_find.suggestion", suggestion, f"unknown; choose one of {', '.join(SUGGESTIONS)}")
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    source = _cycle(batches)
    lrs, losses, smoothed, val_losses = [], [], [], {}
    best, stopped = math.inf, False
    for i, lr in enumerate(lr_schedule(start_lr, end_lr, num_iters, mode).tolist()):
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = next(source)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(inputs), targets)
        value = float(loss.float().item())
        lrs.append(lr)
        losses.append(value)
        if not math.isfinite(value):  # no step on inf/NaN: the curve ends here
            smoothed.append(math.inf)
            stopped = True
            break
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        s = value if i == 0 else smooth * value + (1 - smooth) * smoothed[-1]
        smoothed.append(s)
        best = min(best, s)
        if val_fn is not None and val_every and (i + 1) % val_every == 0:
            val_losses[i] = float(val_fn(model))
        if progress is not None:
            progress(i, lr, s)
        if s > diverge_factor * best:
            stopped = True
            break
    found = suggest(lrs, smoothed, num_iters)
    return RangeTestResult(lrs, losses, smoothed, found["valley"], found["steep"], found["minimum/10"],
                           suggestion, stopped, num_iters, val_losses=val_losses)


def _cycle(batches: Iterable) -> Iterable:
    """Yield from `batches` forever, re-iterating it whenever it runs out."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the range test's batches are empty")


# --------------------------------------------------------------------------- fastai's suggestions


def suggest(lrs: list[float], smoothed: list[float], num_iters: int) -> dict[str, float]:
    """Return fastai's valley, steep and minimum/10 LRs of a smoothed curve (NaN if it is too short).

    As fastai's lr_find, the curve loses its first num_iters // 10 and its last 5 points (and
    everything from the first non-finite one). Fewer than 3 points left (a test that diverged at
    once) suggest nothing: every suggestion is NaN.
    """
    lr, loss = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        lr, loss = lr[:bad[0]], loss[:bad[0]]
    lr, loss = lr[num_iters // 10:loss.size - 5], loss[num_iters // 10:loss.size - 5]
    if loss.size < 3:
        return {name: math.nan for name in SUGGESTIONS}
    return {"valley": _valley(lr, loss), "steep": _steep(lr, loss), "minimum/10": float(lr[loss.argmin()]) / 10}


def _valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """Return fastai's valley: 1/3 + 1/6 of the way into the longest strictly decreasing run of losses.

    The run is fastai's longest decreasing subsequence (O(n^2), n <= num_iters); the index is
    clipped at 0, where fastai would wrap round to the last LR.
    """
    n = losses.size
    lds = np.ones(n, dtype=int)
    max_start = max_end = 0
    for i in range(1, n):
        before = lds[:i][losses[:i] > losses[i]]
        if before.size:
            lds[i] = before.max() + 1
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max(0, max_start + int(sections) + int(sections / 2))
    return float(lrs[idx])


def _steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """Return fastai's steep: the LR where the loss falls fastest per unit of log LR."""
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    return float(lrs[grads.argmin()])


# --------------------------------------------------------------------------- from a trial config


def range_test(cfg: Any, dataset: Any = None, batch_size: Optional[int] = None, *,
               progress: bool = False) -> RangeTestResult:
    """Return the range test of a fresh model, optimizer and data built from `cfg` at `batch_size`.

    The model is built as a trial builds it (same seed, same init), the optimizer is cfg.optimizer
    (momentum, betas and weight decay matter for where the loss diverges), batches are drawn in
    a seeded random order, reshuffled every epoch. cfg.lr_find holds the test's settings;
    batch_size defaults to cfg.batch_size. Nothing outside the call is trained or restored.
    """
    import torch
    import torch.nn.functional as F

    from scaling.data import load_dataset
    from scaling.devices import amp_dtype_of, resolve_device
    from scaling.evaluation import evaluate
    from scaling.models import build_model
    from scaling.optim import build_optimizer

    B = int(batch_size or cfg.batch_size)
    cfg = at_batch_size(cfg, B)
    validate(cfg)
    f = cfg.lr_find
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = (dataset or load_dataset(cfg.data)).to(device)
    check_batch_fits("batch_size", B, data.n_train)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), f.start_lr)
    amp_dtype = amp_dtype_of(cfg.precision)
    val_fn = (lambda m: evaluate(m, data, amp_dtype)["val/loss"]) if f.val_every else None

    from tqdm.auto import tqdm

    with tqdm(total=f.num_iters, desc=f"lr_find bs={B}", disable=not progress, leave=False) as bar:
        def tick(i: int, lr: float, s: float) -> None:
            bar.update(1)
            bar.set_postfix(lr=f"{lr:.2e}", loss=f"{s:.4f}", refresh=False)

        result = lr_range_test(model, F.cross_entropy, _batches(data, B, cfg.seed), optimizer, f.start_lr, f.end_lr,
                               f.num_iters, f.mode, f.smooth, f.diverge_factor, suggestion=f.suggestion,
                               val_fn=val_fn, val_every=f.val_every, grad_clip=cfg.optimizer.grad_clip,
                               amp_dtype=amp_dtype, progress=tick)
    result.batch_size = B
    return result


def _batches(data: Any, batch_size: int, seed: int) -> Iterable:
    """Yield training batches forever: whole batches in a seeded random order, reshuffled every epoch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        order = torch.randperm(data.n_train, generator=g).to(data.x_train.device)
        for i in range(data.n_train // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield data.x_train[idx], data.y_train[idx]


def usable_lr(result: RangeTestResult, key: str, value: Any) -> float:
    """Return result.lr, or raise the ConfigError (naming key=value) of a test too short to suggest an LR."""
    if not math.isfinite(result.lr):
        raise ConfigError(key, value, f"the LR range test at batch size {result.batch_size} diverged after "
                          f"{len(result.lrs)} iterations, too early to suggest an LR: lower lr_find.start_lr")
    return result.lr


def resolve_ref_lr(cfg: Any, dataset: Any = None, *, progress: bool = False, client: Any = None,
                   run_id: Optional[str] = None) -> tuple[float, dict[str, Any]]:
    """Return (ref_lr, details): the range test's suggestion at scaling.ref_batch_size, for ref_lr=auto.

    details are the test's `lr_find.*` scalars (RangeTestResult.params). With an MLflow client
    and run_id (e.g. the study run) the curve and its plot are also logged into that run.
    """
    result = range_test(cfg, dataset, cfg.scaling.ref_batch_size, progress=progress)
    lr = usable_lr(result, "scaling.ref_lr", "auto")
    if client is not None and run_id is not None:
        from scaling.lr_find_cli import log_range_test

        log_range_test(client, run_id, result)
    return lr, result.params()


def trial_ref_lr(cfg: Any, dataset: Any = None, ref_lr: Optional[float] = None, *,
                 progress: bool = False) -> tuple[Optional[float], dict[str, Any]]:
    """Return (ref_lr, details) a trial must pass to run_trial when its LR comes from a range test.

    scaling.ref_lr=auto (and no ref_lr given): the test at scaling.ref_batch_size. With
    schedule.from_lr_find (onecycle, cyclic): the test at the trial's own batch_size, whose
    suggestion becomes the peak LR x lr_multiplier (Smith: max_lr = the suggestion, the cycle's
    base LR base_lr_fraction of it); it is returned as the ref_lr the rule scales back up to it,
    ref_lr = suggestion / (batch_size / ref_batch_size) ** alpha, so effective_lr() and the
    logged lr.base / lr.effective stay consistent. Otherwise (ref_lr, {}).
    """
    if lr_from_range_test(cfg):
        result = range_test(cfg, dataset, cfg.batch_size, progress=progress)
        peak = usable_lr(result, "schedule.from_lr_find", True)
        ref = peak / (cfg.batch_size / cfg.scaling.ref_batch_size) ** lr_exponent(cfg.scaling.rule)
        return ref, {**result.params(), "lr_find.ref_lr": ref}
    if cfg.scaling.ref_lr == "auto" and ref_lr is None:
        ref, details = resolve_ref_lr(cfg, dataset, progress=progress)
        return ref, {**details, "lr_find.ref_lr": ref}
    return ref_lr, {}


def main(argv: Optional[list[str]] = None) -> None:
    """`scaling-lr-find [overrides]`: see scaling.lr_find_cli."""
    from scaling.lr_find_cli import main as cli_main

    cli_main(argv)
