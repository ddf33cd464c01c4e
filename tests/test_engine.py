"""The training loop learns, reports per epoch, and stops on a non-finite loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fa_cli import data, engine
from fa_cli.config import SGDConfig, SyntheticDatasetConfig
from fa_cli.optim import build_scheduler


@pytest.fixture(scope="module")
def splits() -> data.Data:
    cfg = SyntheticDatasetConfig(name="synthetic", train_size=600, test_size=200, noise=4.0)
    return data.load(cfg, torch.device("cpu"), seed=0)


def setup(lr: float = 0.05):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = build_scheduler(
        SGDConfig(lr=lr, momentum=0.9, schedule="step", step_size=2, gamma=0.5), optimizer, 4
    )
    return model, optimizer, scheduler


def test_fit_yields_one_record_per_epoch_and_learns(splits):
    model, optimizer, scheduler = setup()
    steps = []
    records = list(
        engine.fit(
            model,
            optimizer,
            scheduler,
            splits,
            epochs=4,
            batch_size=32,
            eval_batch_size=100,
            generator=torch.Generator().manual_seed(0),
            progress=lambda epoch, step, total, loss, acc: steps.append((epoch, step, total)),
        )
    )
    assert [r.epoch for r in records] == [1, 2, 3, 4]
    assert [r.lr for r in records] == pytest.approx([0.05, 0.05, 0.025, 0.025])
    assert records[-1].train_loss < records[0].train_loss
    assert records[-1].val_accuracy > 80
    assert all(r.seconds > 0 and 0 <= r.train_accuracy <= 100 for r in records)
    assert steps[-1] == (4, 17, 17)  # 540 examples in batches of 32; the progress ends each epoch
    test_loss, test_accuracy = engine.evaluate(model, splits.test, batch_size=64)
    assert test_accuracy > 80 and math.isfinite(test_loss)


def test_evaluate_does_not_depend_on_the_batch_size(splits):
    model, *_ = setup()
    a, b = engine.evaluate(model, splits.test, 7), engine.evaluate(model, splits.test, 200)
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1] == b[1]


def test_a_non_finite_loss_stops_training_naming_epoch_and_step(splits):
    model, optimizer, scheduler = setup()
    train_epoch = engine.train_epoch

    def poisoned(*args, epoch, **kwargs):
        if epoch == 2:  # corrupt the weights after epoch 1: the first step of epoch 2 gives NaN
            with torch.no_grad():
                model[1].weight.fill_(float("nan"))
        return train_epoch(*args, epoch=epoch, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "train_epoch", poisoned)
        fit = engine.fit(
            model,
            optimizer,
            scheduler,
            splits,
            epochs=3,
            batch_size=32,
            eval_batch_size=100,
            generator=torch.Generator().manual_seed(0),
        )
        assert next(fit).epoch == 1
        with pytest.raises(engine.Diverged) as error:
            next(fit)
    assert (error.value.epoch, error.value.step) == (2, 1)


def test_the_batch_order_follows_the_generator(splits):
    results = []
    for seed in (0, 0, 1):
        model, optimizer, _ = setup()
        generator = torch.Generator().manual_seed(seed)
        results.append(engine.train_epoch(model, optimizer, splits.train, 32, generator))
    assert results[0] == results[1] != results[2]


@pytest.mark.parametrize("batch_size", [32, 37])  # 37: a shorter last batch
@pytest.mark.parametrize(
    "gather_bytes, count_every, refresh",
    [
        (engine.GATHER_BYTES, engine.COUNT_EVERY, engine.REFRESH_SECONDS),  # one chunk, one count
        (3 * 37 * 784 * 4, 4, 0.0),  # chunks of 3 batches, counts every 4 steps and at every refresh
        (1, 1, 0.0),  # a batch at a time
    ],
)
def test_train_epoch_reports_the_mean_loss_and_accuracy_of_every_example_it_saw(
    splits, batch_size, gather_bytes, count_every, refresh, monkeypatch
):
    # With lr=0 the model stays as it is, so the epoch's numbers must be the whole split's: batches are
    # gathered in chunks into a reused buffer, correct answers counted for several steps at once and
    # per-step losses stacked at refreshes, and no example may be lost or counted twice.
    monkeypatch.setattr(engine, "GATHER_BYTES", gather_bytes)
    monkeypatch.setattr(engine, "COUNT_EVERY", count_every)
    monkeypatch.setattr(engine, "REFRESH_SECONDS", refresh)
    model, optimizer, _ = setup(lr=0.0)
    reported = []
    loss, accuracy = engine.train_epoch(
        model,
        optimizer,
        splits.train,
        batch_size,
        torch.Generator().manual_seed(0),
        progress=lambda epoch, step, steps, loss, accuracy: reported.append(step),
    )
    expected_loss, expected_accuracy = engine.evaluate(model, splits.train, len(splits.train))
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy)
    assert reported[-1] == math.ceil(len(splits.train) / batch_size)


@pytest.mark.parametrize("gather_bytes", [1, 2 * 32 * 784 * 4, engine.GATHER_BYTES])
def test_each_step_trains_on_the_rows_its_batch_names(splits, gather_bytes, monkeypatch):
    # The batch a step sees (inputs and targets) is the split's rows in the generator's order, however
    # many batches are gathered at once.
    monkeypatch.setattr(engine, "GATHER_BYTES", gather_bytes)
    model, optimizer, _ = setup()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    engine.train_epoch(
        model,
        optimizer,
        splits.train,
        32,
        torch.Generator().manual_seed(3),
        on_batch=lambda epoch, step, steps, x, y: seen.append((x.clone(), y.clone())),
    )
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(3)).split(32)
    assert len(seen) == len(order)
    for (x, y), index in zip(seen, order, strict=True):
        assert torch.equal(x, splits.train.inputs[index]) and torch.equal(y, splits.train.targets[index])


def test_huge_but_finite_losses_are_summed_without_overflow(splits):
    # Each batch loss ~3e36 is finite in float32, but 600 of them summed in float32 are not: the epoch
    # must report the finite mean, not stop as if a step had diverged (found on dfa's CNN on a GPU).
    model, _, _ = setup()
    with torch.no_grad():
        model[3].weight.mul_(1e37)  # batch losses ~3e36: their float32 sum is inf
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = engine.train_epoch(model, optimizer, splits.train, 64, torch.Generator().manual_seed(0))
    assert math.isfinite(loss) and loss > 1e33
