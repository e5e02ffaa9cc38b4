"""Argument checks of the ASR example's constructors (the example uses only dpfl's public API).

Each check returns the value converted (``int`` or ``float``) or raises ``TypeError`` /
``ValueError`` with a message that names the argument and what it accepts.
"""

from __future__ import annotations

import math
from numbers import Real

__all__ = ["require_int", "require_non_negative", "require_positive", "require_probability"]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return x


def require_int(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an int (an integral float is accepted), at least ``minimum``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def require_positive(name: str, value: object) -> float:
    """``value`` as a finite float > 0."""
    x = _real(name, value)
    if not (0 < x < math.inf):
        raise ValueError(f"{name} must be > 0 and finite, got {x!r}")
    return x


def require_non_negative(name: str, value: object) -> float:
    """``value`` as a finite float >= 0."""
    x = _real(name, value)
    if not (0 <= x < math.inf):
        raise ValueError(f"{name} must be >= 0 and finite, got {x!r}")
    return x


def require_probability(name: str, value: object, *, low_open: bool = True,
                        high_open: bool = False) -> float:
    """``value`` as a float in the unit interval, open or closed at each end (default (0, 1])."""
    x = _real(name, value)
    if not ((x > 0 if low_open else x >= 0) and (x < 1 if high_open else x <= 1)):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {x!r}")
    return x
