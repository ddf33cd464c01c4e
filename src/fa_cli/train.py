"""``fa-train``: compose a run from ``conf/``, train it, and write its files.

    fa-train method=dfa model=cnn                          # one run, under outputs/
    fa-train -m method=bp,fa,dfa model=ann,cnn seed=0,1,2  # a grid; summary.md in the sweep folder

A run directory holds Hydra's config (``.hydra/``), ``train.log``, ``metrics.csv`` (a row per epoch),
``checkpoint.pt`` and ``results.json``. Exit codes: 0 completed, 1 crashed, 2 bad config or data,
3 diverged, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fa_cli
from fa_cli import data, distributed, engine, launcher, models
from fa_cli.alignment import convert
from fa_cli.config import (
    SAME_RUN_ANYWAY,
    Abort,
    ConfigError,
    DFAConfig,
    RunConfig,
    check_cuda,
    check_sweep_job,
    describe,
    flatten,
    sweep_jobs,
    validate,
)
from fa_cli.diagnostics import FIELDS as ALIGNMENT_FIELDS
from fa_cli.diagnostics import Diagnostics
from fa_cli.eval import attack_accuracies
from fa_cli.files import (
    BackgroundWrites,
    CheckpointError,
    checkpoint_bytes,
    csv_text,
    load_checkpoint,
    write_csv,
    write_json,
)
from fa_cli.logger import Trackers, Tracking
from fa_cli.optim import build_optimizer, build_scheduler
from fa_cli.plots import plot_run

log = logging.getLogger(__name__)
console = Console()  # rich's progress bar and tables; log lines go through rich too (conf/hydra/job_logging)

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"completed": 0, "failed": 1, "diverged": 3, "interrupted": 130}
IDENTITY = ("method", "model", "dataset")  # with the seed, what names a run in results and tables
METRICS = [f.name for f in dataclasses.fields(engine.EpochRecord)]
FINISHED = ("completed", "diverged")  # outcomes that the same config on the same data would repeat


def main() -> None:
    """Console entry point: Hydra's command line, with config and data errors reported as one line
    (exit code 2) unless ``HYDRA_FULL_ERROR=1`` asks for the traceback."""
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # With this set, Hydra re-raises errors instead of printing its multi-line report; we report below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM stops a run as Ctrl-C does
    torchrun = distributed.launched_by_torchrun()
    if torchrun and {"-m", "--multirun"} & set(sys.argv[1:]):
        print(
            "fa-train: error: torchrun trains one run on several processes: drop -m (for a grid, use "
            "hydra/launcher=joblib or slurm, or one torchrun per run)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        _command(full_error)
    except SystemExit as done:
        if torchrun:  # fa-train's own exit, without the interpreter's shutdown (distributed.leave says why)
            distributed.leave(done.code)
        raise
    except Exception:
        if torchrun:  # a traceback, printed as Python prints it, and Python's status 1; then the same exit
            sys.excepthook(*sys.exc_info())
            distributed.leave(1)
        raise
    if torchrun:
        distributed.leave(0)


def _command(full_error: bool) -> None:
    with distributed.process_group() as world, _files_of_rank(world):
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


def _raised_in_hydra(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and f"{os.sep}hydra{os.sep}" in frame.tb_frame.f_code.co_filename


@contextlib.contextmanager
def _files_of_rank(world: distributed.World) -> Iterator[None]:
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


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then raise KeyboardInterrupt if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda n, _: received.append(n)) for signum in INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
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
        results = train(run_cfg, run_dir, overrides, tracking=Tracking.of(cfg, hydra_cfg))
    except Exception as error:
        _record_failure(run_dir, cfg, overrides, error)
        if not sweep or isinstance(error, FolderTaken):
            if isinstance(error, ConfigError | data.DataError):
                raise Abort(error) from error
            raise
        # One failed job must not lose the others: it is recorded (in its folder, unless an earlier
        # run's results are there; the grid's summary counts the status returned), and the sweep goes on.
        log.error(f"run failed: {describe(error)}")
        return "failed"
    if not sweep and results["status"] != "completed":
        sys.exit(EXIT_CODES[results["status"]])
    return str(results["status"])


def train(
    cfg: RunConfig, run_dir: Path, overrides: list[str] | None = None, tracking: Tracking | None = None
) -> dict[str, Any]:
    """Train one validated config, writing ``metrics.csv``, ``checkpoint.pt`` and ``results.json`` into
    ``run_dir``; returns the results. An interrupt or error at any point after the run starts is
    recorded. With ``trainer.resume`` the run continues from that checkpoint; with
    ``trainer.skip_completed`` a finished run already in ``run_dir`` is returned as it is, and an
    unfinished one continues from its checkpoint. ``tracking`` says which trackers (TensorBoard,
    MLflow) see the run besides its files."""
    world_active = distributed.World.current().active
    if world_active:
        # An earlier run in this process (train() called again under one process group) can be left in
        # a reference cycle: the first import of torch._inductor's config, which
        # torch.use_deterministic_algorithms makes inside Run.__init__, keeps the frames that called
        # it. The collector would free that run, model and all, at some allocation in the middle of
        # this run's collectives, which aborted a rank in about one test run in five; every rank
        # frees it here, before any collective, instead.
        gc.collect()
    resume = Path(cfg.trainer.resume) if cfg.trainer.resume is not None else None
    if cfg.trainer.skip_completed and world_active:
        # The other ranks cannot see rank 0's folder to skip with it; resuming works (all read it).
        raise ConfigError("trainer.skip_completed", "not under torchrun; use trainer.resume=RUN_DIR")
    previous = _previous_run(cfg, run_dir)  # FolderTaken when another config's run is there
    if cfg.trainer.skip_completed:
        if previous is not None and previous["status"] in FINISHED:
            log.info(f"skipped: {run_dir} already holds this run, {previous['status']}")
            return previous
        if previous is not None and resume is None and (run_dir / "checkpoint.pt").is_file():
            resume = run_dir
    try:
        run = Run(cfg, run_dir, overrides or [], resume=resume, tracking=tracking)
    except ConfigError as error:
        if cfg.trainer.resume is None and resume is not None and error.key == "trainer.resume":
            # The checkpoint skip_completed chose, not one the user named: say which setting it was.
            why = f"the unfinished run's checkpoint cannot be resumed: {error.message}"
            raise ConfigError("trainer.skip_completed", why) from error
        raise
    try:
        status = run.fit()
    except KeyboardInterrupt:
        run.finish("interrupted")
        log.warning(
            f"interrupted after {len(run.history)} epochs; files in {run_dir}. Continue with the same "
            f"command and trainer.resume={run_dir}"
        )
        raise
    except Exception as error:
        run.finish("failed", error=describe(error))
        raise
    results = run.finish(status)
    if run.world.main:
        console.print(_results_table(results, run_dir))
    return results


class Run:
    """One run and its files: builds the model (before any data loads, so that a model that cannot take
    the dataset's images fails in seconds), trains, tests, and keeps ``results`` up to date."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        overrides: list[str],
        resume: Path | None = None,
        tracking: Tracking | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.started = cfg, run_dir, time.time()
        self.world = distributed.World.current()  # one process, or the ranks of a torchrun
        self.device = self.world.device(pick_device(cfg.trainer.device))
        if self.world.active and cfg.trainer.batch_size < self.world.min_batch():
            raise ConfigError(
                "trainer.batch_size",
                f"{cfg.trainer.batch_size} is the global batch, split over {self.world.size} processes: "
                f"at least {self.world.min_batch()} gives each process two examples",
            )
        # Read and checked now, before any data loads: a wrong path or another config fails in seconds.
        self.checkpoint = read_checkpoint(resume, cfg) if resume is not None else None
        seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        engine.keep_freed_memory()
        shape = data.shape_of(cfg.dataset)
        if cfg.dataset.random_shift >= shape.size:
            why = f"{cfg.dataset.random_shift} pixels would move the {shape.size}-pixel images out of sight"
            raise ConfigError("dataset.random_shift", f"{why}: at most {shape.size - 1}")
        network = models.build(
            cfg.model, in_channels=shape.channels, image_size=shape.size, num_classes=shape.num_classes
        )
        self.model = convert(
            network,
            cfg.method.name,
            num_classes=shape.num_classes,
            seed=cfg.seed,
            scale=cfg.method.scale,
            dfa_projection=cfg.method.projection if isinstance(cfg.method, DFAConfig) else "full",
            init=cfg.method.init,
        )
        if cfg.trainer.batch_size < 2 and _has_batchnorm(self.model):
            raise ConfigError(
                "trainer.batch_size", f"1 cannot train {cfg.model.name}: BatchNorm needs 2 examples a batch"
            )
        self.history: list[engine.EpochRecord] = []
        self.selected = Selection()
        # None when off: the training loop then runs exactly as it would without diagnostics
        every = cfg.diagnostics.every
        self.diagnostics = Diagnostics(self.model, every) if every else None
        if self.checkpoint is not None:
            self.history = [engine.EpochRecord(**record) for record in self.checkpoint["history"]]
            score = self.checkpoint["best_score"]
            self.selected = Selection(
                self.checkpoint["best_epoch"], tuple(score) if score else None, self.checkpoint["best_model"]
            )
            self.started -= self.checkpoint["wall_seconds"]  # time spent training, not waiting to resume
        self.results: dict[str, Any] = {
            "method": cfg.method.name,
            "model": cfg.model.name,
            "dataset": cfg.dataset.name,
            "seed": cfg.seed,
            "status": "running",
            "test_accuracy": None,
            "test_loss": None,
            "best_val_accuracy": None,
            "best_epoch": None,
            "epochs_completed": 0,
            "epochs": cfg.trainer.epochs,
            "wall_seconds": None,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": _device_name(self.device),
            "threads": torch.get_num_threads(),
            "processes": self.world.size,  # torchrun's ranks, each on its share of every batch
            "torch": torch.__version__,
            "fa_cli": fa_cli.__version__,
            "host": platform.node(),
            "started_at": _now(),
            "overrides": overrides,
            "config": dataclasses.asdict(cfg),
            "alignment": None,  # with diagnostics: the last measured angles, per metric and layer
            "robustness": None,  # with eval.attack: test accuracy under attack at each epsilon
        }
        if self.checkpoint is not None:
            self.results["resumed_from"] = {"checkpoint": str(resume), "epoch": self.checkpoint["epoch"]}
            if self.diagnostics is not None:
                folder = resume if resume.is_dir() else resume.parent
                try:
                    self.diagnostics.resume(folder / "alignment.csv", self.checkpoint["epoch"])
                except ValueError as error:
                    raise ConfigError("trainer.resume", str(error)) from error
                self.results["alignment"] = self.diagnostics.final()  # if no epoch is left to train
        self.trackers = Trackers({})
        if tracking is not None and self.world.main:  # one tracker run per run, not one per rank
            tags = {"overrides": " ".join(overrides)}
            self.trackers = tracking.start(run_dir, self.results["config"], tags)
            self.results["trackers"] = self.trackers.info()
            self.trackers.replay(self.history, self.diagnostics.rows if self.diagnostics else [])
        # Files are written from the start of training (start_files), once the data has loaded: a run
        # that fails before, e.g. on a missing dataset, leaves a folder's earlier results as they were.
        self.files_started = False
        self.epoch_files = BackgroundWrites()  # each epoch's files, written while the next one trains

    def start_files(self) -> None:
        """results.json (running) and the CSVs with their headers, and a resumed run's earlier rows."""
        self.files_started = True
        if self.world.main:  # under torchrun, rank 0 alone writes the run's files
            self.run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it; a caller of train() may not
            write_json(self.run_dir / "results.json", self.results)
            write_csv(self.run_dir / "metrics.csv", map(dataclasses.asdict, self.history), METRICS)
            if self.diagnostics is not None:
                write_csv(self.run_dir / "alignment.csv", self.diagnostics.rows, ALIGNMENT_FIELDS)

    def fit(self) -> str:
        """Load the data, train, and test the selected epoch's model. Returns the status."""
        cfg, model, results = self.cfg, self.model, self.results
        with self.world.main_first():  # under torchrun, rank 0 alone downloads missing files
            splits = data.load(cfg.dataset, self.device, cfg.seed)
        results.update(
            train_examples=len(splits.train),
            val_examples=len(splits.val) if splits.val else 0,
            test_examples=len(splits.test),
        )
        if len(splits.train) < 2 and _has_batchnorm(model):
            raise ConfigError(
                "dataset", f"1 training example cannot train {cfg.model.name}: BatchNorm needs 2 a batch"
            )
        self.start_files()
        model.to(self.device)
        optimizer = build_optimizer(cfg.optim, model)
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.trainer.epochs)
        batch_order = torch.Generator().manual_seed(cfg.seed)
        first_epoch = 1
        if self.checkpoint is not None:
            self.restore(optimizer, scheduler, batch_order)
            first_epoch = self.checkpoint["epoch"] + 1
            if self.history and self.patience_ran_out(self.history[-1]):
                first_epoch = cfg.trainer.epochs + 1  # it had stopped early: nothing left to train
            log.info(f"resuming after epoch {self.checkpoint['epoch']} from {self.results['resumed_from']}")
        log.info(
            f"{cfg.method.name} on {cfg.model.name} ({results['parameters']:,} parameters), "
            f"{cfg.dataset.name}: {len(splits.train):,} train / {results['val_examples']:,} val / "
            f"{len(splits.test):,} test, {results['device']}, seed {cfg.seed} -> {self.run_dir}"
        )
        trained = distributed.wrap(model, self.world)  # model itself outside torchrun
        try:
            with ProgressBar(cfg.trainer.epochs) as on_step:
                for record in engine.fit(
                    trained,
                    optimizer,
                    scheduler,
                    splits,
                    epochs=cfg.trainer.epochs,
                    batch_size=cfg.trainer.batch_size,
                    eval_batch_size=cfg.trainer.eval_batch_size,
                    generator=batch_order,
                    first_epoch=first_epoch,
                    progress=on_step if self.world.main else None,
                    max_loss=cfg.trainer.max_loss,
                    label_smoothing=cfg.trainer.label_smoothing,
                    random_shift=cfg.dataset.random_shift,
                    on_batch=self.diagnostics,
                    world=self.world,
                ):
                    self.end_epoch(record, optimizer, scheduler, batch_order)
                    if self.patience_ran_out(record):
                        break
        except engine.Diverged as e:
            return self.diverged(e)
        model.load_state_dict(self.selected.state)
        batch_size = cfg.trainer.eval_batch_size
        test_loss, test_accuracy = engine.evaluate(model, splits.test, batch_size, self.world)
        if not math.isfinite(test_loss):  # no validation split stopped it: the tested model is broken
            return self.diverged(engine.Diverged(self.selected.epoch, None, test_loss, split="test"))
        results["test_loss"], results["test_accuracy"] = test_loss, test_accuracy
        if cfg.eval.attack != "none":
            self.attack(splits)
        return "completed"

    def diverged(self, e: engine.Diverged) -> str:
        """Record where the run diverged (NaN and inf are not JSON: those losses as words)."""
        loss = e.loss if math.isfinite(e.loss) else str(e.loss)
        self.results["diverged_at"] = {"epoch": e.epoch, "step": e.step, "loss": loss, "split": e.split}
        log.warning(f"diverged: {e}")
        return "diverged"

    def attack(self, splits: data.Data) -> None:
        """Test accuracy of the selected model under ``eval.attack`` at each ``eval.eps``."""
        cfg = self.cfg
        points = attack_accuracies(
            self.model, splits, cfg.eval, batch_size=cfg.trainer.eval_batch_size, seed=cfg.seed
        )
        self.results["robustness"] = {"attack": cfg.eval.attack, "results": points}
        accuracies = "  ".join(f"eps {p['eps']:g}: {p['accuracy']:.2f}%" for p in points)
        log.info(f"under {cfg.eval.attack} attack: {accuracies}")

    def end_epoch(
        self,
        record: engine.EpochRecord,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        batch_order: torch.Generator,
    ) -> None:
        """Append the epoch to metrics.csv, offer it for selection, and checkpoint everything a resumed
        run needs: all or nothing, so that the files always agree on how many epochs are done. The
        files are made here and written by a thread while the next epoch trains (finish waits for
        them)."""
        with interrupts_deferred():
            # The last epoch's files first: a write that failed stops the run before this epoch counts,
            # and one checkpoint at most is held in memory.
            self.epoch_files.wait()
            self.history.append(record)
            if self.diagnostics is not None:
                self.results["alignment"] = self.diagnostics.final()
            self.selected.offer(record, self.model)
            if self.world.main:  # under torchrun, rank 0 alone writes; the other ranks hold the same state
                metrics = csv_text(map(dataclasses.asdict, self.history), METRICS)
                files: dict[Path, bytes | memoryview] = {self.run_dir / "metrics.csv": metrics.encode()}
                if self.diagnostics is not None:
                    alignment = csv_text(self.diagnostics.rows, ALIGNMENT_FIELDS)
                    files[self.run_dir / "alignment.csv"] = alignment.encode()
                files[self.run_dir / "checkpoint.pt"] = checkpoint_bytes(
                    {
                        "epoch": record.epoch,
                        "model": self.model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "best_model": self.selected.state,
                        "best_epoch": self.selected.epoch,
                        "best_score": list(self.selected.score) if self.selected.score else None,
                        "history": [dataclasses.asdict(r) for r in self.history],
                        "wall_seconds": time.time() - self.started,
                        "rng": _rng_state(batch_order),
                        "config": dataclasses.asdict(self.cfg),
                    },
                )
                self.epoch_files.start(files)
        # Outside the deferred block: trackers are views of the same numbers, and a slow tracking
        # server must not hold up an interrupt.
        if self.diagnostics is not None:
            self.trackers.log_alignment(r for r in self.diagnostics.rows if r["epoch"] == record.epoch)
        self.trackers.log_epoch(record)
        line = _epoch_line(record, self.cfg.trainer.epochs)
        if self.diagnostics is not None:
            line = f"{line}  {self.diagnostics.epoch_summary(record.epoch)}"
        log.info(line)

    def restore(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        batch_order: torch.Generator,
    ) -> None:
        """Put the model (with its feedback), optimizer, schedule and every random stream back as the
        checkpoint's epoch left them, so the run goes on as if it had never stopped."""
        assert self.checkpoint is not None
        self.model.load_state_dict(self.checkpoint["model"])
        optimizer.load_state_dict(self.checkpoint["optimizer"])
        scheduler.load_state_dict(self.checkpoint["scheduler"])
        rng = self.checkpoint["rng"]
        batch_order.set_state(rng["batch_order"])
        torch.set_rng_state(rng["torch"])  # brsf's magnitudes and any dropout draw from it
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def patience_ran_out(self, record: engine.EpochRecord) -> bool:
        patience = self.cfg.trainer.patience
        if not patience or record.val_accuracy is None or record.epoch - self.selected.epoch < patience:
            return False
        log.info(f"early stop: validation accuracy has not improved for {patience} epochs")
        return True

    def finish(self, status: str, **details: Any) -> dict[str, Any]:
        """Record the final status and progress (and ``details``, e.g. the error) in results.json, once
        the last epoch's files are on disk. A run that completed but whose last files could not be
        written has failed; another status stays, with the error."""
        # Held until results.json is written: a second Ctrl-C while a large checkpoint is still being
        # written must not leave results.json saying "running". The figures and the trackers' end come
        # after it in any case (a third Ctrl-C stops them).
        written = False
        try:
            with interrupts_deferred():
                unwritten = self.wait_for_files()
                if unwritten is not None:
                    status = "failed" if status == "completed" else status
                    details = {**details, "error": "; ".join(filter(None, [details.get("error"), unwritten]))}
                self.results.update(
                    details,
                    status=status,
                    **self.selected.summary(),
                    epochs_completed=len(self.history),
                    wall_seconds=round(time.time() - self.started, 2),
                    finished_at=_now(),
                )
                # Before training started, only a folder without results gets them (a run that ended on
                # its data or an interrupt): an earlier run's results in the folder are kept.
                fresh = not (self.run_dir / "results.json").exists()
                written = self.world.main and (self.files_started or fresh)
                if written:
                    self.run_dir.mkdir(parents=True, exist_ok=True)  # made by Hydra, not by all callers
                    write_json(self.run_dir / "results.json", self.results)
        finally:
            if written and self.files_started:
                self.plot()
            self.trackers.finish(self.results)  # after the plots: they go to MLflow as artifacts
        return self.results

    def wait_for_files(self) -> str | None:
        """Until the last epoch's files are on disk; what stopped them, or None."""
        try:
            self.epoch_files.wait()
        except Exception as error:
            message = f"the last epoch's files were not written: {describe(error)}"
            log.error(message)
            return message
        return None

    def plot(self) -> None:
        """``curves.png`` and ``alignment.png`` in the run folder, from the files just written. A figure
        that cannot be drawn costs a warning, never the run's results."""
        if not self.cfg.diagnostics.plots:
            return
        try:
            plot_run(self.run_dir)
        except Exception as error:
            log.warning(f"plots not written: {describe(error)}")


@dataclasses.dataclass
class Selection:
    """The epoch whose model is tested: the best validation accuracy, lower validation loss breaking
    ties; the last epoch when there is no validation split. Never chosen by test metrics."""

    epoch: int = 0
    score: tuple[float, float] | None = None  # (validation accuracy, -validation loss)
    state: dict[str, torch.Tensor] | None = None

    def offer(self, record: engine.EpochRecord, model: torch.nn.Module) -> None:
        if record.val_accuracy is not None and record.val_loss is not None:
            score = (record.val_accuracy, -record.val_loss)
            if self.score is not None and score <= self.score:
                return
            self.score = score
        self.epoch = record.epoch
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def summary(self) -> dict[str, Any]:
        return {"best_val_accuracy": self.score[0] if self.score else None, "best_epoch": self.epoch or None}


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU. Asking for CUDA without it is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_cuda(name)
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Same seed, same run on the same machine: weights, feedback, split and batch order all follow it."""
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def _record_failure(run_dir: Path, cfg: DictConfig, overrides: list[str], error: BaseException) -> None:
    """A results.json that says the run failed (naming it from the raw config) for a run that failed
    before it started, e.g. on a config error. A results.json already there is left as it is: either
    the run itself recorded the failure, or it belongs to an earlier run in this folder."""
    path = run_dir / "results.json"
    if path.exists():
        return
    results = {key: OmegaConf.select(cfg, f"{key}.name", default=None) for key in IDENTITY}
    results.update(seed=OmegaConf.select(cfg, "seed", default=None), overrides=overrides)
    results.update(status="failed", error=describe(error), finished_at=_now())
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, results)


class FolderTaken(ConfigError):
    """The run folder holds another config's run: nothing is written into it."""


def read_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint that ``trainer.resume`` names (a run folder or its ``checkpoint.pt``), loaded with
    ``weights_only=True`` and checked to be of this run's config. Raises :class:`ConfigError`."""
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        why = "no checkpoint.pt in that folder (the run stopped before its first epoch ended?)"
        what = why if path.is_dir() else "not a file" if path.exists() else "no such file"
        raise ConfigError("trainer.resume", f"{path}: {what}")
    try:
        checkpoint = load_checkpoint(file)
    except CheckpointError as e:
        raise ConfigError("trainer.resume", str(e)) from e
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise ConfigError("trainer.resume", f"{file} lacks {', '.join(missing)}: not an fa-train checkpoint")
    differences = _differences(checkpoint["config"], dataclasses.asdict(cfg))
    if differences:
        hint = ""
        try:  # the run's own overrides, when its results.json is beside the checkpoint
            overrides = json.loads((file.parent / "results.json").read_text())["overrides"]
            command = [o for o in overrides if not o.startswith("trainer.resume=")]
            command.append(f"trainer.resume={path}")
            hint = f"; resume it with its own overrides: fa-train {' '.join(command)}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise ConfigError("trainer.resume", f"{file} was trained with another config: {differences}{hint}")
    return checkpoint


#: What :meth:`Run.restore` needs from a checkpoint.
RESUME_KEYS = (
    "epoch", "model", "optimizer", "scheduler", "best_model", "best_epoch", "best_score", "history",
    "wall_seconds", "rng", "config",
)  # fmt: skip


def _previous_run(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """The results.json of this config already in ``run_dir``, or None when the folder holds no run
    (none there, or one that failed before it started). A folder whose results.json is missing or
    damaged but holds a checkpoint counts as an interrupted run of the checkpoint's config. Raises
    :class:`FolderTaken` when the folder holds another config's run, which a run of this one would
    overwrite, or a checkpoint that cannot be read to tell."""
    try:
        previous = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or "config" not in previous:
        # No results of a run that started (it failed on its config, or the file is gone or damaged):
        # the checkpoint, when there is one, still tells whose run the folder holds.
        file = run_dir / "checkpoint.pt"
        if not file.is_file():
            return None
        try:
            config = load_checkpoint(file)["config"]
        except (CheckpointError, KeyError) as error:
            raise FolderTaken(
                str(run_dir),
                f"holds a checkpoint.pt that cannot be read ({error}) and no readable results.json; not "
                "writing into it: run in another folder (hydra.run.dir=, or hydra.sweep.dir= for a grid)",
            ) from error
        previous = {"status": "interrupted", "config": config}  # a run to resume, if it is this one
    differences = _differences(previous["config"], dataclasses.asdict(cfg))
    if differences:
        if cfg.trainer.resume is not None:  # its own refusal says more: the command that resumes it
            read_checkpoint(Path(cfg.trainer.resume), cfg)
        raise FolderTaken(
            str(run_dir),
            f"holds a run of another config ({differences}); not writing into it: run in another folder "
            "(hydra.run.dir=, or hydra.sweep.dir= for a grid)",
        )
    return previous


class RunFolders(Callback):
    """Checks the folders a run or a grid will write before Hydra writes there (the job's ``.hydra/``
    and log): each can be made, and none holds another config's run, which is left untouched.
    (:func:`train` checks the latter again, for callers without Hydra and for sweepers that choose
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
        return  # no run there (what _previous_run reads to tell whose it is)
    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    try:
        run = validate(task)
    except (ConfigError, HydraException, OmegaConfBaseException):
        return
    try:
        _previous_run(run, folder)
    except ConfigError as error:  # FolderTaken, or trainer.resume's own refusal
        raise Abort(error, context=context) from error


def _differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    """The keys whose values differ, as ``key: before -> now``, ignoring ``SAME_RUN_ANYWAY``; empty
    when the two configs describe the same run. JSON round trips make tuples and lists alike."""
    old, new = flatten(json.loads(json.dumps(before))), flatten(json.loads(json.dumps(now)))
    keys = sorted(k for k in old.keys() | new.keys() if k not in SAME_RUN_ANYWAY and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in keys)


def _rng_state(batch_order: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "batch_order": batch_order.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _epoch_line(r: engine.EpochRecord, epochs: int) -> str:
    val = f"val loss {r.val_loss:.4f} acc {r.val_accuracy:.2f}%  " if r.val_accuracy is not None else ""
    return (
        f"epoch {r.epoch}/{epochs}  train loss {r.train_loss:.4f} acc {r.train_accuracy:.2f}%  {val}"
        f"lr {r.lr:.3g}  {r.seconds:.1f}s"
    )


class ProgressBar:
    """A rich bar over the current epoch's steps with the running loss and accuracy. Used as a context
    manager that gives the ``progress`` callback for :func:`engine.fit`."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,  # the per-epoch log lines stay; the bar goes when the run ends
        )
        self.task = self.bar.add_task("", total=None, stats="")
        self.epoch = 0

    def __enter__(self) -> engine.Progress:
        self.bar.start()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, epoch: int, step: int, steps: int, loss: float, accuracy: float) -> None:
        if epoch != self.epoch:  # a new epoch: its own bar and clock
            self.epoch = epoch
            self.bar.reset(self.task)
        self.bar.update(
            self.task,
            description=f"epoch {epoch}/{self.epochs}",
            completed=step,
            total=steps,
            stats=f"loss {loss:.4f}  acc {accuracy:.2f}%",
        )


def _results_table(results: dict[str, Any], run_dir: Path) -> Table:
    def number(value: float | None, unit: str = "", digits: int = 4) -> str:
        return "—" if value is None else f"{value:.{digits}f}{unit}"

    title = " · ".join(str(results[key]) for key in IDENTITY)
    table = Table(title=f"{title} · seed {results['seed']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", results["status"])
    table.add_row("test accuracy", number(results["test_accuracy"], " %", 2))
    table.add_row("test loss", number(results["test_loss"]))
    table.add_row("best val accuracy", number(results["best_val_accuracy"], " %", 2))
    table.add_row("selected epoch", str(results["best_epoch"] or "—"))
    table.add_row("epochs", f"{results['epochs_completed']}/{results['epochs']}")
    table.add_row("wall time", f"{results['wall_seconds']:.1f} s")
    table.add_row("device", results["device"])
    table.add_row("files", str(run_dir))
    return table


if __name__ == "__main__":
    # `python -m fa_cli.train` (as torchrun starts it): run the function of the module fa_cli.train, not
    # of this __main__ copy, so that launchers that pickle the task (joblib, submitit) find it by name.
    from fa_cli.train import main as _main

    _main()
