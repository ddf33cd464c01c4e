"""Run files written atomically: a temporary file in the same folder, flushed to disk, then renamed over
the target. A process killed at any moment leaves the old file or the new one, never half of one.
:class:`BackgroundWrites` does the same on a thread of its own, so that a run does not wait for the disk."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any


def _replace(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    _replace(path, lambda f: f.write(text.encode()))


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    _replace(path, lambda f: f.write(data))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Standard JSON, which has no NaN or infinity: such a number (an angle of a zero gradient, an
    attack's loss) is written as a word, ``"nan"``, ``"inf"`` or ``"-inf"``."""
    write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def csv_text(rows: Iterable[Mapping[str, Any]], fieldnames: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], fieldnames: list[str]) -> None:
    write_text(path, csv_text(rows, fieldnames))


def checkpoint_bytes(state: Mapping[str, Any]) -> memoryview:
    """``torch.save`` of tensors, numbers, strings and containers only, so that the file loads with
    ``torch.load(path, weights_only=True)``; in memory, copied off the device as it is now."""
    import torch  # here, not at the top: fa-report writes files without torch, seconds sooner

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getbuffer()  # the buffer itself, not a copy of it: a large model's state is 100s of MB


class BackgroundWrites:
    """Files written atomically by a thread while the caller goes on, one batch of files at a time, in
    the order given, so that a run's next epoch does not wait for the disk (``fsync``). The caller
    hands over finished bytes: what is written is the state when it was handed over, whatever training
    does to the tensors after."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, files: Mapping[Path, bytes | memoryview]) -> None:
        """Write ``files`` in their order once the batch before is written; raises what stopped that
        one (see :meth:`wait`) instead."""
        self.wait()
        batch = dict(files)
        self._thread = threading.Thread(target=self._write, args=(batch,), name="fa-cli-files")
        self._thread.start()

    def _write(self, files: dict[Path, bytes | memoryview]) -> None:
        try:
            for path, data in files.items():
                write_bytes(path, data)
        except BaseException as error:  # raised in the caller's thread by wait()
            self._error = error

    def wait(self) -> None:
        """Until every file handed over is on disk; raises the error that stopped a write, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


#: The first bytes of every file torch.save writes (a zip archive's local file header).
_ZIP = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: unreadable, not a checkpoint, or carrying pickled
    Python objects. One line that names the file."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written from :func:`checkpoint_bytes`, on the CPU. Loaded with ``weights_only=True``:
    a file that carries other pickled objects (which a plain ``torch.load`` would construct, running
    whatever code they name) is refused, never executed."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(_ZIP))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from e
    if head != _ZIP:  # a log, a CSV, an image, a plain pickle: not torch.save's archive at all
        why = "torch.save writes a zip archive; this file is not one"
        raise CheckpointError(f"{path} is not a checkpoint ({why})")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({named.group(1)})" if named else ""
        raise CheckpointError(
            f"{path} carries pickled Python objects{what}, not only tensors and plain values: refused "
            "(checkpoints load with weights_only=True, so that a file cannot run code)"
        ) from e
    except Exception as e:  # whatever a damaged archive makes the reader raise (EOFError, IndexError...)
        why = _first_sentence(e)
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {why}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's dict")
    return state


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split()).split(". ")[0]  # torch's messages run on for paragraphs
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
