"""Optimizers of a trial, built by name from `cfg.optimizer`, all from torch.optim.

`effective_lr` and `lr_exponent` live in scaling.config (the sweeper needs them without
importing torch) and are re-exported here, next to the optimizer they feed.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from scaling.config import ConfigError, effective_lr, lr_exponent

__all__ = ["OPTIMIZERS", "build_optimizer", "effective_lr", "lr_exponent"]

Params = Iterable[Any]


def _sgd(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return SGD with heavy-ball (or Nesterov) momentum and L2 weight decay."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _adam(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return Adam with L2 weight decay (coupled to the gradient, unlike AdamW)."""
    return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)


def _adamw(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return AdamW: decoupled weight decay, scaled by the LR as in torch."""
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def _adagrad(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return Adagrad (no LR decay of its own: the schedule owns the LR)."""
    return torch.optim.Adagrad(params, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _rmsprop(cfg: Any, params: Params, lr: float) -> torch.optim.Optimizer:
    """Return RMSprop with smoothing `alpha` and optional momentum."""
    return torch.optim.RMSprop(params, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
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
