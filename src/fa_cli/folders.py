"""Run folders: which config's run a folder holds, from its ``results.json`` or ``checkpoint.pt``, so
that no run writes into another's; and the checkpoint that ``trainer.resume`` names, checked to be of
the same config; and the ``results.json`` of a run that failed before it started. Imports no torch
until a checkpoint is read."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fa_cli.config import SAME_RUN_ANYWAY, ConfigError, RunConfig, describe, flatten
from fa_cli.files import CheckpointError, load_checkpoint, write_json

NAME_KEYS = ("method", "model", "dataset")  # with the seed, what names a run in results and tables


class FolderTaken(ConfigError):
    """The run folder holds another config's run: nothing is written into it."""


def checkpoint_file(path: Path) -> Path:
    """The file that ``trainer.resume`` names: ``path`` itself, or the ``checkpoint.pt`` in the run
    folder ``path``. Raises :class:`ConfigError` when there is none; reads nothing (no torch)."""
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        why = "no checkpoint.pt in that folder (the run stopped before its first epoch ended?)"
        what = why if path.is_dir() else "not a file" if path.exists() else "no such file"
        raise ConfigError("trainer.resume", f"{path}: {what}")
    return file


def read_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint that ``trainer.resume`` names (a run folder or its ``checkpoint.pt``), loaded with
    ``weights_only=True`` and checked to be of this run's config. Raises :class:`ConfigError`."""
    file = checkpoint_file(path)
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


#: What :meth:`fa_cli.run.Run.restore` needs from a checkpoint.
RESUME_KEYS = (
    "epoch", "model", "optimizer", "scheduler", "best_model", "best_epoch", "best_score", "history",
    "wall_seconds", "rng", "config",
)  # fmt: skip


def previous_run(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
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


def record_failure(run_dir: Path, cfg: DictConfig, overrides: list[str], error: BaseException) -> None:
    """A results.json that says the run failed (naming it from the raw config) for a run that failed
    before it started, e.g. on a config error. A results.json already there is left as it is: either
    the run itself recorded the failure, or it belongs to an earlier run in this folder."""
    path = run_dir / "results.json"
    if path.exists():
        return
    results = {key: OmegaConf.select(cfg, f"{key}.name", default=None) for key in NAME_KEYS}
    results.update(seed=OmegaConf.select(cfg, "seed", default=None), overrides=overrides)
    results.update(status="failed", error=describe(error), finished_at=now())
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, results)


def _differences(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The keys whose values differ, as ``key: before -> after``, ignoring ``SAME_RUN_ANYWAY``; empty
    when the two configs describe the same run. JSON round trips make tuples and lists alike."""
    old, new = flatten(json.loads(json.dumps(before))), flatten(json.loads(json.dumps(after)))
    keys = sorted(k for k in old.keys() | new.keys() if k not in SAME_RUN_ANYWAY and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in keys)


def now() -> str:
    """results.json's time stamps: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
