"""The ledger shared by dpfl's accountants: rounds, budget, state, ε/δ queries."""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import dp_accounting

from dpfl._checks import require_int, require_non_negative, require_probability
from dpfl.accounting._dp_events import rounds_of_event
from dpfl.accounting.budget import BudgetExceededError, PrivacyBudget
from dpfl.accounting.ceiling import NOISE_CEILING, ledger_ceiling_delta
from dpfl.accounting.events import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    Adjacency,
    FixedCohortRound,
    PoissonRound,
    Round,
    round_from_dict,
)

__all__: list[str] = []

Ledger = tuple[tuple[Round, int], ...]
_FORMAT = "dpfl.accounting/1"
_RELATIONS = {
    ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}


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

    @property
    def ceiling_delta(self) -> float:
        """The δ that the noise sampler's ceiling adds to this ledger (already in every ε and δ
        this accountant reports; see [`ceiling_delta`][dpfl.accounting.ceiling_delta])."""
        return ledger_ceiling_delta(self._ledger)

    # ----------------------------------------------------------------- composition
    def add_rounds(self, round: Round | dp_accounting.DpEvent, count: int = 1) -> None:
        """Compose ``count`` identical rounds into the ledger.

        Args:
            round: a [`PoissonRound`][dpfl.accounting.PoissonRound] or
                [`FixedCohortRound`][dpfl.accounting.FixedCohortRound] whose adjacency matches
                this accountant's, or a dp_accounting ``DpEvent`` describing such rounds: a
                ``PoissonSampledDpEvent`` (add/remove-one) or ``SampledWithoutReplacementDpEvent``
                (replace-one; its Gaussian's multiplier is relative to the replace-one
                sensitivity ``2C``) of a ``GaussianDpEvent``, an unsampled ``GaussianDpEvent``
                (a round that includes everyone), and ``SelfComposedDpEvent`` /
                ``ComposedDpEvent`` of these, such as another accountant's
                [`dp_event`][dpfl.accounting.RDPAccountant.dp_event]. The event is charged as
                those rounds, with every check below.
            count: number of times to compose ``round``, an integer >= 0 (0 is a no-op).

        Raises:
            BudgetExceededError: if a budget is set and the new ledger's ε at ``budget.delta`` would
                exceed ``budget.epsilon``; the ledger is left unchanged.
            ValueError: if the round cannot be accounted by this accountant (wrong adjacency, an
                unsupported round type or a ``DpEvent`` of another mechanism); the ledger is left
                unchanged.
            TypeError: if ``round`` is neither a round spec nor a ``DpEvent``, or ``count`` is not
                an integer.
        """
        candidate = self._extended(round, count)
        if self._budget is not None and candidate != self._ledger:
            eps = self._epsilon_total(candidate, self._budget.delta)
            if eps > self._budget.epsilon:
                raise BudgetExceededError(
                    f"adding {count} round(s) of {round} would bring epsilon to {eps:.6g} at "
                    f"delta={self._budget.delta:g}, over the budget epsilon="
                    f"{self._budget.epsilon:g} ({self.rounds} rounds composed so far)"
                    f"{_ceiling_note(candidate, self._budget.delta)}; the ledger is unchanged"
                )
        self._ledger = candidate

    def would_exceed(self, round: Round | dp_accounting.DpEvent, count: int = 1) -> bool:
        """Whether ``add_rounds(round, count)`` would exceed the budget (``False`` with no budget).

        Args:
            round: a round spec or a ``DpEvent``, as for ``add_rounds``.
            count: number of times to compose it, an integer >= 0.

        Raises:
            ValueError, TypeError: as ``add_rounds`` for an invalid round or count.
        """
        candidate = self._extended(round, count)
        if self._budget is None:
            return False
        return self._epsilon_total(candidate, self._budget.delta) > self._budget.epsilon

    def epsilon(self, delta: float) -> float:
        """Return the ε of all rounds composed so far at the given δ.

        The δ includes the noise sampler's ceiling (``ceiling_delta``): the Gaussian ε is
        taken at ``delta - ceiling_delta``, so ``(ε, delta)`` holds for dpfl's sampler.

        Args:
            delta: the target δ, in (0, 1).

        Returns:
            ε >= 0; ``math.inf`` when a round had ``noise_multiplier = 0`` or the ceiling's δ
            reaches ``delta`` (a noise multiplier far below any useful one).

        Raises:
            ValueError: if ``delta`` is outside (0, 1).
        """
        delta = require_probability("delta", delta, high_open=True)
        return self._epsilon_total(self._ledger, delta)

    def delta(self, epsilon: float) -> float:
        """Return the δ of all rounds composed so far at the given ε.

        Includes the noise sampler's ceiling (``ceiling_delta``), capped at 1.

        Args:
            epsilon: the target ε, >= 0 and finite.

        Returns:
            δ in [0, 1].

        Raises:
            ValueError: if ``epsilon`` is negative or not finite.
        """
        epsilon = require_non_negative("epsilon", epsilon)
        total = self._delta_of(self._ledger, epsilon) + ledger_ceiling_delta(self._ledger)
        return min(1.0, total)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The ledger as a ``ComposedDpEvent`` of ``SelfComposedDpEvent(round.dp_event(), count)``.

        Feed it to any dp_accounting accountant (constructed with the same neighbouring relation)
        to reproduce or cross-check this accountant's numbers (for a
        [`PLDAccountant`][dpfl.accounting.PLDAccountant], at the grid
        [`PLDAccountant.discretization_interval`][dpfl.accounting.PLDAccountant.discretization_interval]
        reports).
        """
        return _ledger_event(self._ledger)

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Return the privacy history as a JSON-able plain dict (see ``load_state_dict``)."""
        return {
            "format": _FORMAT,
            "accountant": self.kind,
            "adjacency": self._adjacency,
            "options": self._options(),
            "budget": None if self._budget is None else self._budget.to_dict(),
            "ledger": [{"round": r.to_dict(), "count": c} for r, c in self._ledger],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger and budget with those of ``state`` (from ``state_dict``).

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
    def _epsilon_total(self, ledger: Ledger, delta: float) -> float:
        """ε of ``ledger`` at ``delta`` for dpfl's sampler: the Gaussian ε at the δ the
        sampler's ceiling leaves (``inf`` when it leaves none)."""
        rest = gaussian_delta(ledger, delta)
        return math.inf if rest is None else self._epsilon_of(ledger, rest)

    def _extended(
        self,
        round: Round | dp_accounting.DpEvent,
        count: Any,
        *,
        ledger: Ledger | None = None,
        minimum: int = 0,
    ) -> Ledger:
        """Validate ``(round, count)`` and return the ledger with it appended (merged)."""
        if isinstance(round, dp_accounting.DpEvent):
            count = require_int("count", count, minimum=minimum)
            entries = rounds_of_event(round)
            if len({rnd for rnd, _ in entries}) == 1:
                entries = [(entries[0][0], count * sum(c for _, c in entries))]
            else:
                entries = entries * count
            extended = self._ledger if ledger is None else ledger
            for rnd, times in entries:
                extended = self._extended(rnd, times, ledger=extended)
            return extended
        if not isinstance(round, PoissonRound | FixedCohortRound):
            raise TypeError(
                "round must be a PoissonRound, a FixedCohortRound or a dp_accounting DpEvent, "
                f"got {type(round).__name__}"
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


def gaussian_delta(ledger: Ledger, delta: float) -> float | None:
    """The δ left to the Gaussian accounting of ``ledger`` once the sampler's ceiling is paid,
    or ``None`` when the ceiling alone reaches ``delta``."""
    rest = delta - ledger_ceiling_delta(ledger)
    return rest if rest > 0.0 else None


def _ceiling_note(ledger: Ledger, delta: float) -> str:
    """A clause naming the ceiling when it alone exhausts ``delta``, else ``""``."""
    floor = ledger_ceiling_delta(ledger)
    if floor < delta:
        return ""
    small = min(
        (r.noise_multiplier for r, _ in ledger if r.noise_multiplier > 0), default=0.0
    )
    return (
        f" (the noise sampler's {NOISE_CEILING:.3f}-sigma ceiling alone needs delta >= "
        f"{floor:.3g} at noise_multiplier={small:g}; raise noise_multiplier)"
    )


def _ledger_event(ledger: Ledger) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(r.dp_event(), c) for r, c in ledger]
    )
