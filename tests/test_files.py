"""Run files are replaced atomically: a writer that dies at any moment leaves the old file or the new
one, whole, never a mix or a truncated file."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fa_cli.files import write_json, write_text


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
