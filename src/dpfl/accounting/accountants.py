"""RDP and PLD privacy accountants over a per-round ledger, built on Google's dp_accounting.

Both accountants keep the same ledger: a list of ``(round, count)`` entries where consecutive
identical rounds are merged, so 20,000 identical rounds cost one entry. ε and δ are a function of
the ledger alone (caches only avoid recomputing the same thing), so an accountant restored from
``state_dict`` gives exactly the numbers of the original, whatever the sequence of
``add_rounds`` calls was.

References:
    Pelikan et al., arXiv 2310.00098, section 2.4 (RDP accounting of the Poisson-subsampled
    Gaussian, user-level, δ = 1e-9).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from dpfl._checks import require_positive, require_probability
from dpfl.accounting._ledger import _RELATIONS, Ledger, _LedgerAccountant, gaussian_delta
from dpfl.accounting._pld_accountant import DEFAULT_VALUE_DISCRETIZATION_INTERVAL, PLDAccountant
from dpfl.accounting.budget import PrivacyBudget
from dpfl.accounting.events import (
    ADD_OR_REMOVE_ONE,
    Adjacency,
    Round,
)

__all__ = ["DEFAULT_VALUE_DISCRETIZATION_INTERVAL", "PLDAccountant", "RDPAccountant"]


class RDPAccountant(_LedgerAccountant):
    """Rényi-DP accountant (dp_accounting's ``RdpAccountant`` maths) over a per-round ledger.

    The RDP curve of each distinct round is computed once and cached; a ledger entry of ``count``
    rounds contributes ``count`` times that curve, so ε for 20,000 rounds costs the same as for one.
    ε is converted from RDP with dp_accounting's ``compute_epsilon`` (the improved conversion of
    arXiv 2004.00010, Prop. 12), the same as ``RdpAccountant.get_epsilon``.

    Args:
        budget: optional [`PrivacyBudget`][dpfl.accounting.PrivacyBudget] enforced by
            [`add_rounds`][dpfl.accounting.RDPAccountant.add_rounds].
        adjacency: ``"add_or_remove_one"`` (default; accepts
            [`PoissonRound`][dpfl.accounting.PoissonRound]) or ``"replace_one"`` (accepts
            [`FixedCohortRound`][dpfl.accounting.FixedCohortRound]). One accountant, one relation: a
            round of the other relation raises ``ValueError``.
        orders: RDP orders (all > 1); default dp_accounting's ``DEFAULT_RDP_ORDERS``.

    Raises:
        ValueError: if ``adjacency`` or ``orders`` is invalid.

    Examples:
        >>> from dpfl.accounting import PoissonRound
        >>> acc = RDPAccountant()
        >>> acc.add_rounds(PoissonRound(noise_multiplier=0.6144, sample_rate=0.002947), 2034)
        >>> round(acc.epsilon(1e-9), 1)
        7.2

    References:
        arXiv 2310.00098, section 2.4 (ε = 7.2 for this run, RDP, δ = 1e-9).
    """

    kind = "rdp"
    """The accountant's name in [`state_dict`][dpfl.accounting.RDPAccountant.state_dict]."""

    def __init__(
        self,
        *,
        budget: PrivacyBudget | None = None,
        adjacency: Adjacency = ADD_OR_REMOVE_ONE,
        orders: Sequence[float] | None = None,
    ) -> None:
        super().__init__(budget=budget, adjacency=adjacency)
        if orders is None:
            orders = rdp_privacy_accountant.DEFAULT_RDP_ORDERS
        checked = [require_positive(f"orders[{i}]", a) for i, a in enumerate(orders)]
        if not checked or min(checked) <= 1:
            raise ValueError(f"orders must be a non-empty sequence of numbers > 1, got {orders!r}")
        self._orders = np.array(checked, dtype=np.float64)
        self._curves: dict[Round, np.ndarray] = {}

    @property
    def orders(self) -> np.ndarray:
        """The RDP orders (a copy)."""
        return self._orders.copy()

    def rdp(self) -> np.ndarray:
        """The composed RDP guarantee at each of [`orders`][dpfl.accounting.RDPAccountant.orders] (a copy)."""
        return self._rdp_of(self._ledger)

    def round_rdp(self, round: Round) -> np.ndarray:
        """The RDP curve of one round at [`orders`][dpfl.accounting.RDPAccountant.orders].

        Computed by dp_accounting once per distinct round and cached.

        Args:
            round: A round this accountant accepts (same adjacency).

        Returns:
            The RDP ε at each order (a copy).

        Raises:
            ValueError: if the round's adjacency is not this accountant's.
        """
        self._extended(round, 1)  # validates the round for this accountant
        curve = self._curves.get(round)
        if curve is None and round.noise_multiplier == 0 and round.sample_rate > 0:
            # No noise: any round that can include a user releases it exactly (ε = ∞). Some
            # dp_accounting paths divide by z here instead of returning infinity.
            curve = np.full(len(self._orders), np.inf)
            self._curves[round] = curve
        if curve is None:
            backend = rdp_privacy_accountant.RdpAccountant(
                orders=list(self._orders), neighboring_relation=_RELATIONS[self._adjacency]
            )
            with _quiet_unconverged_orders():
                curve = backend.compose(round.dp_event()).rdp
            self._curves[round] = curve
        return curve.copy()

    @property
    def excluded_orders(self) -> tuple[float, ...]:
        """Orders left out of the ε conversion because the composed RDP there is infinite.

        dp_accounting's series for fractional orders close to 1 does not always converge (e.g. at
        sample rate 0.5); it then bounds that order's RDP by infinity, which removes the order
        from the conversion (ε stays an upper bound; it is attained at another order). dpfl keeps
        dp_accounting's per-order warnings off stderr and reports the orders here instead. With
        ``noise_multiplier = 0`` every order is excluded and ε is infinite.
        """
        rdp = self._rdp_of(self._ledger)
        return tuple(float(a) for a in self._orders[np.isinf(rdp)])

    def epsilon_order(self, delta: float) -> float:
        """The RDP order at which [`epsilon`][dpfl.accounting.RDPAccountant.epsilon] is attained.

        Args:
            delta: The target δ, in (0, 1).

        Returns:
            The order (one of [`orders`][dpfl.accounting.RDPAccountant.orders]); ``nan`` when ε is
            infinite or no round was composed.

        Raises:
            ValueError: if ``delta`` is outside (0, 1).
        """
        delta = require_probability("delta", delta, high_open=True)
        rest = gaussian_delta(self._ledger, delta)
        if rest is None:
            return math.nan
        rdp = self._rdp_of(self._ledger)
        eps, order = rdp_privacy_accountant.compute_epsilon(self._orders, rdp, rest)
        if not self._ledger or math.isinf(eps):
            return math.nan
        return float(order)

    def _rdp_of(self, ledger: Ledger) -> np.ndarray:
        total = np.zeros_like(self._orders)
        for rnd, count in ledger:
            total = total + count * self.round_rdp(rnd)
        return total

    def _epsilon_of(self, ledger: Ledger, delta: float) -> float:
        eps, _ = rdp_privacy_accountant.compute_epsilon(self._orders, self._rdp_of(ledger), delta)
        return float(eps)

    def _delta_of(self, ledger: Ledger, epsilon: float) -> float:
        delta, _ = rdp_privacy_accountant.compute_delta(self._orders, self._rdp_of(ledger), epsilon)
        return float(delta)

    def _options(self) -> dict[str, Any]:
        return {"orders": [float(a) for a in self._orders]}


class _UnconvergedOrderFilter(logging.Filter):
    """Drops dp_accounting's "failed to converge ... Excluding this order" absl warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in str(record.msg)


@contextlib.contextmanager
def _quiet_unconverged_orders() -> Iterator[None]:
    """Silence, for the duration of one dp_accounting call, its per-order convergence warnings.

    The excluded orders are still visible: their RDP is infinite (``RDPAccountant.excluded_orders``).
    Scoped to the call: the filter is removed afterwards, other absl messages pass through.
    """
    logger = logging.getLogger("absl")
    quiet = _UnconvergedOrderFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
