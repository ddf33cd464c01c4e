"""``fa_cli.alignment`` gives its torch-backed names at their first use: whatever is imported first,
each name is what it says, and the rules' names come without torch."""

from __future__ import annotations

import pytest

from runs import run_code

# Every submodule imported first, as a program may (``import fa_cli.optim`` imports one): importing a
# submodule binds the package's attribute of its name, which must never hide a name the package gives.
EVERY_SUBMODULE_FIRST = """
import importlib, pkgutil, types
import fa_cli.alignment as alignment
for info in pkgutil.iter_modules(alignment.__path__):
    importlib.import_module(f"fa_cli.alignment.{info.name}")
for name in alignment.__all__:
    value = getattr(alignment, name)
    assert isinstance(value, types.ModuleType) == (name == "metrics"), (name, value)
from fa_cli.alignment import convert, train_feedback
assert callable(convert) and callable(train_feedback)
print("ok")
"""

NAMES_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from fa_cli.alignment import INITS, METHODS
assert "kp" in METHODS and "xavier" in INITS
print("ok")
"""


def test_every_name_is_what_it_says_whatever_was_imported_first():
    proc = run_code(EVERY_SUBMODULE_FIRST)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_the_rules_names_come_without_torch():
    proc = run_code(NAMES_WITHOUT_TORCH)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_an_unknown_name_is_an_attribute_error():
    import fa_cli.alignment as alignment

    with pytest.raises(AttributeError, match="Linaer"):
        alignment.Linaer  # noqa: B018
