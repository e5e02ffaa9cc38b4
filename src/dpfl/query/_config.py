"""Configuration of a component for resume checks (replaced by structured configs in step 2)."""

from __future__ import annotations

from typing import Any


def component_config(obj: Any) -> Any:
    """``obj.config()`` when the component has one, else its ``repr``."""
    config = getattr(obj, "config", None)
    return config() if callable(config) else repr(obj)
