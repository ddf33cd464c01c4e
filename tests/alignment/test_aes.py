"""brsf's CPU generator: AES-128 against FIPS-197's known answer, and the stream's layout, with each
kind of AES instruction this machine's compiler can be told to use."""

import math
import os
import subprocess
import sys
import threading

import llvmlite.binding as llvm
import numba
import numpy as np
import pytest
import torch
from llvmlite import ir

from fa_cli.alignment import aes, openmp

# Rijndael's S-box, as FIPS-197's figure 7 prints it, row by row.
SBOX = bytes.fromhex(
    "637c777bf26b6fc53001672bfed7ab76"
    "ca82c97dfa5947f0add4a2af9ca472c0"
    "b7fd9326363ff7cc34a5e5f171d83115"
    "04c723c31896059a071280e2eb27b275"
    "09832c1a1b6e5aa0523bd6b329e32f84"
    "53d100ed20fcb15b6acbbe394a4c58cf"
    "d0efaafb434d338545f9027f503c9fa8"
    "51a3408f929d38f5bcb6da2110fff3d2"
    "cd0c13ec5f974417c4a77e3d645d1973"
    "60814fdc222a908846eeb814de5e0bdb"
    "e0323a0a4906245cc2d3ac629195e479"
    "e7c8376d8dd54ea96c56f4ea657aae08"
    "ba78252e1ca6b4c6e8dd741f4bbd8b8a"
    "703eb5664803f60e613557b986c11d9e"
    "e1f8981169d98e949b1e87e9ce5528df"
    "8ca1890dbfe6426841992d0fb054bb16"
)


def times_x(a: int) -> int:
    return ((a << 1) ^ 0x11B) if a & 0x80 else a << 1


def sub_shift(state: list[int]) -> list[int]:
    """SubBytes then ShiftRows: byte 4c + r is row r of column c, and row r moves r columns left."""
    box = aes._SBOX
    return [int(box[state[4 * ((c + r) % 4) + r]]) for c in range(4) for r in range(4)]


def mix(state: list[int]) -> list[int]:
    """MixColumns: each column times {03}x^3 + {01}x^2 + {01}x + {02}."""
    out = []
    for c in range(4):
        a = state[4 * c : 4 * c + 4]
        out += [
            times_x(a[r]) ^ times_x(a[(r + 1) % 4]) ^ a[(r + 1) % 4] ^ a[(r + 2) % 4] ^ a[(r + 3) % 4]
            for r in range(4)
        ]
    return out


def add(state: list[int], key: bytes) -> list[int]:
    return [s ^ k for s, k in zip(state, key, strict=True)]


def round_keys(key: bytes) -> list[bytes]:
    """FIPS-197 5.2 in plain Python: AES-128's eleven round keys."""
    words = [list(key[4 * i : 4 * i + 4]) for i in range(4)]
    rcon = 1
    for i in range(4, 44):
        t = list(words[i - 1])
        if i % 4 == 0:
            t = [int(aes._SBOX[b]) for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = times_x(rcon)
        words.append([a ^ b for a, b in zip(words[i - 4], t, strict=True)])
    return [bytes(sum(words[4 * r : 4 * r + 4], [])) for r in range(11)]


def encrypt(block: bytes, key: bytes) -> bytes:
    """AES-128 of one block, written from FIPS-197 (section 5.1) in plain Python."""
    keys = round_keys(key)
    state = add(list(block), keys[0])
    for r in range(1, 11):
        state = sub_shift(state)
        state = add(mix(state) if r < 10 else state, keys[r])
    return bytes(state)


def reference_stream(n: int, key: int) -> list[float]:
    """The n magnitudes (bound 1): word j mod 4 of AES_key(j div 4), little-endian."""
    key_bytes = key.to_bytes(16, "little")
    words = []
    for i in range((n + 3) // 4):
        block = encrypt(i.to_bytes(16, "little"), key_bytes)
        words += [int.from_bytes(block[4 * q : 4 * q + 4], "little") for q in range(4)]
    return [(word >> 8) / 2**24 for word in words[:n]]


def drawn(out: torch.Tensor, signs: torch.Tensor, bound: float = 0.5, key: int = 12) -> torch.Tensor:
    aes.signed_uniform_(out, signs, bound, key)
    return out


def test_the_reference_the_s_box_and_the_key_expansion_give_fips_197s_known_answers():
    assert bytes(aes._SBOX) == SBOX
    key = bytes(range(16))  # FIPS-197 appendix C.1
    plain, cipher = bytes.fromhex("00112233445566778899aabbccddeeff"), "69c4e0d86a7b0430d8cdb78070b4c55a"
    assert encrypt(plain, key).hex() == cipher
    expanded = aes._round_keys(int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little"))
    assert expanded.tobytes() == b"".join(round_keys(key))
    assert expanded.tobytes()[-16:].hex() == "13111d7fe3944a17f307a78b4d2b30c5"  # C.1's round 10 key
    for counter in (0, 7, 2**64 - 1):  # the lookup AES the draws use for their last blocks
        words = aes._encrypt(np.uint64(counter), expanded)
        assert b"".join(int(w).to_bytes(4, "little") for w in words) == encrypt(
            counter.to_bytes(16, "little"), key
        )


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 31, 32, 33, 67, 1027])
@pytest.mark.parametrize("key", [0, 2**128 - 1, 0x0F0E0D0C0B0A09080706050403020100])
def test_signed_uniform_is_the_stream_of_its_key_with_the_signs_given(n, key):
    signs = torch.randn(n)
    signs[::3] *= -1
    out = drawn(torch.full((n,), float("nan")), signs, 1.0, key)
    assert out.abs().double().tolist() == reference_stream(n, key)
    assert torch.equal(torch.signbit(out), torch.signbit(signs))


def test_signed_uniform_scales_and_keeps_the_sign_bit_of_zeros():
    signs = torch.tensor([0.0, -0.0, 2.0, -3.0, 0.0, -0.0, 1.0] * 6)  # 42: a group of 32, then blocks
    out = drawn(torch.empty(42), signs, 0.25, 79)
    assert torch.equal(torch.signbit(out), torch.signbit(signs))
    expected = torch.tensor(reference_stream(42, 79), dtype=torch.float32) * 0.25
    assert torch.equal(out.abs(), expected)


def test_tensors_of_any_dtype_and_layout_are_read_and_filled_in_logical_order():
    weight = torch.randn(6, 5, dtype=torch.float64)
    expected = drawn(torch.empty(6, 5), weight.float())
    assert torch.equal(drawn(torch.empty(6, 5), weight), expected)  # float64 signs
    assert torch.equal(drawn(torch.empty(6, 5, dtype=torch.float64), weight), expected.double())
    transposed = weight.t()  # not contiguous: its entries in memory are not in its logical order
    out = drawn(torch.empty(6, 5).t(), transposed)  # nor is this output's
    assert torch.equal(out.abs(), expected.abs().reshape(5, 6))  # the stream, in logical order
    assert torch.equal(torch.signbit(out), torch.signbit(transposed))
    conv = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    out = drawn(torch.empty_like(conv), conv)
    assert out.is_contiguous(memory_format=torch.channels_last)  # filled where it lies
    assert torch.equal(out, drawn(torch.empty(4, 3, 2, 2), conv.contiguous()))


def test_signs_of_another_size_and_keys_outside_aes_128_are_refused():
    with pytest.raises(ValueError, match=r"signs of shape \(5,\) for an output of shape \(2, 3\)"):
        aes.signed_uniform_(torch.empty(2, 3), torch.ones(5), 1.0, 0)
    for key in (-1, 2**128):
        with pytest.raises(ValueError, match=r"an AES-128 key is an integer in \[0, 2\*\*128\)"):
            aes.signed_uniform_(torch.empty(2, 3), torch.ones(6), 1.0, key)
    for bound in (-0.5, float("nan"), float("inf")):  # the compiled pass would give every entry a minus sign
        with pytest.raises(ValueError, match="the magnitudes' bound must be finite and 0 or more"):
            aes.signed_uniform_(torch.empty(2, 3), torch.ones(6), bound, 0)
    signs = torch.tensor([1.0, -1.0, 0.0, -0.0] * 10)
    zeros = drawn(torch.empty(40), signs, -0.0)  # a bound of -0.0 gives zeros with the signs' sign bits
    assert torch.equal(zeros.abs(), torch.zeros(40)) and torch.equal(
        torch.signbit(zeros), torch.signbit(signs)
    )
    out = drawn(torch.empty(40), torch.ones(40), 1.0, np.int64(7))  # numpy's integers are keys too
    assert out.double().tolist() == reference_stream(40, 7)


def test_keys_come_from_torchs_generator():
    torch.manual_seed(3)
    first = aes.draw_key()
    torch.manual_seed(3)
    assert aes.draw_key() == first
    assert aes.draw_key() != first
    assert 0 <= first < 2**63
    seeded = [aes.draw_key(torch.Generator().manual_seed(5)) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_a_million_draws_look_uniform_and_independent():
    values = drawn(torch.empty(1_000_000), torch.ones(1_000_000), 1.0, 2024).double()
    assert values.min() >= 0 and values.max() < 1
    assert abs(values.mean().item() - 0.5) < 0.002  # 5 standard errors of the mean (0.00029)
    assert abs(values.var().item() - 1 / 12) < 0.001
    # 256 equal bins: chi-square with 255 degrees of freedom, below its 0.9999 quantile (about 350)
    counts = torch.histc(values, bins=256, min=0.0, max=1.0)
    expected = values.numel() / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 350
    # neighbours in memory (words of one block, consecutive blocks, groups apart) are uncorrelated
    for lag in (1, 4, 32, 250_000):
        a, b = values[:-lag] - 0.5, values[lag:] - 0.5
        correlation = (a * b).mean() / (a.std() * b.std())
        assert abs(correlation.item()) < 5 / math.sqrt(values.numel())


# Run in a fresh interpreter whose numba compiles for the host less some features: the stream must be
# the reference's with every kind of instructions, and with none (the table-lookup AES alone).
STREAM_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_aes import reference_stream
from fa_cli.alignment import aes
print(aes.compiled_instructions())
torch.set_num_threads(2)
for n in (45, aes.PARALLEL_FROM + 37):
    signs = torch.randn(n)
    out = torch.full((n,), float("nan"))
    aes.signed_uniform_(out, signs, 1.0, 2**100 + 5)
    assert out.abs().double().tolist() == reference_stream(n, 2**100 + 5), n
    assert torch.equal(torch.signbit(out), torch.signbit(signs))
print("same stream")
"""


@pytest.mark.parametrize(("remove", "kind"), [(("+vaes",), "aes-ni"), (("+vaes", "+aes"), "None")])
def test_the_stream_is_the_same_with_fewer_aes_instructions(remove, kind, tmp_path):
    if aes.compiled_instructions() not in ("vaes", "aes-ni"):
        pytest.skip("needs an x86 CPU with AES-NI")
    features = ",".join(
        "-" + f[1:] if f in remove else f for f in llvm.get_host_cpu_features().flatten().split(",")
    )
    env = dict(
        os.environ,
        NUMBA_CPU_NAME=llvm.get_host_cpu_name(),
        NUMBA_CPU_FEATURES=features,
        NUMBA_CACHE_DIR=str(tmp_path),  # compiled for other features: kept apart from the real cache
    )
    code = STREAM_CHECK.format(tests=os.path.dirname(__file__))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [kind, "same", "stream"]


def test_arm_crypto_instructions_are_emitted_and_compose_to_aes():
    # No ARM machine runs the tests: the ARMv8 pass is checked to compile to AESE/AESMC for AArch64,
    # and the composition it uses (AESE = AddRoundKey, SubBytes, ShiftRows; AESMC = MixColumns;
    # nine AESE+AESMC, one AESE, the last key added) to give FIPS-197's answer.
    module = ir.Module()
    module.triple = "aarch64-unknown-linux-gnu"
    pointer = ir.FloatType().as_pointer()
    function = ir.Function(
        module,
        ir.FunctionType(
            ir.VoidType(), [pointer, pointer, ir.IntType(64).as_pointer(), ir.IntType(64), ir.FloatType()]
        ),
        "group",
    )
    builder = ir.IRBuilder(function.append_basic_block())
    aes.emit_group(builder, "armv8", *function.args)
    builder.ret_void()
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    machine = llvm.Target.from_triple(module.triple).create_target_machine(features="+neon,+aes", opt=2)
    assembly = machine.emit_assembly(llvm.parse_assembly(str(module)))
    assert assembly.count("aese\t") == 10 * aes.GROUP and assembly.count("aesmc\t") == 9 * aes.GROUP

    key = round_keys(bytes(range(16)))
    state = list(bytes.fromhex("00112233445566778899aabbccddeeff"))
    for r in range(9):
        state = mix(sub_shift(add(state, key[r])))
    state = add(sub_shift(add(state, key[9])), key[10])
    assert bytes(state).hex() == "69c4e0d86a7b0430d8cdb78070b4c55a"


@pytest.mark.parametrize(
    ("features", "triple", "kind"),
    [
        ("+aes,+avx2,+vaes,+sse4.2", "x86_64-unknown-linux-gnu", "vaes"),
        ("+aes,+avx2,-vaes", "x86_64-pc-windows-msvc", "aes-ni"),
        ("+aes,-avx2,+vaes", "x86_64-apple-darwin", "aes-ni"),  # VAES's 256-bit registers need AVX
        ("-aes,+avx2,-vaes", "x86_64-unknown-linux-gnu", None),
        ("+neon,+aes,+sha2", "aarch64-unknown-linux-gnu", "armv8"),
        ("+neon,+crypto", "arm64-apple-darwin", "armv8"),  # LLVM before 19 named AES "crypto"
        ("+neon,-aes,-crypto", "aarch64-unknown-linux-gnu", None),
        ("+aes", "powerpc64le-unknown-linux-gnu", None),
        ("", "x86_64-unknown-linux-gnu", None),
    ],
)
def test_the_instructions_follow_the_target_machines_features(features, triple, kind):
    assert aes._instructions(features, triple) == kind


@pytest.mark.skipif(aes.compiled_instructions() not in ("vaes", "aes-ni"), reason="needs AES-NI")
def test_the_arm_sequence_of_rounds_gives_the_stream():
    # ARMv8's composition (nine AESE+AESMC, one AESE, the last key added), computed with AES-NI's
    # instructions standing for AESE and AESMC: the IR emit_group writes for ARM, run for real.
    group = aes.group_intrinsic("armv8-on-x86")

    @numba.njit
    def fill(out, signs, keys, scale, groups):
        for g in range(groups):
            group(out, signs, keys, np.uint64(g * aes.GROUP), np.float32(scale))

    n = 3 * 4 * aes.GROUP
    signs = torch.randn(n)
    out = torch.full((n,), float("nan"))
    fill(out.numpy(), signs.numpy(), aes.round_keys(2**90 + 3), aes.magnitude_scale(1.0), 3)
    assert out.abs().double().tolist() == reference_stream(n, 2**90 + 3)
    assert torch.equal(torch.signbit(out), torch.signbit(signs))


@pytest.mark.parametrize("hardware", sorted({False, aes.HARDWARE}))
@pytest.mark.parametrize("n", [0, 5, 63, 64, 100, 1027])
def test_the_parts_of_a_fill_write_each_entry_exactly_once_for_any_number_of_parts(hardware, n):
    # How the OpenMP team shares a draw, without the team: 1, 2, 3, 7 or 64 parts (more parts than
    # groups or blocks), each into an output of its own; n = 63 leaves eight blocks after the last group.
    signs = torch.randn(n)
    keys, scale = aes.round_keys(99), aes.magnitude_scale(1.0)
    expected = reference_stream(n, 99)
    for parts in (1, 2, 3, 7, 64):
        written = torch.zeros(n, dtype=torch.long)
        out = torch.full((n,), float("nan"))
        for part in range(parts):
            alone = torch.full((n,), float("nan"))
            aes.fill_range(alone.numpy(), signs.numpy(), keys, scale, hardware, part, parts)
            mine = ~alone.isnan()
            written += mine
            out[mine] = alone[mine]
        assert torch.equal(written, torch.ones(n, dtype=torch.long)), parts  # every entry, by one part
        assert out.abs().double().tolist() == expected, parts
        assert torch.equal(torch.signbit(out), torch.signbit(signs))


@pytest.fixture
def threads():
    """Set torch's thread count for a test (xdist's workers run on one: tests/conftest.py)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif(openmp._runtime() is None, reason="PyTorch's OpenMP runtime (libgomp) is not loaded")
def test_large_draws_are_shared_over_pytorchs_openmp_team_and_give_the_same_stream(threads, monkeypatch):
    # Filled from NaN, so that a share no thread wrote shows; the team's stream must be the calling
    # thread's bit for bit, and the Python reference's.
    threads(2)
    shared = []
    run = openmp.run
    monkeypatch.setattr(openmp, "run", lambda *args: (shared.append(True), run(*args)))
    key = 0x9E3779B97F4A7C15

    def alone(n: int, signs: torch.Tensor, bound: float) -> torch.Tensor:
        out = torch.empty(n)
        keys, scale = aes.round_keys(key), aes.magnitude_scale(bound)
        aes.fill_range(out.numpy(), signs.numpy(), keys, scale, aes.HARDWARE, 0, 1)  # calling thread
        return out

    for n in (aes.PARALLEL_FROM - 1, aes.PARALLEL_FROM, aes.PARALLEL_FROM + 3, 5 * aes.PARALLEL_FROM + 2):
        shared.clear()
        signs = torch.randn(n)
        out = drawn(torch.full((n,), float("nan")), signs, 0.7, key)
        assert torch.equal(out, alone(n, signs, 0.7)), n
        assert shared == ([True] if n >= aes.PARALLEL_FROM else []), n
    shared.clear()
    n = aes.PARALLEL_FROM + 3
    out = drawn(torch.empty(n), torch.ones(n), 1.0, key)
    assert out.double().tolist() == reference_stream(n, key)
    # Three threads (shares that do not divide the groups evenly), and a team whose first thread is
    # not Python's main thread.
    threads(3)
    n = 3 * aes.PARALLEL_FROM + 7 * 32 + 7
    signs = torch.randn(n)
    expected = alone(n, signs, 0.7)
    assert torch.equal(drawn(torch.full((n,), float("nan")), signs, 0.7, key), expected)
    elsewhere = torch.full((n,), float("nan"))
    thread = threading.Thread(target=drawn, args=(elsewhere, signs, 0.7, key))
    thread.start()
    thread.join()
    assert torch.equal(elsewhere, expected)
    assert shared == [True] * 3  # the reference's draw above, and these two
    shared.clear()
    threads(1)  # a team of one: the calling thread draws
    drawn(torch.empty(n), torch.ones(n), 1.0, key)
    assert shared == [] and not openmp.available()


def test_only_cpu_tensors_are_filled():
    meta = torch.empty(aes.PARALLEL_FROM, device="meta")
    with pytest.raises(ValueError, match="fills CPU tensors, not meta"):
        aes.signed_uniform_(meta, torch.ones(aes.PARALLEL_FROM), 1.0, 0)
