"""RDP and PLD privacy accountants over a per-round ledger, built on Google's dp_accounting.

Both accountants keep the same ledger: a list of ``(round, count)`` entries where consecutive
identical rounds are merged, so 20,000 identical rounds cost one entry. ε and δ are a function of
the ledger alone (caches only avoid recomputing the same thing), so an accountant restored from
:meth:`state_dict` gives exactly the numbers of the original, whatever the sequence of
``add_rounds`` calls was.

References:
    Pelikan et al., arXiv 2310.00098, section 2.4 (RDP accounting of the Poisson-subsampled
    Gaussian, user-level, δ = 1e-9).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeAlias, TypeVar

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from dpfl._checks import require_int, require_non_negative, require_positive, require_probability
from dpfl.accounting import _pld
from dpfl.accounting.budget import BudgetExceededError, PrivacyBudget
from dpfl.accounting.events import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    Adjacency,
    FixedCohortRound,
    PoissonRound,
    Round,
    accounted_noise_multiplier,
    round_from_dict,
)

__all__ = ["DEFAULT_VALUE_DISCRETIZATION_INTERVAL", "PLDAccountant", "RDPAccountant"]

Ledger = tuple[tuple[Round, int], ...]
_FORMAT = "dpfl.accounting/1"
_RELATIONS = {
    ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}

#: Default PLD grid step: ``None`` = automatic. The grid starts at 4x the privacy-loss scale of one
#: round (q·sqrt(exp(1/z²) - 1), rounded down to a power of two) and is halved until ε changes by
#: at most 1%; every grid's ε is an upper bound (dp_accounting discretises pessimistically) and the
#: smallest is reported. Within 3% of dp_accounting's default grid (1e-4) on any configuration,
#: often tighter; see :class:`PLDAccountant` and benchmarks/results/accounting.md.
DEFAULT_VALUE_DISCRETIZATION_INTERVAL: float | None = None

_AUTO_RTOL = 0.01  # stop halving the grid once ε changes by at most this fraction
_AUTO_DELTA_RTOL = 0.1  # the same for δ(ε) (δ moves ~10x more than ε for the same grid error)
_AUTO_MAX_STEPS = 10
_AUTO_START = 4.0  # start grid / per-round privacy-loss scale (coarse: halving refines it)
_AUTO_MAX_INTERVAL = 2.0**-5
_AUTO_MIN_INTERVAL = 2.0**-60
_CACHE_SIZE = 16

_PLD: TypeAlias = privacy_loss_distribution.PrivacyLossDistribution
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _LedgerAccountant(abc.ABC):
    """Shared ledger, budget and checkpoint logic; subclasses supply ε(ledger) and δ(ledger)."""

    kind: ClassVar[str]

    def __init__(self, *, budget: PrivacyBudget | None, adjacency: Adjacency) -> None:
        if adjacency not in _RELATIONS:
            raise ValueError(f"adjacency must be one of {sorted(_RELATIONS)}, got {adjacency!r}")
        if budget is not None and not isinstance(budget, PrivacyBudget):
            raise TypeError(f"budget must be a PrivacyBudget or None, got {type(budget).__name__}")
        self._adjacency: Adjacency = adjacency
        self._budget = budget
        self._ledger: Ledger = ()

    # ----------------------------------------------------------------- properties
    @property
    def adjacency(self) -> Adjacency:
        """The neighbouring relation every guarantee of this accountant is stated under."""
        return self._adjacency

    @property
    def budget(self) -> PrivacyBudget | None:
        """The budget that ``add_rounds`` enforces, or ``None``."""
        return self._budget

    @property
    def rounds(self) -> int:
        """Total number of rounds composed so far."""
        return sum(count for _, count in self._ledger)

    @property
    def ledger(self) -> list[tuple[Round, int]]:
        """A copy of the ledger: ``(round, count)`` entries, consecutive duplicates merged."""
        return list(self._ledger)

    # ----------------------------------------------------------------- composition
    def add_rounds(self, round: Round, count: int = 1) -> None:
        """Compose ``count`` identical rounds into the ledger.

        Args:
            round: a :class:`PoissonRound` or :class:`FixedCohortRound` whose adjacency matches
                this accountant's.
            count: number of rounds, an integer >= 0 (0 is a no-op).

        Raises:
            BudgetExceededError: if a budget is set and the new ledger's ε at ``budget.delta`` would
                exceed ``budget.epsilon``; the ledger is left unchanged.
            ValueError: if the round cannot be accounted by this accountant (wrong adjacency or an
                unsupported round type); the ledger is left unchanged.
            TypeError: if ``round`` is not a round spec or ``count`` is not an integer.
        """
        candidate = self._extended(round, count)
        if self._budget is not None and candidate != self._ledger:
            eps = self._epsilon_of(candidate, self._budget.delta)
            if eps > self._budget.epsilon:
                raise BudgetExceededError(
                    f"adding {count} round(s) of {round} would bring epsilon to {eps:.6g} at "
                    f"delta={self._budget.delta:g}, over the budget epsilon="
                    f"{self._budget.epsilon:g} ({self.rounds} rounds composed so far); "
                    "the ledger is unchanged"
                )
        self._ledger = candidate

    def would_exceed(self, round: Round, count: int = 1) -> bool:
        """Whether ``add_rounds(round, count)`` would exceed the budget (``False`` with no budget).

        Raises:
            ValueError, TypeError: as :meth:`add_rounds` for an invalid round or count.
        """
        candidate = self._extended(round, count)
        if self._budget is None:
            return False
        return self._epsilon_of(candidate, self._budget.delta) > self._budget.epsilon

    def epsilon(self, delta: float) -> float:
        """Return the ε of all rounds composed so far at the given δ.

        Args:
            delta: the target δ, in (0, 1).

        Returns:
            ε >= 0; ``math.inf`` when a round had ``noise_multiplier = 0``.

        Raises:
            ValueError: if ``delta`` is outside (0, 1).
        """
        delta = require_probability("delta", delta, high_open=True)
        return self._epsilon_of(self._ledger, delta)

    def delta(self, epsilon: float) -> float:
        """Return the δ of all rounds composed so far at the given ε.

        Args:
            epsilon: the target ε, >= 0 and finite.

        Returns:
            δ in [0, 1].

        Raises:
            ValueError: if ``epsilon`` is negative or not finite.
        """
        epsilon = require_non_negative("epsilon", epsilon)
        return self._delta_of(self._ledger, epsilon)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The ledger as a ``ComposedDpEvent`` of ``SelfComposedDpEvent(round.dp_event(), count)``.

        Feed it to any dp_accounting accountant (constructed with the same neighbouring relation)
        to reproduce or cross-check this accountant's numbers (for a :class:`PLDAccountant`, at the
        grid :meth:`PLDAccountant.discretization_interval` reports).
        """
        return _ledger_event(self._ledger)

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Return the privacy history as a JSON-able plain dict (see :meth:`load_state_dict`)."""
        return {
            "format": _FORMAT,
            "accountant": self.kind,
            "adjacency": self._adjacency,
            "options": self._options(),
            "budget": None if self._budget is None else self._budget.to_dict(),
            "ledger": [{"round": r.to_dict(), "count": c} for r, c in self._ledger],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger and budget with those of ``state`` (from :meth:`state_dict`).

        The state is validated in full before anything changes: it must come from the same kind
        of accountant with the same adjacency and backend options, and every round must be valid.
        Like ``torch.optim.Optimizer.load_state_dict``, the stored budget replaces the constructor's.

        Raises:
            ValueError: if ``state`` is malformed or was saved by an incompatible accountant; the
                accountant is left unchanged.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        expected = {"format", "accountant", "adjacency", "options", "budget", "ledger"}
        if set(state) != expected:
            raise ValueError(
                f"state must have exactly the keys {sorted(expected)}, got {sorted(state)}"
            )
        if state["format"] != _FORMAT:
            raise ValueError(f"state['format'] must be {_FORMAT!r}, got {state['format']!r}")
        for key, mine in (("accountant", self.kind), ("adjacency", self._adjacency)):
            if state[key] != mine:
                raise ValueError(
                    f"state[{key!r}] is {state[key]!r} but this accountant's is {mine!r}; "
                    f"load it into an accountant constructed with {key}={state[key]!r}"
                )
        if state["options"] != self._options():
            raise ValueError(
                f"state['options'] is {state['options']!r} but this accountant uses "
                f"{self._options()!r}; construct it with the same options to keep the history exact"
            )
        budget = None if state["budget"] is None else PrivacyBudget.from_dict(state["budget"])
        if not isinstance(state["ledger"], list):
            raise ValueError("state['ledger'] must be a list of {'round': ..., 'count': ...}")
        ledger: Ledger = ()
        for i, entry in enumerate(state["ledger"]):
            if not isinstance(entry, Mapping) or set(entry) != {"round", "count"}:
                raise ValueError(f"state['ledger'][{i}] must be a dict with keys 'round', 'count'")
            try:
                rnd = round_from_dict(entry["round"])
                ledger = self._extended(rnd, entry["count"], ledger=ledger, minimum=1)
            except (TypeError, ValueError) as err:
                raise ValueError(f"state['ledger'][{i}] is invalid: {err}") from err
        self._budget = budget
        self._ledger = ledger

    # ----------------------------------------------------------------- internals
    def _extended(
        self, round: Round, count: Any, *, ledger: Ledger | None = None, minimum: int = 0
    ) -> Ledger:
        """Validate ``(round, count)`` and return the ledger with it appended (merged)."""
        if not isinstance(round, PoissonRound | FixedCohortRound):
            raise TypeError(
                f"round must be a PoissonRound or FixedCohortRound, got {type(round).__name__}"
            )
        count = require_int("count", count, minimum=minimum)
        self._check_supported(round)
        base = self._ledger if ledger is None else ledger
        if count == 0:
            return base
        if base and base[-1][0] == round:
            return (*base[:-1], (round, base[-1][1] + count))
        return (*base, (round, count))

    def _check_supported(self, round: Round) -> None:
        if round.adjacency != self._adjacency:
            hint = (
                "use PoissonRound (Poisson sampling) for an add/remove-one guarantee"
                if self._adjacency == ADD_OR_REMOVE_ONE
                else "use FixedCohortRound for a replace-one guarantee"
            )
            raise ValueError(
                f"round {type(round).__name__} is only valid under {round.adjacency!r} adjacency, "
                f"but this {type(self).__name__} accounts under {self._adjacency!r}: construct "
                f"{type(self).__name__}(adjacency={round.adjacency!r}) or {hint}"
            )

    @abc.abstractmethod
    def _options(self) -> dict[str, Any]:
        """JSON-able backend options that must match for a state to load."""

    @abc.abstractmethod
    def _epsilon_of(self, ledger: Ledger, delta: float) -> float:
        """ε of ``ledger`` at ``delta`` (already validated)."""

    @abc.abstractmethod
    def _delta_of(self, ledger: Ledger, epsilon: float) -> float:
        """δ of ``ledger`` at ``epsilon`` (already validated)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rounds={self.rounds}, adjacency={self._adjacency!r}, "
            f"budget={self._budget!r})"
        )


class RDPAccountant(_LedgerAccountant):
    """Rényi-DP accountant (dp_accounting's ``RdpAccountant`` maths) over a per-round ledger.

    The RDP curve of each distinct round is computed once and cached; a ledger entry of ``count``
    rounds contributes ``count`` times that curve, so ε for 20,000 rounds costs the same as for one.
    ε is converted from RDP with dp_accounting's ``compute_epsilon`` (the improved conversion of
    arXiv 2004.00010, Prop. 12), the same as ``RdpAccountant.get_epsilon``.

    Args:
        budget: optional :class:`PrivacyBudget` enforced by :meth:`add_rounds`.
        adjacency: ``"add_or_remove_one"`` (default; accepts :class:`PoissonRound`) or
            ``"replace_one"`` (accepts :class:`FixedCohortRound`). One accountant, one relation:
            a round of the other relation raises ``ValueError``.
        orders: RDP orders (all > 1); default dp_accounting's ``DEFAULT_RDP_ORDERS``.

    Raises:
        ValueError: if ``adjacency`` or ``orders`` is invalid.

    Examples:
        >>> acc = RDPAccountant()
        >>> acc.add_rounds(PoissonRound(noise_multiplier=0.6144, sample_rate=0.002947), 2034)
        >>> round(acc.epsilon(1e-9), 1)
        7.2

    References:
        arXiv 2310.00098, section 2.4 (ε = 7.2 for this run, RDP, δ = 1e-9).
    """

    kind = "rdp"

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
        """The composed RDP guarantee at each of :attr:`orders` (a copy)."""
        return self._rdp_of(self._ledger)

    def round_rdp(self, round: Round) -> np.ndarray:
        """The RDP curve of one round at :attr:`orders`, computed by dp_accounting (cached)."""
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
        """The RDP order at which :meth:`epsilon` is attained for this ``delta``.

        Returns:
            The order (one of :attr:`orders`); ``nan`` when ε is infinite or no round was composed.

        Raises:
            ValueError: if ``delta`` is outside (0, 1).
        """
        delta = require_probability("delta", delta, high_open=True)
        rdp = self._rdp_of(self._ledger)
        eps, order = rdp_privacy_accountant.compute_epsilon(self._orders, rdp, delta)
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


class PLDAccountant(_LedgerAccountant):
    """Privacy-loss-distribution accountant (dp_accounting's PLD maths) over a ledger.

    Tighter than RDP for the same run. dp_accounting discretises privacy losses pessimistically
    onto a grid of step ``value_discretization_interval``: every grid gives an upper bound on ε,
    a finer grid a tighter one.

    **Default grid (automatic).** With ``value_discretization_interval=None`` the grid is chosen
    per ledger and query: it starts at four times the privacy-loss scale of one round,
    ``q·sqrt(exp(1/z²) - 1)`` (count-weighted RMS over the ledger, rounded down to a power of two,
    at most 2⁻⁵ or ~ε/256 for a large ε), and is halved until ε changes by at most 1% (δ: 10%).
    Each grid's ε is an upper bound, so the smallest one is reported; it is within 3% of
    dp_accounting's default grid (1e-4)
    on any configuration and tighter where that grid is too coarse (small ε).
    :meth:`discretization_interval` says which grid was used. An explicit float gives exactly
    dp_accounting's result at that grid.

    **Cost.** One round's PLD is built once per (round, grid) and ``count`` identical rounds are
    composed by one FFT self-composition, so ε after T identical rounds costs about the same for
    any T, and accounting one round at a time (as ``run_rounds`` does) costs the same per round at
    round 10 as at round 10,000. The composed PLDs of the last few ledgers are kept, so a ledger
    that grows by one entry composes one entry. Work that would need more than 2²⁴ grid points is
    refused up front with a ``ValueError`` (never a memory error).

    Only add/remove-one adjacency with :class:`PoissonRound` is supported: dp_accounting's PLD
    cannot account sampling without replacement, so a :class:`FixedCohortRound` raises
    ``ValueError`` telling you to use :class:`RDPAccountant` with ``adjacency="replace_one"``.

    Args:
        budget: optional :class:`PrivacyBudget` enforced by :meth:`add_rounds`.
        adjacency: must be ``"add_or_remove_one"``.
        value_discretization_interval: PLD grid step, > 0, or ``None`` (default) for the
            automatic grid described above.

    Raises:
        ValueError: if ``adjacency`` is not add/remove-one or the interval is not > 0.

    Examples:
        >>> acc = PLDAccountant()
        >>> acc.add_rounds(PoissonRound(noise_multiplier=0.6144, sample_rate=0.002947), 2034)
        >>> acc.epsilon(1e-9) < 7.2
        True

    References:
        arXiv 2310.00098, section 2.4 ("a PLD accountant gives tighter ε for the same run");
        Doroshenko et al., "Connect the Dots", PETS 2022 (the pessimistic discretisation).
    """

    kind = "pld"

    def __init__(
        self,
        *,
        budget: PrivacyBudget | None = None,
        adjacency: Adjacency = ADD_OR_REMOVE_ONE,
        value_discretization_interval: float | None = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
    ) -> None:
        super().__init__(budget=budget, adjacency=adjacency)
        if adjacency != ADD_OR_REMOVE_ONE:
            raise ValueError(
                f"adjacency must be 'add_or_remove_one' for PLDAccountant, got {adjacency!r}; "
                "for fixed-size cohorts (replace-one) use RDPAccountant(adjacency='replace_one')"
            )
        self._interval = (
            None
            if value_discretization_interval is None
            else require_positive("value_discretization_interval", value_discretization_interval)
        )
        self._round_plds: OrderedDict[tuple[PoissonRound, float], _PLD] = OrderedDict()
        self._composed: OrderedDict[tuple[Ledger, float], _PLD] = OrderedDict()
        self._results: OrderedDict[tuple[Ledger, str, float], tuple[float, float]] = OrderedDict()

    @property
    def value_discretization_interval(self) -> float | None:
        """The fixed PLD grid step, or ``None`` for the automatic grid."""
        return self._interval

    def discretization_interval(self, delta: float) -> float:
        """The grid step that :meth:`epsilon` settles on for this ``delta`` and the current ledger.

        Raises:
            ValueError: if ``delta`` is outside (0, 1).
        """
        delta = require_probability("delta", delta, high_open=True)
        if self._interval is not None:
            return self._interval
        return self._cached_refine(self._ledger, "epsilon", delta)[1]

    def _check_supported(self, round: Round) -> None:
        if isinstance(round, FixedCohortRound):
            raise ValueError(
                "PLDAccountant cannot account a FixedCohortRound (sampling without replacement is "
                "not supported by dp_accounting's PLD): use RDPAccountant(adjacency='replace_one')"
            )
        super()._check_supported(round)
        z, q = accounted_noise_multiplier(round), round.sample_rate
        if z == 0 or q == 0:
            return
        interval = self._interval if self._interval is not None else _start_interval(((round, 1),))
        points = _round_points(z, q, interval)
        if points > _pld.MAX_POINTS:
            if self._interval is not None:
                raise ValueError(
                    f"value_discretization_interval={interval!r} is too fine for {round}: one "
                    f"round's privacy-loss distribution would need ~{points:.3g} grid points "
                    f"(limit {_pld.MAX_POINTS:.3g}); use a coarser grid or the default (None)"
                )
            raise ValueError(
                f"noise_multiplier={round.noise_multiplier!r} is too small for PLD accounting: "
                f"one round's privacy loss spans ~{points * interval:.3g} nats, ~{points:.3g} grid "
                f"points (limit {_pld.MAX_POINTS:.3g}); ε is enormous, use RDPAccountant"
            )

    # ----------------------------------------------------------------- ε, δ
    def _epsilon_of(self, ledger: Ledger, delta: float) -> float:
        return self._cached_refine(ledger, "epsilon", delta)[0]

    def _delta_of(self, ledger: Ledger, epsilon: float) -> float:
        return self._cached_refine(ledger, "delta", epsilon)[0]

    def _cached_refine(self, ledger: Ledger, kind: str, at: float) -> tuple[float, float]:
        """ε(δ) or δ(ε) of ``ledger`` and its grid, remembered for the last few queries."""
        key = (ledger, kind, at)
        hit = _lru_get(self._results, key)
        if hit is not None:
            return hit
        if kind == "epsilon":
            result = self._refine(ledger, _epsilon_measure(at), _AUTO_RTOL)
        else:

            def measure(pld: _PLD | None) -> float:
                if pld is None:
                    return 1.0
                return float(min(1.0, max(0.0, pld.get_delta_for_epsilon(at))))

            result = self._refine(ledger, measure, _AUTO_DELTA_RTOL)
        _lru_put(self._results, key, result)
        return result

    def _refine(
        self, ledger: Ledger, measure: Callable[[_PLD | None], float], rtol: float
    ) -> tuple[float, float]:
        """(value, grid): the fixed grid's value, or the automatic grid's (see class docstring)."""
        active = tuple((r, c) for r, c in ledger if r.sample_rate > 0)
        if not active:
            return measure(_identity()), self._interval or _AUTO_MAX_INTERVAL
        if any(accounted_noise_multiplier(r) == 0 for r, _ in active):
            return measure(None), self._interval or _AUTO_MAX_INTERVAL  # no noise: ε = ∞
        if self._interval is not None:
            return measure(self._compose(ledger, self._interval)), self._interval
        interval = _start_interval(active)
        best, best_interval, previous = math.inf, interval, None
        for _ in range(_AUTO_MAX_STEPS):
            try:
                value = measure(self._compose(ledger, interval))
            except _pld.PLDTooLargeError:
                if previous is None:
                    raise
                break  # the finest affordable grid's value is still an upper bound
            if value <= best:
                best, best_interval = value, interval
            if previous is not None and (
                previous - value <= rtol * value or (math.isinf(value) and math.isinf(previous))
            ):
                break
            if value == 0 or interval / 2 < _AUTO_MIN_INTERVAL:
                break
            previous, interval = value, interval / 2
        return best, best_interval

    def _compose(self, ledger: Ledger, interval: float) -> _PLD:
        """The composed PLD of ``ledger`` at ``interval``, as dp_accounting's accountant builds it.

        ``identity.compose(e₁).compose(e₂)…`` with ``eᵢ = round_pld.self_compose(countᵢ)``. The
        PLD of ``ledger[:-1]`` is cached too, so when the last entry's count grows (the round
        loop adds one round at a time) only that entry is recomposed.
        """
        cached = _lru_get(self._composed, (ledger, interval))
        if cached is not None:
            return cached
        if not ledger:
            return _identity(interval)
        prefix = _lru_get(self._composed, (ledger[:-1], interval))
        if prefix is None:
            prefix = _identity(interval)
            for rnd, count in ledger[:-1]:
                prefix = self._compose_entry(prefix, rnd, count, interval)
            _lru_put(self._composed, (ledger[:-1], interval), prefix)
        rnd, count = ledger[-1]
        pld = self._compose_entry(prefix, rnd, count, interval)
        _lru_put(self._composed, (ledger, interval), pld)
        return pld

    def _compose_entry(self, pld: _PLD, round: Round, count: int, interval: float) -> _PLD:
        if round.sample_rate == 0:
            return pld  # nobody can be sampled: a no-op, as in dp_accounting
        single = self._round_pld(round, interval)
        try:
            repeated = _pld.self_compose(single, count)
        except _pld.PLDTooLargeError as err:
            raise _pld.PLDTooLargeError(
                f"rounds={count} of {round} are too many for PLD accounting at grid step "
                f"{interval:g}: {err}; account fewer rounds or use RDPAccountant",
                err.points,
            ) from None
        return pld.compose(repeated)

    def _round_pld(self, round: Round, interval: float) -> _PLD:
        assert isinstance(round, PoissonRound)
        key = (round, interval)
        pld = _lru_get(self._round_plds, key)
        if pld is None:
            pld = _pld.gaussian_pld(accounted_noise_multiplier(round), round.sample_rate, interval)
            _lru_put(self._round_plds, key, pld)
        return pld

    def _options(self) -> dict[str, Any]:
        return {"value_discretization_interval": self._interval}


_round_points = functools.lru_cache(maxsize=256)(_pld.round_points)


@functools.lru_cache(maxsize=64)
def _identity(interval: float = _AUTO_MAX_INTERVAL) -> _PLD:
    """dp_accounting's identity PLD (immutable: ``compose`` returns new objects)."""
    return privacy_loss_distribution.identity(value_discretization_interval=interval)


def _epsilon_measure(delta: float) -> Callable[[_PLD | None], float]:
    def measure(pld: _PLD | None) -> float:
        if pld is None:
            return math.inf
        eps = float(pld.get_epsilon_for_delta(delta))
        return max(0.0, eps) if not math.isnan(eps) else math.inf

    return measure


def _start_interval(ledger: Ledger) -> float:
    """4x the count-weighted RMS privacy-loss scale q·sqrt(exp(1/z²) - 1), a power of two.

    At most 2⁻⁵, or ε/256 for a rough ε of the ledger when that is larger (mean + 3 std of the
    composed loss, from the same per-round scale), so that a long ledger with a large ε starts
    on a grid whose number of points does not grow with the number of rounds.
    """
    weighted, total = 0.0, 0
    for rnd, count in ledger:
        z, q = accounted_noise_multiplier(rnd), rnd.sample_rate
        if z == 0 or q == 0:
            continue
        weighted += count * q * q * math.expm1(min(1.0 / (z * z), 700.0))
        total += count
    if not total:
        return _AUTO_MAX_INTERVAL
    rough_epsilon = weighted / 2 + 3 * math.sqrt(weighted)
    ceiling = min(max(_AUTO_MAX_INTERVAL, rough_epsilon / 256), 8.0)
    raw = min(_AUTO_START * math.sqrt(weighted / total), ceiling)
    return max(2.0 ** math.floor(math.log2(raw)), _AUTO_MIN_INTERVAL) if raw > 0 else 2.0**-40


def _lru_get(cache: OrderedDict[_K, _V], key: _K) -> _V | None:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _lru_put(cache: OrderedDict[_K, _V], key: _K, value: _V) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


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


def _ledger_event(ledger: Ledger) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(r.dp_event(), c) for r, c in ledger]
    )
