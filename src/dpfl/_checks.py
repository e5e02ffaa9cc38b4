"""Argument validation shared by dpfl's public constructors and functions, and warnings.

Every helper raises ``ValueError`` (or ``TypeError``) with a message that names the offending
argument and says what would be accepted, so a user can fix the call without reading the source.
``warn_at_caller`` issues a warning located at the user's line.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from numbers import Real

__all__ = [
    "warn_at_caller",
    "require_finite",
    "require_int",
    "require_non_negative",
    "require_positive",
    "require_probability",
]


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def require_finite(name: str, value: object) -> float:
    """Return ``value`` as a float, raising if it is not a finite real number."""
    x = _as_float(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return x


def require_positive(name: str, value: object, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float, raising unless it is > 0 (and finite unless ``allow_inf``)."""
    x = _as_float(name, value)
    if math.isnan(x) or x <= 0 or (math.isinf(x) and not allow_inf):
        bound = "> 0" if allow_inf else "> 0 and finite"
        raise ValueError(f"{name} must be {bound}, got {x!r}")
    return x


def require_non_negative(name: str, value: object, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float, raising unless it is >= 0 (and finite unless ``allow_inf``)."""
    x = _as_float(name, value)
    if math.isnan(x) or x < 0 or (math.isinf(x) and not allow_inf):
        bound = ">= 0" if allow_inf else ">= 0 and finite"
        raise ValueError(f"{name} must be {bound}, got {x!r}")
    return x


def require_probability(
    name: str, value: object, *, low_open: bool = True, high_open: bool = False
) -> float:
    """Return ``value`` as a float in the interval given by the openness flags (default (0, 1])."""
    x = _as_float(name, value)
    lo_ok = x > 0 if low_open else x >= 0
    hi_ok = x < 1 if high_open else x <= 1
    if math.isnan(x) or not (lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {x!r}")
    return x


def require_int(name: str, value: object, *, minimum: int = 0) -> int:
    """Return ``value`` as an int, raising unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` located at the first frame outside dpfl and torch: the user's line.

    A fixed ``stacklevel`` points into torch's ``no_grad`` wrapper or into dpfl's own loop,
    depending on the path that led to the warning; this walks the stack instead.
    """
    skipped = [_PACKAGE_DIR]
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if torch_file:
        skipped.append(os.path.dirname(os.path.abspath(torch_file)) + os.sep)
    prefixes = tuple(skipped)
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is the caller of this function
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        prefixes
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
