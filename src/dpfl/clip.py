"""Clippers that bound one user's model update in L2 norm: global and per-layer.

A model update is a ``dict[str, Tensor]`` (``Δ = θ_user − θ_server``). Clipping it to L2 norm ``C``
bounds the influence of one user on the sum of updates, which is the sensitivity ``C`` that the
Gaussian mechanism is calibrated to under add/remove-one-user adjacency.

* :class:`GlobalClip` clips the concatenation of all tensors: ``Δ · min(1, C / ‖Δ‖)``.
* :class:`PerLayerClip` splits Δ into layers ``h`` (one per tensor by default) and clips each to
  its own bound ``C_h`` with ``Σ_h C_h² = C²``, so the whole update still has norm ``≤ C``.

Every clipper offers ``clip`` (returns a clipped copy), ``clip_`` (in place) and
``clip_and_accumulate_`` (adds the clipped update into an accumulator without materialising the
clipped copy: one norm pass plus one fused scaled-add pass). All three return :class:`ClipStats`.

Guarantee: for finite inputs of any magnitude and dtype (float16, bfloat16, float32, float64), the
clipped output measured in float64 never exceeds the bound (per layer and globally). Scale factors
are shrunk by :data:`dpfl._clip_kernels.SAFETY_MARGIN` (2^-16 relative) to absorb float32 norm and
output rounding errors; an update whose norm is within the bound is returned unchanged (the
decision is made on a float64 norm near the boundary). Inputs with inf/NaN raise ``ValueError``
(:class:`~dpfl._clip_kernels.NonFiniteUpdateError`) naming the tensor.

References: Pelikan et al., "Enabling Differentially Private Federated Learning for Speech
Recognition: Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv 2310.00098.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dpfl._checks import require_positive
from dpfl._clip_kernels import (
    SAFETY_MARGIN,
    NonFiniteUpdateError,
    accumulate_scaled_,
    scale_,
    scaled_copy,
    tensor_norms,
)
from dpfl._clip_layers import LayerPlan, plan_layers

__all__ = ["ClipStats", "GlobalClip", "NonFiniteUpdateError", "PerLayerClip"]

# Norms within this relative distance of their bound are recomputed in float64 before deciding.
_DECISION_WINDOW = 2.0**-12


@dataclass(frozen=True)
class ClipStats:
    """Statistics of one clipping call.

    Attributes:
        norm: Global L2 norm of the update before clipping.
        layer_norms: L2 norm of each layer before clipping (layer name -> norm); ``{"__all__": norm}``
            for :class:`GlobalClip`.
        clipped: Whether any scaling < 1 was applied (in normalize mode: whether any rescale was).
    """

    norm: float
    layer_norms: dict[str, float]
    clipped: bool


def _validate_update(update: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    if not isinstance(update, Mapping):
        raise TypeError(f"update must be a mapping str -> Tensor, got {type(update).__name__}")
    names = list(update)
    tensors = list(update.values())
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"update tensor {name!r} must be a torch.Tensor, got {type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(f"update tensor {name!r} must have a floating dtype, got {t.dtype}")
    return names, tensors


def _limit_scale(bound: float, norm: float) -> float:
    """Scale that brings ``norm`` to just below ``bound`` (safety margin applied)."""
    if bound == 0.0:
        return 0.0
    return min(bound / norm * (1.0 - SAFETY_MARGIN), 1e300)


class _Clipper:
    """Shared driver: subclasses provide ``_plan`` (per-tensor scales and stats)."""

    bound: float

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the sum of clipped updates (add/remove one user): the bound."""
        return self.bound

    def _plan(self, names: list[str], tensors: list[Tensor]) -> tuple[list[float], ClipStats]:
        raise NotImplementedError

    def clip(self, update: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], ClipStats]:
        """Return a clipped copy of ``update`` and its :class:`ClipStats`; ``update`` is unchanged.

        Raises:
            ValueError: if a tensor holds inf/NaN (the message names it) or the layers do not match
                an explicit per-layer allocation.
            TypeError: if ``update`` is not a mapping of floating-point tensors.
        """
        names, tensors = _validate_update(update)
        scales, stats = self._plan(names, tensors)
        out = {n: scaled_copy(t, s) for n, t, s in zip(names, tensors, scales, strict=True)}
        return out, stats

    def clip_(self, update: dict[str, Tensor]) -> ClipStats:
        """Clip ``update`` in place and return its :class:`ClipStats` (same errors as ``clip``)."""
        names, tensors = _validate_update(update)
        scales, stats = self._plan(names, tensors)
        scale_(tensors, scales)
        return stats

    def clip_and_accumulate_(
        self, update: Mapping[str, Tensor], accumulator: dict[str, Tensor]
    ) -> ClipStats:
        """Add the clipped ``update`` into ``accumulator`` in place, without a clipped copy.

        ``accumulator[k] += clip(update)[k]`` for every key, in the accumulator's dtype. The
        update is validated and its norms computed before the accumulator is touched, so an error
        leaves the accumulator unchanged.

        Raises:
            ValueError: as ``clip``, or if ``accumulator`` lacks a key of ``update`` or a shape
                differs.
        """
        names, tensors = _validate_update(update)
        for name, t in zip(names, tensors, strict=True):
            if name not in accumulator:
                raise ValueError(f"accumulator has no entry for update tensor {name!r}")
            if accumulator[name].shape != t.shape:
                raise ValueError(
                    f"update tensor {name!r} has shape {tuple(t.shape)} but the accumulator "
                    f"entry has shape {tuple(accumulator[name].shape)}"
                )
        scales, stats = self._plan(names, tensors)
        accumulate_scaled_([accumulator[n] for n in names], tensors, scales)
        return stats


def _exact_norms_near(
    norms: list[float], bound: float, names: Sequence[str], tensors: Sequence[Tensor]
) -> list[float]:
    """Recompute the tensor norms in float64 if ``hypot(norms)`` is too close to ``bound`` to call."""
    total = math.hypot(*norms)
    if math.isfinite(bound) and abs(total - bound) <= _DECISION_WINDOW * bound:
        return [
            float(torch.linalg.vector_norm(t.detach().to(torch.float64))) if t.numel() else 0.0
            for t in tensors
        ]
    return norms


class GlobalClip(_Clipper):
    """Clip a whole update to global L2 norm ``bound``: ``Δ · min(1, bound / ‖Δ‖)``.

    Args:
        bound: Clipping bound ``C`` > 0. ``math.inf`` disables clipping (only valid with a
            zero-noise mechanism, e.g. to recover the plain mean).

    Raises:
        ValueError: if ``bound`` is not > 0.

    Examples:
        >>> import torch
        >>> clipper = GlobalClip(1.0)
        >>> clipped, stats = clipper.clip({"w": torch.tensor([3.0, 4.0])})
        >>> round(stats.norm, 6), stats.clipped
        (5.0, True)
        >>> bool(torch.linalg.vector_norm(clipped["w"]) <= 1.0)
        True

    References: Pelikan et al., arXiv 2310.00098, section 2 (global clipping).
    """

    def __init__(self, bound: float) -> None:
        self.bound = require_positive("bound", bound, allow_inf=True)

    def __repr__(self) -> str:
        return f"GlobalClip(bound={self.bound!r})"

    def layer_bounds(self, update: Mapping[str, Tensor]) -> dict[str, float]:
        """Return ``{"__all__": bound}``: the whole update is one layer."""
        return {"__all__": self.bound}

    def _plan(self, names: list[str], tensors: list[Tensor]) -> tuple[list[float], ClipStats]:
        norms = _exact_norms_near(tensor_norms(names, tensors), self.bound, names, tensors)
        total = math.hypot(*norms)
        clipped = total > self.bound
        scale = _limit_scale(self.bound, total) if clipped else 1.0
        stats = ClipStats(norm=total, layer_norms={"__all__": total}, clipped=clipped)
        return [scale] * len(tensors), stats


class PerLayerClip(_Clipper):
    """Clip each layer ``h`` of an update to its own bound ``C_h``, with ``Σ_h C_h² = bound²``.

    Layers default to one per tensor; ``layers`` maps a tensor name to a layer name to group
    tensors (e.g. ``lambda n: n.rsplit(".", 1)[0]`` groups a module's weight and bias). The
    per-layer bounds come from ``allocation``:

    * ``"uniform"``: ``C_h = bound / √H`` for ``H`` layers;
    * ``"dim"``: ``C_h = bound · √(d_h / D)`` with ``d_h`` elements in layer ``h``, ``D = Σ d_h``
      (uniform if ``D = 0``);
    * a mapping layer name -> ``C_h``: explicit bounds. They are *validated, not silently
      rescaled*: ``Σ C_h²`` must equal ``bound²`` to relative 1e-9 (the tiny rounding residue is
      then normalised away), and an update must have exactly these layers. Use
      :meth:`from_layer_bounds` to derive ``bound`` from the mapping instead.

    By default each layer is min-clipped: ``Δ_h · min(1, C_h / ‖Δ_h‖)``. With ``normalize=True``
    the reference code's behaviour is reproduced: if ``‖Δ‖ ≤ bound`` the update is untouched,
    otherwise *every* layer is rescaled to norm ``C_h`` (small layers are scaled up; all-zero
    layers stay zero). Both keep ``‖clipped Δ‖ ≤ bound``, so ``sensitivity == bound``.

    Args:
        bound: Total bound ``C`` > 0 (``math.inf`` disables clipping; not with a mapping).
        allocation: ``"uniform"``, ``"dim"`` (default) or a mapping layer name -> bound.
        layers: Tensor name -> layer name; default one layer per tensor.
        normalize: Reproduce the reference code's rescale-every-layer mode.

    Raises:
        ValueError: if ``bound`` is not > 0, ``allocation`` is unknown, or explicit bounds are
            negative, non-finite or do not square-sum to ``bound²`` (the message gives both).

    Examples:
        >>> import torch
        >>> clipper = PerLayerClip(1.0, allocation="uniform")
        >>> clipped, stats = clipper.clip({"a": torch.ones(4), "b": torch.zeros(2)})
        >>> clipper.layer_bounds({"a": torch.ones(4), "b": torch.zeros(2)})["a"]  # 1/sqrt(2)
        0.7071067811865475

    References: Pelikan et al., arXiv 2310.00098, section 2 (per-layer clipping, table 2).
    """

    def __init__(
        self,
        bound: float,
        *,
        allocation: Literal["uniform", "dim"] | Mapping[str, float] = "dim",
        layers: Callable[[str], str] | None = None,
        normalize: bool = False,
    ) -> None:
        self.bound = require_positive("bound", bound, allow_inf=True)
        self.explicit: dict[str, float] | None = None
        if isinstance(allocation, Mapping):
            self.explicit = _validate_explicit(allocation, self.bound)
            self.allocation: str = "explicit"
        elif allocation in ("uniform", "dim"):
            self.allocation = allocation
        else:
            raise ValueError(
                f"allocation must be 'uniform', 'dim' or a mapping layer -> bound, got {allocation!r}"
            )
        if layers is not None and not callable(layers):
            raise TypeError(f"layers must be a callable tensor name -> layer name, got {layers!r}")
        self.layers = layers
        self.normalize = bool(normalize)
        self._cache: dict[tuple[tuple[str, int], ...], LayerPlan] = {}

    @classmethod
    def from_layer_bounds(
        cls,
        layer_bounds: Mapping[str, float],
        *,
        layers: Callable[[str], str] | None = None,
        normalize: bool = False,
    ) -> PerLayerClip:
        """Build a clipper from explicit per-layer bounds; ``bound = √(Σ C_h²)``."""
        checked = _validate_explicit(layer_bounds, None)
        bound = math.sqrt(math.fsum(b * b for b in checked.values()))
        return cls(bound, allocation=checked, layers=layers, normalize=normalize)

    def __repr__(self) -> str:
        alloc = self.explicit if self.explicit is not None else self.allocation
        return (
            f"PerLayerClip(bound={self.bound!r}, allocation={alloc!r}, "
            f"layers={self.layers!r}, normalize={self.normalize!r})"
        )

    def _layer_plan(self, names: list[str], tensors: list[Tensor]) -> LayerPlan:
        key = tuple((n, t.numel()) for n, t in zip(names, tensors, strict=True))
        plan = self._cache.get(key)
        if plan is None:
            plan = plan_layers(
                names,
                [t.numel() for t in tensors],
                bound=self.bound,
                allocation=self.explicit if self.explicit is not None else self.allocation,
                layers=self.layers,
            )
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = plan
        return plan

    def layer_bounds(self, update: Mapping[str, Tensor]) -> dict[str, float]:
        """Return the bound ``C_h`` of every layer of ``update`` (``Σ C_h² == bound²``)."""
        names, tensors = _validate_update(update)
        return dict(self._layer_plan(names, tensors).bounds)

    def _plan(self, names: list[str], tensors: list[Tensor]) -> tuple[list[float], ClipStats]:
        plan = self._layer_plan(names, tensors)
        norms = tensor_norms(names, tensors)
        layer_norms: dict[str, float] = {}
        for layer, members in plan.members.items():
            sub = [norms[i] for i in members]
            sub = _exact_norms_near(sub, plan.bounds[layer], names, [tensors[i] for i in members])
            for i, v in zip(members, sub, strict=True):
                norms[i] = v
            layer_norms[layer] = math.hypot(*sub)
        total = math.hypot(*layer_norms.values())
        if self.normalize:
            total = math.hypot(*_exact_norms_near(norms, self.bound, names, tensors))
            clipped = total > self.bound
            layer_scale = {
                h: (_limit_scale(plan.bounds[h], n) if clipped and n > 0 else 1.0)
                for h, n in layer_norms.items()
            }
        else:
            layer_scale = {
                h: (_limit_scale(plan.bounds[h], n) if n > plan.bounds[h] else 1.0)
                for h, n in layer_norms.items()
            }
            clipped = any(s != 1.0 for s in layer_scale.values())
        scales = [layer_scale[plan.layer_of[i]] for i in range(len(names))]
        return scales, ClipStats(norm=total, layer_norms=layer_norms, clipped=clipped)


def _validate_explicit(allocation: Mapping[str, float], bound: float | None) -> dict[str, float]:
    """Check explicit per-layer bounds; normalise them so ``Σ C_h² == bound²`` exactly."""
    if not allocation:
        raise ValueError("allocation mapping must name at least one layer")
    checked: dict[str, float] = {}
    for layer, b in allocation.items():
        if not isinstance(layer, str):
            raise TypeError(f"allocation keys must be layer names (str), got {layer!r}")
        checked[layer] = require_positive(f"allocation[{layer!r}]", b)
    if bound is None:
        return checked
    if math.isinf(bound):
        raise ValueError("bound must be finite when allocation is an explicit mapping")
    total_sq = math.fsum(b * b for b in checked.values())
    if not math.isclose(total_sq, bound * bound, rel_tol=1e-9):
        raise ValueError(
            f"explicit per-layer bounds must satisfy sum(C_h^2) == bound^2, got "
            f"sum(C_h^2) = {total_sq!r} vs bound^2 = {bound * bound!r} (bound = {bound!r}); "
            "fix the mapping or use PerLayerClip.from_layer_bounds(mapping)"
        )
    fix = bound / math.sqrt(total_sq)
    return {layer: b * fix for layer, b in checked.items()}
