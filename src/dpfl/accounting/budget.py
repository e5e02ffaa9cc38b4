"""A privacy budget (ε, δ) and the error raised when composing would exceed it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpfl._checks import require_positive, require_probability
from dpfl._errors import DPFLError

__all__ = ["BudgetExceededError", "PrivacyBudget"]


class BudgetExceededError(RuntimeError, DPFLError):
    """Raised by ``add_rounds`` when the new rounds would push ε past the budget.

    The accountant's ledger is left unchanged when this is raised, so training can stop cleanly
    (or continue with fewer rounds) without corrupting the privacy history.
    """


@dataclass(frozen=True)
class PrivacyBudget:
    """A total (ε, δ) guarantee that a run must not exceed.

    Args:
        epsilon: the largest ε allowed, > 0 and finite.
        delta: the δ at which ε is measured, in (0, 1).

    Raises:
        ValueError: if ``epsilon`` <= 0 or not finite, or ``delta`` is outside (0, 1).

    Examples:
        >>> PrivacyBudget(epsilon=7.2, delta=1e-9)
        PrivacyBudget(epsilon=7.2, delta=1e-09)

    References:
        arXiv 2310.00098, section 2.4 (user-level ε at δ = 1e-9).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", require_positive("epsilon", self.epsilon))
        object.__setattr__(self, "delta", require_probability("delta", self.delta, high_open=True))

    def to_dict(self) -> dict[str, float]:
        """Return ``{"epsilon": ..., "delta": ...}``."""
        return {"epsilon": self.epsilon, "delta": self.delta}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyBudget:
        """Rebuild a budget from [`to_dict`][dpfl.accounting.PrivacyBudget.to_dict] output.

        Args:
            data: The dict from ``to_dict()`` (keys ``"epsilon"`` and ``"delta"``), validated.

        Raises:
            ValueError: if a key is missing or a value is out of range.
        """
        if not isinstance(data, Mapping) or set(data) != {"epsilon", "delta"}:
            raise ValueError(f"budget must be a dict with keys 'epsilon' and 'delta', got {data!r}")
        return cls(epsilon=data["epsilon"], delta=data["delta"])
