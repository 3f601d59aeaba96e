"""Models of a trial: an MLP, a plain CNN and a small CIFAR ResNet, built by name from `cfg.model`.

Every builder takes `(cfg, input_shape, num_classes)` and returns an `nn.Module` mapping a batch
of shape `(B, *input_shape)` to logits `(B, num_classes)`. Inputs with one dimension (MNIST-1D's
40 features) are read as a length-L signal with one channel by the convolutional models; inputs
with three dimensions are images (C, H, W).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from scaling.config import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
}
# kaiming_normal_'s `nonlinearity` per activation. torch has gains for relu, tanh (5/3) and
# sigmoid (1, i.e. 'linear'); it has none for GELU, which behaves like ReLU away from 0, so it
# gets ReLU's sqrt(2) (closer to GELU's true ~1.53 than linear's 1).
HE_NONLINEARITY: dict[str, str] = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "gelu": "relu"}


def _choice(key: str, value: str, registry: dict[str, Any]) -> Any:
    """Return registry[value], or raise a ConfigError naming the key and the choices."""
    if value not in registry:
        raise ConfigError(key, value, f"unknown; choose one of {', '.join(registry)}")
    return registry[value]


def _spatial_dims(name: str, input_shape: tuple[int, ...]) -> int:
    """Return 1 for (L,) signals and 2 for (C, H, W) images; the conv models take nothing else."""
    if len(input_shape) not in (1, 3):
        raise ConfigError("model.name", name,
                          f"needs input of shape (length,) or (C, H, W), got {tuple(input_shape)}")
    return 1 if len(input_shape) == 1 else 2


def _stem(input_shape: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """Return the layers that give a conv net channels first, and its input channel count."""
    if len(input_shape) == 1:  # (B, L) -> (B, 1, L)
        return [nn.Unflatten(1, (1, input_shape[0]))], 1
    return [], input_shape[0]


def build_mlp(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Return Flatten, depth x (Linear(width), activation), Linear head; depth 0 is logistic regression."""
    act = _choice("model.activation", cfg.activation, ACTIVATIONS)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(cfg.depth):
        layers += [nn.Linear(fan_in, cfg.width), act()]
        fan_in = cfg.width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def build_cnn(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Return depth conv layers of `width` channels, global average pool and a Linear head.

    The first conv keeps the resolution, every later one halves it (stride 2): 40 -> 20 -> 10 on
    MNIST-1D, 28 -> 14 -> 7 on MNIST at depth 3. Signals get kernel 5 (a wider view is cheap on
    40 samples), images kernel 3. No normalisation, so init and activation matter as configured.
    """
    dims = _spatial_dims("cnn", input_shape)
    act = _choice("model.activation", cfg.activation, ACTIVATIONS)
    conv, pool, kernel = ((nn.Conv1d, nn.AdaptiveAvgPool1d, 5) if dims == 1
                          else (nn.Conv2d, nn.AdaptiveAvgPool2d, 3))
    layers, channels = _stem(input_shape)
    for i in range(cfg.depth):
        layers += [conv(channels, cfg.width, kernel, stride=1 if i == 0 else 2, padding=kernel // 2), act()]
        channels = cfg.width
    layers += [pool(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (He et al. 2016), for 1-D or 2-D inputs."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride: int, act: type[nn.Module]):
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.act1 = act()
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.act2 = act()
        # Option B: a 1x1 projection only where the shape changes, identity elsewhere.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


def build_resnet(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Return a CIFAR ResNet: 3 stages of `depth` BasicBlocks of width, 2x and 4x width channels.

    depth=3 is ResNet-20 (6 * depth + 2 layers). Stages 2 and 3 start with stride 2. A 1-D input
    (MNIST-1D) gets the same network with Conv1d/BatchNorm1d rather than an error.
    """
    dims = _spatial_dims("resnet", input_shape)
    act = _choice("model.activation", cfg.activation, ACTIVATIONS)
    conv, norm, pool = ((nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d) if dims == 1
                        else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d))
    layers, channels = _stem(input_shape)
    layers += [conv(channels, cfg.width, 3, padding=1, bias=False), norm(cfg.width), act()]
    channels = cfg.width
    for stage in range(3):
        for block in range(cfg.depth):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(dims, channels, cfg.width * 2**stage, stride, act))
            channels = cfg.width * 2**stage
    layers += [pool(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[Any, tuple[int, ...], int], nn.Module]] = {
    "mlp": build_mlp, "cnn": build_cnn, "resnet": build_resnet,
}


def _xavier(weight: torch.Tensor, activation: str) -> None:
    """Fill `weight` from U(+-sqrt(6 / (fan_in + fan_out))), Glorot's gain-1 init for any activation."""
    nn.init.xavier_uniform_(weight)


def _he(weight: torch.Tensor, activation: str) -> None:
    """Fill `weight` from N(0, gain^2 / fan_in), the gain matching the activation."""
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity=HE_NONLINEARITY[activation])


# None keeps torch's own init: kaiming_uniform(a=sqrt(5)) weights, U(+-1/sqrt(fan_in)) biases.
INITS: dict[str, Callable[[torch.Tensor, str], None] | None] = {
    "default": None, "xavier": _xavier, "he": _he,
}


@torch.no_grad()
def init_weights(model: nn.Module, init: str, activation: str) -> nn.Module:
    """Return `model` with its Linear and Conv weights re-initialised in place (BatchNorm untouched).

    xavier is xavier_uniform (gain 1); he is kaiming_normal with fan_in and the activation's gain
    (HE_NONLINEARITY). Both zero the biases, as in their papers. The head is initialised like
    the hidden layers.
    """
    fill = _choice("model.init", init, INITS)
    _choice("model.activation", activation, HE_NONLINEARITY)
    if fill is None:
        return model
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fill(m.weight, activation)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def build_model(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Return the model `cfg.model` describes (name, width, depth, activation, init), initialised."""
    builder = _choice("model.name", cfg.name, MODELS)
    model = builder(cfg, tuple(input_shape), num_classes)
    return init_weights(model, cfg.init, cfg.activation)
