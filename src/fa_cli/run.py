"""One run: builds the network with its learning rule, loads the data, trains, tests the selected
epoch's model, and writes the run's files: ``metrics.csv`` (a row per epoch), ``alignment.csv``,
``checkpoint.pt``, ``results.json`` and the figures. Knows nothing of Hydra: :func:`train` takes a
validated :class:`~fa_cli.config.RunConfig`; ``fa_cli.train`` is the command that composes one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import platform
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fa_cli
from fa_cli import data, distributed, engine, models
from fa_cli.alignment import convert
from fa_cli.config import ConfigError, DFAConfig, RunConfig, check_cuda, describe
from fa_cli.diagnostics import FIELDS as ALIGNMENT_FIELDS
from fa_cli.diagnostics import Diagnostics
from fa_cli.eval import attack_accuracies
from fa_cli.files import BackgroundWrites, checkpoint_bytes, csv_text, write_csv, write_json
from fa_cli.folders import now, previous_run, read_checkpoint
from fa_cli.logger import Trackers, Tracking
from fa_cli.optim import build_optimizer, build_scheduler
from fa_cli.plots import plot_run

log = logging.getLogger(__name__)
console = Console()  # rich's progress bar and tables; log lines go through rich too (conf/hydra/job_logging)

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
METRICS = [f.name for f in dataclasses.fields(engine.EpochRecord)]
FINISHED = ("completed", "diverged")  # outcomes that the same config on the same data would repeat


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
    previous = previous_run(cfg, run_dir)  # FolderTaken when another config's run is there
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
            "started_at": now(),
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
                    finished_at=now(),
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
    return f"cpu ({cpu_model()})"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, as Linux gives it (``AMD EPYC 7B13``), for results.json and benchmarks: what
    a run's wall time was measured on. Elsewhere, what Python knows (often only ``x86_64``)."""
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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

    title = f"{results['method']} · {results['model']} · {results['dataset']} · seed {results['seed']}"
    table = Table(title=title, show_header=False)
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
