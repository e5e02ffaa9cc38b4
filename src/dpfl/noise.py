"""The Gaussian mechanism: add ``N(0, (z·C)²)`` noise to a dict of tensors.

With the sum of clipped updates having L2 sensitivity ``C`` (add/remove one user), adding
independent Gaussian noise of standard deviation ``z·C`` to every coordinate is the Gaussian
mechanism with noise multiplier ``z``; its privacy loss is described by
``dp_accounting.GaussianDpEvent(z)`` and composed by an accountant.

References: Pelikan et al., arXiv 2310.00098, section 2 (DP-FedAvg, noise on the sum, z = σ_DP·S);
Holohan & Braghin, "Secure Random Sampling in Differential Privacy", arXiv 2107.10138.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import dp_accounting
import torch
from torch import Tensor

from dpfl._checks import require_int, require_non_negative, require_positive

__all__ = ["GaussianMechanism"]

#: Number of Gaussian draws summed per coordinate in secure mode (scaled by 1/sqrt(k)).
SECURE_DRAWS = 4


class GaussianMechanism:
    """Add Gaussian noise of standard deviation ``noise_multiplier * sensitivity`` to tensors.

    Randomness comes from the mechanism's own ``torch.Generator`` (never the global torch RNG).
    With ``seed`` the noise is reproducible (``seed=0`` is a seed like any other); without it the
    generator is seeded from OS entropy. :meth:`state_dict` / :meth:`load_state_dict` save and
    restore the generator so a resumed run continues with the same noise.

    Secure mode (``secure=True``):

    * every call to :meth:`add_noise_` reseeds the generator from the OS CSPRNG (``secrets``),
      so noise cannot be predicted from earlier releases or a saved seed;
    * each coordinate is the sum of ``SECURE_DRAWS`` (4) independent Gaussian draws scaled by
      ``1/sqrt(4)`` — the construction of Holohan & Braghin (arXiv 2107.10138) that smooths the
      lattice of representable floating-point samples exploited by floating-point attacks on
      textbook Gaussian samplers; it costs 4x the sampling time;
    * :meth:`state_dict` carries no generator state (nothing that would let a checkpoint reader
      reconstruct the noise).

    It does **not** make torch's generator (a Mersenne Twister / Philox, not a CSPRNG) a
    cryptographic source between reseeds, protect generator state or noise held in process
    memory, or remove the rounding of the final ``value + noise`` addition in the tensor dtype.
    An explicit ``seed`` with ``secure=True`` is an error: a known seed makes the noise
    reproducible by anyone holding it, which is exactly what secure mode rules out.

    Args:
        noise_multiplier: ``z >= 0``; ``0`` adds no noise (values returned unchanged).
        sensitivity: L2 sensitivity ``C > 0`` of the released sum (the clipping bound); ``inf``
            is accepted only with ``z = 0``.
        seed: Integer seed in ``[0, 2**64)`` for reproducible noise; ``None`` uses OS entropy.
        secure: Hardened sampling as described above.

    Raises:
        ValueError: if ``noise_multiplier < 0``, ``sensitivity <= 0``, ``sensitivity`` is infinite
            with ``noise_multiplier > 0``, ``seed`` is out of range, or ``secure`` with a seed.

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

    References: Pelikan et al., arXiv 2310.00098; Holohan & Braghin, arXiv 2107.10138.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sensitivity: float,
        *,
        seed: int | None = None,
        secure: bool = False,
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
                    "seed must be None when secure=True: secure mode seeds from the OS CSPRNG "
                    "so that nobody holding a seed can reproduce (and subtract) the noise"
                )
            seed = require_int("seed", seed, minimum=0)
            if seed >= 2**64:
                raise ValueError(f"seed must be < 2**64, got {seed!r}")
        self.secure = bool(secure)
        self.seed = seed
        self._generator = torch.Generator()
        self._generator.manual_seed(seed if seed is not None else secrets.randbits(64))

    def __repr__(self) -> str:
        return (
            f"GaussianMechanism(noise_multiplier={self.noise_multiplier!r}, "
            f"sensitivity={self.sensitivity!r}, seed={self.seed!r}, secure={self.secure!r})"
        )

    @property
    def std(self) -> float:
        """Standard deviation of the noise per coordinate: ``noise_multiplier * sensitivity``."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.noise_multiplier * self.sensitivity

    def _noise_like(self, t: Tensor) -> Tensor:
        dtype = t.dtype if t.dtype == torch.float64 else torch.float32
        draws = SECURE_DRAWS if self.secure else 1
        noise = torch.empty(t.shape, dtype=dtype).normal_(0.0, self.std, generator=self._generator)
        for _ in range(draws - 1):
            extra = torch.empty(t.shape, dtype=dtype)
            noise.add_(extra.normal_(0.0, self.std, generator=self._generator))
        if draws > 1:
            noise.mul_(1.0 / math.sqrt(draws))
        return noise

    def add_noise_(self, tensors: Mapping[str, Tensor]) -> None:
        """Add independent noise to every tensor in place (no-op when ``noise_multiplier == 0``).

        Noise is drawn on the CPU in float32 (float64 for float64 tensors), in the mapping's
        iteration order, and moved to each tensor's device.

        Raises:
            TypeError: if a value is not a floating-point tensor (the message names it).
        """
        _check_tensors(tensors)
        if self.std == 0.0:
            return
        if self.secure:
            self._generator.manual_seed(secrets.randbits(64))
        with torch.no_grad():
            for t in tensors.values():
                if t.numel() == 0:
                    continue
                noise = self._noise_like(t)
                t.add_(noise.to(t.device))

    def add_noise(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return noised copies of ``tensors`` (inputs unchanged); see :meth:`add_noise_`."""
        _check_tensors(tensors)
        out = {k: v.detach().clone() for k, v in tensors.items()}
        self.add_noise_(out)
        return out

    def dp_event(self) -> dp_accounting.GaussianDpEvent:
        """The privacy event of one release: ``GaussianDpEvent(noise_multiplier)``."""
        return dp_accounting.GaussianDpEvent(self.noise_multiplier)

    def state_dict(self) -> dict[str, Any]:
        """Generator state for resuming (no generator state in secure mode)."""
        state: dict[str, Any] = {
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": self.sensitivity,
            "secure": self.secure,
        }
        if not self.secure:
            state["generator"] = self._generator.get_state().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the hyperparameters and mode must match.

        Raises:
            ValueError: if ``state`` comes from a mechanism with another noise multiplier,
                sensitivity or mode, or lacks the generator state (nothing is changed then).
        """
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
        if not isinstance(gen, Tensor) or gen.dtype != torch.uint8:
            raise ValueError("state['generator'] must be the uint8 tensor from state_dict()")
        self._generator.set_state(gen.clone())


def _check_tensors(tensors: Mapping[str, Tensor]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping str -> Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"tensor {name!r} must be a floating-point torch.Tensor, got {t!r:.60}")
