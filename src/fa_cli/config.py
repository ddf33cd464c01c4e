"""The config schema: one dataclass per kind of option in each group of ``conf/``, plus the checks
that types cannot express.

The dataclasses are registered in Hydra's ConfigStore under ``schema/<group>``; every yaml option
names its schema in its defaults list (``- /schema/model/mlp@_here_``). Hydra then rejects a
misspelt key or a wrong type while it composes, for every job of a sweep before the first starts.
:func:`validate` adds what types cannot say (``lr > 0``, a known method, a torchvision model that
exists) and returns typed objects. A schema field with a default is a knob most runs leave alone; a
field without one (``MISSING``) is set by each option's yaml.

Errors become :class:`ConfigError`: one line that names the key, which ``fa-train`` prints before
exiting with code 2.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from typing import Any

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fa_cli.alignment import INITS, METHODS


class ConfigError(ValueError):
    """A config that cannot run. ``str()`` is one line that starts with the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class DataError(RuntimeError):
    """Dataset files that are missing (and cannot be downloaded) or unreadable (raised by
    ``fa_cli.data``). One line."""


class Abort(BaseException):
    """Carries a config or data error past Hydra's handlers, which catch ``Exception`` (to print their
    own multi-line report, or to turn a callback's error into a warning), up to ``fa-train``'s main,
    which prints ``str(abort)`` as one line and exits with code 2. ``context`` says where (which job)."""

    def __init__(self, error: Exception, context: str = "") -> None:
        super().__init__(describe(error) + (f" ({context})" if context else ""))
        self.error = error


# --- dataset/ -------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    name: str = MISSING
    subset: int | None = None  # use only the first N training examples (null: all)
    val_fraction: float = 0.1  # share of the training examples held out for model selection (0: none)
    random_shift: int = 0  # augmentation: training images move by up to this many pixels each way (0: off)


@dataclass
class FilesDatasetConfig(DatasetConfig):
    """A torchvision dataset read from files under ``root`` (downloaded there when missing)."""

    root: str = "${oc.env:FA_DATA_DIR,data}"


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    """Generated images: a smooth random template per class plus Gaussian noise. No files."""

    train_size: int = MISSING
    test_size: int = MISSING
    noise: float = MISSING  # pixel noise over template contrast: higher is harder
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10


# --- model/ ---------------------------------------------------------------------------------------
# The schema class says which builder in fa_cli.models makes the network; ``name`` is what results
# and tables call it (for torchvision: the torchvision model's name).


@dataclass
class ModelConfig:
    name: str = MISSING
    # default: PyTorch's initialisation of each layer; xavier: Glorot-uniform weights and zero biases
    # for every Linear and Conv layer (BioTorch's default)
    init: str = "default"


@dataclass
class MLPConfig(ModelConfig):
    widths: list[int] = MISSING  # hidden layer widths, input to output
    activation: str = "relu"


@dataclass
class CNNConfig(ModelConfig):
    channels: list[int] = MISSING  # one 3x3 conv (+ activation + 2x2 max-pool) per entry
    hidden: int = MISSING  # width of the linear layer between the convs and the output
    kernel_size: int = 3
    activation: str = "relu"


@dataclass
class LeNetConfig(ModelConfig):
    pass


@dataclass
class TorchvisionConfig(ModelConfig):
    pass


# --- method/ --------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    name: str = MISSING  # the learning rule, one of fa_cli.alignment.METHODS
    scale: float = MISSING  # multiplies the feedback matrices' initial bound
    init: str = "default"  # default | xavier: the law feedback is drawn from (fa_cli.alignment.feedback)


@dataclass
class DFAConfig(MethodConfig):
    projection: str = MISSING  # full | channel: how the output error reaches a conv layer


# --- optim/ ---------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    lr: float = MISSING
    weight_decay: float = 0.0
    schedule: str = "none"  # none | step | multistep | cosine; stepped once per epoch
    step_size: int = 30  # step: multiply the lr by gamma every step_size epochs
    milestones: list[int] = field(default_factory=list)  # multistep: ... at these epochs
    gamma: float = 0.1


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = MISSING
    nesterov: bool = False


@dataclass
class AdamConfig(OptimConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class AdamWConfig(AdamConfig):
    """Adam with decoupled weight decay (Loshchilov & Hutter): the decay shrinks the weights directly
    instead of joining the gradient that Adam normalises."""


# --- trainer/ -------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = 1000
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    patience: int | None = None  # stop once validation accuracy has not improved for this many epochs
    deterministic: bool = True  # deterministic kernels on CUDA (same seed, same results)
    threads: int | None = None  # torch.set_num_threads (null: torch's default)
    label_smoothing: float = 0.0  # training loss only; validation and test losses stay plain cross-entropy
    max_loss: float | None = None  # a batch's training loss above this is divergence (null: NaN/inf only)
    resume: str | None = None  # a run folder (or its checkpoint.pt) to continue from its last epoch
    skip_completed: bool = False  # keep a run folder's finished result of this config; resume interrupted


# --- diagnostics/ ---------------------------------------------------------------------------------


@dataclass
class DiagnosticsConfig:
    every: int = 0  # measure alignment angles every N training steps (0: off, costing nothing)
    plots: bool = True  # draw the run's curves.png (and alignment.png) when it ends


# --- eval/ ----------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    attack: str = "none"  # none | fgsm | pgd: test accuracy under an L-infinity attack, true input gradient
    eps: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])  # pixel units (0..1)
    steps: int = 10  # pgd: gradient steps per example
    step_size: float = 0.25  # pgd: each step's size as a fraction of eps
    random_start: bool = True  # pgd: start from a uniform random point of the eps-ball (seeded)


# --- logger/ --------------------------------------------------------------------------------------
# Trackers that show a run's records. They are not part of what a run computes, so they stay out of
# RunConfig (and out of results.json's config, checkpoints and resume checks): see logger_settings.


@dataclass
class CSVLoggerConfig:
    """The run's own files (metrics.csv, results.json), which every run writes: nothing to set."""


@dataclass
class TensorBoardLoggerConfig:
    """Event files in the run folder: nothing to set."""


@dataclass
class MLflowLoggerConfig:
    tracking_uri: str = MISSING  # sqlite:///path/mlflow.db (no server) or http(s)://host:port
    experiment: str | None = None  # null: the preset's name, else the sweep folder, else fa-train


@dataclass
class LoggerConfig:
    """The trackers that are on: ``logger=[csv,tensorboard,mlflow]`` merges one key per option."""

    csv: CSVLoggerConfig | None = None
    tensorboard: TensorBoardLoggerConfig | None = None
    mlflow: MLflowLoggerConfig | None = None


LOGGERS: dict[str, type] = {
    "csv": CSVLoggerConfig,
    "tensorboard": TensorBoardLoggerConfig,
    "mlflow": MLflowLoggerConfig,
}


@dataclass
class RunConfig:
    """A validated run: what :func:`validate` returns."""

    dataset: FilesDatasetConfig | SyntheticDatasetConfig
    model: MLPConfig | CNNConfig | LeNetConfig | TorchvisionConfig
    method: MethodConfig
    optim: SGDConfig | AdamConfig | AdamWConfig
    trainer: TrainerConfig
    diagnostics: DiagnosticsConfig
    eval: EvalConfig
    seed: int


SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"files": FilesDatasetConfig, "synthetic": SyntheticDatasetConfig},
    "model": {"mlp": MLPConfig, "cnn": CNNConfig, "lenet": LeNetConfig, "torchvision": TorchvisionConfig},
    "method": {"rule": MethodConfig, "dfa": DFAConfig},
    "optim": {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamWConfig},
    "trainer": {"trainer": TrainerConfig},
    "diagnostics": {"diagnostics": DiagnosticsConfig},
    "eval": {"eval": EvalConfig},
}

FILE_DATASETS = ("mnist", "fashion_mnist", "cifar10")
#: model.activation: the ``torch.nn`` module of each name (named here, without torch, for the checks).
ACTIVATIONS: dict[str, str] = {
    "relu": "ReLU",
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "gelu": "GELU",
    "elu": "ELU",
    "leaky_relu": "LeakyReLU",
}
#: model.init: PyTorch's default initialisation of each layer, or Glorot's (xavier_uniform_, zero bias).
MODEL_INITS = ("default", "xavier")
SCHEDULES = ("none", "step", "multistep", "cosine")
PROJECTIONS = ("full", "channel")
ATTACKS = ("none", "fgsm", "pgd")
# Keys that say how a run was started and where its data lives, not what it computes: summary tables
# keep runs that differ only in these in one row.
LAUNCH_ONLY = ("dataset.root", "trainer.threads", "trainer.resume", "trainer.skip_completed")
# Keys that may differ between a run and the one it resumes or skips: those, and the device it runs on.
SAME_RUN_ANYWAY = (*LAUNCH_ONLY, "trainer.device")


def register() -> None:
    """Store the schemas as ``schema/<group>/<kind>``. Importing ``fa_cli.conf`` calls this."""
    store = ConfigStore.instance()
    for group, kinds in SCHEMAS.items():
        for kind, schema in kinds.items():
            store.store(group=f"schema/{group}", name=kind, node=schema)
    for name, schema in LOGGERS.items():  # each logger option holds one key, so each has its schema
        store.store(group="schema/logger", name=name, node=schema)


# --- validation -----------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> RunConfig:
    """Typed objects for a composed config, or :class:`ConfigError` naming the first bad key.

    Checks only the config itself (and that torchvision knows a model's name): it loads no data and
    builds nothing, so it answers in milliseconds for every job of a sweep.
    """
    expected = {*SCHEMAS, "seed", "logger"}
    for key in cfg:
        if key not in expected:
            raise ConfigError(str(key), f"unknown key{_hint(str(key), sorted(expected))}")
    for group in SCHEMAS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or not is_dataclass(OmegaConf.get_type(node)):
            raise ConfigError(group, f"missing or not built from a schema/{group} option")
    try:
        resolved = {key: OmegaConf.to_object(cfg[key]) for key in SCHEMAS}
        seed = cfg.seed
    except OmegaConfBaseException as e:
        raise ConfigError(str(e.full_key), str(e).strip().splitlines()[0]) from e
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("seed", f"must be an integer, got {seed!r}")
    run = RunConfig(seed=seed, **resolved)
    _check_dataset(run.dataset)
    _check_model(run.model)
    _check_method(run.method)
    _check_optim(run.optim)
    _check_trainer(run.trainer)
    _check_diagnostics(run.diagnostics)
    _check_eval(run.eval)
    if run.trainer.patience is not None and run.dataset.val_fraction == 0:
        raise ConfigError(
            "trainer.patience",
            "stops on validation accuracy, and dataset.val_fraction=0 holds no validation split",
        )
    logger_settings(cfg)  # a tracker whose package is missing fails with the config, before any job
    return run


def _check_dataset(d: FilesDatasetConfig | SyntheticDatasetConfig) -> None:
    if isinstance(d, FilesDatasetConfig):
        _one_of("dataset.name", d.name, FILE_DATASETS)
    else:
        _one_of("dataset.name", d.name, ("synthetic",))
        for key in ("train_size", "test_size", "channels", "image_size", "num_classes"):
            _positive(f"dataset.{key}", getattr(d, key))
        if d.num_classes < 2:
            raise ConfigError("dataset.num_classes", f"needs at least 2 classes, got {d.num_classes}")
        if d.noise < 0:
            raise ConfigError("dataset.noise", f"must be >= 0, got {d.noise}")
    if d.subset is not None:
        _positive("dataset.subset", d.subset)
    if not 0 <= d.val_fraction < 1:
        raise ConfigError("dataset.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if d.random_shift < 0:
        raise ConfigError("dataset.random_shift", f"must be >= 0 pixels, got {d.random_shift}")


def _check_model(m: ModelConfig) -> None:
    _one_of("model.init", m.init, MODEL_INITS)
    if isinstance(m, MLPConfig | CNNConfig):
        _one_of("model.activation", m.activation, list(ACTIVATIONS))
    if isinstance(m, MLPConfig):
        for i, width in enumerate(m.widths):
            _positive(f"model.widths[{i}]", width)
    if isinstance(m, CNNConfig):
        if not m.channels:
            raise ConfigError("model.channels", "needs at least one conv layer")
        for i, width in enumerate(m.channels):
            _positive(f"model.channels[{i}]", width)
        _positive("model.hidden", m.hidden)
        if m.kernel_size < 1 or m.kernel_size % 2 == 0:
            raise ConfigError("model.kernel_size", f"must be odd and positive, got {m.kernel_size}")
    if isinstance(m, TorchvisionConfig):
        names = _torchvision_classifiers()
        if m.name not in names:
            raise ConfigError(
                "model.name",
                f"unknown torchvision classifier {m.name!r}{_hint(m.name, names)}; list them with "
                "python -c 'import torchvision; print(torchvision.models.list_models(torchvision.models))'",
            )


@functools.cache
def _torchvision_classifiers() -> list[str]:
    from torchvision import models  # here, not at the top: importing torchvision takes a second

    return models.list_models(module=models)


def _check_method(m: MethodConfig) -> None:
    _one_of("method.name", m.name, METHODS)
    _positive("method.scale", m.scale)
    _one_of("method.init", m.init, INITS)
    if isinstance(m, DFAConfig):
        _one_of("method.projection", m.projection, PROJECTIONS)


def _check_optim(o: OptimConfig) -> None:
    _positive("optim.lr", o.lr)
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _positive("optim.step_size", o.step_size)
    _positive("optim.gamma", o.gamma)
    if o.schedule == "multistep":
        if not o.milestones:
            raise ConfigError("optim.milestones", "multistep needs milestones, e.g. optim.milestones=[50,75]")
        if any(m < 1 for m in o.milestones) or sorted(set(o.milestones)) != o.milestones:
            raise ConfigError("optim.milestones", f"must be increasing epochs >= 1, got {o.milestones}")
    if isinstance(o, SGDConfig) and not 0 <= o.momentum < 1:
        raise ConfigError("optim.momentum", f"must be in [0, 1), got {o.momentum}")
    if isinstance(o, SGDConfig) and o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov", "needs optim.momentum > 0")
    if isinstance(o, AdamConfig):
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
        _positive("optim.eps", o.eps)


def _check_trainer(t: TrainerConfig) -> None:
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.patience is not None:
        _positive("trainer.patience", t.patience)
    if t.threads is not None:
        _positive("trainer.threads", t.threads)
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError("trainer.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    if t.max_loss is not None:
        _positive("trainer.max_loss", t.max_loss)
    device = t.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError("trainer.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")
    check_cuda(device)


def check_cuda(device: str) -> None:
    """A CUDA device that this machine has: checked with the config, so that a grid fails before its
    first job rather than in each."""
    if not device.startswith("cuda"):
        return
    import torch  # here, not at the top: only a CUDA device needs torch to check it

    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
        raise ConfigError(
            "trainer.device", f"{device} but CUDA is not available ({built}); use trainer.device=cpu or auto"
        )
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise ConfigError("trainer.device", f"{device} but there are {torch.cuda.device_count()} GPUs")


def _check_diagnostics(d: DiagnosticsConfig) -> None:
    if d.every < 0:
        raise ConfigError("diagnostics.every", f"must be >= 0 steps (0: off), got {d.every}")


def _check_eval(e: EvalConfig) -> None:
    _one_of("eval.attack", e.attack, ATTACKS)
    if e.attack != "none" and not e.eps:
        raise ConfigError("eval.eps", f"{e.attack} needs at least one epsilon, e.g. eval.eps=[0,0.1,0.2]")
    for i, eps in enumerate(e.eps):
        if not 0 <= eps <= 1:  # also rejects NaN
            raise ConfigError(f"eval.eps[{i}]", f"must be in [0, 1] (pixel units), got {eps}")
        if eps in e.eps[:i]:  # tables would average the repeats as if they were other seeds
            raise ConfigError(f"eval.eps[{i}]", f"{eps} is listed twice")
    _positive("eval.steps", e.steps)
    _positive("eval.step_size", e.step_size)


def logger_settings(cfg: DictConfig) -> LoggerConfig:
    """The trackers a composed config turns on, checked: a tracker whose package is not installed is a
    :class:`ConfigError` that names the extra to install. No ``logger`` (``logger=[]``): the files only."""
    from fa_cli.logger import missing_package  # here, not at the top: the schema needs no trackers

    node = cfg.get("logger")
    if node is None:
        return LoggerConfig(csv=CSVLoggerConfig())
    if not isinstance(node, DictConfig):
        raise ConfigError("logger", f"must be conf/logger/ options, e.g. logger=[csv,mlflow], not {node!r}")
    trackers = {}
    for name, tracker in node.items():
        schema = LOGGERS.get(str(name))
        if schema is None or OmegaConf.get_type(tracker) is not schema:
            raise ConfigError(f"logger.{name}", f"not a logger; choose from: {', '.join(LOGGERS)}")
        try:
            trackers[str(name)] = OmegaConf.to_object(tracker)
        except OmegaConfBaseException as e:
            raise ConfigError(str(e.full_key), str(e).strip().splitlines()[0]) from e
    settings = LoggerConfig(**trackers)
    if settings.mlflow is not None:
        if not settings.mlflow.tracking_uri.strip():
            raise ConfigError("logger.mlflow.tracking_uri", "is empty; e.g. sqlite:///outputs/mlflow.db")
        if settings.mlflow.experiment is not None and not settings.mlflow.experiment.strip():
            raise ConfigError("logger.mlflow.experiment", "is empty; null names it from the preset or sweep")
    for name in ("tensorboard", "mlflow"):
        tracker = getattr(settings, name)
        package = tracker is not None and missing_package(name, tracker)
        if package:
            raise ConfigError(
                "logger",
                f"{name} needs the {package} package, which is not installed: pip install 'fa-cli[{name}]' "
                f"(in a checkout: pip install -e '.[{name}]')",
            )
    return settings


def _positive(key: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ConfigError(key, f"must be > 0, got {value}")


def _one_of(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        choices = ", ".join(allowed)
        raise ConfigError(key, f"unknown value {value!r}{_hint(value, allowed)}; choose one of: {choices}")


# --- one-line messages for Hydra's and OmegaConf's errors -----------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``: a config tree's leaves by dotted key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe(error: BaseException) -> str:
    """One line for a config error raised by fa-cli, Hydra or OmegaConf, naming the key."""
    if isinstance(error, Abort) or type(error).__module__.startswith("fa_cli."):
        return str(error)  # fa-cli's own errors are written as one line for users
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")  # an unknown option of a config group
        options = error.options or _options(group)  # Hydra lists none for an option in a list (logger)
        if options:
            choices = ", ".join(options)
            return f"{group}={option}: no such option{_hint(option, options)}; choose one of: {choices}"
    omega = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(omega, OmegaConfBaseException) and omega.full_key:
        key = str(omega.full_key)
        parent, _, leaf = key.rpartition(".")
        valid = [f.name for f in fields(omega.object_type)] if is_dataclass(omega.object_type) else None
        if valid is not None and leaf not in valid:
            if not valid:
                return f"{key}: unknown key; {parent} has no settings"
            hint = _hint(leaf, valid, prefix=f"{parent}." if parent else "")  # a misspelt or extra key
            return f"{key}: unknown key{hint}; valid keys: {', '.join(valid)}"
        if parent == "logger" and leaf in _options("logger"):  # a tracker's setting, tracker not chosen
            return f"{key}: {leaf} is not among this run's trackers; choose it too, e.g. logger=[csv,{leaf}]"
        return f"{key}: {str(omega).strip().splitlines()[0]}"
    # Hydra's override-syntax errors and the like: keep the words, drop the layout.
    return " ".join(f"{type(error).__name__}: {error}".split())


def _options(group: str) -> list[str]:
    """The options of a config group of ``conf/``, by its yaml files."""
    try:
        folder = resources.files("fa_cli.conf").joinpath(group)
        return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))
    except (OSError, ModuleNotFoundError):
        return []


def _hint(word: str, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# --- sweeps ---------------------------------------------------------------------------------------


class ValidateSweep(Callback):
    """Validates every job of a multirun before the first one trains, so a bad value in the last
    job fails in seconds instead of after hours of the others."""

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        from fa_cli.launcher import threads_per_job  # here, not at the top: fa_cli.launcher imports this

        try:  # the launcher's settings, which it would otherwise meet with a traceback (n_jobs=0)
            threads_per_job(config.hydra.launcher)
        except ConfigError as e:
            raise Abort(e) from e
        for job in sweep_jobs(config) or []:
            try:
                check_sweep_job(validate(compose(config_name=config_name, overrides=list(job))))
            except (ConfigError, HydraException, OmegaConfBaseException) as e:
                raise Abort(e, context=f"job {' '.join(job)}") from e


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of each job of a multirun, in Hydra's job order (the number of its folder); None
    when they are not known before the jobs run."""
    if config.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None  # other sweepers choose their jobs as they go: each job checks itself
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
        return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except HydraException:
        return None  # e.g. glob() sweeps need Hydra's config loader to expand: each job checks itself


def check_sweep_job(run: RunConfig) -> None:
    """What a job of a grid cannot ask for: one run's checkpoint cannot continue every job."""
    if run.trainer.resume is not None:
        raise ConfigError(
            "trainer.resume",
            "continues one run, not a grid: relaunch the grid with hydra.sweep.dir=<its folder> "
            "trainer.skip_completed=true to keep its finished runs and resume its interrupted ones",
        )
