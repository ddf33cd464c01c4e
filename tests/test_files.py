"""Run files are replaced atomically: a writer that dies at any moment leaves the old file or the new
one, whole, never a mix or a truncated file."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from fa_cli.files import BackgroundWrites, checkpoint_bytes, write_json, write_text


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"status": "completed"})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"status": "running", "oops": Unserialisable()})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file left"


# Rewrites one file as fast as it can, alternating two contents of a megabyte each, so that a kill
# lands mid-write almost every time.
WRITER = """
import sys
from fa_cli.files import write_text
path = sys.argv[1]
contents = ["a" * 2**20, "b" * 2**20]
print("writing", flush=True)
i = 0
while True:
    write_text(path, contents[i % 2])
    i += 1
"""


def test_a_writer_killed_at_any_moment_leaves_a_whole_file(tmp_path):
    path = tmp_path / "summary.md"
    write_text(path, "a" * 2**20)
    command = [sys.executable, "-c", WRITER, str(path)]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        time.sleep(0.2)
    finally:
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait()
    assert path.read_text() in ("a" * 2**20, "b" * 2**20)


def test_background_writes_land_in_order_and_raise_their_error_once(tmp_path):
    writes = BackgroundWrites()
    writes.start({tmp_path / "a": b"1", tmp_path / "b": b"1"})
    writes.start({tmp_path / "a": b"2"})  # after the first batch, never interleaved with it
    writes.wait()
    assert (tmp_path / "a").read_bytes() == b"2" and (tmp_path / "b").read_bytes() == b"1"

    writes.start({tmp_path / "c": b"3", tmp_path / "missing" / "d": b"3", tmp_path / "e": b"3"})
    with pytest.raises(FileNotFoundError):  # the next batch is not written after a failed one
        writes.start({tmp_path / "a": b"4"})
    assert (tmp_path / "c").read_bytes() == b"3" and not (tmp_path / "e").exists()
    assert (tmp_path / "a").read_bytes() == b"2"
    writes.wait()  # raised once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no temporary file left"


def test_a_checkpoints_bytes_hold_the_state_as_it_was_handed_over(tmp_path):
    weight = torch.zeros(3)
    state = checkpoint_bytes({"epoch": 1, "model": {"weight": weight}})
    weight.add_(1)  # training goes on while the thread writes
    writes = BackgroundWrites()
    writes.start({tmp_path / "checkpoint.pt": state})
    writes.wait()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["model"]["weight"], torch.zeros(3))
