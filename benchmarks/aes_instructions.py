"""brsf's CPU draw with each kind of AES instructions: ms per million signed entries.

numba compiles for the CPU it runs on, less the features NUMBA_CPU_FEATURES leaves out, so one machine
times every path (the same stream in each; tests/alignment/test_aes.py checks that)::

    python benchmarks/aes_instructions.py                 # the instructions this CPU has
    F=$(python -c "import llvmlite.binding as b; print(b.get_host_cpu_features().flatten())")
    CPU=$(python -c "import llvmlite.binding as b; print(b.get_host_cpu_name())")
    NUMBA_CACHE_DIR=$(mktemp -d) NUMBA_CPU_NAME=$CPU NUMBA_CPU_FEATURES=${F/+vaes/-vaes} \\
        python benchmarks/aes_instructions.py             # AES-NI, one block per instruction
    NUMBA_CACHE_DIR=$(mktemp -d) NUMBA_CPU_NAME=$CPU \\
        NUMBA_CPU_FEATURES=$(echo $F | sed 's/+vaes/-vaes/; s/+aes/-aes/') \\
        python benchmarks/aes_instructions.py             # none: the table-lookup AES
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fa_cli.alignment import aes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    out, signs = torch.empty(args.entries), torch.randn(args.entries)
    print(f"instructions: {aes.compiled_instructions()}")
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        aes.signed_uniform_(out, signs, 0.1, aes.draw_key())  # compiled or loaded from the cache
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            aes.signed_uniform_(out, signs, 0.1, aes.draw_key())
            times.append(time.perf_counter() - start)
        per_million = 1e3 * statistics.median(times) * 1e6 / args.entries
        print(f"{threads} thread(s): {per_million:.3f} ms per million entries (median of {args.reps})")


if __name__ == "__main__":
    main()
