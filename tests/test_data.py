"""Datasets load as normalised tensors with a seeded validation split; missing files fail fast."""

from __future__ import annotations

import time

import pytest
import torch

from fa_cli import data
from fa_cli.config import FilesDatasetConfig, SyntheticDatasetConfig

CPU = torch.device("cpu")


def synthetic(**overrides) -> SyntheticDatasetConfig:
    values = dict(name="synthetic", train_size=500, test_size=100, noise=4.0, val_fraction=0.1) | overrides
    return SyntheticDatasetConfig(**values)


def test_synthetic_splits_have_the_configured_sizes_and_shapes():
    d = data.load(synthetic(), CPU, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (450, 50, 100)
    assert d.train.inputs.shape == (450, 1, 28, 28) and d.train.inputs.dtype == torch.float32
    assert d.train.targets.dtype == torch.int64 and set(d.train.targets.tolist()) <= set(range(10))
    assert d.shape == data.ImageShape(1, 28, 10)


def test_inputs_are_normalised_with_training_statistics():
    d = data.load(synthetic(), CPU, seed=0)
    assert d.train.inputs.mean().abs() < 1e-4
    assert (d.train.inputs.std() - 1).abs() < 1e-3


def test_the_split_follows_the_seed_and_never_overlaps():
    a, b, c = (data.load(synthetic(), CPU, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.val.inputs, b.val.inputs) and torch.equal(a.train.targets, b.train.targets)
    assert not torch.equal(a.val.inputs, c.val.inputs)
    train_rows = {tuple(x.flatten()[:40].tolist()) for x in a.train.inputs}
    assert not any(tuple(x.flatten()[:40].tolist()) in train_rows for x in a.val.inputs)
    # the test set is fixed: the seed changes the split, not the task
    assert torch.equal(a.test.targets, c.test.targets)


def test_subset_takes_the_first_training_examples():
    (_, labels), _ = data._synthetic(synthetic())
    part = data.load(synthetic(val_fraction=0.0, subset=40), CPU, seed=0)
    assert len(part.train) == 40 and part.val is None
    assert (
        sorted(part.train.targets.tolist()) == sorted(labels[:40].tolist()) != sorted(labels[40:80].tolist())
    )


def test_subset_larger_than_the_data_is_an_error():
    with pytest.raises(data.DataError, match="dataset.subset=9999"):
        data.load(synthetic(subset=9999), CPU, seed=0)


def test_synthetic_shape_is_configurable():
    d = data.load(synthetic(channels=3, image_size=32, num_classes=4), CPU, seed=0)
    assert d.train.inputs.shape[1:] == (3, 32, 32) and d.shape == data.ImageShape(3, 32, 4)
    assert set(d.test.targets.tolist()) <= set(range(4))


def test_file_datasets_know_their_shape_before_loading():
    assert data.shape_of(FilesDatasetConfig(name="cifar10", root="nowhere")) == data.ImageShape(3, 32, 10)
    assert data.shape_of(FilesDatasetConfig(name="fashion_mnist", root="nowhere")) == data.ImageShape(
        1, 28, 10
    )


@pytest.mark.parametrize(
    "name,folder,first_file",
    [
        ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw", "train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
    ],
)
def test_missing_files_offline_name_files_and_folder(tmp_path, monkeypatch, name, folder, first_file):
    monkeypatch.setattr(data, "_online", lambda url, timeout=3.0: False)
    with pytest.raises(data.DataError) as error:
        data.load(FilesDatasetConfig(name=name, root=str(tmp_path)), CPU, seed=0)
    message = str(error.value)
    assert str(tmp_path / folder) in message and first_file in message and "\n" not in message
    assert "dataset.root" in message and "FA_DATA_DIR" in message


def test_the_network_check_fails_fast_when_nothing_answers():
    start = time.monotonic()
    assert not data._online("http://127.0.0.1:9/", timeout=2.0)  # discard port: connection refused
    assert time.monotonic() - start < 3


def test_real_mnist_loads(mnist_root):
    d = data.load(FilesDatasetConfig(name="mnist", root=str(mnist_root), val_fraction=0.1), CPU, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (54000, 6000, 10000)
    assert d.train.inputs.shape[1:] == (1, 28, 28)
    assert torch.bincount(d.test.targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
