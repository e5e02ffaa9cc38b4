"""Clippers that bound one user's model update in L2 norm: global and per-layer.

A model update is a ``dict[str, Tensor]`` (``Δ = θ_user − θ_server``). Clipping it to L2 norm ``C``
bounds the influence of one user on the sum of updates, which is the sensitivity ``C`` that the
Gaussian mechanism is calibrated to under add/remove-one-user adjacency.

* [`GlobalClip`][dpfl.clip.GlobalClip] clips the concatenation of all tensors: ``Δ · min(1, C /
  ‖Δ‖)``.
* [`PerLayerClip`][dpfl.clip.PerLayerClip] splits Δ into layers ``h`` (one per tensor by default)
  and clips each to its own bound ``C_h`` with ``Σ_h C_h² = C²``, so the whole update still has norm
  ``≤ C``.

Every clipper offers ``clip`` (returns a clipped copy), ``clip_`` (in place) and
``clip_and_accumulate_`` (adds the clipped update into an accumulator without materialising the
clipped copy: one norm pass plus one fused scaled-add pass). All three return
[`ClipStats`][dpfl.clip.ClipStats].

Guarantee: for finite inputs of any length, magnitude and dtype (float16, bfloat16, float32,
float64), the clipped output measured exactly never exceeds the bound, globally and per layer (in
normalize mode: globally, and per layer when the update was rescaled; an update within the total
bound is returned as it is, so a layer of it can exceed its ``C_h``, never ``C``), for ``clip``,
``clip_`` and ``clip_and_accumulate_`` (there: the contribution rounded to the accumulator's
dtype). Norms that decide clipping come with a stated error bound
(a float32 pass over 128-element rows combined in float64, or a float64 pass; relative error below
8e-6 for a tensor of any length), and each scale factor is shrunk by a margin *derived* from that
bound and from the rounding of the scale and the output (about 1.6e-5 for float32 updates, about
``6 n 2^-53`` for float64 ones); the derivation is in
[the norm kernels' source](https://github.com/dpfl-dev/dpfl/blob/main/src/dpfl/_clip_kernels.py). An update
whose norm is within the bound is returned unchanged; only when its norm lies within the float64
error bound (about ``n 2^-52`` relative) of the bound is it scaled down by that much. A kept
update narrowed into a smaller accumulator dtype is rounded toward zero where rounding to nearest
could push it past the bound. Inputs with inf/NaN raise ``ValueError``
([`NonFiniteUpdateError`][dpfl.clip.NonFiniteUpdateError]) naming the tensor. Tested by
[test_clip.py](https://github.com/dpfl-dev/dpfl/blob/main/tests/test_clip.py) and
[test_clip_long.py](https://github.com/dpfl-dev/dpfl/blob/main/tests/test_clip_long.py) (10⁷ and 3·10⁷ elements by default,
10⁸ elements and the paper-shaped update with ``-m slow``), measuring outputs exactly.

References: Pelikan et al., "Enabling Differentially Private Federated Learning for Speech
Recognition: Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv 2310.00098.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dpfl._checks import require_positive
from dpfl._clip_kernels import (
    U64,
    NonFiniteUpdateError,
    accumulate_scaled_,
    combine_errors,
    fast_path_ok,
    keep_natively,
    margin,
    output_roundoff,
    precise_error,
    precise_norms,
    scale_,
    scaled_copy,
    tensor_norms,
)
from dpfl._clip_layers import LayerPlan, plan_layers

__all__ = ["ClipStats", "GlobalClip", "NonFiniteUpdateError", "PerLayerClip"]

#: Version of the ``config()`` dictionaries of the clippers.
CONFIG_VERSION = 1


@dataclass(frozen=True)
class ClipStats:
    """Statistics of one clipping call.

    Attributes:
        norm: Global L2 norm of the update before clipping.
        layer_norms: L2 norm of each layer before clipping (layer name -> norm); ``{"__all__": norm}``
            for [`GlobalClip`][dpfl.clip.GlobalClip].
        clipped: Whether any scaling < 1 was applied (in normalize mode: whether any rescale was).
    """

    norm: float
    layer_norms: dict[str, float]
    clipped: bool


def _validate_update(update: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    if not isinstance(update, Mapping):
        raise TypeError(f"update must be a mapping str -> Tensor, got {type(update).__name__}")
    if not update:
        raise ValueError(
            "update is empty (no tensors): clipping it would release nothing with norm 0; pass "
            "the user's model update {name: tensor}, or drop the user"
        )
    names = list(update)
    tensors = list(update.values())
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(name, str):
            raise TypeError(f"update keys must be str (parameter names), got {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(
                f"update tensor {name!r} must be a torch.Tensor, got {type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(f"update tensor {name!r} must have a floating dtype, got {t.dtype}")
        if t.layout != torch.strided or t.is_meta:
            raise TypeError(
                f"update tensor {name!r} must be a dense (strided) tensor holding data, got "
                f"layout {t.layout} on device {t.device}"
            )
    return names, tensors


@dataclass
class _Plan:
    """Per-tensor scale factors and paths (``exact``: float64 product rounded toward zero)."""

    scales: list[float]
    exact: list[bool]


class _Groups:
    """Norms of groups of tensors (layers, or the whole update) with error bounds.

    Tensor norms come from the fast pass of ``tensor_norms``; a group
    whose norm is too close to its bound to decide is recomputed by the float64 pass
    (``precise_norms``) before deciding again.
    """

    def __init__(self, names: list[str], tensors: list[Tensor]) -> None:
        self.names = names
        self.tensors = tensors
        self.norms, self.errs = tensor_norms(names, tensors)

    def norm(self, idx: Sequence[int]) -> tuple[float, float]:
        """Norm ``N̂`` of the group and its relative error bound ``e``."""
        return math.hypot(*(self.norms[i] for i in idx)), combine_errors(
            [self.errs[i] for i in idx]
        )

    def numel(self, idx: Sequence[int]) -> int:
        return sum(self.tensors[i].numel() for i in idx)

    def exceeds(self, idx: Sequence[int], bound: float) -> bool:
        """Whether the group's exact norm exceeds ``bound`` (``True`` when too close to call)."""
        verdict = _verdict(*self.norm(idx), bound)
        if verdict is None:
            sub = [i for i in idx if self.tensors[i].numel() > 0]
            norms, errs = precise_norms(
                [self.names[i] for i in sub], [self.tensors[i] for i in sub]
            )
            for i, v, e in zip(sub, norms, errs, strict=True):
                self.norms[i], self.errs[i] = v, e
            verdict = _verdict(*self.norm(idx), bound)
        return verdict is not False

    def scale_group(
        self, plan: _Plan, idx: Sequence[int], bound: float, out_dtypes: Sequence[torch.dtype]
    ) -> None:
        """Set the scale bringing the group's norm just below ``bound`` (margin derived)."""
        norm, err = self.norm(idx)
        if norm == 0.0:
            return
        numel = self.numel(idx)
        rho = max(output_roundoff(out_dtypes[i]) for i in idx)
        mu = margin(err, rho, precise_error(numel))
        scale = 0.0 if bound == 0.0 else min(bound / norm * (1.0 - mu), 1e300)
        for i in idx:
            plan.scales[i] = scale
            plan.exact[i] = not fast_path_ok(out_dtypes[i], scale, bound, numel)

    def keep_group(
        self, plan: _Plan, idx: Sequence[int], bound: float, out_dtypes: Sequence[torch.dtype]
    ) -> None:
        """Keep the group (scale 1); narrowing conversions round toward zero near the bound."""
        norm, err = self.norm(idx)
        numel = self.numel(idx)
        for i in idx:
            src = self.tensors[i].dtype
            plan.exact[i] = not keep_natively(src, out_dtypes[i], norm, err, bound, numel)


def _verdict(norm: float, err: float, bound: float) -> bool | None:
    """``False``: exact norm <= bound; ``True``: exact norm > bound; ``None``: too close."""
    if math.isinf(bound) or norm * (1 + 2 * err + 4 * U64) <= bound:
        return False
    if norm * (1 - 2 * err - 4 * U64) > bound:
        return True
    return None


class _Clipper:
    """Shared driver: subclasses provide ``_plan`` (per-tensor scales and stats)."""

    bound: float

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the sum of clipped updates (add/remove one user): the bound."""
        return self.bound

    def _plan(
        self, names: list[str], tensors: list[Tensor], out_dtypes: list[torch.dtype]
    ) -> tuple[_Plan, ClipStats]:
        raise NotImplementedError

    def clip(self, update: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], ClipStats]:
        """Return a clipped copy of ``update`` and its [`ClipStats`][dpfl.clip.ClipStats];
        ``update`` is unchanged.

        Raises:
            ValueError: if ``update`` is empty, a tensor holds inf/NaN (the message names it)
                or the layers do not match an explicit per-layer allocation.
            TypeError: if ``update`` is not a mapping from str to dense floating-point tensors.
        """
        names, tensors = _validate_update(update)
        plan, stats = self._plan(names, tensors, [t.dtype for t in tensors])
        out = {
            n: scaled_copy(t, s, exact=ex)
            for n, t, s, ex in zip(names, tensors, plan.scales, plan.exact, strict=True)
        }
        return out, stats

    def clip_(self, update: dict[str, Tensor]) -> ClipStats:
        """Clip ``update`` in place and return its [`ClipStats`][dpfl.clip.ClipStats] (same errors as ``clip``)."""
        names, tensors = _validate_update(update)
        plan, stats = self._plan(names, tensors, [t.dtype for t in tensors])
        scale_(tensors, plan.scales, plan.exact)
        return stats

    def clip_and_accumulate_(
        self, update: Mapping[str, Tensor], accumulator: dict[str, Tensor]
    ) -> ClipStats:
        """Add the clipped ``update`` into ``accumulator`` in place, without a clipped copy.

        ``accumulator[k] += clip(update)[k]`` for every key, in the accumulator's dtype; the
        contribution itself, rounded to that dtype, stays within the bounds (a kept float64 update
        added to a float32 sum is rounded toward zero where rounding to nearest could exceed
        them). The update is validated and its norms computed before the accumulator is touched,
        so an error leaves the accumulator unchanged.

        Raises:
            ValueError: as ``clip``, or if ``accumulator`` lacks a key of ``update`` or a shape
                differs.
            TypeError: as ``clip``, or if an accumulator entry is not a floating-point tensor.
        """
        names, tensors = _validate_update(update)
        for name, t in zip(names, tensors, strict=True):
            if name not in accumulator:
                raise ValueError(f"accumulator has no entry for update tensor {name!r}")
            acc = accumulator[name]
            if not isinstance(acc, Tensor) or not acc.is_floating_point():
                raise TypeError(f"accumulator entry {name!r} must be a floating-point tensor")
            if acc.shape != t.shape:
                raise ValueError(
                    f"update tensor {name!r} has shape {tuple(t.shape)} but the accumulator "
                    f"entry has shape {tuple(acc.shape)}"
                )
        accs = [accumulator[n] for n in names]
        plan, stats = self._plan(names, tensors, [a.dtype for a in accs])
        accumulate_scaled_(accs, tensors, plan.scales, plan.exact)
        return stats


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

    def config(self) -> dict[str, Any]:
        """Plain, versioned settings for checkpoints and resume checks."""
        return {"type": "GlobalClip", "version": CONFIG_VERSION, "bound": self.bound}

    def layer_bounds(self, update: Mapping[str, Tensor]) -> dict[str, float]:
        """Return ``{"__all__": bound}``: the whole update is one layer.

        Args:
            update: The update (its layers do not matter for a global bound).
        """
        return {"__all__": self.bound}

    def _plan(
        self, names: list[str], tensors: list[Tensor], out_dtypes: list[torch.dtype]
    ) -> tuple[_Plan, ClipStats]:
        groups = _Groups(names, tensors)
        everything = range(len(tensors))
        plan = _Plan([1.0] * len(tensors), [False] * len(tensors))
        clipped = groups.exceeds(everything, self.bound)
        if clipped:
            groups.scale_group(plan, everything, self.bound, out_dtypes)
        else:
            groups.keep_group(plan, everything, self.bound, out_dtypes)
        total = groups.norm(everything)[0]
        return plan, ClipStats(norm=total, layer_norms={"__all__": total}, clipped=clipped)


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
      [`from_layer_bounds`][dpfl.clip.PerLayerClip.from_layer_bounds] to derive ``bound`` from the
      mapping instead.

    By default each layer is min-clipped: ``Δ_h · min(1, C_h / ‖Δ_h‖)``. With ``normalize=True``
    the reference code's behaviour is reproduced: if ``‖Δ‖ ≤ bound`` the update is untouched,
    otherwise *every* layer is rescaled to norm ``C_h`` (small layers are scaled up; all-zero
    layers stay zero). Both keep ``‖clipped Δ‖ ≤ bound``, so ``sensitivity == bound``. Only the
    default mode bounds every layer by its ``C_h``: in normalize mode a layer of an update
    within the total bound keeps its norm (up to ``bound``, e.g. ``√H · C_h`` for ``H``
    uniform layers), and per-layer bounds hold only for rescaled updates.

    Args:
        bound: Total bound ``C`` > 0 (``math.inf`` disables clipping; not with a mapping).
        allocation: ``"uniform"``, ``"dim"`` (default) or a mapping layer name -> bound.
        layers: Tensor name -> layer name; default one layer per tensor.
        normalize: Reproduce the reference code's rescale-every-layer mode.

    Attributes:
        explicit: The validated explicit bounds (layer -> ``C_h``), or ``None`` when
            ``allocation`` is ``"uniform"`` or ``"dim"`` (then ``allocation`` is that string;
            with a mapping it is ``"explicit"``).

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
        """Build a clipper from explicit per-layer bounds; ``bound = √(Σ C_h²)``.

        Args:
            layer_bounds: Layer name -> ``C_h`` (each > 0 and finite); an update must have
                exactly these layers.
            layers: Tensor name -> layer name, as for the constructor.
            normalize: Reproduce the reference code's rescale-every-layer mode.

        Raises:
            ValueError: if the mapping is empty or a bound is not > 0 and finite.
            TypeError: if a key is not a str.
        """
        checked = _validate_explicit(layer_bounds, None)
        bound = math.sqrt(math.fsum(b * b for b in checked.values()))
        return cls(bound, allocation=checked, layers=layers, normalize=normalize)

    def __repr__(self) -> str:
        alloc = self.explicit if self.explicit is not None else self.allocation
        return (
            f"PerLayerClip(bound={self.bound!r}, allocation={alloc!r}, "
            f"layers={callable_name(self.layers)}, normalize={self.normalize!r})"
        )

    def config(self) -> dict[str, Any]:
        """Plain, versioned settings for checkpoints and resume checks.

        A ``layers`` function is named by module and qualified name only (no code digest), so
        a resume under another Python version, or after an edit of the function's body, is
        accepted; renaming or moving the function is a changed setting.
        """
        alloc = dict(self.explicit) if self.explicit is not None else self.allocation
        return {
            "type": "PerLayerClip",
            "version": CONFIG_VERSION,
            "bound": self.bound,
            "allocation": alloc,
            "layers": None if self.layers is None else callable_name(self.layers),
            "normalize": self.normalize,
        }

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
        """Return the bound ``C_h`` of every layer of ``update`` (``Σ C_h² == bound²``).

        Args:
            update: An update (only its tensor names and sizes are read).

        Raises:
            TypeError: if ``update`` is not a mapping of names to floating-point tensors.
            ValueError: with explicit bounds, if the update's layers differ from the mapping's.
        """
        names, tensors = _validate_update(update)
        return dict(self._layer_plan(names, tensors).bounds)

    def _plan(
        self, names: list[str], tensors: list[Tensor], out_dtypes: list[torch.dtype]
    ) -> tuple[_Plan, ClipStats]:
        layout = self._layer_plan(names, tensors)
        groups = _Groups(names, tensors)
        plan = _Plan([1.0] * len(tensors), [False] * len(tensors))
        everything = range(len(tensors))
        if self.normalize:
            clipped = groups.exceeds(everything, self.bound)
            for layer, idx in layout.members.items():
                if clipped:
                    groups.scale_group(plan, idx, layout.bounds[layer], out_dtypes)
            if not clipped:
                groups.keep_group(plan, everything, self.bound, out_dtypes)
        else:
            clipped = False
            for layer, idx in layout.members.items():
                if groups.exceeds(idx, layout.bounds[layer]):
                    clipped = True
                    groups.scale_group(plan, idx, layout.bounds[layer], out_dtypes)
                else:
                    groups.keep_group(plan, idx, layout.bounds[layer], out_dtypes)
        layer_norms = {layer: groups.norm(idx)[0] for layer, idx in layout.members.items()}
        total = groups.norm(everything)[0]
        return plan, ClipStats(norm=total, layer_norms=layer_norms, clipped=clipped)


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


def callable_name(fn: Callable[[str], str] | None) -> str:
    """``module.qualname`` of ``fn`` (the same in every process and Python version).

    ``repr`` of a function holds its address, which changes from process to process; other
    callables are named by their type.
    """
    if fn is None:
        return "None"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{qualname}"
