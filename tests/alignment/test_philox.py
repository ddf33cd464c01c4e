"""brsf's CPU generator: Philox4x32-10 against Random123's known answers, and the stream's layout."""

import math
import threading

import pytest
import torch

from fa_cli.alignment import openmp, philox

MASK = 2**32 - 1
# Random123's kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output (4 words).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK, MASK, MASK, MASK), (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def reference_block(counter: tuple[int, ...], key: tuple[int, ...]) -> list[int]:
    """Philox4x32-10 in plain Python integers, written from Salmon et al. (2011)."""
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK]
        k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
    return c


def reference_stream(n: int, key: tuple[int, int]) -> list[float]:
    """The n magnitudes (bound 1) of the module's layout: word q of block i at q * (n // 4) + i."""
    m = n // 4
    values = [0.0] * n
    for i in range(m):
        for q, word in enumerate(reference_block((i, 0, 0, 0), key)):
            values[q * m + i] = (word >> 8) / 2**24
    for j, word in enumerate(reference_block((m, 0, 0, 0), key)[: n - 4 * m]):
        values[4 * m + j] = (word >> 8) / 2**24
    return values


def drawn(out: torch.Tensor, signs: torch.Tensor, bound: float = 0.5, key=(1, 2)) -> torch.Tensor:
    philox.signed_uniform_(out, signs, bound, key)
    return out


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox_gives_random123s_known_answers(counter, key, expected):
    assert reference_block(counter, key) == list(expected)
    assert [int(word) for word in philox.philox4x32(*counter, *key)] == list(expected)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 7, 1027])
@pytest.mark.parametrize("key", [(0, 0), (MASK, MASK), (0x12345678, 0x9ABCDEF0)])
def test_signed_uniform_is_the_stream_of_its_key_with_the_signs_given(n, key):
    signs = torch.randn(n)
    signs[::3] *= -1
    out = drawn(torch.full((n,), float("nan")), signs, 1.0, key)
    assert out.abs().double().tolist() == reference_stream(n, key)
    assert torch.equal(torch.signbit(out), torch.signbit(signs))


def test_signed_uniform_scales_and_keeps_the_sign_bit_of_zeros():
    signs = torch.tensor([0.0, -0.0, 2.0, -3.0, 0.0, -0.0, 1.0])
    out = drawn(torch.empty(7), signs, 0.25, (7, 9))
    assert torch.equal(torch.signbit(out), torch.signbit(signs))
    expected = torch.tensor(reference_stream(7, (7, 9)), dtype=torch.float32) * 0.25
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


def test_signs_of_another_size_are_refused():
    with pytest.raises(ValueError, match=r"signs of shape \(5,\) for an output of shape \(2, 3\)"):
        philox.signed_uniform_(torch.empty(2, 3), torch.ones(5), 1.0, (0, 0))


def test_keys_come_from_torchs_generator():
    torch.manual_seed(3)
    first = philox.draw_key()
    torch.manual_seed(3)
    assert philox.draw_key() == first
    assert philox.draw_key() != first
    assert all(0 <= word <= MASK for word in first)
    seeded = [philox.draw_key(torch.Generator().manual_seed(5)) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_a_million_draws_look_uniform_and_independent():
    values = drawn(torch.empty(1_000_000), torch.ones(1_000_000), 1.0, (2024, 11)).double()
    assert values.min() >= 0 and values.max() < 1
    assert abs(values.mean().item() - 0.5) < 0.002  # 5 standard errors of the mean (0.00029)
    assert abs(values.var().item() - 1 / 12) < 0.001
    # 256 equal bins: chi-square with 255 degrees of freedom, below its 0.9999 quantile (about 350)
    counts = torch.histc(values, bins=256, min=0.0, max=1.0)
    expected = values.numel() / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 350
    # neighbours in memory (different words of one block, or consecutive blocks) are uncorrelated
    for lag in (1, 250_000):
        a, b = values[:-lag] - 0.5, values[lag:] - 0.5
        correlation = (a * b).mean() / (a.std() * b.std())
        assert abs(correlation.item()) < 5 / math.sqrt(values.numel())


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
    key = (0x9E3779B9, 12345)
    for n in (
        philox.PARALLEL_FROM - 1,
        philox.PARALLEL_FROM,
        philox.PARALLEL_FROM + 3,
        5 * philox.PARALLEL_FROM + 2,
    ):
        shared.clear()
        signs = torch.randn(n)
        out = drawn(torch.full((n,), float("nan")), signs, 0.7, key)
        alone = torch.empty(n)
        philox._fill_signed(alone.numpy(), signs.numpy(), *key, 0.7)
        assert torch.equal(out, alone), n
        assert shared == ([True] if n >= philox.PARALLEL_FROM else []), n
    shared.clear()
    n = philox.PARALLEL_FROM + 3
    out = drawn(torch.empty(n), torch.ones(n), 1.0, key)
    assert out.double().tolist() == reference_stream(n, key)
    # Three threads (shares that do not divide the blocks evenly), and a team whose first thread is
    # not Python's main thread.
    threads(3)
    n = 3 * philox.PARALLEL_FROM + 7
    signs = torch.randn(n)
    alone = torch.empty(n)
    philox._fill_signed(alone.numpy(), signs.numpy(), *key, 0.7)
    assert torch.equal(drawn(torch.full((n,), float("nan")), signs, 0.7, key), alone)
    elsewhere = torch.full((n,), float("nan"))
    thread = threading.Thread(target=drawn, args=(elsewhere, signs, 0.7, key))
    thread.start()
    thread.join()
    assert torch.equal(elsewhere, alone)
    assert shared == [True] * 3  # the reference's draw above, and these two
    shared.clear()
    threads(1)  # a team of one: the calling thread draws
    drawn(torch.empty(n), torch.ones(n), 1.0, key)
    assert shared == [] and not openmp.available()


def test_only_cpu_tensors_are_filled():
    meta = torch.empty(philox.PARALLEL_FROM, device="meta")
    with pytest.raises(ValueError, match="fills CPU tensors, not meta"):
        philox.signed_uniform_(meta, torch.ones(philox.PARALLEL_FROM), 1.0, (0, 0))
