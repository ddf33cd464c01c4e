"""Compiled loops on the CPU threads PyTorch itself computes with: its own OpenMP team.

Why not threads of our own: PyTorch's CPU ops run on an OpenMP team whose workers, after each op, spin
a while waiting for the next one. A thread started beside them finds a core held by a spinning worker:
two Python threads drawing brsf's magnitudes took 0.62 of one thread's time alone, but 1.05 of it right
after a matmul (docs/PERFORMANCE.md, fourth round). A parallel region opened on that same team is taken
up at once by the spinning workers instead.

How: where PyTorch's parallel backend is OpenMP (Linux), ``GOMP_parallel`` (libgomp's entry point for
``#pragma omp parallel``) runs a numba ``cfunc`` on every thread of the calling thread's team, and the
cfunc asks ``omp_get_thread_num`` and ``omp_get_num_threads`` which share of the work is its own. Their
addresses are given to LLVM under their names (:func:`available` does that first), so a cfunc declares
them as external functions. The runtime is the one ``libtorch_cpu``'s own dependencies give those
names (GNU libgomp in the Linux wheels; LLVM's and Intel's runtimes export the same entry points); one
put ahead of them with ``LD_PRELOAD`` would be torch's but not this module's. Elsewhere
(macOS, Windows, one thread) :func:`available` is False and callers run their loop on the calling
thread. As for torch's own ops, a process forked after the team has run should not use it (libgomp's
threads do not survive a fork).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
from numba import types
from numba.extending import intrinsic


@intrinsic
def pointer(typingctx: Any, address: Any) -> Any:
    """In a cfunc: an address (int64, as :func:`run`'s data passes them) as a void pointer, for
    ``numba.carray``."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    if not isinstance(address, types.Integer):
        return None
    return types.voidptr(types.int64), codegen


#: The calling thread's number in its team, and the team's size: for cfuncs, once :func:`available`.
thread_number = types.ExternalFunction("omp_get_thread_num", types.intc())
team_size = types.ExternalFunction("omp_get_num_threads", types.intc())


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    if sys.platform != "linux" or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        # Looked up from libtorch_cpu, already loaded (RTLD_NOLOAD): its symbols and then those of the
        # libraries it depends on, so the OpenMP functions are those of the runtime torch uses, whatever
        # the file is named, and no second runtime is ever loaded.
        library = ctypes.CDLL(str(torch_cpu), mode=os.RTLD_NOLOAD)
        functions = {name: getattr(library, name) for name in ("GOMP_parallel", *_COUNTERS)}
    except (OSError, AttributeError):
        return None
    from llvmlite import binding

    for name in _COUNTERS:
        binding.add_symbol(name, ctypes.cast(functions[name], ctypes.c_void_p).value)
    functions["GOMP_parallel"].argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    functions["GOMP_parallel"].restype = None
    return library


_COUNTERS = ("omp_get_thread_num", "omp_get_num_threads")


def available() -> bool:
    """Whether :func:`run` can use PyTorch's OpenMP team, of more than one thread."""
    return torch.get_num_threads() > 1 and _runtime() is not None


def run(function: int, data: int) -> None:
    """Run the cfunc at address ``function`` with the pointer ``data`` on each of PyTorch's
    ``torch.get_num_threads()`` threads, the calling thread as the first; return when all are done.
    Only after :func:`available` said True."""
    library = _runtime()
    assert library is not None
    library.GOMP_parallel(function, data, torch.get_num_threads(), 0)
