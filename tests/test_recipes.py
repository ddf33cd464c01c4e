"""The training-recipe options the result presets use (label smoothing, random shifts, AdamW) do what
they say, and the presets compose for every method they are run with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fa_cli import data, engine
from fa_cli.config import AdamWConfig, ConfigError, SyntheticDatasetConfig
from fa_cli.optim import build_optimizer, build_scheduler
from inprocess import compose_run as make

REPORT_METHODS = ("bp", "fa", "dfa")
BIOTORCH_METHODS = ("bp", "fa", "usf", "brsf", "frsf", "dfa")


# --- random shifts ---------------------------------------------------------------------------------


def test_shift_images_translates_each_image_by_its_own_offset():
    images = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    offsets = torch.tensor([[1, 0], [0, -2]])  # image 0 one row down; image 1 two columns left
    shifted = data.shift_images(images, offsets, max_shift=2)
    assert torch.equal(shifted[0, 0, 1:], images[0, 0, :-1])  # rows moved down by one
    assert torch.equal(shifted[0, 0, 0], images[0, 0, 0])  # the uncovered row repeats the border
    assert torch.equal(shifted[1, 0, :, :3], images[1, 0, :, 2:])  # columns moved left by two
    assert torch.equal(shifted[1, 0, :, 3], images[1, 0, :, 4])  # the uncovered columns repeat the border
    assert torch.equal(shifted[1, 0, :, 4], images[1, 0, :, 4])
    assert torch.equal(data.shift_images(images, torch.zeros(2, 2, dtype=torch.long), 2), images)


@pytest.fixture(scope="module")
def splits() -> data.Data:
    cfg = SyntheticDatasetConfig(name="synthetic", train_size=300, test_size=100, noise=4.0)
    return data.load(cfg, torch.device("cpu"), seed=0)


class Recorder(nn.Module):
    """A linear classifier that keeps the inputs of its last forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.linear(x)


def one_epoch(splits: data.Data, **options) -> tuple[Recorder, float]:
    torch.manual_seed(0)
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing learns: the inputs are the point
    loss, _ = engine.train_epoch(
        model, optimizer, splits.train, 300, torch.Generator().manual_seed(0), **options
    )
    return model, loss


def test_random_shift_moves_training_images_and_no_shift_leaves_them(splits):
    plain, _ = one_epoch(splits)
    shifted, _ = one_epoch(splits, random_shift=2)
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.seen[0], splits.train.inputs[order])  # without shifts: the images as stored
    assert not torch.equal(shifted.seen[0], plain.seen[0])
    # Every image is some translation of the stored one by at most 2 pixels: its interior is there.
    moved = shifted.seen[0]
    inner = splits.train.inputs[order][:, :, 2:-2, 2:-2]
    matches = torch.zeros(len(order), dtype=torch.bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            window = moved[:, :, 2 + dy : 26 + dy, 2 + dx : 26 + dx]
            matches |= (window == inner).flatten(1).all(dim=1)
    assert matches.all()


def test_label_smoothing_changes_the_training_loss_only(splits):
    _, plain = one_epoch(splits)
    model, smoothed = one_epoch(splits, label_smoothing=0.2)
    logits = model.linear(model.seen[0])
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    targets = splits.train.targets[order]
    assert smoothed == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=0.2).item(), rel=1e-5)
    assert plain == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert smoothed != pytest.approx(plain)
    # evaluate() has no smoothing option: validation and test losses are always plain cross-entropy.
    assert engine.evaluate(model.linear, splits.train, 1000)[0] == pytest.approx(plain, rel=1e-5)


# --- AdamW -----------------------------------------------------------------------------------------


def test_adamw_decays_the_weights_directly():
    weight = nn.Parameter(torch.ones(3))
    model = nn.Module()
    model.weight = weight
    optimizer = build_optimizer(AdamWConfig(lr=0.1, weight_decay=0.5), model)
    assert type(optimizer) is torch.optim.AdamW
    weight.grad = torch.zeros(3)  # no gradient: only the decoupled decay moves the weights
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    build_scheduler(AdamWConfig(lr=0.1, schedule="cosine"), optimizer, 5)  # schedules work as for the others


# --- config ----------------------------------------------------------------------------------------


def test_recipe_options_compose_and_validate():
    run = make("optim=adamw", "trainer.label_smoothing=0.1", "dataset.random_shift=2")
    assert isinstance(run.optim, AdamWConfig) and run.optim.weight_decay == 0.01
    assert (run.trainer.label_smoothing, run.dataset.random_shift) == (0.1, 2)
    defaults = make()
    assert (defaults.trainer.label_smoothing, defaults.dataset.random_shift) == (0.0, 0)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.label_smoothing=1.0", "trainer.label_smoothing"),
        ("trainer.label_smoothing=-0.1", "trainer.label_smoothing"),
        ("dataset.random_shift=-1", "dataset.random_shift"),
    ],
)
def test_impossible_recipe_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as error:
        make(override)
    assert error.value.key == key


# --- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,method",
    [("report_ann", m) for m in REPORT_METHODS]
    + [("report_cnn", m) for m in REPORT_METHODS]
    + [("report_cnn_adamw", m) for m in REPORT_METHODS]
    + [("biotorch_lenet", m) for m in BIOTORCH_METHODS]
    + [("biotorch_lenet_adamw", m) for m in BIOTORCH_METHODS],
)
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_presets_fix_the_model_and_recipe_for_every_method(preset, method, dataset):
    run = make(f"experiment={preset}", f"method={method}", f"dataset={dataset}")
    assert run.method.name == method and run.dataset.name == dataset
    assert run.model.name == ("lenet" if preset.startswith("biotorch_lenet") else preset.split("_")[1])
    if preset.startswith("biotorch_lenet"):
        assert run.trainer.epochs <= 20  # the budget, against BioTorch's 100
    # A preset is a whole recipe: what it sets does not depend on the group defaults of the moment.
    assert run.trainer.epochs > 1 and run.optim.schedule != "none"
