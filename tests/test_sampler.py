"""Tests for dpfl._sampler: the Box–Muller transform's attainable range, its tail, the keystream
layout against an independent AES reference, thread-count independence, and the device path.

Statistical checks state their false-alarm rate; each is at most ALPHA = 1e-6 on correct code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats as sps

from dpfl import _sampler as sampler
from dpfl._sampler import LOW63, MAX_ABS_NORMAL, PIECE, U1_MIN, add_gaussian_, box_muller_

ALPHA = 1e-6
KEY = bytes(range(32))
# float32 output uses int32 angle words, float64 output int64 angle words.
ANGLE_DTYPE = {torch.float32: torch.int32, torch.float64: torch.int64}


def transform(radius_words, angle_words, dtype, fine_words=None):
    r = torch.as_tensor(radius_words, dtype=torch.int64).clone()
    a = torch.as_tensor(angle_words, dtype=ANGLE_DTYPE[dtype])
    f = torch.zeros_like(r) if fine_words is None else torch.as_tensor(fine_words).clone()
    p = r.numel()
    out = torch.empty(2 * p, dtype=dtype)
    box_muller_(r, f, a, out, torch.empty(p, dtype=dtype), torch.empty(p, dtype=dtype))
    return out


def extreme_words(bits: int) -> list[int]:
    """All-zero/all-one patterns, the sign boundaries, powers of two and their neighbours."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    words = {0, -1, 1, lo, hi, lo + 1, hi - 1}
    for k in range(bits - 1):
        words |= {2**k, -(2**k), 2**k + 1, -(2**k) - 1, 2**k - 1, -(2**k) + 1}
    return sorted(w for w in words if lo <= w <= hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_bound_holds_for_every_extreme_bit_pattern(dtype):
    """Every pair of extreme radius and fine words (and extreme angles) gives a finite draw
    within sqrt(252 ln 2) = 13.216 (u1 >= 2^-126), the bound the accountants charge for; the
    bound is attained at b1 = b3 = 0 (and at their sign-bit twins)."""
    from dpfl.accounting import NOISE_CEILING

    assert MAX_ABS_NORMAL == math.sqrt(-2 * math.log(U1_MIN)) == pytest.approx(13.2164, abs=1e-4)
    assert MAX_ABS_NORMAL == NOISE_CEILING  # one number for the sampler and the accountants
    assert MAX_ABS_NORMAL > 12 > math.sqrt(128 * math.log(2)) > math.sqrt(48 * math.log(2))
    words = extreme_words(64)
    angles = extreme_words(32 if dtype == torch.float32 else 64)
    r = torch.tensor(words).repeat_interleave(len(words))
    f = torch.tensor(words).repeat(len(words))
    a = torch.tensor(angles).repeat(-(-r.numel() // len(angles)))[: r.numel()]
    pad = (-r.numel()) % 4
    r, f, a = torch.cat([r, r[:pad]]), torch.cat([f, f[:pad]]), torch.cat([a, a[:pad]])
    eps = torch.finfo(dtype).eps
    for angle in (a, torch.zeros_like(a)):
        out = transform(r, angle, dtype, f)
        assert torch.isfinite(out).all()
        assert out.abs().max().item() <= MAX_ABS_NORMAL * (1 + 4 * eps)
    for b1, b3 in ((0, 0), (-(2**63), 0), (0, -(2**63)), (-(2**63), -(2**63))):
        top = transform([b1] * 4, [0] * 4, dtype, [b3] * 4)  # u1 = 2^-126, θ = 0
        assert top[0].item() == pytest.approx(MAX_ABS_NORMAL, rel=4 * eps)
        assert top[4].item() == 0.0  # sin 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radius_falls_monotonically_from_the_smallest_words(dtype):
    """r is non-increasing in u1 = 2^-126 (2^63 k + j + 1) (k, j: the words' low 63 bits), so
    the bound above is the supremum over all 2^192 radius and fine words."""
    small = list(range(0, 4096))
    powers = sorted({2**e + d for e in range(12, 63) for d in (-1, 0, 1)} | {2**63 - 1})
    ks = [0] * len(small + powers) + small[1:] + powers  # k = 0 with growing j, then growing k
    js = small + powers + [2**62] * (len(small) - 1 + len(powers))
    pad = (-len(ks)) % 4
    ks, js = ks + [2**63 - 1] * pad, js + [2**63 - 1] * pad
    n = len(ks)
    r = transform(ks, [0] * n, dtype, js)[:n]
    assert (r[1:] <= r[:-1]).all()
    # A set sign bit changes nothing: b and b | 2^63 give the same draw.
    flipped = transform([k - 2**63 for k in ks], [0] * n, dtype, [j - 2**63 for j in js])[:n]
    assert torch.equal(flipped, r)
    assert r[-1].item() == pytest.approx(0.0, abs=1e-3)  # u1 -> 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k_max", "j_max"), [(2**16, None), (0, None), (0, 2**20)])
def test_tail_beyond_the_old_ceiling_is_gaussian(dtype, k_max, j_max):
    """Radius words with k <= k_max and fine words with j <= j_max (all 63 bits: None) give
    u1 uniform below u0 = 2^-126 (2^63 k_max + j_max + 1) and r² - r0² ~ χ²(2), r0² = -2 ln u0:
    the radius is Rayleigh in its tail from 8.07σ (k_max = 2^16), beyond the old 9.42σ ceiling
    (k = 0, where 64-bit words had a single value) and from 12.1σ (j < 2^20) to the new one.

    Feeding the transform the rare words directly samples the tail that a truncated sampler
    would not have. Kolmogorov–Smirnov test, false-alarm rate ALPHA.
    """
    n = 100_000
    gen = torch.Generator().manual_seed(5 + k_max + (j_max or 0))
    k = torch.randint(0, k_max + 1, (n,), generator=gen)
    if j_max is None:
        j = torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen)  # sign bit: ignored
        u0 = (k_max + 1) * 2.0**-63
    else:
        j = torch.randint(0, j_max + 1, (n,), generator=gen)
        u0 = (2**63 * k_max + j_max + 1) * 2.0**-126
    r = transform(k, torch.zeros(n, dtype=torch.int64), dtype, j)[:n].double()
    r0_sq = -2 * math.log(u0)
    excess = (r**2 - r0_sq).numpy()
    assert excess.min() > -1e-3 * r0_sq  # nothing below the conditioning threshold
    assert sps.kstest(excess, sps.chi2(2).cdf).pvalue > ALPHA
    assert r.max().item() <= MAX_ABS_NORMAL * (1 + 1e-6)
    if k_max == 0:  # beyond anything 64-bit radius words can give
        assert r.min().item() > math.sqrt(126 * math.log(2)) and r.max().item() > 9.9
    if j_max is not None:
        assert r.min().item() > 12.1 and r.max().item() > 13.0


def reference_words(key: bytes, release: int, offset: int, count: int) -> np.ndarray:
    """``count`` int64 words of the AES-256 keystream from word ``offset``, via ECB of counters."""
    first, last = offset // 2, (offset + count + 1) // 2
    blocks = b"".join(release.to_bytes(8, "big") + i.to_bytes(8, "big") for i in range(first, last))
    stream = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(blocks)
    words = np.frombuffer(stream, dtype="<i8")
    return words[offset - 2 * first :][:count]


def reference_normals(words: np.ndarray, pairs: int, float64: bool) -> np.ndarray:
    """Box–Muller in float64 from the documented word layout (radius words, fine words, then
    angles): u1 = 2^-126 + 2^-63 (k + 2^-63 j) with k, j the words' low 63 bits, evaluated with
    the roundings of the output dtype (k and j read as floats, each sum rounded once)."""
    ftype = np.float64 if float64 else np.float32
    k = (words[:pairs] & LOW63).astype(ftype)
    j = (words[pairs : 2 * pairs] & LOW63).astype(ftype)
    raw = words[2 * pairs :].tobytes()
    angles = np.frombuffer(raw, dtype="<i8" if float64 else "<i4")[:pairs]
    x = k + j * ftype(2.0**-63)
    u1 = ftype(2.0**-126) + x * ftype(2.0**-63)
    log_u1 = np.log(u1.astype(np.float64))
    theta = angles.astype(np.float64) * 2 * math.pi * 2.0 ** (-64 if float64 else -32)
    r = np.sqrt(-2 * log_u1)
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])


def reference_noise(sizes, dtypes, release, secure):
    """Expected noise (scale 1) of tensors of ``sizes`` from the documented stream layout."""
    out, offset = [], 0
    for size, dtype in zip(sizes, dtypes, strict=True):
        f64 = dtype == torch.float64
        step = PIECE // (4 if secure else 1)
        pieces = []
        for start in range(0, size, step):
            count = min(step, size - start)
            if secure:
                m = count + (count & 1)
                pairs = 2 * m
            else:
                pairs = -(-count // 8) * 4
            nwords = 3 * pairs if f64 else 2 * pairs + pairs // 2
            z = reference_normals(reference_words(KEY, release, offset, nwords), pairs, f64)
            offset += nwords
            if secure:
                rows = z.reshape(4, m)
                z = (rows[0] + rows[1] + np.roll(rows[2] + rows[3], -1)) / 2
            pieces.append(z[:count])
        out.append(np.concatenate(pieces) if pieces else np.zeros(0))
    return out


@pytest.mark.parametrize("secure", [False, True])
def test_noise_is_box_muller_on_the_documented_aes_keystream(secure):
    """Every coordinate equals the float64 reference built from an independent AES-ECB."""
    sizes = [PIECE + 5, 3, 1, 2 * PIECE, 0, 17]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float32]
    dtypes.append(torch.float16)
    flats = [torch.zeros(s, dtype=d) for s, d in zip(sizes, dtypes, strict=True)]
    add_gaussian_(flats, key=KEY, release=7, scale=1.0, secure=secure, workers=2)
    expected = reference_noise(sizes, dtypes, 7, secure)
    for flat, exp in zip(flats, expected, strict=True):
        tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3}[flat.dtype]
        np.testing.assert_allclose(flat.double().numpy(), exp, rtol=tol, atol=tol)


def flats_for(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3 * PIECE + 11,), (7,), (PIECE // 2 + 1,), (1,), (5 * PIECE,)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16]
    return [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]


@pytest.mark.parametrize(("secure", "stream"), [(False, None), (False, "torch"), (True, None)])
def test_same_key_same_noise_for_any_thread_count(secure, stream):
    results = []
    for workers in (1, 2, 3):
        flats = flats_for(0)
        add_gaussian_(
            flats, key=KEY, release=3, scale=0.5, secure=secure, workers=workers, stream=stream
        )
        results.append(flats)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    fresh = flats_for(0)
    assert all(not torch.equal(a, b) for a, b in zip(results[0], fresh, strict=True))


def test_releases_and_keys_give_independent_noise():
    """Lag correlations between releases/keys are ~N(0, 1/n); two-sided test at ALPHA."""
    n = 4 * PIECE
    draws = []
    for key, release in ((KEY, 0), (KEY, 1), (bytes(32), 0)):
        x = torch.zeros(n)
        add_gaussian_([x], key=key, release=release, scale=1.0, secure=False)
        draws.append(x.double())
    for i in range(3):
        for j in range(i):
            r = float(torch.corrcoef(torch.stack([draws[i], draws[j]]))[0, 1])
            assert abs(r) * math.sqrt(n) < sps.norm.ppf(1 - ALPHA / 2)


def test_torch_stream_is_a_device_generator_path():
    """The device path (a torch.Generator on the tensor's device), run on the CPU device."""
    n = 200_000
    a, b = torch.zeros(n), torch.zeros(n)
    add_gaussian_([a], key=KEY, release=0, scale=1.0, secure=False, stream="torch")
    add_gaussian_([b], key=KEY, release=0, scale=1.0, secure=False)
    assert not torch.equal(a, b)  # another bit source
    assert_standard_normal_tails(a)
    with pytest.raises(ValueError, match="secure"):
        add_gaussian_([a], key=KEY, release=0, scale=1.0, secure=True, stream="torch")


def assert_standard_normal_tails(z: torch.Tensor, thresholds=(1.0, 2.0, 3.0, 4.0)) -> None:
    """Mean, variance, and P(|Z| > t) per threshold of a N(0, 1) sample; each two-sided at ALPHA.

    Sums run in float64 over chunks (the slow test holds 2^27 draws).
    """
    n = z.numel()
    chunks = [c.double() for c in z.flatten().split(1 << 22)]
    total = sum(float(c.sum()) for c in chunks)
    mean = total / n
    var = sum(float(((c - mean) ** 2).sum()) for c in chunks) / (n - 1)
    crit = sps.norm.ppf(1 - ALPHA / 2)
    assert abs(mean) * math.sqrt(n) < crit
    chi2 = (n - 1) * var
    assert sps.chi2.ppf(ALPHA / 2, n - 1) < chi2 < sps.chi2.ppf(1 - ALPHA / 2, n - 1)
    for t in thresholds:
        k = sum(int((c.abs() > t).sum()) for c in chunks)
        p = 2 * sps.norm.sf(t)
        assert sps.binomtest(k, n, p).pvalue > ALPHA, (t, k, n * p)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_tail_frequencies(secure, dtype):
    z = torch.zeros(1 << 20, dtype=dtype)
    add_gaussian_([z], key=KEY, release=11, scale=1.0, secure=secure, workers=2)
    assert_standard_normal_tails(z)


@pytest.mark.slow
def test_sampler_far_tail_frequencies_slow():
    """2^27 plain float32 draws: P(|Z| > t) up to 5.5σ (expected count ~5 there)."""
    z = torch.zeros(1 << 27)
    add_gaussian_([z], key=KEY, release=12, scale=1.0, secure=False, workers=2)
    assert_standard_normal_tails(z, thresholds=(3.0, 4.0, 4.5, 5.0, 5.5))
    assert z.abs().max().item() <= MAX_ABS_NORMAL * (1 + 1e-6)


def test_pieces_stay_below_the_intra_op_grain():
    """Each op on a CPU piece touches <= 32768 elements, so it runs inline in its thread."""
    assert PIECE <= 32768
    assert 2 * sampler._pairs(PIECE, False) <= 32768
    assert 2 * sampler._pairs(PIECE // sampler.SECURE_DRAWS, True) <= 32768


_FORK_SCRIPT = """
import multiprocessing, sys, torch
torch.set_num_threads(1)  # libgomp is not fork-safe: the parent must not have used OpenMP threads
from dpfl._sampler import PIECE, add_gaussian_
KEY = bytes(range(32))
add_gaussian_([torch.zeros(3 * PIECE)], key=KEY, release=0, scale=1.0, secure=False, workers=2)

def child(queue):
    x = torch.zeros(3 * PIECE)
    add_gaussian_([x], key=KEY, release=0, scale=1.0, secure=False, workers=2)
    queue.put(float(x.std()))

ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
proc = ctx.Process(target=child, args=(queue,))
proc.start()
proc.join(120)
if proc.is_alive():
    proc.kill()
    sys.exit("the forked child hung")
assert proc.exitcode == 0, proc.exitcode
std = queue.get(timeout=10)
assert 0.9 < std < 1.1, std
print("ok")
"""


def test_thread_pool_works_in_a_forked_child():
    """A child forked after the noise pool exists gets fresh workers instead of waiting forever.

    Run in a fresh interpreter: whether a forked child can use torch at all depends on what the
    parent did before (a parent that ran OpenMP-parallel ops leaves libgomp unusable in the
    child, whatever dpfl does), so the parent's state must be controlled.
    """
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT],
        env={**__import__("os").environ, "PYTHONPATH": src},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
