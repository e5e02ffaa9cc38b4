"""The Gaussian mechanism: add ``N(0, (z·C)²)`` noise to a dict of tensors.

With the sum of clipped updates having L2 sensitivity ``C`` (add/remove one user), adding
independent Gaussian noise of standard deviation ``z·C`` to every coordinate is the Gaussian
mechanism with noise multiplier ``z``; its privacy loss is described by
``dp_accounting.GaussianDpEvent(z)`` and composed by an accountant. The guarantee assumes the
noise is Gaussian in the tail that small ``δ`` depends on; the sampler
is Gaussian up to ``sqrt(252 ln 2) ≈ 13.216`` standard deviations and never beyond (torch's
float32 ``normal_`` stops at ``5.77``); dpfl's accountants add the δ of that ceiling
([`ceiling_delta`][dpfl.accounting.ceiling_delta]).

References: Pelikan et al., arXiv 2310.00098, section 2 (DP-FedAvg, noise on the sum, z = σ_DP·S);
Box & Muller (1958); Holohan & Braghin, "Secure Random Sampling in Differential Privacy",
arXiv 2107.10138.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from typing import Any

import dp_accounting
import torch
from torch import Tensor

from dpfl import _sampler
from dpfl._checks import require_int, require_non_negative, require_positive
from dpfl._sampler import add_gaussian_, max_abs_draw

__all__ = ["MAX_ABS_NORMAL", "SECURE_DRAWS", "GaussianMechanism"]

MAX_ABS_NORMAL: float = _sampler.MAX_ABS_NORMAL
"""Largest ``|Z|`` one standard normal draw can take: ``sqrt(-2 ln 2⁻⁶⁴) = sqrt(128 ln 2) ≈ 9.419``.

Each normal comes from Box–Muller on 64-bit uniform words, so its tail is exact up to this value
and empty beyond it (0.1.0's float32 sampler stopped at 5.77). The noise added to one coordinate
is at most ``MAX_ABS_NORMAL · z · C`` in magnitude, up to rounding (secure mode: ``2 ×`` that, see
[`SECURE_DRAWS`][dpfl.noise.SECURE_DRAWS]).
"""

SECURE_DRAWS: int = _sampler.SECURE_DRAWS
"""Standard normals summed per coordinate in secure mode (``GaussianMechanism(secure=True)``).

Each comes from its own Box–Muller pair and the sum is scaled by ``1/sqrt(SECURE_DRAWS)``; the
sum fills in the lattice of representable values that a single floating-point sample leaves,
the defence against floating-point attacks on the Gaussian mechanism.
"""

_STATE_MAGIC = b"dpfl-aes256ctr-1"  # 16 bytes: format of state_dict()['generator']
_STATE_BYTES = len(_STATE_MAGIC) + 32 + 8


def _key_from_seed(seed: int) -> bytes:
    return hashlib.sha256(b"dpfl.noise.GaussianMechanism\0" + seed.to_bytes(8, "little")).digest()


class GaussianMechanism:
    """Add Gaussian noise of standard deviation ``noise_multiplier * sensitivity`` to tensors.

    **Sampler.** Every coordinate (float16, bfloat16, float32 or float64, on any device) gets
    ``std · Z`` with ``Z`` from Box–Muller whose radius uniform is built from two 64-bit random
    words: ``u1 = 2^-126 (2^63 k + j + 1)`` (``k``, ``j``: the words' low 63 bits) is the
    uniform rounded up to the grid ``2^-126`` and keeps float precision down to ``2^-126``, so
    the radius is Rayleigh (``Z`` Gaussian) up to the largest attainable ``|Z|``,
    ``sqrt(252 ln 2) ≈ 13.216`` ([`MAX_ABS_NORMAL`][dpfl.noise.MAX_ABS_NORMAL]; secure mode: ``2 × 13.216``). A
    release with a user can land beyond that from the neighbour's sum where none without can;
    the accountants add that probability to δ ([`ceiling_delta`][dpfl.accounting.ceiling_delta],
    ``exp(-(13.216 - 1/z)²/2)`` per participation: ``2e-21`` at ``z = 0.6144``). (torch's
    float32 ``normal_``, used in dpfl 0.1.0, is Box–Muller on 24-bit uniforms and never exceeds
    5.77σ; one 64-bit word per radius stopped at 9.419σ, which at ``z = 0.2`` gave δ ≥ 3e-6.)
    The transform runs in float64 for float64 tensors and in float32 otherwise; noise is
    generated on the tensor's device, in cache-sized pieces shared by ``num_threads`` threads on
    the CPU, and added in place.

    **Randomness.** The mechanism owns a 256-bit key and a release counter; release ``r`` draws
    its words from AES-256 in counter mode keyed by the key, at counter ``(r, position)`` (on
    devices other than the CPU, plain mode uses that device's ``torch.Generator`` seeded per
    piece from the key, release and position). With ``seed`` the key is derived from the seed
    (``seed=0`` is a seed like any other), so the noise is reproducible, identical for any
    ``num_threads``; without it the key comes from the OS CSPRNG (``os.urandom``).
    [`state_dict`][dpfl.noise.GaussianMechanism.state_dict] /
    [`load_state_dict`][dpfl.noise.GaussianMechanism.load_state_dict] save and restore key and
    counter so that a resumed run continues with the same noise. Noise never touches the global
    torch RNG.

    **Secure mode** (``secure=True``) defends against an observer of the releases (and of any
    checkpoint) who tries to predict, reproduce or subtract the noise, or to tell two
    neighbouring inputs apart from the floating-point pattern of the noise:

    * every release draws a fresh 256-bit key from ``os.urandom`` and all its bits from the
      AES-256-CTR keystream under that key (on every device: the words are generated on the
      host and copied to the device), so earlier releases, seeds and checkpoints say nothing
      about the noise;
    * each coordinate is ``(Z1 + Z2 + Z3 + Z4) / 2`` from four different Box–Muller pairs
      ([`SECURE_DRAWS`][dpfl.noise.SECURE_DRAWS]): the sum fills in the lattice of representable
      single samples that floating-point attacks on textbook samplers exploit (Holohan & Braghin,
      arXiv 2107.10138); it costs about four times the sampling of plain mode;
    * [`state_dict`][dpfl.noise.GaussianMechanism.state_dict] carries no key.

    It does **not** protect the key, the noise or the pre-noise sum while they are in process
    memory (or on a GPU), remove the rounding of the final ``value + noise`` addition in the
    tensor's dtype, or make the accounting right: those are the caller's. An explicit ``seed``
    with ``secure=True`` is an error: a known seed makes the noise reproducible by anyone
    holding it, which is exactly what secure mode rules out.

    Args:
        noise_multiplier: ``z >= 0``; ``0`` adds no noise (values returned unchanged).
        sensitivity: L2 sensitivity ``C > 0`` of the released sum (the clipping bound); ``inf``
            is accepted only with ``z = 0``.
        seed: Integer seed in ``[0, 2**64)`` for reproducible noise; ``None`` uses OS entropy.
        secure: Hardened sampling as described above.
        num_threads: Threads that generate CPU noise (``None``: ``torch.get_num_threads()``);
            the noise does not depend on it.

    Raises:
        ValueError: if ``noise_multiplier < 0``, ``sensitivity <= 0``, ``sensitivity`` is infinite
            with ``noise_multiplier > 0``, ``seed`` is out of range, ``secure`` with a seed, or
            ``num_threads < 1``.

    Warning:
        Reusing one seed across runs or workers makes their noise identical; correlated noise
        breaks the privacy guarantee of the combined releases. Leave ``seed=None`` in production.

    Examples:
        >>> import torch
        >>> mech = GaussianMechanism(1.0, 0.5, seed=0)
        >>> mech.std
        0.5
        >>> noised = mech.add_noise({"w": torch.zeros(3)})
        >>> noised["w"].shape
        torch.Size([3])

    References: Pelikan et al., arXiv 2310.00098; Box & Muller (1958); Holohan & Braghin,
    arXiv 2107.10138.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sensitivity: float,
        *,
        seed: int | None = None,
        secure: bool = False,
        num_threads: int | None = None,
    ) -> None:
        self.noise_multiplier = require_non_negative("noise_multiplier", noise_multiplier)
        self.sensitivity = require_positive("sensitivity", sensitivity, allow_inf=True)
        if math.isinf(self.sensitivity) and self.noise_multiplier > 0:
            raise ValueError(
                "sensitivity must be finite when noise_multiplier > 0 (infinite sensitivity "
                "would need infinite noise); use sensitivity=inf only with noise_multiplier=0"
            )
        if seed is not None:
            if secure:
                raise ValueError(
                    "seed must be None when secure=True: secure mode keys every release from "
                    "the OS CSPRNG so that nobody holding a seed can reproduce (and subtract) "
                    "the noise"
                )
            seed = require_int("seed", seed, minimum=0)
            if seed >= 2**64:
                raise ValueError(f"seed must be < 2**64, got {seed!r}")
        if num_threads is not None:
            num_threads = require_int("num_threads", num_threads, minimum=1)
        self.secure = bool(secure)
        self.seed = seed
        self.num_threads = num_threads
        self._key = _key_from_seed(seed) if seed is not None else os.urandom(32)
        self._release = 0

    def __repr__(self) -> str:
        return (
            f"GaussianMechanism(noise_multiplier={self.noise_multiplier!r}, "
            f"sensitivity={self.sensitivity!r}, seed={self.seed!r}, secure={self.secure!r})"
        )

    @property
    def release_index(self) -> int:
        """Index of the next release: its words come from counter ``(release_index, ·)``."""
        return self._release

    def advance_to(self, release: int) -> None:
        """Make ``release`` the index of the next release; the ones skipped are never drawn.

        The round loop keys each release on the privacy journal's charge index, so a round
        re-run after a crash (charged again) never repeats the noise of its first release.

        Args:
            release: index of the next release (its words' counter), ``>= release_index``.

        Raises:
            ValueError: if ``release`` is below ``release_index`` (an index is never
                reused: two releases with the same noise leak their difference) or not in
                ``[0, 2**64)``.
        """
        release = require_int("release", release, minimum=0)
        if release < self._release:
            raise ValueError(
                f"release must be >= the next release index {self._release}, got {release}: "
                "a release index is never reused (the same noise twice leaks the difference "
                "of the two releases)"
            )
        if release >= 2**64:
            raise ValueError(f"release must be < 2**64, got {release}")
        self._release = release

    @property
    def std(self) -> float:
        """Standard deviation of the noise per coordinate: ``noise_multiplier * sensitivity``."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.noise_multiplier * self.sensitivity

    def _check_representable(self, tensors: Mapping[str, Tensor], std: float) -> None:
        """Raise unless ``std × largest draw`` is finite in every tensor's dtype."""
        largest = std * max_abs_draw(self.secure)
        for name, t in tensors.items():
            limit = torch.finfo(t.dtype).max
            if not largest <= limit:
                raise ValueError(
                    f"noise std {std!r} (noise_multiplier * sensitivity) is not "
                    f"representable in tensor {name!r} of dtype {t.dtype}: draws up to "
                    f"{max_abs_draw(self.secure):.3f} std would exceed its largest finite "
                    f"value {limit:.4g} and release inf; lower the std or use a wider dtype"
                )

    def add_noise_(
        self, tensors: Mapping[str, Tensor], *, sensitivity: float | None = None
    ) -> None:
        """Add independent noise to every tensor in place (none when ``noise_multiplier == 0``).

        Every call is one release: it advances the release counter (even without noise, so that
        a side stream of the next release,
        [`add_side_noise_`][dpfl.noise.GaussianMechanism.add_side_noise_], gets fresh words).

        Tensors are noised in the mapping's iteration order (it fixes which stream words each
        coordinate gets); each on its own device.

        Args:
            tensors: The tensors to noise, in place.
            sensitivity: The L2 sensitivity of this release, if it differs from the
                constructor's (adaptive clipping: the round's bound, fixed before the round);
                the std is then ``noise_multiplier * sensitivity``.

        Raises:
            TypeError: if a value is not a floating-point tensor (the message names it).
            ValueError: if ``std`` times the largest draw overflows a tensor's dtype (the
                message names the tensor), or ``sensitivity`` is not > 0 and finite. Nothing is
                changed when an error is raised.
        """
        std = self.std if sensitivity is None else self._std_for(sensitivity)
        self._noise(tensors, std, None)
        self._release += 1  # also without noise: a side stream of this release is never reused

    def add_side_noise_(
        self,
        tensors: Mapping[str, Tensor],
        *,
        stream: str,
        noise_multiplier: float,
        sensitivity: float,
    ) -> None:
        """Noise a second release of the current round from an independent stream.

        For a query released beside the main one in the same round (the count of adaptive
        clipping): the same sampler, tails and mode, std ``noise_multiplier * sensitivity``,
        but words from another key: ``SHA-256(tag, stream, key)`` at the current release index
        in plain mode (so seeded runs stay reproducible and resume exactly), a fresh
        ``os.urandom`` key in secure mode. It never reuses the main stream's words. Call it at
        most once per ``stream`` per release, before
        [`add_noise_`][dpfl.noise.GaussianMechanism.add_noise_] (which advances the release
        counter); it changes no state of its own.

        Args:
            tensors: The side release's tensors, noised in place.
            stream: A non-empty name of the side release (adaptive clipping uses
                [`COUNT_STREAM`][dpfl.adaptive_clip.COUNT_STREAM]).
            noise_multiplier: Its noise multiplier ``z_b >= 0`` (0: no noise).
            sensitivity: Its L2 sensitivity (> 0 and finite); the std is
                ``noise_multiplier * sensitivity``.

        Raises:
            TypeError: as [`add_noise_`][dpfl.noise.GaussianMechanism.add_noise_].
            ValueError: as [`add_noise_`][dpfl.noise.GaussianMechanism.add_noise_], or if
                ``stream`` is not a non-empty str.
        """
        if not isinstance(stream, str) or not stream:
            raise ValueError(
                f"stream must be a non-empty str naming the side release, got {stream!r}"
            )
        z = require_non_negative("noise_multiplier", noise_multiplier)
        sens = require_positive("sensitivity", sensitivity)
        key = hashlib.sha256(
            b"dpfl.noise.GaussianMechanism.side\0" + stream.encode() + b"\0" + self._key
        ).digest()
        self._noise(tensors, z * sens if z > 0 else 0.0, key)

    def _std_for(self, sensitivity: float) -> float:
        sens = require_positive("sensitivity", sensitivity)
        return 0.0 if self.noise_multiplier == 0 else self.noise_multiplier * sens

    def _noise(self, tensors: Mapping[str, Tensor], std: float, side_key: bytes | None) -> bool:
        """Add noise of ``std`` in place; ``False`` (nothing done) when ``std == 0``."""
        _check_tensors(tensors)
        if std == 0.0:
            return False
        self._check_representable(tensors, std)
        if self.secure:
            key = os.urandom(32)
            if side_key is None:
                self._key = key
        else:
            key = self._key if side_key is None else side_key
        flats, copies = [], []
        with torch.no_grad():
            for t in tensors.values():
                flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
                if not t.is_contiguous():
                    copies.append((t, flat))
                flats.append(flat)
            add_gaussian_(
                flats,
                key=key,
                release=self._release,
                scale=std,
                secure=self.secure,
                workers=self.num_threads or torch.get_num_threads(),
            )
            for t, flat in copies:
                t.copy_(flat.view(t.shape))
        return True

    def add_noise(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return noised copies of ``tensors`` (inputs unchanged).

        Args:
            tensors: The tensors to noise, as for
                [`add_noise_`][dpfl.noise.GaussianMechanism.add_noise_] (one release).

        Returns:
            A new dict of noised copies.
        """
        _check_tensors(tensors)
        out = {k: v.detach().clone() for k, v in tensors.items()}
        self.add_noise_(out)
        return out

    def dp_event(self) -> dp_accounting.GaussianDpEvent:
        """The privacy event of one release: ``GaussianDpEvent(noise_multiplier)``."""
        return dp_accounting.GaussianDpEvent(self.noise_multiplier)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, plus key and release counter in plain mode (none in secure mode).

        ``state["generator"]`` is a uint8 tensor: a 16-byte format tag, the 32-byte key and the
        release counter (8 bytes, little-endian). Anyone holding it can reproduce the noise of
        every release; keep plain-mode checkpoints as secret as the seed.
        """
        state: dict[str, Any] = {
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": self.sensitivity,
            "secure": self.secure,
        }
        if not self.secure:
            raw = _STATE_MAGIC + self._key + self._release.to_bytes(8, "little")
            state["generator"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a [`state_dict`][dpfl.noise.GaussianMechanism.state_dict].

        Args:
            state: The dict from ``state_dict()`` of a mechanism with the same noise
                multiplier, sensitivity and mode.

        Raises:
            ValueError: if ``state`` comes from a mechanism with another noise multiplier,
                sensitivity or mode, or its generator state is missing or malformed (e.g. from
                an older dpfl whose sampler was torch's ``normal_``); nothing is changed then.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a GaussianMechanism.state_dict(), got {state!r:.60}")
        for key in ("noise_multiplier", "sensitivity", "secure"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}; pass a GaussianMechanism.state_dict()")
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state[{key!r}] = {state[key]!r} does not match this mechanism's "
                    f"{key} = {getattr(self, key)!r}"
                )
        if self.secure:
            return
        gen = state.get("generator")
        ok = (
            isinstance(gen, Tensor)
            and gen.dtype == torch.uint8
            and gen.dim() == 1
            and gen.numel() == _STATE_BYTES
        )
        raw = bytes(gen.cpu().tolist()) if ok and isinstance(gen, Tensor) else b""
        if not raw.startswith(_STATE_MAGIC):
            raise ValueError(
                "state['generator'] must be the 56-byte uint8 tensor from state_dict() (format "
                f"{_STATE_MAGIC.decode()}); got {gen!r:.80} — a state saved by another dpfl "
                "version cannot resume this sampler"
            )
        tag = len(_STATE_MAGIC)
        self._key = raw[tag : tag + 32]
        self._release = int.from_bytes(raw[tag + 32 :], "little")


def _check_tensors(tensors: Mapping[str, Tensor]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping str -> Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"tensor {name!r} must be a floating-point torch.Tensor, got {t!r:.60}")
