"""Streaming DP aggregation: clip each user's update, sum, add noise once, divide by a fixed size.

[`DPAggregator`][dpfl.aggregate.DPAggregator] composes a clipper ([`dpfl.clip`][dpfl.clip]) and a
Gaussian mechanism ([`dpfl.noise`][dpfl.noise]) into the server side of one DP-FedAvg round:

1. ``add(update)`` validates one user's update, clips it and adds it into a running sum
   (O(model) memory, one norm pass plus one fused scaled-add pass per user);
2. ``release()`` optionally reduces the sums across workers, adds ``N(0, (z·C)²)`` noise once to
   the total, divides by the **expected** cohort size and resets for the next round.

References: Pelikan et al., arXiv 2310.00098, section 2 (DP-FedAvg with user-level DP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from dpfl._checks import require_positive
from dpfl._finite import divide_
from dpfl.adaptive_clip import COUNT_STREAM, AdaptiveClip
from dpfl.clip import ClipStats, GlobalClip, NonFiniteUpdateError, PerLayerClip
from dpfl.noise import GaussianMechanism

__all__ = ["DPAggregator", "ReleaseStats"]


@dataclass(frozen=True)
class ReleaseStats:
    """Statistics of one release (summed over workers when a ``reduce`` hook is used).

    Attributes:
        num_users: Users whose clipped update entered the sum.
        num_dropped: Users dropped for non-finite values (``drop_nonfinite=True``).
        fraction_clipped: Fraction of ``num_users`` whose update was scaled down (0 if none).
        mean_norm: Mean pre-clip global norm over ``num_users`` (0 if none).
        mean_finite: Whether every coordinate of the released (noised) mean is finite, tested
            by [`DPAggregator.release`][dpfl.aggregate.DPAggregator.release] right after the
            division by the fixed denominator (one read pass, plain torch, any dtype and device);
            ``None`` only for statistics not made by a release. A property of the DP output itself,
            unlike the fields above; ``run_rounds`` uses it to skip ``server_step``'s own finiteness
            pass.

    Warning:
        These statistics are computed from raw user updates and are **not** differentially
        private; log them for debugging, do not publish them as part of a DP release.
    """

    num_users: int
    num_dropped: int
    fraction_clipped: float
    mean_norm: float
    mean_finite: bool | None = None


class DPAggregator:
    """Clip, sum, noise and average user updates with a fixed denominator.

    With an [`AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip] the aggregator also sums each user's
    centred bits; ``release`` adds noise of multiplier ``clipper.count_noise_multiplier`` to
    that count from an independent stream of the same mechanism
    ([`add_side_noise_`][dpfl.noise.GaussianMechanism.add_side_noise_]), noises the update sum with
    the round's bound as sensitivity, then moves the bounds with the noised count
    ([`update_`][dpfl.adaptive_clip.AdaptiveClip.update_], expected cohort size as denominator).
    Charge such a round with ``count_noise_multiplier`` in its round spec.

    Args:
        clipper: A [`GlobalClip`][dpfl.clip.GlobalClip], [`PerLayerClip`][dpfl.clip.PerLayerClip] or
            [`AdaptiveClip`][dpfl.adaptive_clip.AdaptiveClip].
        mechanism: A [`GaussianMechanism`][dpfl.noise.GaussianMechanism]; its ``sensitivity`` must
            equal the clipper's (for an ``AdaptiveClip``: its ``initial_bound``; each release then
            uses the round's bound).
        expected_cohort_size: The fixed denominator ``S >= 1`` (Poisson: ``q·K``; fixed cohort:
            the cohort size).
        accumulate_dtype: ``torch.float32`` (default) or ``torch.float64`` for the running sum
            and the released mean.
        drop_nonfinite: If ``True``, a user whose update holds inf/NaN is dropped (counted in
            ``ReleaseStats.num_dropped``) instead of raising.
        template: Optional update fixing the schema (names, shapes, dtypes, device) up front;
            without it the first added update fixes it. Needed to release with no user at all
            (``allow_empty=True``) or for a worker that may receive no user before ``reduce``.

    Raises:
        ValueError: if the sensitivities differ, ``expected_cohort_size < 1``,
            ``accumulate_dtype`` is not float32/float64, or ``template`` is empty or holds no
            element.

    Warning:
        The mean is divided by ``expected_cohort_size``, never by the realised number of users:
        the realised count depends on who took part, and dividing by it leaks that information
        (and changes the sensitivity). Releasing ``ReleaseStats`` is not private either.

    Examples:
        >>> import torch
        >>> from dpfl.clip import GlobalClip
        >>> from dpfl.noise import GaussianMechanism
        >>> agg = DPAggregator(GlobalClip(1.0), GaussianMechanism(0.0, 1.0),
        ...                    expected_cohort_size=2)
        >>> _ = agg.add({"w": torch.tensor([3.0, 4.0])})
        >>> _ = agg.add({"w": torch.tensor([0.0, 0.5])})
        >>> mean, stats = agg.release()
        >>> stats.num_users, stats.fraction_clipped
        (2, 0.5)

    References: Pelikan et al., arXiv 2310.00098, section 2.
    """

    def __init__(
        self,
        clipper: GlobalClip | PerLayerClip | AdaptiveClip,
        mechanism: GaussianMechanism,
        *,
        expected_cohort_size: float,
        accumulate_dtype: torch.dtype = torch.float32,
        drop_nonfinite: bool = False,
        template: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not isinstance(clipper, GlobalClip | PerLayerClip | AdaptiveClip):
            raise TypeError(
                f"clipper must be a GlobalClip, PerLayerClip or AdaptiveClip, got {clipper!r}"
            )
        if not isinstance(mechanism, GaussianMechanism):
            raise TypeError(f"mechanism must be a GaussianMechanism, got {mechanism!r}")
        adaptive = isinstance(clipper, AdaptiveClip)
        expected = (
            clipper.initial_bound if isinstance(clipper, AdaptiveClip) else clipper.sensitivity
        )
        if mechanism.sensitivity != expected:
            what = "clipper.initial_bound" if adaptive else "clipper.sensitivity"
            raise ValueError(
                f"mechanism.sensitivity ({mechanism.sensitivity!r}) must equal "
                f"{what} ({expected!r}); build the mechanism with sensitivity={what}"
            )
        size = require_positive("expected_cohort_size", expected_cohort_size)
        if size < 1:
            raise ValueError(f"expected_cohort_size must be >= 1, got {size!r}")
        if accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"accumulate_dtype must be torch.float32 or torch.float64, got {accumulate_dtype!r}"
            )
        self.clipper = clipper
        self.mechanism = mechanism
        self.expected_cohort_size = size
        self.accumulate_dtype = accumulate_dtype
        self.drop_nonfinite = bool(drop_nonfinite)
        self._schema: dict[str, tuple[torch.Size, torch.dtype, torch.device]] | None = None
        if template is not None:
            self._schema = _schema_of(template, "template")
        self._reset()

    def _reset(self) -> None:
        self._sum: dict[str, Tensor] | None = None
        self._num_users = 0
        self._num_clipped = 0
        self._num_dropped = 0
        self._norm_sum = 0.0
        self._bits: list[float] | None = None

    @property
    def num_users(self) -> int:
        """Users added (and not dropped) since the last release, on this worker."""
        return self._num_users

    def _check(self, update: Mapping[str, Tensor]) -> None:
        """Validate ``update`` against the schema without changing any state."""
        if not isinstance(update, Mapping):
            raise TypeError(f"update must be a mapping str -> Tensor, got {type(update).__name__}")
        if not update:
            raise ValueError(
                "update is empty (no tensors): a user must send a model update; drop the user "
                "instead of adding an empty mapping"
            )
        for name, t in update.items():
            _check_tensor(name, t, "update")
        schema = self._schema if self._schema is not None else _schema_of(update, "update")
        missing = [k for k in schema if k not in update]
        extra = [k for k in update if k not in schema]
        if missing or extra:
            raise ValueError(
                f"update keys do not match the aggregator's schema: missing {missing}, "
                f"unexpected {extra}"
            )
        for name, (shape, dtype, device) in schema.items():
            t = update[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"update tensor {name!r} must be a torch.Tensor")
            if t.shape != shape:
                raise ValueError(
                    f"update tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            if t.dtype != dtype:
                raise ValueError(f"update tensor {name!r} has dtype {t.dtype}, expected {dtype}")
            if t.device != device:
                raise ValueError(f"update tensor {name!r} is on {t.device}, expected {device}")

    def add(self, update: Mapping[str, Tensor]) -> ClipStats | None:
        """Clip one user's update and add it to the running sum.

        Args:
            update: The user's model update ``θ_user − θ``, a ``dict[str, Tensor]`` (unchanged).

        Returns:
            The user's [`ClipStats`][dpfl.clip.ClipStats], or ``None`` if the user was dropped for
            non-finite values (``drop_nonfinite=True``).

        Raises:
            ValueError: an empty update (``{}``) or, for the first update without a template,
                one whose tensors hold no element at all; missing/extra keys, shape/dtype/device
                mismatch with the schema, or non-finite values (unless dropped); the message
                names the tensor. The aggregator is unchanged after any error.
            TypeError: if ``update`` is not a mapping from str to dense floating-point tensors
                holding data (sparse and meta tensors are rejected).
        """
        self._check(update)
        schema = self._schema if self._schema is not None else _schema_of(update, "update")
        acc = self._sum if self._sum is not None else _zeros(schema, self.accumulate_dtype)
        try:
            stats = self.clipper.clip_and_accumulate_(update, acc)
        except NonFiniteUpdateError:
            if not self.drop_nonfinite:
                raise
            self._num_dropped += 1  # no update and no bits: the user is absent from both
            return None
        if isinstance(self.clipper, AdaptiveClip):
            bits = self.clipper.centred_bits(stats)
            old = self._bits if self._bits is not None else [0.0] * len(bits)
            self._bits = [a + b for a, b in zip(old, bits, strict=True)]
        self._schema = schema
        self._sum = acc
        self._num_users += 1
        self._num_clipped += int(stats.clipped)
        self._norm_sum += stats.norm
        return stats

    def release(
        self,
        *,
        reduce: Callable[[list[Tensor]], None] | None = None,
        allow_empty: bool = False,
    ) -> tuple[dict[str, Tensor], ReleaseStats]:
        """Noise the sum once, divide by ``expected_cohort_size``, return it and reset.

        Args:
            reduce: Optional hook called with ``[*sum tensors, stats tensor]`` (stats: float64
                ``[num_users, num_clipped, norm_sum, num_dropped]``; with an ``AdaptiveClip``
                the float64 sums of centred bits, one per layer, come before it as
                ``[*sum tensors, count tensor, stats tensor]``) that must sum them in place
                across workers (e.g. ``torch.distributed.all_reduce`` on each), before noise is
                added. Noise is then added once to the global sum: with several workers, call
                ``release`` with an identically seeded mechanism on every worker (or broadcast
                rank 0's result) so all workers hold the same released mean.
            allow_empty: Release noise only when no user was added (needs a schema: a previous
                update or ``template=``). Otherwise a release with no user raises.

        Returns:
            ``(noised mean, ReleaseStats)``; the mean is in ``accumulate_dtype``.

        Raises:
            ValueError: if no user was added (globally, after ``reduce``) and ``allow_empty`` is
                false, or no schema is known; the aggregator is unchanged then.
        """
        if self._schema is None:
            raise ValueError(
                "release() with no user added and no schema: add an update first or pass "
                "template= to DPAggregator"
            )
        sums = self._sum if self._sum is not None else _zeros(self._schema, self.accumulate_dtype)
        device = next(iter(sums.values())).device if sums else torch.device("cpu")
        local = [self._num_users, self._num_clipped, self._norm_sum, self._num_dropped]
        stats_t = torch.tensor(local, dtype=torch.float64, device=device)
        count_t = self._count_tensor(sums, device)
        if reduce is not None:
            reduce([*sums.values(), *([] if count_t is None else [count_t]), stats_t])
        num_users, num_clipped, norm_sum, num_dropped = stats_t.tolist()
        if round(num_users) == 0 and not allow_empty:
            raise ValueError(
                "release() with no user added (num_users == 0); add updates or pass "
                "allow_empty=True to release noise only"
            )
        if isinstance(self.clipper, AdaptiveClip):
            assert count_t is not None
            self.mechanism.add_side_noise_(
                {"count": count_t},
                stream=COUNT_STREAM,
                noise_multiplier=self.clipper.count_noise_multiplier,
                sensitivity=self.clipper.count_sensitivity,
            )
            self.mechanism.add_noise_(sums, sensitivity=self.clipper.sensitivity)
            # The bound of the next round: post-processing of this round's noised count only.
            self.clipper.update_(count_t.tolist(), expected_cohort_size=self.expected_cohort_size)
        else:
            self.mechanism.add_noise_(sums)
        finite = divide_(list(sums.values()), self.expected_cohort_size)
        n = round(num_users)
        stats = ReleaseStats(
            num_users=n,
            num_dropped=round(num_dropped),
            fraction_clipped=num_clipped / n if n else 0.0,
            mean_norm=norm_sum / n if n else 0.0,
            mean_finite=finite,
        )
        self._reset()
        return sums, stats

    def _count_tensor(self, sums: dict[str, Tensor], device: torch.device) -> Tensor | None:
        """The float64 sums of centred bits (zeros if no user), or ``None`` without adaptation."""
        if not isinstance(self.clipper, AdaptiveClip):
            return None
        layers = len(self.clipper.layer_bounds(sums))  # fixes the layers if no user came
        bits = self._bits if self._bits is not None else [0.0] * layers
        return torch.tensor(bits, dtype=torch.float64, device=device)


def _schema_of(
    update: Mapping[str, Tensor], what: str
) -> dict[str, tuple[torch.Size, torch.dtype, torch.device]]:
    if not isinstance(update, Mapping):
        raise TypeError(f"{what} must be a mapping str -> Tensor, got {type(update).__name__}")
    if not update:
        raise ValueError(f"{what} is empty (no tensors): it must hold the model's parameters")
    schema = {}
    for name, t in update.items():
        _check_tensor(name, t, what)
        schema[name] = (t.shape, t.dtype, t.device)
    if all(shape.numel() == 0 for shape, _, _ in schema.values()):
        raise ValueError(
            f"{what} has no elements (every tensor is empty: {sorted(schema)}); it must hold "
            "the model's parameters"
        )
    return schema


def _check_tensor(name: object, t: object, what: str) -> None:
    """Reject non-str keys, non-tensors and tensors without dense floating-point data."""
    if not isinstance(name, str):
        raise TypeError(f"{what} keys must be str (parameter names), got {name!r}")
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{what} tensor {name!r} must be a floating-point torch.Tensor")
    if t.layout != torch.strided:
        raise TypeError(
            f"{what} tensor {name!r} must be a dense (strided) tensor, got layout {t.layout}; "
            "convert it with .to_dense()"
        )
    if t.is_meta:
        raise TypeError(f"{what} tensor {name!r} is on the meta device and holds no data")


def _zeros(
    schema: Mapping[str, tuple[torch.Size, torch.dtype, torch.device]], dtype: torch.dtype
) -> dict[str, Tensor]:
    return {
        name: torch.zeros(shape, dtype=dtype, device=dev)
        for name, (shape, _, dev) in schema.items()
    }
