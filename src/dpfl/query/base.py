"""The DP query contract: one object owns the noise that leaves the process and its event.

A [`DPQuery`][dpfl.query.DPQuery] states the privacy event of its next release *before* the round
([`DPQuery.event`][dpfl.query.DPQuery.event]), so the caller can charge it write-ahead; it then
accumulates clipped updates ([`DPQuery.start`][dpfl.query.DPQuery.start],
[`DPQuery.add`][dpfl.query.DPQuery.add]) and releases the noised mean together with the event that
this noise *is* ([`DPQuery.release`][dpfl.query.DPQuery.release]), computed from the multipliers it
actually used. The round loop charges only what [`DPQuery.event`][dpfl.query.DPQuery.event] states
and refuses a release whose event differs from the charged one
([`ReleaseEventError`][dpfl.query.ReleaseEventError]).

References: Google's TF Privacy ``DPQuery`` (initial_sample_state / accumulate / get_noised_result)
and Opacus' ``DPOptimizer`` are the designs this contract follows and narrows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from dpfl._errors import DPFLError
from dpfl._sampler import max_abs_draw
from dpfl.aggregate import DPAggregator, ReleaseStats
from dpfl.clip import ClipStats

__all__ = [
    "DPQuery",
    "Release",
    "ReleaseEventError",
    "Sampling",
    "check_noise_representable",
]


class Sampling(Protocol):
    """What a query needs of a sampler: the round event for its multipliers.

    Attributes:
        expected_cohort_size: The sampler's expected cohort size (the mean's denominator).
    """

    expected_cohort_size: float

    def round_spec(
        self, noise_multiplier: float, *, count_noise_multiplier: float | None = None
    ) -> Any:
        """The round spec of one release with these multipliers (the sampler's adjacency).

        Args:
            noise_multiplier: ``z`` of the sum's noise.
            count_noise_multiplier: ``z_b`` of a noised count released with the sum (adaptive
                clipping), or ``None``.
        """
        ...


class ReleaseEventError(DPFLError, RuntimeError):
    """A release's privacy event differs from the event charged for it (nothing is applied)."""


@dataclass(frozen=True)
class Release:
    """One noised release and the privacy event it is.

    Attributes:
        mean: The noised sum divided by the fixed denominator (the expected cohort size).
        event: The round spec (``PoissonRound`` / ``FixedCohortRound``, ``DpEvent``-compatible)
            computed from the multipliers this release's noise used; ``None`` when the query was
            never told the sampling (a release outside the round loop).
        stats: Cohort statistics (**not** private; see
            [`ReleaseStats`][dpfl.aggregate.ReleaseStats]).
        sensitivity: The L2 sensitivity of the noised sum (the round's clipping bound); the
            noise std per coordinate of the sum is ``event.noise_multiplier * sensitivity``.
        record: DP quantities of the release worth logging (adaptive: the bound(s) used).
    """

    mean: dict[str, Tensor]
    event: Any
    stats: ReleaseStats
    sensitivity: float
    record: dict[str, Any] = field(default_factory=dict)


class DPQuery(ABC):
    """A clip-sum-noise query: states its event, accumulates, releases noise and event together.

    Subclasses set ``adaptive`` (its sensitivity moves between rounds) and implement the
    abstract methods (``_release`` behind the public ``release``); the round loop uses nothing else, so a new noise scheme (e.g. correlated
    noise across rounds) plugs in as another subclass.
    """

    adaptive: bool = False
    """Whether the clipping bound moves between rounds (a one-shot canary audit needs a fixed one)."""

    @property
    @abstractmethod
    def clipper(self) -> Any:
        """The clipper of the next round (``sensitivity``, ``layer_bounds``, ``clip...``)."""

    @property
    @abstractmethod
    def expected_cohort_size(self) -> float:
        """The fixed denominator of the mean."""

    @property
    @abstractmethod
    def seeded(self) -> bool:
        """Whether the noise is reproducible from a seed (every rank adds the same noise)."""

    @property
    @abstractmethod
    def secure(self) -> bool:
        """Whether the noise is drawn in hardened, unseeded mode."""

    @property
    def broadcast(self) -> bool:
        """Whether rank 0's release must be broadcast (unseeded noise differs per rank)."""
        return not self.seeded

    @abstractmethod
    def event(self, sampling: Sampling) -> Any:
        """The privacy event of the next release, stated before the round (to charge first).

        Args:
            sampling: The run's sampler; the query passes its own multipliers to
                ``sampling.round_spec``, and its releases report their events the same way.
        """

    def check_round(self) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` before the round if its noise cannot be represented."""

    def advance_to(self, release: int) -> None:  # noqa: B027 - optional hook
        """Key the next release's noise on ``release`` (the journal's charge index).

        Args:
            release: The index of the charge that pays for the next release.
        """

    @abstractmethod
    def start(
        self, *, template: Mapping[str, Tensor] | None = None, drop_nonfinite: bool = False
    ) -> DPAggregator:
        """A fresh accumulator for one round (an aggregator holding this query's noise).

        Args:
            template: Names and shapes of an update (pre-allocates the sum; an empty round
                releases zeros of these shapes).
            drop_nonfinite: Drop a user whose update holds NaN/inf instead of raising.
        """

    def add(self, acc: DPAggregator, update: Mapping[str, Tensor]) -> ClipStats | None:
        """Clip ``update`` into ``acc``; ``None`` when a non-finite user is dropped.

        Args:
            acc: The accumulator from ``start``.
            update: One user's model update.
        """
        return acc.add(update)

    def release(
        self,
        acc: DPAggregator,
        *,
        reduce: Callable[[list[Tensor]], None] | None = None,
        allow_empty: bool = False,
    ) -> Release:
        """Noise the (reduced) sum once, divide, and return it with its event.

        The returned event is the one of the noise actually added (computed from the multipliers
        that noised the sum, not copied from ``event``), so a caller comparing it with the
        charged event compares the noise that leaves the process. Subclasses implement
        ``_release``.

        Args:
            acc: The accumulator from this query's ``start``.
            reduce: Sums tensors across ranks in place (multi-process runs), before the noise.
            allow_empty: Release (noise only) when no user was added, instead of raising.
        """
        return self._release(acc, reduce, allow_empty)

    @abstractmethod
    def _release(
        self, acc: DPAggregator, reduce: Callable[[list[Tensor]], None] | None, allow_empty: bool
    ) -> Release:
        """The release itself (the arguments as ``release`` documents them)."""

    def broadcast_(self, release: Release, broadcast: Callable[[list[Tensor]], None]) -> None:
        """Replace this rank's release (and state moved by it) with rank 0's, in place.

        Args:
            release: This rank's release; its tensors are overwritten.
            broadcast: Copies rank 0's tensors into the given ones in place.
        """
        broadcast(list(release.mean.values()))

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A plain, versioned description ({"type", "version", ...primitives}) for resume checks."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """State a checkpoint keeps (noise key and counter only when seeded; adaptive bounds)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``; raise ``ValueError`` (nothing changed) if it does not fit.

        Args:
            state: What ``state_dict`` returned.
        """

    @abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """The whole in-memory state (also an unseeded key), to undo a failed round."""

    @abstractmethod
    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Undo to a ``snapshot``.

        Args:
            snapshot: What ``snapshot`` returned.
        """


def check_noise_representable(noise_multiplier: float, bound: float, *, secure: bool) -> None:
    """Raise unless noise of std ``noise_multiplier * bound`` fits the float32 sums of a round.

    The round loop sums in float32; a draw of up to ``max_abs_draw`` std
    beyond float32's largest value would release inf. Checked before any round is charged (and,
    with adaptive clipping, before each round, whose bound may have grown).

    Args:
        noise_multiplier: ``z`` of the noise.
        bound: The clipping bound (the sum's L2 sensitivity).
        secure: Hardened noise (its largest draw differs).

    Raises:
        ValueError: If the largest draw would exceed float32's largest value.
    """
    std = noise_multiplier * bound if noise_multiplier > 0 else 0.0
    largest, limit = std * max_abs_draw(secure), float(torch.finfo(torch.float32).max)
    if not largest <= limit:
        raise ValueError(
            f"noise std {std!r} (noise_multiplier {noise_multiplier!r} * clipping bound "
            f"{bound!r}) cannot be represented in the round's float32 sums: draws up to "
            f"{max_abs_draw(secure):.3f} std exceed float32's largest value {limit:.4g}, so "
            "every release would be inf; lower noise_multiplier or the clipping bound"
        )
