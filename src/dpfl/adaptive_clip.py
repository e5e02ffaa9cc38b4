"""Adaptive clipping: a clip bound that tracks a quantile of the users' update norms, privately.

[`AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip] wraps a [`GlobalClip`][dpfl.clip.GlobalClip] (one
bound) or a [`PerLayerClip`][dpfl.clip.PerLayerClip] (one bound per layer) and moves its bound(s)
between rounds by geometric updates driven by a *noised* count (Andrew et al., NeurIPS 2021):

1. Round ``t`` clips with the bounds ``C_h`` fixed before the round. Each user also reports,
   per layer ``h``, the centred bit ``b_h − ½`` with ``b_h = 1[‖Δ_h‖ ≤ C_h]`` (global: one bit,
   ``h`` = the whole update).
2. The server sums the centred bits, adds ``N(0, σ_b²)`` to every layer's sum with
   ``σ_b = z_b · √H / 2`` and estimates the fraction of users under the bound with the
   **expected** cohort size ``S`` as the fixed denominator: ``b̃_h = ½ + noised sum_h / S``.
3. ``C_h ← C_h · exp(−η (b̃_h − γ))`` (``γ`` the target quantile, ``η`` the learning rate).
   With ``fix_total=True`` (per layer only) the bounds are then rescaled so that
   ``Σ C_h² = C²`` keeps the initial total ``C``; otherwise the total ``C = √(Σ C_h²)`` floats
   with them.

Sensitivity of the count. One user changes the vector of centred bit sums by a vector of ``H``
entries ``±½`` (add or remove the user): L2 sensitivity ``√H / 2`` (raw bits in ``{0, 1}``
would have ``√H``; centring halves it, as in TF Privacy's quantile estimator). ``z_b``
(``count_noise_multiplier``) is the count's noise std over that sensitivity, so the count is a
Gaussian mechanism of multiplier ``z_b`` whatever ``H`` is, and with the update sum (multiplier
``z``) one round is one Gaussian of multiplier ``z_eff`` with ``z_eff⁻² = z⁻² + z_b⁻²``
([`dpfl.accounting.effective_noise_multiplier`][dpfl.accounting.effective_noise_multiplier]). The
count's *std per layer* grows as ``√H``: with hundreds of layers each layer's estimate is noisier,
so per-layer adaptation needs a larger cohort (or ``η`` smaller) than global adaptation for the same
``z_b``.

Users dropped for non-finite updates (``DPAggregator(drop_nonfinite=True)``) contribute neither
update nor bits: a user's contribution to both releases is either both or nothing, so the
sensitivities above hold. The bound of round ``t`` depends only on earlier noised counts
(post-processing), and a round's release uses the bound of that round.

References:
    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021. Pelikan et al., arXiv 2310.00098, section 2 (per-layer clipping).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from dpfl._checks import require_int, require_positive, require_probability
from dpfl.clip import ClipStats, GlobalClip, PerLayerClip

__all__ = ["COUNT_STREAM", "AdaptiveClip"]

COUNT_STREAM = "adaptive-clip-count"
"""Name of the noise stream of the adaptive count's release.

[`DPAggregator`][dpfl.aggregate.DPAggregator] noises the count with
[`add_side_noise_`][dpfl.noise.GaussianMechanism.add_side_noise_] on this stream: independent
of the update's noise, and never repeated across releases.
"""
_MIN_BOUND, _MAX_BOUND = 1e-150, 1e150  # squares (Σ C_h²) stay finite and non-zero


class AdaptiveClip:
    """Global or per-layer clipping whose bound(s) adapt to a target quantile of update norms.

    Use it wherever a clipper goes (``DPAggregator``, ``Privacy``): it clips like the clipper
    of the current bounds and reports each user's centred bits; ``DPAggregator.release`` noises
    their sum with the count multiplier and calls
    [`update_`][dpfl.adaptive_clip.AdaptiveClip.update_].

    Args:
        clipper: The starting point: a [`GlobalClip`][dpfl.clip.GlobalClip] (global adaptive
            clipping) or a [`PerLayerClip`][dpfl.clip.PerLayerClip] (per-layer; its allocation gives
            the initial ``C_h``, its ``layers`` the grouping; not ``normalize=True``). Finite
            bound.
        count_noise_multiplier: ``z_b > 0``, the count's noise std over its sensitivity
            ``√H / 2``; Andrew et al. suggest ``σ_b ≈ S / 20`` for the global count, i.e.
            ``z_b ≈ S / 10``.
        target_quantile: ``γ`` in (0, 1): the fraction of users (per layer) to leave unclipped.
        learning_rate: ``η > 0`` of the geometric update (Andrew et al. use 0.2).
        fix_total: Per layer only: keep ``Σ C_h² = C²`` at the initial total ``C`` (only the
            allocation adapts); ``False`` lets every ``C_h`` and so ``C`` adapt.

    Attributes:
        base: The clipper passed in (its bounds are the starting point; it is never changed).
        per_layer: Whether the bounds are per layer (``clipper`` is a ``PerLayerClip``).
        initial_bound: The total bound ``C`` at the start.
        step: The number of [`update_`][dpfl.adaptive_clip.AdaptiveClip.update_] calls so far
            (checkpointed).

    Raises:
        TypeError: if ``clipper`` is not a GlobalClip or PerLayerClip.
        ValueError: an infinite bound, ``normalize=True``, ``fix_total`` with a global clipper,
            or an option out of range (the message names it).

    Examples:
        >>> import torch
        >>> from dpfl.clip import GlobalClip
        >>> ada = AdaptiveClip(GlobalClip(1.0), count_noise_multiplier=10.0)
        >>> _, stats = ada.clip({"w": torch.tensor([3.0, 4.0])})
        >>> ada.centred_bits(stats)  # norm 5 > 1: under the bound? no
        [-0.5]
        >>> ada.update_([-0.5], expected_cohort_size=1)  # noise-free count of one user
        >>> round(ada.bound, 4)  # exp(-0.2 * (0 - 0.5))
        1.1052

    References: Andrew et al., NeurIPS 2021 (algorithm 1 and section 3).
    """

    def __init__(
        self,
        clipper: GlobalClip | PerLayerClip,
        *,
        count_noise_multiplier: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        fix_total: bool = False,
    ) -> None:
        if not isinstance(clipper, GlobalClip | PerLayerClip):
            raise TypeError(f"clipper must be a GlobalClip or PerLayerClip, got {clipper!r}")
        if math.isinf(clipper.bound):
            raise ValueError("clipper.bound must be finite for adaptive clipping")
        self.per_layer = isinstance(clipper, PerLayerClip)
        if self.per_layer and clipper.normalize:  # type: ignore[union-attr]
            raise ValueError("adaptive clipping does not support PerLayerClip(normalize=True)")
        if not isinstance(fix_total, bool):
            raise TypeError(f"fix_total must be a bool, got {fix_total!r}")
        if fix_total and not self.per_layer:
            raise ValueError(
                "fix_total=True needs a PerLayerClip: a global bound with a fixed total would "
                "never adapt"
            )
        self.base = clipper
        self.count_noise_multiplier = require_positive(
            "count_noise_multiplier", count_noise_multiplier
        )
        self.target_quantile = require_probability(
            "target_quantile", target_quantile, high_open=True
        )
        self.learning_rate = require_positive("learning_rate", learning_rate)
        self.fix_total = fix_total
        self.initial_bound = float(clipper.bound)
        self.step = 0
        self._bounds: dict[str, float] | None = (
            None if self.per_layer else {"__all__": clipper.bound}
        )
        self._current: GlobalClip | PerLayerClip | None = None

    def config(self) -> dict[str, Any]:
        """Plain, versioned settings (the base clipper's nested) for resume checks."""
        return {
            "type": "AdaptiveClip",
            "version": 1,
            "clipper": self.base.config(),
            "count_noise_multiplier": self.count_noise_multiplier,
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "fix_total": self.fix_total,
        }

    def __repr__(self) -> str:
        return (
            f"AdaptiveClip({self.base!r}, count_noise_multiplier={self.count_noise_multiplier!r}, "
            f"target_quantile={self.target_quantile!r}, learning_rate={self.learning_rate!r}, "
            f"fix_total={self.fix_total!r})"
        )

    # ----------------------------------------------------------------- bounds
    @property
    def bound(self) -> float:
        """The total bound ``C = √(Σ C_h²)`` of the current round."""
        if self._bounds is None:
            return self.initial_bound
        return math.sqrt(math.fsum(b * b for b in self._bounds.values()))

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of this round's sum of clipped updates: the current [`bound`][dpfl.adaptive_clip.AdaptiveClip.bound]."""
        return self.bound

    @property
    def bounds(self) -> dict[str, float] | None:
        """The current bound of every layer (``{"__all__": C}`` globally); ``None`` per layer
        until the first update (or [`layer_bounds`][dpfl.adaptive_clip.AdaptiveClip.layer_bounds]) fixes the layers."""
        return None if self._bounds is None else dict(self._bounds)

    @property
    def num_layers(self) -> int | None:
        """``H``: 1 globally, the number of layers once known per layer."""
        return None if self._bounds is None else len(self._bounds)

    @property
    def count_sensitivity(self) -> float:
        """L2 sensitivity ``√H / 2`` of the vector of centred bit sums.

        Raises:
            ValueError: per layer, before the layers are known (no update seen yet).
        """
        if self._bounds is None:
            raise ValueError(
                "the layers are not known yet: call layer_bounds(update) or clip an update first"
            )
        return math.sqrt(len(self._bounds)) / 2.0

    @property
    def count_noise_std(self) -> float:
        """``σ_b = z_b · √H / 2``, the std of the noise on each layer's count."""
        return self.count_noise_multiplier * self.count_sensitivity

    def layer_bounds(self, update: Mapping[str, Tensor]) -> dict[str, float]:
        """The bound of every layer of ``update`` this round (fixes the layers on first use).

        Args:
            update: An update; on first use its layers (per ``clipper.layers``) become the
                adapted layers.
        """
        if self._bounds is None:
            self._bounds = dict(self.base.layer_bounds(update))
        return dict(self._bounds)

    def clipper(self) -> GlobalClip | PerLayerClip:
        """The fixed clipper of the current round's bounds."""
        if self._current is None:
            assert self._bounds is not None
            if self.per_layer:
                layers = self.base.layers  # type: ignore[union-attr]
                self._current = PerLayerClip.from_layer_bounds(self._bounds, layers=layers)
            else:
                self._current = GlobalClip(self._bounds["__all__"])
        return self._current

    # ----------------------------------------------------------------- clipping
    def clip(self, update: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], ClipStats]:
        """Clip a copy with the current bounds (see [`GlobalClip.clip`][dpfl.clip.GlobalClip.clip]).

        Args:
            update: One user's update, a ``dict[str, Tensor]`` (unchanged).

        Returns:
            The clipped copy and its [`ClipStats`][dpfl.clip.ClipStats].
        """
        self.layer_bounds(update)
        return self.clipper().clip(update)

    def clip_(self, update: dict[str, Tensor]) -> ClipStats:
        """Clip in place with the current bounds.

        Args:
            update: One user's update, clipped in place.

        Returns:
            The [`ClipStats`][dpfl.clip.ClipStats] of the update.
        """
        self.layer_bounds(update)
        return self.clipper().clip_(update)

    def clip_and_accumulate_(
        self, update: Mapping[str, Tensor], accumulator: dict[str, Tensor]
    ) -> ClipStats:
        """Add the update clipped with the current bounds into ``accumulator``.

        Args:
            update: One user's update (unchanged).
            accumulator: The running sum, same keys and shapes, updated in place.

        Returns:
            The [`ClipStats`][dpfl.clip.ClipStats] of the update.
        """
        self.layer_bounds(update)
        return self.clipper().clip_and_accumulate_(update, accumulator)

    def centred_bits(self, stats: ClipStats) -> list[float]:
        """The user's centred bits ``b_h − ½`` (``+½``: layer norm within its bound), by layer.

        Any deterministic function of the user's update into ``{−½, +½}^H`` keeps the count's
        sensitivity at ``√H / 2``; this one compares the clipper's norm estimates with the
        bounds.

        Args:
            stats: The user's [`ClipStats`][dpfl.clip.ClipStats] from clipping with the current
                bounds.
        """
        assert self._bounds is not None
        if not self.per_layer:
            return [-0.5 if stats.clipped else 0.5]
        return [
            0.5 if stats.layer_norms[layer] <= bound else -0.5
            for layer, bound in self._bounds.items()
        ]

    # ----------------------------------------------------------------- adaptation
    def update_(self, noised_sums: Sequence[float], *, expected_cohort_size: float) -> None:
        """Move the bounds after a round from its **noised** sums of centred bits.

        ``b̃_h = ½ + noised_sums[h] / S`` and ``C_h ← C_h · exp(−η (b̃_h − γ))`` (then rescaled
        to the initial total with ``fix_total``); bounds are kept within [1e-150, 1e150] so that ``Σ C_h²`` stays finite.

        Args:
            noised_sums: One noised sum per layer, in the order of
                [`bounds`][dpfl.adaptive_clip.AdaptiveClip.bounds].
            expected_cohort_size: ``S``, the fixed denominator (never the realised count).

        Raises:
            ValueError: wrong length, a non-finite sum or ``S < 1``; nothing changes then.
        """
        if self._bounds is None:
            raise ValueError("update_ before any update: the layers are not known yet")
        size = require_positive("expected_cohort_size", expected_cohort_size)
        if size < 1:
            raise ValueError(f"expected_cohort_size must be >= 1, got {size!r}")
        sums = [float(x) for x in noised_sums]
        if len(sums) != len(self._bounds) or not all(math.isfinite(x) for x in sums):
            raise ValueError(
                f"noised_sums must hold {len(self._bounds)} finite values (one per layer), "
                f"got {noised_sums!r:.200}"
            )
        new = {}
        for (layer, bound), total in zip(self._bounds.items(), sums, strict=True):
            fraction = 0.5 + total / size
            exponent = max(
                -700.0, min(700.0, -self.learning_rate * (fraction - self.target_quantile))
            )
            new[layer] = min(max(bound * math.exp(exponent), _MIN_BOUND), _MAX_BOUND)
        if self.fix_total:
            fix = self.initial_bound / math.sqrt(math.fsum(b * b for b in new.values()))
            new = {layer: b * fix for layer, b in new.items()}
        self._set(new)
        self.step += 1

    def _set(self, bounds: dict[str, float]) -> None:
        self._bounds = bounds
        self._current = None

    def set_bounds_(self, values: Sequence[float]) -> None:
        """Overwrite the bounds, e.g. with rank 0's values.

        Args:
            values: One bound per layer, in the order of
                [`bounds`][dpfl.adaptive_clip.AdaptiveClip.bounds].

        Raises:
            ValueError: wrong length or a bound not > 0 and finite; nothing changes then.
        """
        if self._bounds is None or len(values) != len(self._bounds):
            raise ValueError(f"set_bounds_ needs {self.num_layers} values, got {len(values)}")
        checked = [require_positive(f"bounds[{i}]", v) for i, v in enumerate(values)]
        self._set(dict(zip(self._bounds, checked, strict=True)))

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The bounds (``None`` before the first update per layer), the step and the config."""
        return {"config": self.config(), "bounds": self.bounds, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a [`state_dict`][dpfl.adaptive_clip.AdaptiveClip.state_dict].

        Args:
            state: The dict from ``state_dict()`` of an identically configured ``AdaptiveClip``.

        Raises:
            ValueError: another configuration, or malformed bounds or step; nothing changes.
        """
        if not isinstance(state, Mapping) or set(state) != {"config", "bounds", "step"}:
            raise ValueError(f"state must be an AdaptiveClip.state_dict(), got {state!r:.80}")
        if state["config"] != self.config():
            raise ValueError(
                f"state was saved by {state['config']} but this is {self.config()}; build the "
                "AdaptiveClip with the same settings"
            )
        step = require_int("state['step']", state["step"], minimum=0)
        bounds = state["bounds"]
        if bounds is None:
            if not self.per_layer:
                raise ValueError("state['bounds'] is None but a global AdaptiveClip has a bound")
            checked = None
        else:
            if not isinstance(bounds, Mapping) or not bounds:
                raise ValueError(f"state['bounds'] must map layer -> bound, got {bounds!r:.80}")
            checked = {
                str(k): require_positive(f"state['bounds'][{k!r}]", v) for k, v in bounds.items()
            }
            if not self.per_layer and set(checked) != {"__all__"}:
                raise ValueError(
                    f"a global AdaptiveClip's bounds are {{'__all__': C}}, got {bounds}"
                )
        self._bounds = checked
        self._current = None
        self.step = step
