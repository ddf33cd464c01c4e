"""brsf's matrices on the CPU: uniform magnitudes from AES-128 in counter mode, with the weight's signs.

Why not ``torch.Tensor.uniform_``: on the CPU it draws from mt19937, one number after another (2.4 ms
per million float32 on the Intel machine, 3.8-7.8 ms on the AMD one), and brsf draws one per weight per
step: 3.1M on the 4x1024 MLP, more than half a backprop step. A counter-mode generator computes block
``i`` of its stream from ``(i, key)`` alone, so a compiled loop works on many blocks at once and any
share of the stream can be computed on any thread.

Why AES: it is the standard block cipher (FIPS-197), its counter mode is the core of NIST's CTR_DRBG
generator, and no known statistical test tells its output from random; and CPUs compute an AES round
in one instruction: on x86 AES-NI (most x86-64 CPUs since about 2010), with VAES two blocks per
instruction (AMD Zen 3, Intel Ice Lake and later); on 64-bit ARM the crypto extension's AESE and AESMC.
It replaced Philox4x32-10, whose ten multiply rounds AVX2 computes in many more instructions: on
torch's two threads of the AMD machine a million signed entries take 0.67-0.73 of Philox's time
(docs/PERFORMANCE.md, seventeenth round).

The stream of ``n`` numbers under ``key`` (an integer below ``2**128``): block ``i`` is AES-128, under
the key whose 16 bytes are ``key`` little-endian, of the 16 bytes of ``i`` little-endian: the AES-CTR
keystream of that counter. Number ``j`` is the little-endian 32-bit word ``j mod 4`` of block
``j div 4``, and a word ``w`` gives the magnitude ``(w >> 8) * 2**-24 * bound``: float32's 24 bits, in
``[0, bound)``.

The key comes from torch's global generator (:func:`draw_key`), so ``torch.manual_seed`` makes the
draws reproducible and a checkpoint of torch's RNG state resumes them exactly.

The compiled loop fills eight blocks (32 entries) at a time with the CPU's AES instructions, and the
entries after the last whole group of 32 (at most eight blocks, on the team's first thread) with an
AES by table lookup (four lookups and XORs per column and round). On a CPU without AES instructions
(x86 before about 2010, ARM boards without the crypto extension such as the Raspberry Pi 4, other
architectures) that table-lookup AES fills everything: the same stream, 45-55 times slower (27.6 ms
per million entries on one thread of the AMD machine, against 0.51 with VAES; 14.3 ms on two
threads). A draw of :data:`PARALLEL_FROM` entries or more is shared over PyTorch's own CPU threads,
its OpenMP team (:mod:`fa_cli.alignment.openmp`), where one is there: thread ``t`` of ``T`` fills the
``t``-th of ``T`` runs of the eight-block groups (of the blocks, without AES instructions). The
stream depends neither on how it is shared nor on the instructions that compute it, on little-endian
machines (all that PyTorch's CPU wheels are built for but s390x: the words are read in the machine's
byte order).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic
from torch import Tensor

from fa_cli.alignment import openmp


def _sbox() -> np.ndarray:
    # FIPS-197 5.1.1: each byte's multiplicative inverse in GF(2^8) (0 for 0), then the affine map
    # b ^ rotl(b, 1) ^ rotl(b, 2) ^ rotl(b, 3) ^ rotl(b, 4) ^ 0x63. The inverses from the powers of 3,
    # a generator of the field's multiplicative group: inverse(3^k) = 3^(255 - k).
    power, log = [0] * 255, [0] * 256
    x = 1
    for k in range(255):
        power[k], log[x] = x, k
        x ^= ((x << 1) ^ (0x11B if x & 0x80 else 0)) & 0xFF  # x * 3 = x * 2 ^ x
    box = []
    for b in range(256):
        inverse = power[(255 - log[b]) % 255] if b else 0
        rotations = [((inverse << k) | (inverse >> (8 - k))) & 0xFF for k in range(5)]
        box.append(functools.reduce(int.__xor__, rotations) ^ 0x63)
    return np.array(box, dtype=np.uint8)


_SBOX = _sbox()


@njit(cache=True)
def _round_keys(low: int, high: int) -> np.ndarray:
    # FIPS-197 5.2, AES-128's key expansion: the 176 bytes of the 11 round keys, from the key's 16
    # bytes (low, high: its little-endian halves). As 22 little-endian uint64s: round r's in 2r, 2r+1.
    w = np.zeros(176, np.uint8)
    for j in range(8):
        w[j] = (np.uint64(low) >> np.uint64(8 * j)) & np.uint64(0xFF)
        w[8 + j] = (np.uint64(high) >> np.uint64(8 * j)) & np.uint64(0xFF)
    rcon = 1
    for i in range(4, 44):  # word i from words i - 1 and i - 4
        t0, t1, t2, t3 = w[4 * i - 4], w[4 * i - 3], w[4 * i - 2], w[4 * i - 1]
        if i % 4 == 0:  # RotWord, SubWord, Rcon
            t0, t1, t2, t3 = _SBOX[t1] ^ np.uint8(rcon), _SBOX[t2], _SBOX[t3], _SBOX[t0]
            rcon = ((rcon << 1) ^ 0x11B) if rcon & 0x80 else rcon << 1
        w[4 * i], w[4 * i + 1] = w[4 * i - 16] ^ t0, w[4 * i - 15] ^ t1
        w[4 * i + 2], w[4 * i + 3] = w[4 * i - 14] ^ t2, w[4 * i - 13] ^ t3
    return w.view(np.uint64)


def _tables() -> np.ndarray:
    # The four tables of a round computed by lookup (Daemen and Rijmen, "The Design of Rijndael",
    # 4.2): table r maps a byte b of row r to its column after SubBytes and MixColumns, as a
    # little-endian uint32 (row k in byte k): (2s, s, s, 3s) for row 0, s = S(b), rotated k rows down
    # for row k. A round is then four lookups and XORs per column.
    box = _SBOX.astype(np.uint32)
    twice = ((box << 1) ^ np.where(box & 0x80, 0x11B, 0)).astype(np.uint32)
    first = twice | (box << 8) | (box << 16) | ((twice ^ box) << 24)
    return np.stack([(first << (8 * r)) | (first >> (32 - 8 * r)) if r else first for r in range(4)])


_TABLES = _tables()


@njit(cache=True)
def _encrypt(counter: int, keys: np.ndarray) -> tuple[int, int, int, int]:
    # AES-128 (FIPS-197 5.1) by table lookup: the four little-endian words of the block whose 16
    # bytes are counter (below 2**64) little-endian, under the round keys (22 uint64s). Word c is
    # column c of the state, its byte r row r; ShiftRows moves row r of column c + r to column c.
    k = keys.view(np.uint32)
    c = np.uint64(counter)
    s0, s1 = np.uint32(c & np.uint64(0xFFFFFFFF)) ^ k[0], np.uint32(c >> np.uint64(32)) ^ k[1]
    s2, s3 = k[2], k[3]
    for r in range(1, 10):
        s0, s1, s2, s3 = (
            _mixed_column(s0, s1, s2, s3) ^ k[4 * r],
            _mixed_column(s1, s2, s3, s0) ^ k[4 * r + 1],
            _mixed_column(s2, s3, s0, s1) ^ k[4 * r + 2],
            _mixed_column(s3, s0, s1, s2) ^ k[4 * r + 3],
        )
    # The last round: SubBytes and ShiftRows, no MixColumns.
    return (
        _last_column(s0, s1, s2, s3) ^ k[40],
        _last_column(s1, s2, s3, s0) ^ k[41],
        _last_column(s2, s3, s0, s1) ^ k[42],
        _last_column(s3, s0, s1, s2) ^ k[43],
    )


@njit(cache=True, inline="always")
def _mixed_column(a: int, b: int, c: int, d: int) -> int:
    # A round's new column (before its key): row r from column r after it (a, b, c, d), through the
    # S-box and MixColumns, by the tables.
    t = _TABLES
    return t[0, a & 0xFF] ^ t[1, (b >> 8) & 0xFF] ^ t[2, (c >> 16) & 0xFF] ^ t[3, d >> 24]


@njit(cache=True, inline="always")
def _last_column(a: int, b: int, c: int, d: int) -> int:
    # The last round's: row r from column r after it (a, b, c, d), through the S-box alone.
    box = _SBOX
    return (
        np.uint32(box[a & 0xFF])
        | (np.uint32(box[(b >> 8) & 0xFF]) << 8)
        | (np.uint32(box[(c >> 16) & 0xFF]) << 16)
        | (np.uint32(box[d >> 24]) << 24)
    )


@njit(cache=True)
def _fill_lookup(
    out: np.ndarray, signs: np.ndarray, keys: np.ndarray, scale: float, lo: int, hi: int
) -> None:
    # Blocks lo..hi-1 by table lookup, each entry copysign(magnitude, signs[j]).
    n = out.shape[0]
    for i in range(lo, hi):
        block = _encrypt(i, keys)
        for q in range(min(4, n - 4 * i)):
            out[4 * i + q] = np.copysign(
                np.float32(block[q] >> np.uint32(8)) * np.float32(scale), signs[4 * i + q]
            )


#: Blocks one pass of the compiled loop encrypts (four VAES registers of two blocks, or eight of one).
GROUP = 8


def _instructions(features: str, triple: str) -> str | None:
    # Which AES instructions a target machine (features: LLVM's "+aes,-avx512f,..." string) has.
    # LLVM before 19 named ARM's "crypto" (AES and SHA together) where it now names "aes".
    enabled = set(features.split(","))
    if triple.startswith(("x86_64", "i686", "i386")) and "+aes" in enabled:
        return "vaes" if {"+vaes", "+avx2"} <= enabled else "aes-ni"
    if triple.startswith(("aarch64", "arm64")) and enabled & {"+aes", "+crypto"}:
        return "armv8"
    return None


def _compiled_for(codegen: Any) -> str | None:
    # numba's cache key for the machine it compiles for: (triple, CPU name, features).
    try:
        triple, _, features = codegen.magic_tuple()
    except (AttributeError, TypeError, ValueError):  # another numba: the table lookup is always right
        return None
    return _instructions(features, triple)


def compiled_instructions() -> str | None:
    """The AES instructions numba compiles for on this machine (``"vaes"``, ``"aes-ni"`` or
    ``"armv8"``), or None, where the table-lookup AES fills every block."""
    return _compiled_for(cpu_target.target_context.codegen())


def _arm_rounds(builder: ir.IRBuilder, native: bool) -> tuple[Any, Any]:
    # ARMv8's AESE (AddRoundKey, SubBytes, ShiftRows) and AESMC (MixColumns), on <2 x i64>. Not native
    # (the tests, on x86), the same functions from AES-NI: AESENCLAST with a zero key is SubBytes and
    # ShiftRows, and AESENC with a zero key after AESDECLAST with a zero key (their inverses) is
    # MixColumns alone.
    module, lanes = builder.module, ir.VectorType(ir.IntType(64), 2)
    if native:
        bytes16 = ir.VectorType(ir.IntType(8), 16)
        aese = cgutils.get_or_insert_function(
            module, ir.FunctionType(bytes16, [bytes16, bytes16]), "llvm.aarch64.crypto.aese"
        )
        aesmc = cgutils.get_or_insert_function(
            module, ir.FunctionType(bytes16, [bytes16]), "llvm.aarch64.crypto.aesmc"
        )

        def sub_shift(state: Any, key: Any) -> Any:
            as_bytes = [builder.bitcast(v, bytes16) for v in (state, key)]
            return builder.bitcast(builder.call(aese, as_bytes), lanes)

        def mix(state: Any) -> Any:
            return builder.bitcast(builder.call(aesmc, [builder.bitcast(state, bytes16)]), lanes)

        return sub_shift, mix
    x86 = ir.FunctionType(lanes, [lanes, lanes])
    enc, last, dec_last = (
        cgutils.get_or_insert_function(module, x86, f"llvm.x86.aesni.{name}")
        for name in ("aesenc", "aesenclast", "aesdeclast")
    )
    zero = ir.Constant(lanes, [0, 0])

    def emulated_sub_shift(state: Any, key: Any) -> Any:
        return builder.call(last, [builder.xor(state, key), zero])

    def emulated_mix(state: Any) -> Any:
        return builder.call(enc, [builder.call(dec_last, [state, zero]), zero])

    return emulated_sub_shift, emulated_mix


def emit_group(
    builder: ir.IRBuilder, kind: str, out: Any, signs: Any, keys: Any, first: Any, scale: Any
) -> None:
    """LLVM IR for one pass: blocks ``first`` .. ``first + 7`` of the stream, with ``kind``'s
    instructions (``"armv8-on-x86"``: ARMv8's sequence of rounds with AES-NI's, for the tests), into
    ``out[4 * first:]`` (float*) with the sign bits of ``signs[4 * first:]`` (float*), from the round
    keys ``keys`` (i64*, 22), times ``scale`` (float)."""
    i64, i32 = ir.IntType(64), ir.IntType(32)
    blocks = 2 if kind == "vaes" else 1  # per register
    lanes = ir.VectorType(i64, 2 * blocks)
    words, floats = ir.VectorType(i32, 4 * blocks), ir.VectorType(ir.FloatType(), 4 * blocks)

    def vector(values: list[Any]) -> Any:
        v = ir.Constant(lanes, ir.Undefined)
        for lane, x in enumerate(values):
            v = builder.insert_element(v, x, ir.Constant(i32, lane))
        return v

    round_keys = []
    for r in range(11):  # (low, high) of round r, in each block's place
        low, high = (builder.load(builder.gep(keys, [ir.Constant(i64, 2 * r + h)])) for h in (0, 1))
        round_keys.append(vector([low, high] * blocks))
    states = []
    for g in range(GROUP // blocks):  # the counters' 16 bytes: (i, 0) as little-endian uint64s
        counters = [builder.add(first, ir.Constant(i64, g * blocks + b)) for b in range(blocks)]
        states.append(vector([x for c in counters for x in (c, ir.Constant(i64, 0))]))
    if kind.startswith("armv8"):
        # AESE adds its key first, so round r's key goes in with the next round's AESE, and the last
        # key is added after the last AESE.
        sub_shift, mix = _arm_rounds(builder, native=kind == "armv8")
        for r in range(9):
            states = [mix(sub_shift(s, round_keys[r])) for s in states]
        states = [builder.xor(sub_shift(s, round_keys[9]), round_keys[10]) for s in states]
    else:
        # AESENC is SubBytes, ShiftRows, MixColumns, AddRoundKey; AESENCLAST leaves out MixColumns.
        suffix = ".256" if kind == "vaes" else ""
        x86 = ir.FunctionType(lanes, [lanes, lanes])
        enc = cgutils.get_or_insert_function(builder.module, x86, "llvm.x86.aesni.aesenc" + suffix)
        last = cgutils.get_or_insert_function(builder.module, x86, "llvm.x86.aesni.aesenclast" + suffix)
        states = [builder.xor(s, round_keys[0]) for s in states]
        for r in range(1, 10):
            states = [builder.call(enc, [s, round_keys[r]]) for s in states]
        states = [builder.call(last, [s, round_keys[10]]) for s in states]
    scales = ir.Constant(floats, ir.Undefined)
    for lane in range(4 * blocks):
        scales = builder.insert_element(scales, scale, ir.Constant(i32, lane))
    eight = ir.Constant(words, [8] * 4 * blocks)
    sign_bit = ir.Constant(words, [0x80000000] * 4 * blocks)
    start = builder.mul(first, ir.Constant(i64, 4))
    for g, state in enumerate(states):
        # The words >> 8 are below 2**24: converted exactly as signed (one instruction on x86). The
        # magnitude's sign bit is clear (scale >= 0), so OR-ing in the sign's bit is copysign.
        magnitude = builder.fmul(
            builder.sitofp(builder.lshr(builder.bitcast(state, words), eight), floats), scales
        )
        at = builder.add(start, ir.Constant(i64, 4 * blocks * g))
        sign = builder.and_(
            builder.load(builder.bitcast(builder.gep(signs, [at]), words.as_pointer()), align=4), sign_bit
        )
        value = builder.or_(builder.bitcast(magnitude, words), sign)
        builder.store(value, builder.bitcast(builder.gep(out, [at]), words.as_pointer()), align=4)


def group_intrinsic(kind: str | None = None) -> Any:
    """A numba intrinsic ``(out, signs, keys, first, scale)`` that emits one pass of
    :func:`emit_group` with ``kind``'s instructions, or (None) with those numba compiles for; out and
    signs float32 arrays, keys the 22 uint64 round keys, all contiguous."""

    def aes_group(typingctx: Any, out: Any, signs: Any, keys: Any, first: Any, scale: Any) -> Any:
        # The pass reads and writes through raw pointers: contiguous arrays of these dtypes only.
        def vector(array: Any, dtype: Any) -> bool:
            return (
                isinstance(array, types.Array)
                and array.dtype == dtype
                and array.ndim == 1
                and array.layout == "C"
            )

        if (
            vector(out, types.float32)
            and out.mutable
            and vector(signs, types.float32)
            and vector(keys, types.uint64)
        ):
            return types.void(out, signs, keys, types.uint64, types.float32), codegen
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> None:
        out_array, signs_array, keys_array = (
            context.make_array(t)(context, builder, a)
            for t, a in zip(signature.args[:3], args[:3], strict=True)
        )
        target = kind or _compiled_for(context.codegen())
        if target is None:  # never run: fill_range takes no groups where the CPU has no AES instructions
            trap = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.trap"
            )
            builder.call(trap, [])
            return
        emit_group(builder, target, out_array.data, signs_array.data, keys_array.data, args[3], args[4])

    return intrinsic(aes_group)


_group = group_intrinsic()


@njit(cache=True)
def _fill_groups(
    out: np.ndarray, signs: np.ndarray, keys: np.ndarray, scale: float, lo: int, hi: int
) -> None:
    # out, signs: (n,) float32, contiguous; groups lo..hi-1 of GROUP blocks, with the AES instructions.
    for g in range(np.uint64(lo), np.uint64(hi)):
        _group(out, signs, keys, np.uint64(g) * np.uint64(GROUP), np.float32(scale))


@njit(cache=True)
def fill_range(
    out: np.ndarray, signs: np.ndarray, keys: np.ndarray, scale: float, hardware: bool, part: int, parts: int
) -> None:
    """Part ``part`` of ``parts`` of the stream (:func:`signed_uniform_` on one thread: part 0 of 1):
    ``out`` and ``signs`` contiguous float32 of one length, ``keys`` from :func:`round_keys`, ``scale``
    from :func:`magnitude_scale`. With the AES instructions (``hardware``: :data:`HARDWARE`) it is the
    part-th run of eight-block groups, and for part 0 the blocks after the last group too; without
    them the part-th run of blocks, by table lookup."""
    n = out.shape[0]
    if signs.shape[0] != n or keys.shape[0] != 22:  # read through raw pointers: never past their ends
        raise ValueError("fill_range: signs of out's length and 22 round keys")
    hardware = hardware and HARDWARE  # a CPU without AES instructions has no group pass to run
    blocks = (n + 3) // 4
    groups = n // (4 * GROUP) if hardware else 0
    units = groups if hardware else blocks
    run = (units + parts - 1) // parts
    lo = min(units, part * run)
    hi = min(units, lo + run)
    if hardware:
        _fill_groups(out, signs, keys, scale, lo, hi)
        if part == 0:
            _fill_lookup(out, signs, keys, scale, GROUP * groups, blocks)
    else:
        _fill_lookup(out, signs, keys, scale, lo, hi)


def _share(data: Any) -> None:
    # On each thread of PyTorch's OpenMP team: data points to int64s (out's address, signs' address,
    # n, the round keys' address, scale's float64 bits). Thread t of T fills part t of T. The stream
    # is the same however it is shared.
    words = carray(data, (5,), np.int64)
    n = words[2]
    out = carray(openmp.pointer(words[0]), (n,), np.float32)
    signs = carray(openmp.pointer(words[1]), (n,), np.float32)
    keys = carray(openmp.pointer(words[3]), (22,), np.uint64)
    scale = carray(data, (5,), np.float64)[4]
    fill_range(out, signs, keys, scale, HARDWARE, openmp.thread_number(), openmp.team_size())


@functools.cache
def _shared_fill() -> int:
    # Compiled at the first use, once openmp.available() has given LLVM the OpenMP functions' addresses.
    return cfunc(types.void(types.voidptr), cache=True)(_share).address


#: Below this many entries the draw stays on the calling thread: waking the team would cost more.
PARALLEL_FROM = 1 << 16


def draw_key(generator: torch.Generator | None = None) -> int:
    """A fresh key, one 63-bit draw from ``generator`` (torch's global CPU one if None)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device="cpu"))


def round_keys(key: int) -> np.ndarray:
    """AES-128's eleven round keys for ``key`` (an integer in ``[0, 2**128)``), as the 22
    little-endian uint64s the fills read."""
    key = operator.index(key)  # numpy's integers too
    if not 0 <= key < 2**128:
        raise ValueError(f"an AES-128 key is an integer in [0, 2**128), not {key}")
    return _round_keys(np.uint64(key & (2**64 - 1)), np.uint64(key >> 64))


def magnitude_scale(bound: float) -> float:
    """What a word's top 24 bits are multiplied by: ``bound * 2**-24`` in float32, as the fills
    compute it."""
    if not (math.isfinite(bound) and bound >= 0):
        raise ValueError(f"the magnitudes' bound must be finite and 0 or more, not {bound}")
    # abs: -0.0 too must give magnitudes whose sign bit is clear, as the compiled pass ORs the signs in
    return abs(float(np.float32(bound) * np.float32(2.0**-24)))


def signed_uniform_(out: Tensor, signs: Tensor, bound: float, key: int) -> None:
    """Fill the CPU tensor ``out`` with the ``U(0, bound)`` stream of ``key`` (see above), in its logical
    order, each entry with the sign bit of the same entry of ``signs`` (a zero's too, as ``copysign``)."""
    # A call is one layer's draw in one step, so its fixed costs count on small models: float32
    # contiguous tensors are read and written where they lie; other dtypes and layouts go through
    # float32 copies.
    if out.device.type != "cpu":  # the kernel writes through the tensor's address
        raise ValueError(f"signed_uniform_ fills CPU tensors, not {out.device.type} ones")
    if signs.numel() != out.numel():  # the kernel reads signs[j] for every j it writes out[j]
        raise ValueError(f"signs of shape {tuple(signs.shape)} for an output of shape {tuple(out.shape)}")
    keys, scale = round_keys(key), magnitude_scale(bound)
    signs = signs.detach()
    if signs.dtype != torch.float32 or signs.device.type != "cpu" or not signs.is_contiguous():
        signs = signs.to(device="cpu", dtype=torch.float32).contiguous()
    direct = out.dtype == torch.float32 and out.is_contiguous()
    target = out.detach() if direct else torch.empty(out.shape, dtype=torch.float32)
    if target.numel() >= PARALLEL_FROM and openmp.available():
        # On every thread torch computes with, where one would otherwise spin idle beside the draw.
        words = np.array(
            [target.data_ptr(), signs.data_ptr(), target.numel(), keys.ctypes.data, 0], dtype=np.int64
        )
        words[4:].view(np.float64)[0] = scale
        openmp.run(_shared_fill(), words.ctypes.data)
    else:
        fill_range(target.view(-1).numpy(), signs.view(-1).numpy(), keys, scale, HARDWARE, 0, 1)
    if not direct:
        out.copy_(target)


#: Whether the CPU's AES instructions fill the draws' groups (else the table lookup fills every block).
HARDWARE = compiled_instructions() is not None
