"""Every option of every config group composes and validates; bad values fail naming their key."""

from __future__ import annotations

from importlib import resources

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import HydraException

from fa_cli.config import (
    CNNConfig,
    ConfigError,
    DFAConfig,
    FilesDatasetConfig,
    LeNetConfig,
    MLPConfig,
    SGDConfig,
    SyntheticDatasetConfig,
    TorchvisionConfig,
    describe,
    validate,
)

GROUPS = ("dataset", "model", "method", "optim", "trainer", "diagnostics", "eval", "experiment")


def options(group: str) -> list[str]:
    folder = resources.files("fa_cli.conf") / group
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


@pytest.fixture(autouse=True)
def hydra_conf():
    with initialize_config_module(config_module="fa_cli.conf", version_base=None):
        yield


def make(*overrides: str):
    return validate(compose(config_name="train", overrides=list(overrides)))


def test_groups_have_the_options_the_cli_documents():
    assert options("dataset") == ["cifar10", "fashion_mnist", "mnist", "synthetic"]
    assert options("model") == ["ann", "cnn", "lenet", "mlp", "torchvision"]
    assert options("method") == sorted(["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "shallow"])
    assert options("optim") == ["adam", "adamw", "sgd"]
    assert "default" in options("trainer")
    assert options("diagnostics") == ["default"] and options("eval") == ["default"]
    assert options("experiment"), "at least one preset"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    run = make(f"{group}={option}")
    if group == "method":
        assert run.method.name == option
        assert run.method.scale == (0.25 if option == "dfa" else 1.0)  # see conf/method/dfa.yaml
    if group == "dataset":
        assert run.dataset.name == option


def test_defaults_are_the_reports_setup():
    run = make()
    assert isinstance(run.dataset, FilesDatasetConfig) and run.dataset.name == "mnist"
    assert isinstance(run.model, MLPConfig) and list(run.model.widths) == [50]  # the report's ANN
    assert run.method.name == "bp"
    assert isinstance(run.optim, SGDConfig)
    assert run.seed == 0


def test_options_pick_their_schema():
    assert isinstance(make("model=cnn").model, CNNConfig)
    assert isinstance(make("model=lenet").model, LeNetConfig)
    assert isinstance(make("model=torchvision", "model.name=resnet18").model, TorchvisionConfig)
    assert isinstance(make("dataset=synthetic").dataset, SyntheticDatasetConfig)
    dfa = make("method=dfa").method
    assert isinstance(dfa, DFAConfig) and dfa.projection == "full"


def test_the_overrides_the_issue_names_exist():
    run = make(
        "method=dfa",
        "model=cnn",
        "dataset=mnist",
        "optim=adam",
        "seed=3",
        "trainer.epochs=4",
        "trainer.batch_size=32",
        "trainer.device=cpu",
        "optim.lr=0.005",
        "dataset.root=/somewhere",
        "dataset.subset=100",
    )
    assert (run.method.name, run.model.name, run.seed) == ("dfa", "cnn", 3)
    assert (run.trainer.epochs, run.trainer.batch_size, run.trainer.device) == (4, 32, "cpu")
    assert (run.optim.lr, run.dataset.root, run.dataset.subset) == (0.005, "/somewhere", 100)


def test_data_root_follows_fa_data_dir(monkeypatch):
    monkeypatch.setenv("FA_DATA_DIR", "/data/here")
    assert make().dataset.root == "/data/here"
    monkeypatch.delenv("FA_DATA_DIR")
    assert make().dataset.root == "data"


def test_experiment_preset_overrides_groups():
    run = make("experiment=smoke")
    assert run.dataset.name == "synthetic"
    assert run.trainer.epochs == 3


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-0.1"], "optim.lr"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
        (["trainer.epochs=-1"], "trainer.epochs"),
        (["trainer.device=tpu"], "trainer.device"),
        (["dataset.subset=0"], "dataset.subset"),
        (["dataset.val_fraction=1.0"], "dataset.val_fraction"),
        (["method.name=backprop"], "method.name"),
        (["method.scale=0"], "method.scale"),
        (["method=dfa", "method.projection=diagonal"], "method.projection"),
        (["method.init=he"], "method.init"),
        (["model.init=he"], "model.init"),
        (["model=torchvision", "model.name=resnet1"], "model.name"),
        (["model=mlp", "model.activation=swish"], "model.activation"),
        (["model=mlp", "model.widths=[10,0]"], "model.widths[1]"),
        (["optim.schedule=multistep"], "optim.milestones"),
        (["optim.schedule=multistep", "optim.milestones=[75,50]"], "optim.milestones"),
        (["optim.schedule=warm"], "optim.schedule"),
        (["optim.momentum=1.5"], "optim.momentum"),
        (["dataset.name=imagenet"], "dataset.name"),
        (["+extra=1"], "extra"),
        (["trainer.patience=3", "dataset.val_fraction=0"], "trainer.patience"),
        (["eval.attack=fgsm", "eval.eps=[0.3,0,0.3]"], "eval.eps[2]"),
    ],
)
def test_impossible_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        make(*overrides)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}: ")
    assert "\n" not in str(error.value)


def test_unknown_values_list_the_valid_ones():
    with pytest.raises(ConfigError, match="choose one of: bp, fa, dfa, usf, brsf, frsf, kp, shallow"):
        make("method.name=dfx")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("method=dfx", "method=dfx: no such option (did you mean dfa?); choose one of: bp, brsf, dfa"),
        ("trainer.epoch=3", "trainer.epoch: unknown key (did you mean trainer.epochs?)"),
        ("trainer.epochs=abc", "trainer.epochs: Value 'abc' of type 'str' could not be converted to Integer"),
        ("model.widths=oops", "model.widths: "),
        ("logger=[csv,tensorbord]", "logger=tensorbord: no such option (did you mean tensorboard?); choose "),
        ("logger.mlflow.tracking_uri=x", "logger.mlflow: mlflow is not among this run's trackers; choose"),
        ("logger=tensorboard logger.tensorboard.dir=x", "logger.tensorboard.dir: unknown key; logger.tens"),
    ],
)
def test_hydra_errors_become_one_line_naming_the_key(override, expected):
    with pytest.raises(HydraException) as error:
        compose(config_name="train", overrides=override.split())
    message = describe(error.value)
    assert message.startswith(expected)
    assert "\n" not in message
