"""Reading dp_accounting ``DpEvent``s as dpfl rounds, so that ``add_rounds`` accepts them.

dpfl's ledger holds plain round specifications; an event is charged as the rounds it describes,
so the accountants' checks (adjacency, PLD support, budget) apply to it unchanged. Recognised:

* ``PoissonSampledDpEvent(q, G)`` → ``PoissonRound(z, q)``; an unsampled ``GaussianDpEvent(z)`` is
  the round that includes everyone, ``PoissonRound(z, 1.0)``;
* ``SampledWithoutReplacementDpEvent(n, m, G)`` → ``FixedCohortRound(2σ, m, n)``: the event's
  multiplier σ is relative to the replace-one sensitivity ``2C``, dpfl's ``z`` to ``C``;
* ``G`` is a ``GaussianDpEvent`` or the ``ComposedDpEvent`` of the update's and the adaptive
  count's two Gaussians (the round's ``count_noise_multiplier``), exactly as ``Round.dp_event()``
  writes them; ``SelfComposedDpEvent`` and ``ComposedDpEvent`` compose rounds; ``NoOpDpEvent``
  costs nothing.

Anything else (Laplace, randomized response, trees, sampling with replacement, non-private
events) raises ``ValueError`` naming the event: account it with dp_accounting directly.
"""

from __future__ import annotations

import dp_accounting

from dpfl._checks import require_int
from dpfl.accounting.events import FixedCohortRound, PoissonRound, Round

__all__ = ["rounds_of_event"]

_SUPPORTED = (
    "dpfl accounts Gaussian rounds: GaussianDpEvent, or PoissonSampledDpEvent / "
    "SampledWithoutReplacementDpEvent of a GaussianDpEvent (or of a ComposedDpEvent of the "
    "update's and the count's two Gaussians), composed with SelfComposedDpEvent and "
    "ComposedDpEvent; account other mechanisms with dp_accounting directly"
)


def rounds_of_event(event: dp_accounting.DpEvent) -> list[tuple[Round, int]]:
    """The ``(round, count)`` entries ``event`` composes, in order (validated, nothing merged).

    Raises:
        ValueError: if the event, or one it contains, is not a Gaussian round dpfl accounts.
    """
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return []
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        count = require_int("SelfComposedDpEvent.count", event.count, minimum=0)
        inner = rounds_of_event(event.event)
        if count == 0 or not inner:
            return []
        if len({rnd for rnd, _ in inner}) == 1:
            return [(inner[0][0], count * sum(c for _, c in inner))]
        return inner * count
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return [entry for sub in event.events for entry in rounds_of_event(sub)]
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return [(PoissonRound(noise_multiplier=event.noise_multiplier, sample_rate=1.0), 1)]
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        gaussians = _gaussians(event.event, event)
        if gaussians is None:
            return []
        z, zb = gaussians
        rnd = PoissonRound(
            noise_multiplier=z, sample_rate=event.sampling_probability, count_noise_multiplier=zb
        )
        return [(rnd, 1)]
    if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
        gaussians = _gaussians(event.event, event)
        if gaussians is None:
            return []
        z, zb = gaussians
        fixed = FixedCohortRound(
            noise_multiplier=2.0 * z,
            cohort_size=event.sample_size,
            population=event.source_dataset_size,
            count_noise_multiplier=None if zb is None else 2.0 * zb,
        )
        return [(fixed, 1)]
    raise ValueError(f"cannot charge a {type(event).__name__}: {_SUPPORTED}")


def _gaussians(
    inner: dp_accounting.DpEvent, outer: dp_accounting.DpEvent
) -> tuple[float, float | None] | None:
    """The update's and the count's multipliers inside a sampling event (None: a no-op)."""
    if isinstance(inner, dp_accounting.NoOpDpEvent):
        return None
    if isinstance(inner, dp_accounting.GaussianDpEvent):
        return inner.noise_multiplier, None
    if isinstance(inner, dp_accounting.ComposedDpEvent) and all(
        isinstance(e, dp_accounting.GaussianDpEvent) for e in inner.events
    ):
        if len(inner.events) == 1:
            return inner.events[0].noise_multiplier, None
        if len(inner.events) == 2:
            return inner.events[0].noise_multiplier, inner.events[1].noise_multiplier
        raise ValueError(
            f"cannot charge a {type(outer).__name__} of {len(inner.events)} Gaussians: a dpfl "
            "round releases at most two Gaussians (the update's and the adaptive count's)"
        )
    raise ValueError(
        f"cannot charge a {type(outer).__name__} of a {type(inner).__name__}: {_SUPPORTED}"
    )
