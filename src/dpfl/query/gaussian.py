"""Gaussian sum queries: fixed clipping (global or per layer) and adaptive clipping.

[`GaussianSumQuery`][dpfl.query.GaussianSumQuery] clips each update with a
[`GlobalClip`][dpfl.clip.GlobalClip] or [`PerLayerClip`][dpfl.clip.PerLayerClip], sums, adds
``N(0, (z·C)²)`` once and divides by the expected cohort size; its event is
``sampling.round_spec(z)``. [`AdaptiveClipQuery`][dpfl.query.AdaptiveClipQuery] composes that
sum with a noised count of centred clipping bits (Andrew et al., NeurIPS 2021) that moves the
bound(s) after each release; its event is the combined Gaussian
``sampling.round_spec(z, count_noise_multiplier=z_b)`` (``z_eff⁻² = z⁻² + z_b⁻²``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from torch import Tensor

from dpfl.adaptive_clip import AdaptiveClip
from dpfl.aggregate import DPAggregator
from dpfl.clip import GlobalClip, PerLayerClip
from dpfl.noise import GaussianMechanism
from dpfl.query.base import DPQuery, Release, Sampling, check_noise_representable

__all__ = ["AdaptiveClipQuery", "GaussianSumQuery", "gaussian_query"]

CONFIG_VERSION = 1


class GaussianSumQuery(DPQuery):
    """Clip, sum, add Gaussian noise once, divide by the expected cohort size.

    The query builds and owns its [`GaussianMechanism`][dpfl.noise.GaussianMechanism], so the
    multiplier that noises the sum and the one that the event states have one owner.

    Args:
        clipper: A [`GlobalClip`][dpfl.clip.GlobalClip] or [`PerLayerClip`][dpfl.clip.PerLayerClip].
        noise_multiplier: ``z >= 0``; the noise std on the sum is ``z * clipper.sensitivity``.
        expected_cohort_size: The fixed denominator ``S >= 1``.
        seed: Noise seed (simulations only; every rank then adds the same noise); ``None``: OS
            entropy.
        secure: Hardened unseeded noise
            ([`GaussianMechanism`][dpfl.noise.GaussianMechanism] ``secure=True``).

    Attributes:
        mechanism: The [`GaussianMechanism`][dpfl.noise.GaussianMechanism] that noises the sum.

    Raises:
        TypeError: a clipper of another type.
        ValueError: as [`GaussianMechanism`][dpfl.noise.GaussianMechanism] and
            ``expected_cohort_size < 1``.

    Examples:
        >>> import torch
        >>> from dpfl.clip import GlobalClip
        >>> from dpfl.simulation import PoissonSampler
        >>> q = GaussianSumQuery(GlobalClip(1.0), 0.0, expected_cohort_size=2)
        >>> spec = q.event(PoissonSampler(range(10), 0.2, seed=0))
        >>> acc = q.start()
        >>> _ = q.add(acc, {"w": torch.tensor([3.0, 4.0])})
        >>> out = q.release(acc)
        >>> out.event == spec, [round(v, 4) for v in out.mean["w"].tolist()]
        (True, [0.3, 0.4])
    """

    _clipper_types: tuple[type, ...] = (GlobalClip, PerLayerClip)

    def __init__(
        self,
        clipper: Any,
        noise_multiplier: float,
        *,
        expected_cohort_size: float,
        seed: int | None = None,
        secure: bool = False,
    ) -> None:
        if not isinstance(clipper, self._clipper_types):
            names = " or ".join(t.__name__ for t in self._clipper_types)
            raise TypeError(f"{type(self).__name__} needs a {names}, got {clipper!r}")
        self._clipper: Any = clipper
        self.mechanism = GaussianMechanism(
            noise_multiplier, self._initial_sensitivity(), seed=seed, secure=secure
        )
        # Validated by the aggregator it builds (same rules); fail now, not at the first round.
        DPAggregator(cast(Any, clipper), self.mechanism, expected_cohort_size=expected_cohort_size)
        self._size = float(expected_cohort_size)
        self._sampling: Sampling | None = None
        self._template: Mapping[str, Tensor] | None = None

    def _initial_sensitivity(self) -> float:
        return float(self._clipper.sensitivity)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._clipper!r}, {self.noise_multiplier!r}, "
            f"expected_cohort_size={self._size!r}, seeded={self.seeded}, secure={self.secure})"
        )

    # ----------------------------------------------------------------- properties
    @property
    def clipper(self) -> Any:
        """The clipper (its ``sensitivity`` is the bound of the next release)."""
        return self._clipper

    @property
    def noise_multiplier(self) -> float:
        """``z`` of the sum's noise."""
        return self.mechanism.noise_multiplier

    @property
    def expected_cohort_size(self) -> float:
        """The fixed denominator of the mean."""
        return self._size

    @property
    def seeded(self) -> bool:
        """Whether the noise comes from a seed."""
        return self.mechanism.seed is not None

    @property
    def secure(self) -> bool:
        """Whether the noise is hardened (never seeded)."""
        return self.mechanism.secure

    @property
    def seed(self) -> int | None:
        """The noise seed (``None``: OS entropy)."""
        return self.mechanism.seed

    # ----------------------------------------------------------------- the release
    def _event(self, sampling: Sampling, noise_multiplier: float) -> Any:
        return sampling.round_spec(noise_multiplier)

    def event(self, sampling: Sampling) -> Any:
        """``sampling.round_spec(z)``: the event of the next release, stated before it.

        Args:
            sampling: The run's sampler (remembered: the releases state their events by it).
        """
        self._sampling = sampling
        return self._event(sampling, self.noise_multiplier)

    def check_round(self) -> None:
        """Raise ``ValueError`` if this round's noise overflows the float32 sums."""
        check_noise_representable(
            self.noise_multiplier, float(self._clipper.sensitivity), secure=self.secure
        )

    def advance_to(self, release: int) -> None:
        """Key the next release's noise on ``release`` (never reused, see the mechanism).

        Args:
            release: The index of the charge that pays for the next release.
        """
        self.mechanism.advance_to(release)

    def start(
        self, *, template: Mapping[str, Tensor] | None = None, drop_nonfinite: bool = False
    ) -> DPAggregator:
        """A fresh aggregator over this query's clipper and mechanism.

        Args:
            template: Names and shapes of an update (pre-allocates the sum).
            drop_nonfinite: Drop a user whose update holds NaN/inf instead of raising.
        """
        self._template = template
        return DPAggregator(
            self._clipper,
            self.mechanism,
            expected_cohort_size=self._size,
            drop_nonfinite=drop_nonfinite,
            template=template,
        )

    def _record(self) -> dict[str, Any]:
        return {}

    def _release(
        self, acc: DPAggregator, reduce: Callable[[list[Tensor]], None] | None, allow_empty: bool
    ) -> Release:
        # The event comes from the multiplier of the mechanism that noised the sum.
        if acc.mechanism is not self.mechanism or acc.clipper is not self._clipper:
            raise ValueError("release(acc): acc must come from this query's start()")
        sensitivity = float(self._clipper.sensitivity)  # adaptive: moves during the release
        record = self._record()
        mean, stats = acc.release(reduce=reduce, allow_empty=allow_empty)
        sampling = self._sampling
        event = None if sampling is None else self._event(sampling, acc.mechanism.noise_multiplier)
        return Release(mean=mean, event=event, stats=stats, sensitivity=sensitivity, record=record)

    # ----------------------------------------------------------------- state
    def config(self) -> dict[str, Any]:
        """``{"type", "version", "noise_multiplier", "sensitivity", ...}`` (primitives only)."""
        from dpfl.query._config import component_config  # noqa: PLC0415 - step-local helper

        return {
            "type": type(self).__name__,
            "version": CONFIG_VERSION,
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": self._initial_sensitivity(),
            "expected_cohort_size": self._size,
            "seeded": self.seeded,
            "secure": self.secure,
            "clipper": component_config(self._clipper),
        }

    def _stateful(self, *, everything: bool) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        if everything or self.seeded:  # unseeded noise state never leaves memory
            parts["mechanism"] = self.mechanism
        return parts

    def state_dict(self) -> dict[str, Any]:
        """The seeded noise generator (key and counter); nothing for unseeded fixed clipping."""
        return {k: v.state_dict() for k, v in self._stateful(everything=False).items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``; nothing changes if a part rejects its state.

        Args:
            state: What ``state_dict`` returned.
        """
        self._load(state, everything=False)

    def snapshot(self) -> dict[str, Any]:
        """Everything, also an unseeded key: to undo a failed round in memory."""
        return {k: v.state_dict() for k, v in self._stateful(everything=True).items()}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Undo to ``snapshot``.

        Args:
            snapshot: What ``snapshot`` returned.
        """
        self._load(snapshot, everything=True)

    def _load(self, state: Mapping[str, Any], *, everything: bool) -> None:
        parts = self._stateful(everything=everything)
        if not isinstance(state, Mapping) or set(state) != set(parts):
            raise ValueError(
                f"state must be a {type(self).__name__}.state_dict() with keys {sorted(parts)}, "
                f"got {state!r:.80}"
            )
        backups = {k: obj.state_dict() for k, obj in parts.items()}
        done = []
        try:
            for key, obj in parts.items():
                obj.load_state_dict(state[key])
                done.append(key)
        except BaseException:
            for key in done:
                parts[key].load_state_dict(backups[key])
            raise


class AdaptiveClipQuery(GaussianSumQuery):
    """A composed query: the Gaussian sum plus a noised count that moves the clipping bound(s).

    Each release noises the count of centred clipping bits with ``z_b =
    clipper.count_noise_multiplier`` from its own stream, noises the sum with this round's
    bound, then moves the bound(s) with the noised count (post-processing). Its event is one
    Gaussian of ``z_eff⁻² = z⁻² + z_b⁻²`` (``sampling.round_spec(z, count_noise_multiplier=
    z_b)``). The bounds are DP releases: always checkpointed, and logged per round.

    Args:
        clipper: An [`AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip] (global or per layer).
        noise_multiplier: ``z >= 0``, the sum's share (as in
            [`GaussianSumQuery`][dpfl.query.GaussianSumQuery]).
        expected_cohort_size: The fixed denominator ``S >= 1``.
        seed: Noise seed (simulations only); ``None``: OS entropy.
        secure: Hardened unseeded noise (``GaussianMechanism(secure=True)``).
    """

    adaptive = True
    """Always: the bound(s) move after each release."""
    _clipper_types = (AdaptiveClip,)

    def _initial_sensitivity(self) -> float:
        return float(self._clipper.initial_bound)

    def _event(self, sampling: Sampling, noise_multiplier: float) -> Any:
        zb = self._clipper.count_noise_multiplier
        return sampling.round_spec(noise_multiplier, count_noise_multiplier=zb)

    def _record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"clip_bound": self._clipper.bound}
        if self._clipper.per_layer and self._template is not None:
            record["layer_bounds"] = self._clipper.layer_bounds(self._template)
        return record

    def broadcast_(self, release: Release, broadcast: Callable[[list[Tensor]], None]) -> None:
        """Rank 0's mean and its bounds (moved by rank 0's noised count).

        Args:
            release: This rank's release; its tensors are overwritten.
            broadcast: Copies rank 0's tensors into the given ones in place.
        """
        import torch  # noqa: PLC0415

        super().broadcast_(release, broadcast)
        bounds = self._clipper.bounds
        assert bounds is not None  # set by the release
        vec = torch.tensor(list(bounds.values()), dtype=torch.float64)
        broadcast([vec])
        self._clipper.set_bounds_(vec.tolist())

    def _stateful(self, *, everything: bool) -> dict[str, Any]:
        return {**super()._stateful(everything=everything), "clipper": self._clipper}


def gaussian_query(
    clipper: Any,
    noise_multiplier: float,
    *,
    expected_cohort_size: float,
    seed: int | None = None,
    secure: bool = False,
) -> GaussianSumQuery:
    """The Gaussian query for ``clipper``: an [`AdaptiveClipQuery`][dpfl.query.AdaptiveClipQuery]
    for an ``AdaptiveClip``, else a [`GaussianSumQuery`][dpfl.query.GaussianSumQuery].

    Args:
        clipper: A ``GlobalClip``, ``PerLayerClip`` or ``AdaptiveClip``.
        noise_multiplier: ``z >= 0`` (the sum's share with an ``AdaptiveClip``).
        expected_cohort_size: The fixed denominator ``S >= 1``.
        seed: Noise seed (simulations only); ``None``: OS entropy.
        secure: Hardened unseeded noise (``GaussianMechanism(secure=True)``).
    """
    cls = AdaptiveClipQuery if isinstance(clipper, AdaptiveClip) else GaussianSumQuery
    return cls(
        clipper,
        noise_multiplier,
        expected_cohort_size=expected_cohort_size,
        seed=seed,
        secure=secure,
    )
