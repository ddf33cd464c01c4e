"""The model zoo builds for each dataset shape, matches its reference, and converts with every rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fa_cli import models
from fa_cli.alignment import METHODS, convert
from fa_cli.config import ACTIVATIONS, CNNConfig, ConfigError, LeNetConfig, MLPConfig, TorchvisionConfig

CONFIGS = {
    "ann": MLPConfig(name="ann", widths=[50]),
    "mlp": MLPConfig(name="mlp", widths=[32, 16], activation="tanh"),
    "cnn": CNNConfig(name="cnn", channels=[32, 64, 64], hidden=128),
    "lenet": LeNetConfig(name="lenet"),
    "resnet18": TorchvisionConfig(name="resnet18"),
}


def build(name: str, channels: int = 1, size: int = 28, classes: int = 10) -> nn.Module:
    return models.build(CONFIGS[name], in_channels=channels, image_size=size, num_classes=classes)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_models_take_the_datasets_images(name, channels, size):
    model = build(name, channels, size, classes=7)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_ann_is_the_reports_784_50_10():
    linears = [m for m in build("ann").modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 50), (50, 10)]


def test_cnn_has_three_convs_and_two_linear_layers():
    model = build("cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.out_channels for m in convs] == [32, 64, 64]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 3 * 3, 128), (128, 10)]


def test_lenet_matches_biotorch_le_net_mnist():
    model = build("lenet")
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size) for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    assert convs == [(1, 6, (5, 5)), (6, 16, (5, 5)), (16, 120, (5, 5))]
    assert [(m.in_features, m.out_features) for m in (model.fc1, model.fc2)] == [(120, 84), (84, 10)]
    assert sum(p.numel() for p in model.parameters()) == 61706
    # BioTorch's module names and order, with no activation between fc1 and fc2 (as there)
    names = [name for name, _ in model.named_children()]
    assert names == [
        "resize",
        "conv1",
        "relu1",
        "pool1",
        "conv2",
        "relu2",
        "pool2",
        "conv3",
        "relu3",
        "fc1",
        "fc2",
    ]


def test_torchvision_models_are_adapted_to_the_channels():
    model = build("resnet18", channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_name_builds_its_torch_module(activation):
    # The names are in fa_cli.config, without torch, for the checks; each must be the module it names.
    mlp = MLPConfig(name="mlp", widths=[8], activation=activation)
    cnn = CNNConfig(name="cnn", channels=[4], hidden=8, activation=activation)
    for config in (mlp, cnn):
        model = models.build(config, in_channels=1, image_size=8, num_classes=3)
        built = sum(type(m).__name__ == ACTIVATIONS[activation] for m in model.modules())
        assert built == (1 if config is mlp else 2)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_models_that_cannot_take_the_images_fail_naming_the_key():
    with pytest.raises(ConfigError, match="^model: vit_b_16 cannot take 1x28x28 images"):
        models.build(TorchvisionConfig(name="vit_b_16"), in_channels=1, image_size=28, num_classes=10)
    with pytest.raises(ConfigError, match="^model.channels: "):
        models.build(
            CNNConfig(name="cnn", channels=[8] * 6, hidden=8), in_channels=1, image_size=28, num_classes=10
        )


def test_building_does_not_touch_batchnorm_statistics():
    model = build("resnet18")
    assert torch.equal(model.bn1.running_mean, torch.zeros(64)) and int(model.bn1.num_batches_tracked) == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["ann", "cnn", "lenet"])
def test_every_rule_trains_every_model(name, method):
    torch.manual_seed(0)
    model = convert(build(name), method, num_classes=10, seed=0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    learning = [p for p in model.parameters() if p.requires_grad]
    assert learning and all(p.grad is not None and torch.isfinite(p.grad).all() for p in learning)


@pytest.mark.parametrize("name", ["ann", "cnn", "lenet"])
def test_xavier_init_gives_glorot_weights_and_zero_biases(name):
    config = CONFIGS[name].__class__(**{**vars(CONFIGS[name]), "init": "xavier"})
    torch.manual_seed(0)
    model = models.build(config, in_channels=1, image_size=28, num_classes=10)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert layers
    for layer in layers:
        receptive = layer.weight[0][0].numel()
        bound = (6 / ((layer.weight.shape[0] + layer.weight.shape[1]) * receptive)) ** 0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(layer.bias) == 0
    torch.manual_seed(0)
    default = models.build(CONFIGS[name], in_channels=1, image_size=28, num_classes=10)
    assert not torch.equal(next(default.parameters()), next(model.parameters()))
