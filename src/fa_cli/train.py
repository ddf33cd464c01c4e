"""``fa-train``: compose a run from ``conf/``, check it, and hand it to :func:`fa_cli.run.train`.

    fa-train method=dfa model=cnn                          # one run, under outputs/
    fa-train -m method=bp,fa,dfa model=ann,cnn seed=0,1,2  # a grid; summary.md in the sweep folder

A run directory holds Hydra's config (``.hydra/``), ``train.log``, ``metrics.csv`` (a row per epoch),
``checkpoint.pt`` and ``results.json``. Exit codes: 0 completed, 1 crashed, 2 bad config or data,
3 diverged, 130 interrupted.

This module imports no torch, and :mod:`fa_cli.run` (which does) is imported only once the config
and the run folder have passed their checks: a config or folder that cannot run is refused in under
a second, not after the seconds torch takes to load. The checks that need torch itself load it: a
CUDA device, a torchvision model's name, a checkpoint to read, and torchrun's process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from fa_cli import launcher
from fa_cli.config import (
    Abort,
    ConfigError,
    DataError,
    check_sweep_job,
    describe,
    sweep_jobs,
    validate,
)
from fa_cli.folders import FolderTaken, checkpoint_file, previous_run, record_failure
from fa_cli.logger import Tracking

if TYPE_CHECKING:
    from fa_cli.distributed import World

log = logging.getLogger(__name__)

EXIT_CODES = {"completed": 0, "failed": 1, "diverged": 3, "interrupted": 130}


def main() -> None:
    """Console entry point: Hydra's command line, with config and data errors reported as one line
    (exit code 2) unless ``HYDRA_FULL_ERROR=1`` asks for the traceback."""
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # With this set, Hydra re-raises errors instead of printing its multi-line report; we report below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM stops a run as Ctrl-C does
    if not launcher.launched_by_torchrun():
        _command(full_error)
        return
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        print(
            "fa-train: error: torchrun trains one run on several processes: drop -m (for a grid, use "
            "hydra/launcher=joblib or slurm, or one torchrun per run)",
            file=sys.stderr,
        )
        sys.exit(2)
    from fa_cli import distributed  # here, not at the top: it imports torch (see _process_group)

    try:
        _command(full_error)
    except SystemExit as done:  # fa-train's own exit, without the interpreter's shutdown (leave says why)
        distributed.leave(done.code)
        raise
    except Exception:  # a traceback, printed as Python prints it, and Python's status 1; then the same exit
        sys.excepthook(*sys.exc_info())
        distributed.leave(1)
        raise
    distributed.leave(0)


def _command(full_error: bool) -> None:
    with _process_group():
        try:
            hydra_main()
        except (Abort, HydraException, OmegaConfBaseException) as error:
            if full_error:
                raise
            print(f"fa-train: error: {describe(error)}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("fa-train: interrupted", file=sys.stderr)
            sys.exit(EXIT_CODES["interrupted"])
        except ValueError as error:  # Hydra's own check of an override (dataset=null), not a run's crash
            if full_error or not _raised_in_hydra(error):
                raise
            print(f"fa-train: error: {describe(error)}", file=sys.stderr)
            sys.exit(2)


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Under torchrun, the command's process group, joined for the block, and this rank's files;
    a single process needs neither (nor torch, before its config is checked). Run by a caller that
    set up a process group itself, without torchrun's variables, every rank writes Hydra's files
    into the run folder; the run itself uses the group (:class:`fa_cli.distributed.World`)."""
    if not launcher.launched_by_torchrun():
        yield
        return
    from fa_cli import distributed

    with distributed.process_group() as world, _files_of_rank(world):
        yield


def _raised_in_hydra(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and f"{os.sep}hydra{os.sep}" in frame.tb_frame.f_code.co_filename


@contextlib.contextmanager
def _files_of_rank(world: World) -> Iterator[None]:
    """Under torchrun only rank 0 writes the run's folder. The other ranks, which compose the same
    config, have Hydra put its files (config, log) in a temporary folder deleted at exit, and print
    only warnings."""
    if world.main:
        yield
        return
    folder = tempfile.mkdtemp(prefix=f"fa-train-rank{world.rank}-")
    sys.argv += [f"hydra.run.dir={folder}", "hydra.output_subdir=null"]
    sys.argv += ["hydra.job_logging.root.level=WARNING"]
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@hydra.main(version_base=None, config_path="pkg://fa_cli.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> str:
    """One run; returns its status (in a grid, Hydra hands it to the end-of-grid summary)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        run_cfg = validate(cfg)
        # Unless set, as many threads as the cores leave for each of the jobs running at once.
        run_cfg.trainer.threads = launcher.job_threads(run_cfg.trainer.threads, hydra_cfg.launcher)
        if sweep:
            check_sweep_job(run_cfg)
        if run_cfg.trainer.resume is not None:  # a mistyped path is told before torch loads, too
            checkpoint_file(Path(run_cfg.trainer.resume))
        from fa_cli import run  # here, not at the top: torch loads only for a config that passed

        results = run.train(run_cfg, run_dir, overrides, tracking=Tracking.of(cfg, hydra_cfg))
    except Exception as error:
        record_failure(run_dir, cfg, overrides, error)
        if not sweep or isinstance(error, FolderTaken):
            if isinstance(error, ConfigError | DataError):
                raise Abort(error) from error
            raise
        # One failed job must not lose the others: it is recorded (in its folder, unless an earlier
        # run's results are there; the grid's summary counts the status returned), and the sweep goes on.
        log.error(f"run failed: {describe(error)}")
        return "failed"
    if not sweep and results["status"] != "completed":
        sys.exit(EXIT_CODES[results["status"]])
    return str(results["status"])


class RunFolders(Callback):
    """Checks the folders a run or a grid will write before Hydra writes there (the job's ``.hydra/``
    and log): each can be made, and none holds another config's run, which is left untouched.
    (:func:`fa_cli.run.train` checks the latter again, for callers without Hydra and for sweepers that choose
    their jobs as they go.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = _made("hydra.run.dir", config.hydra.run.dir)
        _keep_other_run(config, folder)

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        existed = Path(config.hydra.sweep.dir).is_dir()
        sweep_dir = _made("hydra.sweep.dir", config.hydra.sweep.dir)
        if not existed:
            return  # a new folder: no run to keep
        for num, job in enumerate(sweep_jobs(config) or []):
            # Each job's folder as Hydra's launcher names it: the job's config with its number, and
            # the sweep's ${now:} values (OmegaConf's resolver cache), as Hydra's load_sweep_config does.
            overrides = [*config.hydra.overrides.hydra, *job]
            job_config = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
            OmegaConf.copy_cache(from_config=config, to_config=job_config)
            with read_write(job_config.hydra), open_dict(job_config.hydra):
                job_config.hydra.job.num = job_config.hydra.job.id = num
            folder = sweep_dir / str(job_config.hydra.sweep.subdir)
            _keep_other_run(job_config, folder, context=f"job {' '.join(job)}")


def _made(key: str, folder: str) -> Path:
    """``folder``, made (with its parents) if it is not there, as Hydra would next; :class:`Abort` with
    one line naming ``key`` when it cannot be, instead of Hydra's traceback."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise Abort(ConfigError(key, f"{folder} is a file, not a folder")) from None
    except OSError as error:
        raise Abort(ConfigError(key, f"cannot make the folder {folder}: {error.strerror}")) from None
    return path


def _keep_other_run(config: DictConfig, folder: str | Path, context: str = "") -> None:
    """Raise :class:`Abort` (exit code 2) when ``folder`` holds a run of another config than ``config``
    (Hydra's, with its ``hydra`` node). A config that does not validate is left to its run to report."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("results.json", "checkpoint.pt")):
        return  # no run there (what previous_run reads to tell whose it is)
    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    try:
        run = validate(task)
    except (ConfigError, HydraException, OmegaConfBaseException):
        return
    try:
        previous_run(run, folder)
    except ConfigError as error:  # FolderTaken, or trainer.resume's own refusal
        raise Abort(error, context=context) from error


if __name__ == "__main__":
    # `python -m fa_cli.train` (as torchrun starts it): run the function of the module fa_cli.train, not
    # of this __main__ copy, so that launchers that pickle the task (joblib, submitit) find it by name.
    from fa_cli.train import main as _main

    _main()
