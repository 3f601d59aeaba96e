"""Optimizers: every preset builds with its config fields, trains a tiny batch, names are checked."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import scaling.config
from scaling.config import OPTIMIZERS as OPTIMIZER_NAMES, ConfigError, ModelConfig, OptimizerConfig
from scaling.models import build_model
from scaling.optim import OPTIMIZERS, build_optimizer, effective_lr, lr_exponent

CONF = Path(__file__).resolve().parents[1] / "conf" / "optimizer"
LRS = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01, "adagrad": 0.05, "rmsprop": 0.003}


def preset(name: str, **kw):
    """Return conf/optimizer/<name>.yaml on top of the schema, as Hydra composes it."""
    cfg = OmegaConf.merge(OmegaConf.structured(OptimizerConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    return OmegaConf.merge(cfg, kw)


def test_registry_matches_config_and_presets():
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(OPTIMIZER_NAMES)


def test_reexports():
    assert effective_lr is scaling.config.effective_lr
    assert lr_exponent is scaling.config.lr_exponent
    assert lr_exponent("sqrt") == 0.5


@pytest.mark.parametrize("name,cls,want", [
    ("sgd", torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-4}),
    ("adam", torch.optim.Adam, {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-4}),
    ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-4}),
    ("adagrad", torch.optim.Adagrad, {"eps": 1e-6, "weight_decay": 1e-4}),
    ("rmsprop", torch.optim.RMSprop, {"alpha": 0.9, "eps": 1e-6, "momentum": 0.8, "weight_decay": 1e-4}),
])
def test_config_fields_reach_torch(name, cls, want):
    cfg = preset(name, momentum=0.8, nesterov=name == "sgd", weight_decay=1e-4, beta1=0.8, beta2=0.95,
                 eps=1e-6, alpha=0.9)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], lr=0.02)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.02
    assert {k: group[k] for k in want} == want


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_training_decreases_loss(name):
    torch.manual_seed(0)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    model = build_model(OmegaConf.structured(ModelConfig(width=32, depth=1)), (40,), 10)
    opt = build_optimizer(preset(name), model.parameters(), lr=LRS[name])
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_unknown_name_raises():
    with pytest.raises(ConfigError, match="optimizer.name='lion'"):
        build_optimizer(OmegaConf.create({"name": "lion"}), [torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_nonpositive_lr_raises():
    with pytest.raises(ConfigError, match="lr"):
        build_optimizer(preset("sgd"), [torch.nn.Parameter(torch.zeros(1))], lr=0.0)
