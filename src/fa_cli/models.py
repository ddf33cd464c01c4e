"""The networks of ``conf/model/``, built for a dataset's image shape and classes.

Plain ``nn.Module``s with exact backprop: ``fa_cli.alignment.convert`` turns their ``nn.Linear`` and
``nn.Conv2d`` layers into ones that learn with the chosen rule.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fa_cli.alignment.layers import CONVERTIBLE
from fa_cli.config import (
    ACTIVATIONS,
    CNNConfig,
    ConfigError,
    LeNetConfig,
    MLPConfig,
    ModelConfig,
    TorchvisionConfig,
)


def _activation(name: str) -> nn.Module:
    """A new ``model.activation`` module: ``relu`` is ``nn.ReLU()`` (the names in ``fa_cli.config``)."""
    module: type[nn.Module] = getattr(nn, ACTIVATIONS[name])
    return module()


class MLP(nn.Sequential):
    """Flatten, then ``Linear -> activation`` per hidden width, then a linear output layer."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int, activation: str = "relu"):
        layers: list[nn.Module] = [nn.Flatten()]
        for width in widths:
            layers += [nn.Linear(in_features, width), _activation(activation)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


class CNN(nn.Sequential):
    """Per entry of ``channels``: a same-padded conv, the activation and 2x2 max-pooling; then a hidden
    linear layer and the output layer. The default ``[32, 64, 64]`` with ``hidden=128`` is the report's
    3 conv + 2 linear network (28 -> 14 -> 7 -> 3 pixels, 576 features into the hidden layer)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: list[int],
        hidden: int,
        num_classes: int,
        kernel_size: int = 3,
        activation: str = "relu",
    ):
        layers: list[nn.Module] = []
        size = image_size
        for width in channels:
            layers += [
                nn.Conv2d(in_channels, width, kernel_size, padding=kernel_size // 2),
                _activation(activation),
                nn.MaxPool2d(2),
            ]
            in_channels, size = width, size // 2
        if size < 1:
            message = f"{len(channels)} 2x2 poolings shrink {image_size}x{image_size} images to nothing"
            raise ConfigError("model.channels", message)
        layers += [
            nn.Flatten(),
            nn.Linear(in_channels * size * size, hidden),
            _activation(activation),
            nn.Linear(hidden, num_classes),
        ]
        super().__init__(*layers)


class LeNet(nn.Module):
    """BioTorch's ``le_net_mnist`` (biotorch/models/le_net.py), layer for layer: 5x5 convs with 6, 16
    and 120 channels (ReLU, 2x2 max-pooling after the first two), then linear 120 -> 84 -> classes
    with no activation between the two linear layers, as there. It needs 32x32 inputs (the third conv
    turns 5x5 into 1x1); BioTorch resizes MNIST to 32x32 when loading it, this model resizes its input
    (bilinear) when the images are another size."""

    def __init__(self, in_channels: int = 1, image_size: int = 32, num_classes: int = 10):
        super().__init__()
        self.resize = nn.Identity() if image_size == 32 else nn.Upsample(size=(32, 32), mode="bilinear")
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(kernel_size=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(kernel_size=2)
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(self.resize(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x)).flatten(1)
        return self.fc2(self.fc1(x))


def torchvision_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """An untrained torchvision classifier with ``num_classes`` outputs whose first conv takes
    ``in_channels`` (same kernel, stride and padding as torchvision's)."""
    from torchvision import models

    model = models.get_model(name, weights=None, num_classes=num_classes)
    first = next(((path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first[1].in_channels != in_channels:
        path, conv = first
        parent, _, attribute = path.rpartition(".")
        replacement = nn.Conv2d(
            in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        setattr(model.get_submodule(parent) if parent else model, attribute, replacement)
    return model


def build(cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The network ``cfg`` describes, checked with a forward pass on two blank images so that a model
    that cannot take the dataset's images fails now, naming the key, before any data loads."""
    if isinstance(cfg, MLPConfig):
        model = MLP(in_channels * image_size * image_size, list(cfg.widths), num_classes, cfg.activation)
    elif isinstance(cfg, CNNConfig):
        model = CNN(
            in_channels,
            image_size,
            list(cfg.channels),
            cfg.hidden,
            num_classes,
            kernel_size=cfg.kernel_size,
            activation=cfg.activation,
        )
    elif isinstance(cfg, LeNetConfig):
        model = LeNet(in_channels, image_size, num_classes)
    elif isinstance(cfg, TorchvisionConfig):
        model = torchvision_model(cfg.name, in_channels, num_classes)
    else:
        raise TypeError(f"no builder for {type(cfg).__name__}")
    if cfg.init == "xavier":
        for layer in model.modules():
            if isinstance(layer, tuple(CONVERTIBLE)):  # the layers a rule can train
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    # In training mode, on a copy: some models answer differently when training (auxiliary outputs),
    # and the copy keeps BatchNorm's running statistics of the real model untouched.
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(2, in_channels, image_size, image_size))
    except Exception as e:  # whatever the model raises on these images, it cannot train on them
        message = " ".join(str(e).split())
        raise ConfigError(
            "model", f"{cfg.name} cannot take {in_channels}x{image_size}x{image_size} images: {message}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.shape != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError("model", f"{cfg.name} must return (batch, {num_classes}) logits, returned {got}")
    return model
