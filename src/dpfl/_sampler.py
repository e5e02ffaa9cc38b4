"""Gaussian noise sampler behind [`dpfl.noise.GaussianMechanism`][dpfl.noise.GaussianMechanism].

Three stages, each small enough to check on its own:

1. **Bits.** Uniformly random words addressed by ``(key, release, word offset)``: on the CPU
   (and, in secure mode, for every device) the AES-256 keystream in counter mode, whose 16-byte
   counter block is the release index followed by the index of the block within the release
   (both 8 bytes, big-endian; a block is two 64-bit words); on other devices a
   ``torch.Generator`` of the device, seeded per piece with a keyed BLAKE2b hash of
   ``(release, offset)``.
2. **Transform.** ``box_muller_`` turns ``p`` radius words ``b1`` (int64), ``p`` fine
   words ``b3`` (int64) and ``p`` angle words ``b2`` (int32 for float32 output, int64 for
   float64) into ``2p`` standard normals. With ``k`` and ``j`` the low 63 bits of ``b1`` and
   ``b3`` (each uniform on ``[0, 2^63)``),
   ``u1 = 2^-63 k + 2^-126 (j + 1) = 2^-126 (2^63 k + j + 1)``: the uniform on ``(0, 1]``
   rounded *up* to the grid ``2^-126`` (exactly, before floating-point rounding), so
   ``P(u1 <= t) = t`` at every grid point. ``θ = 2π · b2 / 2^w``, ``r = sqrt(-2 ln u1)``, and
   the outputs are ``r cos θ`` and ``r sin θ``. ``k`` and ``j`` are read as floats (24 or 53
   significant bits over their whole range, so small values are exact): ``u1`` keeps a relative
   precision of ``2^-24`` (float32) down to ``2^-126``, so the radius follows the Rayleigh tail
   ``P(r > s) = exp(-s²/2)`` at that resolution up to the largest attainable ``|draw|``,
   ``sqrt(252 ln 2) ≈ 13.216`` (``MAX_ABS_NORMAL``, at ``u1 = 2^-126``, the smallest normal
   float32), against ``sqrt(128 ln 2) ≈ 9.419`` for one 64-bit word per radius and
   ``sqrt(48 ln 2) ≈ 5.77`` for 24-bit uniforms (torch's float32 ``normal_``). The transform
   runs in float64 for float64 targets and in float32 otherwise; its constants and every
   nonzero intermediate are normal floats, so flush-to-zero modes change nothing.
3. **Add.** Each tensor is cut into fixed pieces (``PIECE`` elements on the CPU); a piece's
   words sit at a fixed offset of the release's stream, so the noise does not depend on how
   pieces are shared among threads. ``target += scale · normals`` from reused per-thread
   scratch buffers: no allocation per tensor or per piece.

Secure mode sums [`SECURE_DRAWS`][dpfl.noise.SECURE_DRAWS] (4) normals from four different
Box–Muller pairs per coordinate and halves the sum (Holohan & Braghin, arXiv 2107.10138).

References: Box & Muller, Ann. Math. Statist. 29 (1958) 610; Holohan & Braghin,
arXiv 2107.10138; NIST SP 800-38A (counter mode).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor

__all__ = [
    "MAX_ABS_NORMAL",
    "PIECE",
    "SECURE_DRAWS",
    "add_gaussian_",
    "box_muller_",
    "max_abs_draw",
]

#: Smallest radius uniform of ``box_muller_`` (the smallest normal float32).
U1_MIN = 2.0**-126
#: The low 63 bits of a word: ``b & LOW63`` is uniform on ``[0, 2^63)`` for a uniform ``b``.
LOW63 = 2**63 - 1
#: Largest attainable ``|draw|`` of ``box_muller_``: ``sqrt(-2 ln 2^-126) = sqrt(252 ln 2)``.
#: ``NOISE_CEILING`` is the same number (the accountants add its δ).
MAX_ABS_NORMAL = math.sqrt(-2.0 * math.log(U1_MIN))
#: Normals summed per coordinate in secure mode (each from its own Box–Muller pair).
SECURE_DRAWS = 4
#: Elements per piece on the CPU (secure: ``PIECE / SECURE_DRAWS`` coordinates). Every op on a
#: piece touches at most 32768 elements, torch's intra-op grain size, so it runs inline in its
#: worker thread, and a piece's scratch (~0.4 MB) stays in the L2 cache.
PIECE = 32768
#: Elements per piece on other devices (fewer, larger kernels).
DEVICE_PIECE = 1 << 22

_CONST: dict[str, Tensor] = {
    name: torch.tensor(value, dtype=torch.float64)
    for name, value in {
        "2^-126": 2.0**-126,
        "-2": -2.0,
        "2pi/2^32": 2.0 * math.pi * 2.0**-32,
        "2pi/2^64": 2.0 * math.pi * 2.0**-64,
    }.items()
}


def max_abs_draw(secure: bool) -> float:
    """Largest attainable ``|noise| / std``: [`MAX_ABS_NORMAL`][dpfl.noise.MAX_ABS_NORMAL] (secure:
    the sum of four
    such draws, halved, i.e. twice as much)."""
    return MAX_ABS_NORMAL * (math.sqrt(SECURE_DRAWS) if secure else 1.0)


def box_muller_(
    radius_bits: Tensor,
    fine_bits: Tensor,
    angle_bits: Tensor,
    out: Tensor,
    radius: Tensor,
    angle: Tensor,
) -> Tensor:
    """Write ``2p`` standard normals computed from ``p`` triples of words into ``out``.

    Args:
        radius_bits: ``p`` uniformly random int64 words (``b1``); their sign bits are cleared
            in place.
        fine_bits: ``p`` uniformly random int64 words (``b3``), the radius uniform's low bits;
            their sign bits are cleared in place.
        angle_bits: ``p`` uniformly random int32 or int64 words (``b2``; int32 suffices for
            float32 output).
        out: ``2p`` floats (float32 or float64): ``out[i] = r_i cos θ_i`` and
            ``out[p + i] = r_i sin θ_i``.
        radius, angle: scratch tensors of ``p`` elements of ``out``'s dtype.

    ``u1 = 2^-63 k + 2^-126 (j + 1)`` (``k``, ``j``: the low 63 bits of ``b1``, ``b3``) lies in
    ``[2^-126, 1]`` and is the uniform rounded up to the grid ``2^-126``, so
    ``r = sqrt(-2 ln u1)`` lies in ``[0, sqrt(252 ln 2)]``: no bit pattern gives ``inf`` or
    ``NaN``, and ``|out| <= MAX_ABS_NORMAL`` up to one rounding.

    Returns:
        ``out``.
    """
    p = radius_bits.numel()
    radius_bits.bitwise_and_(LOW63)
    fine_bits.bitwise_and_(LOW63)
    _box_muller(
        radius_bits, fine_bits, angle_bits, out[:p], out[p:], out.view(2, p), radius, angle
    )
    return out


def _box_muller(
    radius_bits: Tensor,
    fine_bits: Tensor,
    angle_bits: Tensor,
    cos: Tensor,
    sin: Tensor,
    rows: Tensor,
    radius: Tensor,
    angle: Tensor,
) -> None:
    """``box_muller_`` on words whose sign bits are already cleared, and views made once:
    ``cos``/``sin`` are ``out[:p]``/``out[p:]``, ``rows`` is ``out.view(2, p)`` (a view costs
    about as much as a small op)."""
    unit = _CONST["2pi/2^32"] if angle_bits.dtype == torch.int32 else _CONST["2pi/2^64"]
    radius.copy_(radius_bits)  # k
    angle.copy_(fine_bits)  # j: the angle scratch holds it until the angle is computed
    radius.add_(angle, alpha=2.0**-63)  # k + 2^-63 j
    torch.add(_CONST["2^-126"], radius, alpha=2.0**-63, out=radius)  # u1 = 2^-126 (2^63 k + j + 1)
    radius.log_().mul_(_CONST["-2"]).sqrt_()
    angle.copy_(angle_bits).mul_(unit)
    torch.cos(angle, out=cos)
    torch.sin(angle, out=sin)
    rows.mul_(radius)


# ------------------------------------------------------------------------------------- layout
def _pairs(count: int, secure: bool) -> int:
    """Box–Muller pairs drawn for ``count`` elements (a multiple of 4, so words fill blocks)."""
    if secure:  # an even number >= 2 of coordinates, SECURE_DRAWS normals each
        return SECURE_DRAWS * (count + (count & 1)) // 2
    return -(-count // 8) * 4


def _words(pairs: int, dtype: torch.dtype) -> int:
    """64-bit words drawn for ``pairs`` pairs: int64 radius and fine words, then int32 (float32)
    or int64 angles."""
    return pairs * 3 if dtype == torch.float64 else 2 * pairs + pairs // 2


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Piece:
    flat: Tensor  # 1-D contiguous view of the target
    start: int  # first element of the piece
    count: int  # elements of the piece
    pairs: int  # Box-Muller pairs drawn
    words: int  # 64-bit words drawn
    offset: int  # word offset of the piece in the release's stream


def _pieces(flats: Sequence[Tensor], secure: bool) -> list[_Piece]:
    pieces, offset = [], 0
    for flat in flats:
        size = PIECE if flat.device.type == "cpu" else DEVICE_PIECE
        size //= SECURE_DRAWS if secure else 1
        dtype = _math_dtype(flat.dtype)
        for start in range(0, flat.numel(), size):
            count = min(size, flat.numel() - start)
            pairs = _pairs(count, secure)
            words = _words(pairs, dtype)
            pieces.append(_Piece(flat, start, count, pairs, words, offset))
            offset += words
    return pieces


def _split(pieces: list[_Piece], parts: int) -> Iterator[list[_Piece]]:
    """Runs of consecutive pieces (one device, contiguous in the stream) of similar size."""
    target = max(1, -(-sum(p.words for p in pieces) // parts))
    run: list[_Piece] = []
    size = 0
    for piece in pieces:
        if run and (
            size >= target
            or run[-1].offset + run[-1].words != piece.offset
            or piece.flat.device != run[0].flat.device
        ):
            yield run
            run, size = [], 0
        run.append(piece)
        size += piece.words
    if run:
        yield run


# ------------------------------------------------------------------------------------ scratch
class _Work:
    """Views of one thread's scratch for pieces of ``pairs`` pairs in one dtype and device."""

    def __init__(self, raw: bytearray, pairs: int, dtype: torch.dtype, device: torch.device):
        angle_dtype = torch.int64 if dtype == torch.float64 else torch.int32
        # Radius words, then fine words: one view to clear both sign bits with one op.
        self.radial_words = torch.frombuffer(raw, dtype=torch.int64, count=2 * pairs)
        self.radius_words, self.fine_words = self.radial_words[:pairs], self.radial_words[pairs:]
        self.angle_words = torch.frombuffer(
            raw, dtype=angle_dtype, count=pairs, offset=16 * pairs
        )
        if device.type != "cpu":  # words are copied here when they come from the host
            self.device_words = torch.empty(_words(pairs, dtype), dtype=torch.int64, device=device)
            self.device_radial_words = self.device_words[: 2 * pairs]
            self.device_radius_words = self.device_words[:pairs]
            self.device_fine_words = self.device_words[pairs : 2 * pairs]
            self.device_angle_words = self.device_words[2 * pairs :].view(angle_dtype)[:pairs]
        # 2p normals (cosines, then sines) and one slot after them for the secure wrap-around.
        self.buffer = torch.empty(2 * pairs + 1, dtype=dtype, device=device)
        self.out = self.buffer[: 2 * pairs]
        self.cos, self.sin = self.out[:pairs], self.out[pairs:]
        self.rows = self.out.view(2, pairs)
        self.radius = torch.empty(pairs, dtype=dtype, device=device)
        self.angle = torch.empty(pairs, dtype=dtype, device=device)
        # Secure mode (pairs = 2m): normal j of the cosines gains sine j + 1 (the sine of pair 0
        # copied after the last one), then coordinate c sums the results c and m + c.
        m = pairs // 2
        self.wrap_to, self.wrap_from = self.buffer[2 * pairs :], self.buffer[pairs : pairs + 1]
        self.cosines, self.next_sines = self.buffer[:pairs], self.buffer[pairs + 1 :]
        self.half, self.other_half = self.buffer[:m], self.buffer[m:pairs]


class _Scratch:
    """One thread's reusable buffers: raw bytes for the keystream and per-shape views."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.zeros = memoryview(b"")
        self._works: dict[tuple[int, torch.dtype, torch.device], _Work] = {}

    def work(self, pairs: int, dtype: torch.dtype, device: torch.device) -> _Work:
        nbytes = 8 * _words(pairs, dtype)
        if len(self.zeros) < nbytes:  # grow: earlier views point into the old buffer
            self.raw = bytearray(nbytes + 16)  # CTR's update_into wants block_size - 1 spare
            self.zeros = memoryview(bytes(nbytes))
            self._works.clear()
        key = (pairs, dtype, device)
        work = self._works.get(key)
        if work is None:
            if len(self._works) >= 64:
                self._works.clear()
            work = self._works[key] = _Work(self.raw, pairs, dtype, device)
        return work


_LOCAL = threading.local()


def _scratch() -> _Scratch:
    scratch = getattr(_LOCAL, "scratch", None)
    if scratch is None:
        scratch = _LOCAL.scratch = _Scratch()
    return scratch


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's worker threads (and maybe a held lock)."""
    global _POOLS_LOCK, _THREAD_INIT_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _THREAD_INIT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


_THREAD_INIT_LOCK = threading.Lock()


def _init_worker() -> None:
    """Let torch set up this thread's intra-op state, one worker at a time.

    The first torch op of a new thread calls ``at::set_num_threads``, which fetches torch's
    internal pthreadpool. In a forked child the first such fetch replaces the pool leaked by
    the fork without a lock, so two workers doing it at once can see no pool at all ("Invalid
    thread pool!"). The main thread makes the first fetch in ``_pool``; the lock serialises
    the rest.
    """
    with _THREAD_INIT_LOCK:
        torch.get_num_threads()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            torch.set_num_threads(torch.get_num_threads())  # first pool fetch, in this thread
            pool = _POOLS[workers] = ThreadPoolExecutor(
                workers, thread_name_prefix="dpfl-noise", initializer=_init_worker
            )
        return pool


# ------------------------------------------------------------------------------------- streams
class _AesStream:
    """AES-256-CTR keystream of one release, from word ``offset`` on (``offset`` even)."""

    def __init__(self, key: bytes, release: int, offset: int) -> None:
        counter = release.to_bytes(8, "big") + (offset // 2).to_bytes(8, "big")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()

    def fill(self, scratch: _Scratch, work: _Work, words: int, device: torch.device) -> None:
        self._enc.update_into(scratch.zeros[: 8 * words], scratch.raw)
        if device.type != "cpu":
            host = torch.frombuffer(scratch.raw, dtype=torch.int64, count=words)
            work.device_words[:words].copy_(host)


class _TorchStream:
    """Words from a ``torch.Generator`` on the piece's device, seeded per piece."""

    def __init__(self, key: bytes, release: int, offset: int) -> None:
        self._key, self._release, self._offset = key, release, offset

    def fill(self, scratch: _Scratch, work: _Work, words: int, device: torch.device) -> None:
        data = self._release.to_bytes(8, "little") + self._offset.to_bytes(8, "little")
        digest = hashlib.blake2b(data, key=self._key, digest_size=8).digest()
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest, "little"))
        self._offset += words
        if device.type == "cpu":
            host = torch.frombuffer(scratch.raw, dtype=torch.int64, count=words)
            host.random_(-(2**63), None, generator=gen)
        else:
            work.device_words[:words].random_(-(2**63), None, generator=gen)


# -------------------------------------------------------------------------------------- noise
def _noise_piece(piece: _Piece, work: _Work, scale: float, secure: bool) -> None:
    """Add ``scale ·`` (normals from the words already in ``work``) to one piece."""
    cpu = piece.flat.device.type == "cpu"
    (work.radial_words if cpu else work.device_radial_words).bitwise_and_(LOW63)
    _box_muller(
        work.radius_words if cpu else work.device_radius_words,
        work.fine_words if cpu else work.device_fine_words,
        work.angle_words if cpu else work.device_angle_words,
        work.cos,
        work.sin,
        work.rows,
        work.radius,
        work.angle,
    )
    target = piece.flat[piece.start : piece.start + piece.count]
    if not secure:
        out = work.out if piece.count == work.out.numel() else work.out[: piece.count]
        target.add_(out, alpha=scale)
        return
    # Coordinate c sums the cosines of pairs c and m + c and the sines of pairs c + 1 and
    # m + c + 1 (cyclically: pair 2m is pair 0): four normals from four distinct Box-Muller
    # pairs, as m >= 2. Then (sum of four N(0, 1)) / 2 ~ N(0, 1). Three adds, no new views.
    work.wrap_to.copy_(work.wrap_from)
    work.cosines.add_(work.next_sines)
    acc = work.half.add_(work.other_half)
    target.add_(
        acc if piece.count == acc.numel() else acc[: piece.count],
        alpha=scale / math.sqrt(SECURE_DRAWS),
    )


def _run(
    kind: type[_AesStream] | type[_TorchStream],
    key: bytes,
    release: int,
    run: Sequence[_Piece],
    scale: float,
    secure: bool,
) -> None:
    stream = kind(key, release, run[0].offset)
    scratch = _scratch()
    for piece in run:
        device = piece.flat.device
        work = scratch.work(piece.pairs, _math_dtype(piece.flat.dtype), device)
        stream.fill(scratch, work, piece.words, device)
        _noise_piece(piece, work, scale, secure)


def add_gaussian_(
    flats: Sequence[Tensor],
    *,
    key: bytes,
    release: int,
    scale: float,
    secure: bool,
    workers: int = 1,
    stream: str | None = None,
) -> None:
    """Add ``N(0, scale²)`` noise to every element of the 1-D contiguous tensors ``flats``.

    Args:
        flats: Contiguous 1-D floating-point tensors (views of the targets), in stream order.
        key: 32-byte key of the bit streams.
        release: Index of this release, ``0 <= release < 2**64``; every ``(key, release)`` gives
            independent noise.
        scale: Standard deviation of the noise.
        secure: Sum four normals per coordinate; every word comes from the AES keystream.
        workers: Threads sharing the CPU pieces; the noise does not depend on it.
        stream: Bit source: ``None`` (AES keystream on the CPU and in secure mode, a generator
            of the tensor's device otherwise), or ``"aes"`` / ``"torch"`` for every piece.

    Raises:
        ValueError: for ``stream="torch"`` with ``secure=True``.
    """
    if secure and stream == "torch":
        raise ValueError("secure noise draws its words from the AES keystream, not stream='torch'")
    pieces = _pieces(flats, secure)
    cpu = [p for p in pieces if p.flat.device.type == "cpu"]
    other = [p for p in pieces if p.flat.device.type != "cpu"]
    cpu_kind = _TorchStream if stream == "torch" else _AesStream
    other_kind = _AesStream if secure or stream == "aes" else _TorchStream
    for run in _split(other, 1):
        _run(other_kind, key, release, run, scale, secure)
    if workers <= 1 or len(cpu) <= 1:
        for run in _split(cpu, 1):
            _run(cpu_kind, key, release, run, scale, secure)
        return
    pool = _pool(workers)
    futures = [
        pool.submit(_run, cpu_kind, key, release, run, scale, secure)
        for run in _split(cpu, 4 * workers)
    ]
    wait(futures)
    for future in futures:
        future.result()
