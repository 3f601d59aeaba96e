"""Optimizers of a trial, built by name from `cfg.optimizer`, all from torch.optim.

`effective_lr` and `lr_exponent` live in scaling.config (the sweeper needs them without
importing torch) and are re-exported here, next to the optimizer they feed.

Each optimizer is torch's own class, with its methods taken without the decorators that serve
torch.compile (see `eager`): those decorators import `torch._dynamo` on first use, 1.0-1.3 s of CPU
in every trial worker, and a trial never compiles its optimizer.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable

import torch

from scaling.config import ConfigError, effective_lr, lr_exponent

__all__ = ["OPTIMIZERS", "build_optimizer", "effective_lr", "lr_exponent"]

Params = Iterable[Any]


# Optimizer methods that torch 2.x wraps in `torch._disable_dynamo`, whose wrapper imports
# torch._dynamo on its first call, compiled or not.
_COMPILER_WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


@functools.cache
def eager(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """Return a subclass of torch optimizer `cls` whose methods skip torch.compile's decorators.

    `step` runs under the grad mode torch's own `_use_grad_for_differentiable` sets (enabled only
    for `differentiable=True`), without its `torch._dynamo.graph_break()` calls, which do nothing
    outside a compiled region; the `_COMPILER_WRAPPED` methods run undecorated. So the arithmetic
    is torch's, bit for bit (tests/test_optim.py), the step hooks and LR schedulers work as on
    `cls` (Optimizer still wraps `step` in its hook caller), and `torch._dynamo` is never imported:
    the wrappers would import it on the first `SGD(...)` and the first `step()` of every trial
    worker, ~1 s of CPU each that no eager loop uses. Not for use inside torch.compile.
    """
    raw_step = inspect.unwrap(cls.step)

    @functools.wraps(raw_step)
    def step(self, *args, **kwargs):
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return raw_step(self, *args, **kwargs)

    def __reduce__(self):  # pickled by its torch class: this subclass has no importable name
        return _unpickle_eager, (cls, self.__getstate__())

    body = {name: inspect.unwrap(getattr(cls, name)) for name in _COMPILER_WRAPPED}
    body.update(step=step, __reduce__=__reduce__, __module__=__name__, __qualname__=cls.__qualname__,
                __doc__=cls.__doc__)
    return type(cls.__name__, (cls,), body)


def _unpickle_eager(cls: type[torch.optim.Optimizer], state: dict) -> torch.optim.Optimizer:
    opt = eager(cls).__new__(eager(cls))
    opt.__setstate__(state)
    return opt


def _sgd(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return SGD with heavy-ball (or Nesterov) momentum and L2 weight decay."""
    return eager(torch.optim.SGD)(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                  weight_decay=cfg.weight_decay)


def _adam(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return Adam with L2 weight decay (coupled to the gradient, unlike AdamW)."""
    return eager(torch.optim.Adam)(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                   weight_decay=cfg.weight_decay)


def _adamw(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return AdamW: decoupled weight decay, scaled by the LR as in torch."""
    return eager(torch.optim.AdamW)(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                    weight_decay=cfg.weight_decay)


def _adagrad(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return Adagrad (no LR decay of its own: the schedule owns the LR)."""
    return eager(torch.optim.Adagrad)(params, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _rmsprop(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return RMSprop with smoothing `alpha` and optional momentum."""
    return eager(torch.optim.RMSprop)(params, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[Any, Params, float], torch.optim.Optimizer]] = {
    "sgd": _sgd, "adam": _adam, "adamw": _adamw, "adagrad": _adagrad, "rmsprop": _rmsprop,
}


def build_optimizer(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return the torch optimizer `cfg.optimizer` names over `params`, at learning rate `lr`.

    One parameter group: weight decay applies to every parameter, biases and BatchNorm included.
    Gradient clipping (`cfg.grad_clip`) is the training loop's job, not the optimizer's.
    """
    if cfg.name not in OPTIMIZERS:
        raise ConfigError("optimizer.name", cfg.name, f"unknown; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ConfigError("lr", lr, "must be positive")
    return OPTIMIZERS[cfg.name](cfg, params, float(lr))
