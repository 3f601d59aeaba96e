"""Models: shapes over the registry x activations x inits, init statistics, errors."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from scaling.config import ACTIVATIONS, INITS, MODELS as MODEL_NAMES, ConfigError, ModelConfig
from scaling.models import MODELS, build_model

SHAPES = {
    "mlp": [(40,), (1, 28, 28)],
    "cnn": [(40,), (1, 28, 28), (3, 32, 32)],
    "resnet": [(3, 32, 32), (40,)],  # 1-D input gets Conv1d/BatchNorm1d, not an error
}
CASES = [(name, shape) for name in MODEL_NAMES for shape in SHAPES[name]]


def model_cfg(**kw):
    return OmegaConf.structured(ModelConfig(**kw))


def test_registry_matches_config():
    assert tuple(MODELS) == MODEL_NAMES


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name,shape", CASES)
def test_forward_shape(name, shape, activation, init):
    torch.manual_seed(0)
    model = build_model(model_cfg(name=name, width=4, depth=1, activation=activation, init=init), shape, 10)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_mlp_depth_zero_is_logistic_regression():
    model = build_model(model_cfg(name="mlp", depth=0), (40,), 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 10)]


def test_mlp_layers():
    model = build_model(model_cfg(name="mlp", width=32, depth=3, activation="tanh"), (1, 28, 28), 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 32), (32, 32), (32, 32), (32, 10)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3


@pytest.mark.parametrize("shape,conv,sizes", [
    ((40,), nn.Conv1d, [40, 20, 10]),
    ((1, 28, 28), nn.Conv2d, [28, 14, 7]),
])
def test_cnn_downsamples(shape, conv, sizes):
    model = build_model(model_cfg(name="cnn", width=8, depth=3), shape, 10)
    seen = []
    for m in model.modules():
        if isinstance(m, conv):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[-1]))
    model(torch.randn(2, *shape))
    assert seen == sizes


def test_resnet20_layout():
    """depth 3 is ResNet-20: 19 3x3 convs + the head, 1x1 shortcuts only where the shape changes."""
    model = build_model(model_cfg(name="resnet", width=16, depth=3), (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19
    assert [(m.in_channels, m.out_channels, m.stride) for m in convs if m.kernel_size == (1, 1)] == [
        (16, 32, (2, 2)), (32, 64, (2, 2))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19 + 2
    assert model[-1].in_features == 64
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < n_params < 0.28e6  # ResNet-20 (option B) has ~0.27M parameters


def _first(model: nn.Module, kind: type[nn.Module]) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, kind))


@pytest.mark.parametrize("activation,gain", [
    ("relu", math.sqrt(2)), ("gelu", math.sqrt(2)), ("tanh", 5 / 3), ("sigmoid", 1.0)])
def test_he_init_std(activation, gain):
    torch.manual_seed(0)
    model = build_model(model_cfg(name="mlp", width=1024, depth=2, activation=activation, init="he"), (40,), 10)
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][1]  # 1024 x 1024
    assert hidden.weight.std().item() == pytest.approx(gain / math.sqrt(1024), rel=0.02)
    assert hidden.weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, nn.Linear))


def test_he_init_conv_uses_fan_in():
    torch.manual_seed(0)
    model = build_model(model_cfg(name="cnn", width=64, depth=2, init="he"), (3, 32, 32), 10)
    second = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]  # fan_in = 64 * 3 * 3
    assert second.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)


def test_xavier_init():
    torch.manual_seed(0)
    model = build_model(model_cfg(name="mlp", width=1024, depth=1, init="xavier"), (40,), 10)
    first = _first(model, nn.Linear)  # fan_in 40, fan_out 1024: U(-a, a), a = sqrt(6 / 1064)
    bound = math.sqrt(6 / (40 + 1024))
    assert first.weight.abs().max().item() <= bound
    assert first.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert (first.bias == 0).all()


def test_default_init_is_torchs():
    torch.manual_seed(0)
    model = build_model(model_cfg(name="mlp", width=1024, depth=1, init="default"), (40,), 10)
    first = _first(model, nn.Linear)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert first.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 40), rel=0.02)
    assert (first.bias != 0).any()


def test_init_leaves_batchnorm_alone():
    model = build_model(model_cfg(name="resnet", width=4, depth=1, init="xavier"), (3, 8, 8), 10)
    bn = _first(model, nn.BatchNorm2d)
    assert (bn.weight == 1).all() and (bn.bias == 0).all()


@pytest.mark.parametrize("key,kw", [
    ("model.name", {"name": "transformer"}),
    ("model.activation", {"activation": "swish"}),
    ("model.init", {"init": "orthogonal"}),
])
def test_unknown_names_raise(key, kw):
    cfg = OmegaConf.create({**ModelConfig().__dict__, **kw})
    with pytest.raises(ConfigError, match=key):
        build_model(cfg, (40,), 10)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_conv_models_need_signal_or_image(name):
    with pytest.raises(ConfigError, match=r"model.name=.*\(length,\) or \(C, H, W\)"):
        build_model(model_cfg(name=name), (28, 28), 10)
