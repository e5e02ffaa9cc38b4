"""Layer grouping and per-layer bound allocation for
[`dpfl.clip.PerLayerClip`][dpfl.clip.PerLayerClip].

References: Pelikan et al., arXiv 2310.00098, section 2 (per-layer clipping: uniform and
dimension-proportional allocations with ``Σ_h C_h² = C²``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["LayerPlan", "plan_layers"]


@dataclass(frozen=True)
class LayerPlan:
    """How an update's tensors map to layers and what bound each layer gets.

    Attributes:
        layer_of: Layer name of each tensor, in update order.
        members: Layer name -> indices of its tensors (layers in first-seen order).
        bounds: Layer name -> bound ``C_h``; ``Σ C_h² == bound²`` up to float rounding.
    """

    layer_of: tuple[str, ...]
    members: dict[str, list[int]]
    bounds: dict[str, float]


def plan_layers(
    names: Sequence[str],
    numels: Sequence[int],
    *,
    bound: float,
    allocation: str | Mapping[str, float],
    layers: Callable[[str], str] | None,
) -> LayerPlan:
    """Group tensors into layers and allocate the per-layer bounds.

    Args:
        names: Tensor names of the update.
        numels: Number of elements of each tensor.
        bound: Total bound ``C`` (may be ``inf``: every layer bound is then ``inf``).
        allocation: ``"uniform"``, ``"dim"`` or explicit bounds (already validated against
            ``bound``).
        layers: Tensor name -> layer name, or ``None`` for one layer per tensor.

    Raises:
        ValueError: if explicit bounds do not cover exactly the layers of the update, or
            ``layers`` returns a non-string.
    """
    layer_of: list[str] = []
    for name in names:
        layer = name if layers is None else layers(name)
        if not isinstance(layer, str):
            raise ValueError(f"layers({name!r}) must return a layer name (str), got {layer!r}")
        layer_of.append(layer)
    members: dict[str, list[int]] = {}
    for i, layer in enumerate(layer_of):
        members.setdefault(layer, []).append(i)
    if isinstance(allocation, Mapping):
        missing = sorted(set(allocation) - set(members))
        extra = sorted(set(members) - set(allocation))
        if missing or extra:
            raise ValueError(
                "update layers do not match the explicit per-layer bounds: "
                f"layers without a tensor in the update {missing}, layers without a bound {extra}"
            )
        bounds = {layer: float(allocation[layer]) for layer in members}
    elif math.isinf(bound):
        bounds = {layer: math.inf for layer in members}
    else:
        sizes = {layer: sum(numels[i] for i in idx) for layer, idx in members.items()}
        total = sum(sizes.values())
        if allocation == "dim" and total > 0:
            bounds = {layer: bound * math.sqrt(d / total) for layer, d in sizes.items()}
        else:
            h = len(members)
            bounds = {layer: bound / math.sqrt(h) for layer in members}
    return LayerPlan(layer_of=tuple(layer_of), members=members, bounds=bounds)
