"""brsf's generator on the CPU until the seventeenth round (docs/PERFORMANCE.md), kept here for
``speed.py --sections parts``, which times it against the AES-128 that replaced it
(``fa_cli.alignment.aes``): uniform magnitudes from Philox4x32-10, with the weight's signs.

Why not ``torch.Tensor.uniform_``: on the CPU it draws from mt19937, one number after another (2.4 ms
per million float32 on the Intel machine, 3.8-7.8 ms on the AMD one), and brsf draws one per weight per
step: 3.1M on the 4x1024 MLP, more than half a backprop step. Philox is counter-based: block ``i`` of
a stream is a pure function of ``(i, key)``, so a compiled loop works on several blocks at once in SIMD
registers (1.15 ms per million signed entries on the AMD machine, against 6.2 ms for ``uniform_``
and ``copysign_``; docs/PERFORMANCE.md, twelfth round). It is the generator PyTorch uses on CUDA, and
it passes TestU01's BigCrush (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3");
:func:`philox4x32` reproduces Random123's known-answer vectors.

The stream of ``n`` numbers under ``key``: block ``i`` is Philox4x32-10 of the counter
``(i mod 2**32, i div 2**32, 0, 0)``, and with ``m = n // 4`` full blocks, number ``q * m + i`` is word
``q`` of block ``i`` (each word fills a contiguous quarter, which keeps the stores vectorised); the last
``n mod 4`` numbers are the first words of block ``m``. A word ``w`` gives the magnitude
``(w >> 8) * 2**-24 * bound``: float32's 24 bits, in ``[0, bound)``.

The key comes from torch's global generator (:func:`draw_key`), so ``torch.manual_seed`` makes the
draws reproducible and a checkpoint of torch's RNG state resumes them exactly.

A draw of :data:`PARALLEL_FROM` entries or more is shared over PyTorch's own CPU threads, its OpenMP
team (:mod:`fa_cli.alignment.openmp`), where one is there: thread ``t`` of ``T`` fills the ``t``-th of
``T`` runs of blocks. The stream does not depend on how it is shared.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from numba import carray, cfunc, njit, types
from torch import Tensor

from fa_cli.alignment import openmp

# Random123's constants: the two multipliers, and the key's increments (the golden ratio, sqrt(3) - 1).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10


@njit(cache=True, inline="always")  # inlined into _fill_signed, whose block loop then vectorises
def philox4x32(c0: int, c1: int, c2: int, c3: int, k0: int, k1: int) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block: the counter's four 32-bit words under the key's two."""
    c0, c1, c2, c3 = np.uint32(c0), np.uint32(c1), np.uint32(c2), np.uint32(c3)
    k0, k1 = np.uint32(k0), np.uint32(k1)
    for _ in range(_ROUNDS):
        # mulhilo: the 64-bit products of the multipliers and words 0 and 2, split into halves.
        # numba widens uint32 ^ uint32 to 64 bits: each new word is cut back to 32.
        p0 = np.uint64(_M0) * np.uint64(c0)
        p1 = np.uint64(_M1) * np.uint64(c2)
        c0, c1, c2, c3 = (
            np.uint32((p1 >> np.uint64(32)) ^ c1 ^ k0),
            np.uint32(p1),
            np.uint32((p0 >> np.uint64(32)) ^ c3 ^ k1),
            np.uint32(p0),
        )
        k0 = np.uint32(k0 + np.uint32(_W0))  # the key moves on after each round, mod 2**32
        k1 = np.uint32(k1 + np.uint32(_W1))
    return c0, c1, c2, c3


@njit(cache=True)
def _fill_blocks(
    out: np.ndarray, signs: np.ndarray, k0: int, k1: int, bound: float, lo: int, hi: int
) -> None:
    # out, signs: (n,) float32, contiguous. Blocks lo..hi-1 of the stream of n numbers, each entry
    # copysign(magnitude, signs[j]): word q of block i is entry q * m + i, m = n // 4. The block loop
    # has no branch and writes four contiguous runs, so LLVM vectorises it; its index is unsigned, so
    # that no negative index is checked for.
    m = np.uint64(out.shape[0] // 4)
    scale = np.float32(bound) * np.float32(2.0**-24)
    shift = np.uint32(8)
    for i in range(np.uint64(lo), np.uint64(hi)):
        w0, w1, w2, w3 = philox4x32(np.uint32(i), np.uint32(i >> np.uint64(32)), 0, 0, k0, k1)
        out[i] = np.copysign(np.float32(w0 >> shift) * scale, signs[i])
        out[m + i] = np.copysign(np.float32(w1 >> shift) * scale, signs[m + i])
        out[np.uint64(2) * m + i] = np.copysign(np.float32(w2 >> shift) * scale, signs[np.uint64(2) * m + i])
        out[np.uint64(3) * m + i] = np.copysign(np.float32(w3 >> shift) * scale, signs[np.uint64(3) * m + i])


@njit(cache=True)
def _fill_tail(out: np.ndarray, signs: np.ndarray, k0: int, k1: int, bound: float) -> None:
    # The last n mod 4 entries: the first words of block m.
    n = out.shape[0]
    m = n // 4
    scale = np.float32(bound) * np.float32(2.0**-24)
    tail = philox4x32(np.uint32(m), np.uint32(m >> 32), 0, 0, k0, k1)
    for j in range(n - 4 * m):
        out[4 * m + j] = np.copysign(np.float32(tail[j] >> np.uint32(8)) * scale, signs[4 * m + j])


@njit(cache=True)
def _fill_signed(out: np.ndarray, signs: np.ndarray, k0: int, k1: int, bound: float) -> None:
    # The whole stream on the calling thread.
    _fill_blocks(out, signs, k0, k1, bound, 0, out.shape[0] // 4)
    _fill_tail(out, signs, k0, k1, bound)


def _share(data: Any) -> None:
    # On each thread of PyTorch's OpenMP team: data points to int64s (out's address, signs' address,
    # n, k0, k1, bound's float64 bits). Thread t of T fills the t-th of T runs of blocks; thread 0
    # also the tail. The stream is the same however it is shared.
    words = carray(data, (6,), np.int64)
    n = words[2]
    out = carray(openmp.pointer(words[0]), (n,), np.float32)
    signs = carray(openmp.pointer(words[1]), (n,), np.float32)
    bound = carray(data, (6,), np.float64)[5]
    m = n // 4
    thread, threads = openmp.thread_number(), openmp.team_size()
    run = (m + threads - 1) // threads
    lo = min(m, thread * run)
    _fill_blocks(out, signs, words[3], words[4], bound, lo, min(m, lo + run))
    if thread == 0:
        _fill_tail(out, signs, words[3], words[4], bound)


@functools.cache
def _shared_fill() -> int:
    # Compiled at the first use, once openmp.available() has given LLVM the OpenMP functions' addresses.
    return cfunc(types.void(types.voidptr), cache=True)(_share).address


#: Below this many entries the draw stays on the calling thread: waking the team would cost more.
PARALLEL_FROM = 1 << 16


def draw_key(generator: torch.Generator | None = None) -> tuple[int, int]:
    """A fresh key, one 63-bit draw from ``generator`` (torch's global CPU one if None), as its low
    and high 32-bit words."""
    key = int(torch.randint(0, 2**63 - 1, (), generator=generator, device="cpu"))
    return key & 0xFFFFFFFF, key >> 32


def signed_uniform_(out: Tensor, signs: Tensor, bound: float, key: tuple[int, int]) -> None:
    """Fill the contiguous float32 CPU tensor ``out`` with the ``U(0, bound)`` stream of ``key`` (see
    above), each entry with the sign bit of the same entry of ``signs`` (contiguous float32 too): the
    draw as it was made for such tensors, the only kind the parts pair passes."""
    if out.numel() >= PARALLEL_FROM and openmp.available():
        # On every thread torch computes with, where one would otherwise spin idle beside the draw.
        words = np.array([out.data_ptr(), signs.data_ptr(), out.numel(), *key, 0], dtype=np.int64)
        words[5:].view(np.float64)[0] = bound
        openmp.run(_shared_fill(), words.ctypes.data)
    else:
        _fill_signed(out.view(-1).numpy(), signs.view(-1).numpy(), key[0], key[1], bound)
