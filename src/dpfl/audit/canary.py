"""One-shot empirical privacy estimation of a federated run with random canary clients.

[`CanaryAudit`][dpfl.audit.CanaryAudit] follows Andrew et al. (ICLR 2024): ``k`` canary clients,
each of whose update is a fixed random direction at the clip bound, take part in the run like users
— sampled at the run's rate, clipped, summed and noised by the same aggregator. At the end, the
cosine between the model's total change and each canary direction is compared with the cosines of
``k`` random directions that were never inserted; Gaussians fitted to the two samples give ``μ =
(canary mean − unseen mean) / pooled std`` (0 if negative) and the estimate is the ε of μ-GDP at δ
([`gaussian_epsilon`][dpfl.audit.gaussian_epsilon]). With every released iterate observed, the
statistic of a direction is its largest cosine with any one round's model change.

What the estimate is: the ε that this particular attack (cosine with the model change) achieves
against canaries of this run, assuming the fitted Gaussians. It is not a guarantee and not a
bound: real users are usually less exposed (their updates are not worst-case directions), a
stronger attack may leak more, and with few canaries it is noisy. Its use is to compare with the
accountant's ε — a proven upper bound for every user, canaries included — and to catch
implementation bugs: an estimate clearly above the accountant's ε means the run leaks more than
was accounted.

Canaries are not users of the population: they hold no data, they are not counted in the expected
cohort size (the fixed denominator stays that of the real users) and they cost no privacy budget.
Adding the same data-independent updates to every neighbouring pair of datasets leaves each real
user's (ε, δ) guarantee unchanged; the only cost is utility (each round adds about
``q · k · C / S`` of random direction to the mean).

Hooks for a round loop (see ``docs/audit.md``)::

    audit.begin(template, clipper)                      # once, before round 1
    for i in audit.sample(sample_rate):                 # each round, before release()
        aggregator.add(audit.update(i))
    ...release, server step...
    audit.observe(before, after)                        # each round, the released model change
    estimate = audit.result(delta)                      # at the end

References:
    Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar, "One-shot Empirical Privacy Estimation for
    Federated Learning", ICLR 2024, arXiv 2302.03098.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dpfl._checks import require_int, require_probability
from dpfl.audit.gaussian import gaussian_epsilon
from dpfl.clip import GlobalClip, PerLayerClip

__all__ = [
    "CanaryAudit",
    "CanaryEstimate",
    "CosineEstimate",
    "canary_update",
    "estimate_from_cosines",
]

#: Canary layers are scaled to this fraction of their bound so the clipper leaves them unchanged.
_BELOW_BOUND = 1.0 - 1e-6
_CANARY, _UNSEEN, _MEMBERSHIP = 0, 1, 2


def _layer_of(clipper: GlobalClip | PerLayerClip, name: str) -> str:
    if isinstance(clipper, GlobalClip):
        return "__all__"
    return name if clipper.layers is None else clipper.layers(name)


def canary_update(
    template: Mapping[str, Tensor],
    clipper: GlobalClip | PerLayerClip,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """A random update at full strength under ``clipper``: each layer ``h`` has norm ≈ ``C_h``.

    Every layer is an independent uniformly random direction (normalised Gaussian draws from
    ``generator``) scaled to just below its bound, so clipping leaves it unchanged and its
    global norm is just below ``clipper.sensitivity``. Shapes, dtypes and devices follow
    ``template``.

    Args:
        template: Name -> tensor giving the update's shapes, dtypes and devices (values unused).
        clipper: The run's [`GlobalClip`][dpfl.clip.GlobalClip] or
            [`PerLayerClip`][dpfl.clip.PerLayerClip]; its bounds set each layer's norm.
        generator: The source of the random directions.

    Raises:
        TypeError: if ``clipper`` is not a GlobalClip/PerLayerClip or ``template`` is not a
            mapping of floating-point tensors.
        ValueError: if the clip bound is infinite.
    """
    if not isinstance(clipper, GlobalClip | PerLayerClip):
        raise TypeError(f"clipper must be a GlobalClip or PerLayerClip, got {clipper!r}")
    if not math.isfinite(clipper.sensitivity):
        raise ValueError("canaries need a finite clip bound (clipper.sensitivity is inf)")
    bounds = clipper.layer_bounds(template)
    draws = {
        n: torch.randn(t.shape, generator=generator, dtype=torch.float64)
        for n, t in template.items()
    }
    sq: dict[str, float] = {}
    for n, d in draws.items():
        layer = _layer_of(clipper, n)
        sq[layer] = sq.get(layer, 0.0) + float(d.pow(2).sum())
    out = {}
    for n, t in template.items():
        layer = _layer_of(clipper, n)
        norm = math.sqrt(sq[layer])
        scale = bounds[layer] * _BELOW_BOUND / norm if norm > 0 else 0.0
        out[n] = (draws[n] * scale).to(dtype=t.dtype, device=t.device)
    return out


@dataclass(frozen=True)
class CosineEstimate:
    """ε of two Gaussians fitted to canary and unseen-direction statistics.

    Attributes:
        epsilon: ε of μ-GDP at ``delta`` with ``mu``.
        mu: ``max(0, canary_mean − unseen_mean) / pooled std``.
        canary_mean: Mean of the inserted canaries' statistics.
        canary_std: Standard deviation (unbiased) of the canaries' statistics.
        unseen_mean: Mean of the unseen directions' statistics.
        unseen_std: Standard deviation (unbiased) of the unseen directions' statistics.
        count: Number of canaries (and of unseen directions).
    """

    epsilon: float
    mu: float
    canary_mean: float
    canary_std: float
    unseen_mean: float
    unseen_std: float
    count: int


def estimate_from_cosines(
    canary: Sequence[float] | np.ndarray, unseen: Sequence[float] | np.ndarray, *, delta: float
) -> CosineEstimate:
    """Estimate ε from saved canary and unseen-direction cosines (Andrew et al., ICLR 2024).

    Fits a Gaussian to each sample (mean, unbiased std), sets ``μ = max(0, m_c − m_u) / s`` with
    the pooled std ``s = √((s_c² + s_u²)/2)`` and returns the ε of μ-GDP at ``delta``. The
    difference is signed: a canary pushes the model *towards* its direction, so canaries scoring
    lower than unseen directions are no evidence of leakage (taking ``|m_c − m_u|`` would turn
    pure sampling noise into a positive estimate twice as often). The sampling error of ``μ`` is
    about ``√(2/k)`` for ``k`` canaries: estimates below ``ε(2·√(2/k))`` are noise.

    Args:
        canary: Statistic (cosine) of each inserted canary; at least 2 finite values.
        unseen: The same statistic for never-inserted random directions; at least 2.
        delta: δ in (0, 1].

    Raises:
        ValueError: if a sample has fewer than 2 values or a non-finite one.

    Examples:
        >>> est = estimate_from_cosines([0.9, 1.1, 1.0], [-0.1, 0.1, 0.0], delta=1e-5)
        >>> round(est.mu, 3), round(est.epsilon, 2)
        (10.0, 91.82)
    """
    c = _sample("canary", canary)
    u = _sample("unseen", unseen)
    delta = require_probability("delta", delta)
    mc, mu_ = float(c.mean()), float(u.mean())
    sc, su = float(c.std(ddof=1)), float(u.std(ddof=1))
    pooled = math.sqrt((sc * sc + su * su) / 2)
    gap = max(0.0, mc - mu_)
    mu = gap / pooled if pooled > 0 else (math.inf if gap > 0 else 0.0)
    return CosineEstimate(gaussian_epsilon(mu, delta), mu, mc, sc, mu_, su, int(c.size))


def _sample(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"{name} needs at least 2 values, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} values must be finite")
    return x


@dataclass(frozen=True)
class CanaryEstimate:
    """Result of [`CanaryAudit.result`][dpfl.audit.CanaryAudit.result].

    Attributes:
        delta: The δ of the estimates.
        final: Estimate from the final model's total change (what a model user sees).
        all_iterates: Estimate from every observed release (largest per-round cosine), or
            ``None`` if fewer than 2 rounds were observed.
        num_canaries: ``k``.
        rounds_observed: Releases passed to [`CanaryAudit.observe`][dpfl.audit.CanaryAudit.observe].
        mean_participations: Average number of rounds a canary took part in.
    """

    delta: float
    final: CosineEstimate
    all_iterates: CosineEstimate | None
    num_canaries: int
    rounds_observed: int
    mean_participations: float

    @property
    def epsilon(self) -> float:
        """The final-model estimate, ``final.epsilon``."""
        return self.final.epsilon

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able summary for logs: ``empirical_epsilon`` and its details."""
        out: dict[str, Any] = {
            "empirical_epsilon": self.final.epsilon,
            "empirical_epsilon_all_iterates": (
                self.all_iterates.epsilon if self.all_iterates else None
            ),
            "delta": self.delta,
            "num_canaries": self.num_canaries,
            "rounds_observed": self.rounds_observed,
            "mean_participations": self.mean_participations,
            "final": asdict(self.final),
            "all_iterates": asdict(self.all_iterates) if self.all_iterates else None,
        }
        return out


class CanaryAudit:
    """Insert ``k`` canary clients into a DP-FedAvg run and estimate its ε in one shot.

    Everything random (canary and unseen directions, canary membership per round) derives from
    ``seed``; the round loop calls [`begin`][dpfl.audit.CanaryAudit.begin],
    [`sample`][dpfl.audit.CanaryAudit.sample], [`update`][dpfl.audit.CanaryAudit.update],
    [`observe`][dpfl.audit.CanaryAudit.observe] and finally
    [`result`][dpfl.audit.CanaryAudit.result] (see the module docstring for where).
    [`state_dict`][dpfl.audit.CanaryAudit.state_dict]/[`load_state_dict`][dpfl.audit.CanaryAudit.load_state_dict]
    checkpoint it (call [`begin`][dpfl.audit.CanaryAudit.begin] first on resume; directions are
    regenerated, not stored).

    Memory: ``2k`` flattened directions in float32 (``8·k·D`` bytes for ``D`` parameters) plus
    two float64 vectors of ``D``.

    Args:
        num_canaries: ``k >= 2`` canaries (and as many unseen directions).
        seed: seed of all the audit's randomness; ``None`` draws one from OS entropy.

    Raises:
        ValueError: if ``num_canaries < 2`` or ``seed`` is negative.

    Examples:
        >>> import torch
        >>> from dpfl.clip import GlobalClip
        >>> audit = CanaryAudit(4, seed=0)
        >>> audit.begin({"w": torch.zeros(10)}, GlobalClip(1.0))
        >>> members = audit.sample(1.0)
        >>> members
        [0, 1, 2, 3]
        >>> round(float(audit.update(0)["w"].norm()), 4)
        1.0

    References:
        Andrew et al., ICLR 2024, arXiv 2302.03098.
    """

    def __init__(self, num_canaries: int, *, seed: int | None = None) -> None:
        self.num_canaries = require_int("num_canaries", num_canaries, minimum=2)
        if seed is not None:
            seed = require_int("seed", seed, minimum=0)
        self.seed = seed
        self._entropy = seed if seed is not None else secrets.randbits(63)
        self._directions: Tensor | None = None  # (2k, D) float32: canaries then unseen
        self._schema: list[tuple[str, torch.Size, torch.dtype, torch.device]] = []
        self._reset_progress()

    def __repr__(self) -> str:
        return f"CanaryAudit(num_canaries={self.num_canaries!r}, seed={self.seed!r})"

    @property
    def rounds_observed(self) -> int:
        """Released iterates passed to [`observe`][dpfl.audit.CanaryAudit.observe] so far."""
        return self._rounds_observed

    def _reset_progress(self) -> None:
        self._round = 0
        self._participations = np.zeros(self.num_canaries, np.int64)
        self._rounds_observed = 0
        self._total: Tensor | None = None
        self._max_cos: Tensor | None = None

    def _generator(self, kind: int, index: int) -> torch.Generator:
        words = np.random.SeedSequence(self._entropy, spawn_key=(kind, index)).generate_state(2)
        return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))

    def begin(self, template: Mapping[str, Tensor], clipper: GlobalClip | PerLayerClip) -> None:
        """Fix the update schema and draw the canary and unseen directions.

        Args:
            template: an update (e.g. the model's parameters) fixing names, shapes, dtypes.
            clipper: the run's clipper; each canary layer is scaled to just below its bound.

        Raises:
            TypeError, ValueError: as [`canary_update`][dpfl.audit.canary_update] (nothing changes
                then).
        """
        rows = []
        for kind in (_CANARY, _UNSEEN):
            for i in range(self.num_canaries):
                upd = canary_update(template, clipper, self._generator(kind, i))
                rows.append(torch.cat([t.detach().flatten().float().cpu() for t in upd.values()]))
        self._schema = [(n, t.shape, t.dtype, t.device) for n, t in template.items()]
        self._directions = torch.stack(rows)
        self._begun_with = (template, clipper)
        self._reset_progress()

    def _require_begun(self) -> Tensor:
        if self._directions is None:
            raise RuntimeError("call CanaryAudit.begin(template, clipper) first")
        return self._directions

    def sample(self, sample_rate: float) -> list[int]:
        """The canaries taking part in the next round: each independently with ``sample_rate``.

        Use the run's Poisson rate ``q`` (for fixed cohorts, ``cohort_size / population``, the
        per-round inclusion probability of a user). Advances the audit's round counter.

        Args:
            sample_rate: Each canary's inclusion probability this round, in [0, 1].

        Returns:
            The indices of the canaries in this round's cohort.

        Raises:
            ValueError: if ``sample_rate`` is outside [0, 1].
            RuntimeError: before [`begin`][dpfl.audit.CanaryAudit.begin].
        """
        q = require_probability("sample_rate", sample_rate, low_open=False)
        self._require_begun()
        seq = np.random.SeedSequence(self._entropy, spawn_key=(_MEMBERSHIP, self._round))
        chosen = np.flatnonzero(np.random.default_rng(seq).random(self.num_canaries) < q)
        self._round += 1
        self._participations[chosen] += 1
        return [int(i) for i in chosen]

    def update(self, index: int) -> dict[str, Tensor]:
        """Canary ``index``'s update (the same every round), shaped like the template.

        Args:
            index: The canary, in ``[0, num_canaries)``.

        Raises:
            ValueError: if ``index`` is not in ``[0, num_canaries)``.
            RuntimeError: before [`begin`][dpfl.audit.CanaryAudit.begin].
        """
        rows = self._require_begun()
        i = require_int("index", index, minimum=0)
        if i >= self.num_canaries:
            raise ValueError(f"index must be < num_canaries ({self.num_canaries}), got {i}")
        return self._unflatten(rows[i])

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, shape, dtype, device in self._schema:
            n = math.prod(shape)
            out[name] = flat[start : start + n].reshape(shape).to(dtype=dtype, device=device)
            start += n
        return out

    def _flatten(self, what: str, update: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n, *_ in self._schema if n not in update]
        if missing or len(update) != len(self._schema):
            raise ValueError(f"{what} must have exactly the template's tensors; missing {missing}")
        parts = []
        for name, shape, *_ in self._schema:
            t = update[name]
            if not isinstance(t, Tensor) or t.shape != shape:
                raise ValueError(f"{what}[{name!r}] must be a tensor of shape {tuple(shape)}")
            parts.append(t.detach().flatten().to("cpu", torch.float64))
        return torch.cat(parts)

    def observe(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> None:
        """Record one released iterate: the model (parameters) before and after the round.

        Args:
            before: The model's parameters before the round (name -> tensor, as the template).
            after: The released parameters after the round.

        Raises:
            ValueError: if a mapping does not match the template (nothing is recorded).
            RuntimeError: before [`begin`][dpfl.audit.CanaryAudit.begin].
        """
        rows = self._require_begun()
        change = self._flatten("after", after) - self._flatten("before", before)
        cos = _cosines(rows, change)
        self._total = change if self._total is None else self._total + change
        self._max_cos = cos if self._max_cos is None else torch.maximum(self._max_cos, cos)
        self._rounds_observed += 1

    def cosines(self) -> dict[str, Any]:
        """The raw statistics, JSON-able, for
        [`estimate_from_cosines`][dpfl.audit.estimate_from_cosines] or ``dpfl audit``.

        Returns:
            ``{"final": {"canary": [...], "unseen": [...]}, "all_iterates": {...} or None,
            "rounds_observed": int}``.

        Raises:
            RuntimeError: before any [`observe`][dpfl.audit.CanaryAudit.observe].
        """
        rows = self._require_begun()
        if self._total is None or self._max_cos is None:
            raise RuntimeError("no iterate observed yet: call observe(before, after) each round")
        k = self.num_canaries
        final = _cosines(rows, self._total).tolist()
        best = self._max_cos.tolist()
        return {
            "final": {"canary": final[:k], "unseen": final[k:]},
            "all_iterates": (
                {"canary": best[:k], "unseen": best[k:]} if self._rounds_observed >= 2 else None
            ),
            "rounds_observed": self._rounds_observed,
        }

    def result(self, delta: float) -> CanaryEstimate:
        """The empirical ε estimates at ``delta`` (final model, and every iterate).

        Args:
            delta: The δ of the estimates, in (0, 1].

        Raises:
            ValueError: if ``delta`` is outside (0, 1].
            RuntimeError: before any [`observe`][dpfl.audit.CanaryAudit.observe].
        """
        delta = require_probability("delta", delta)
        cos = self.cosines()
        final = estimate_from_cosines(cos["final"]["canary"], cos["final"]["unseen"], delta=delta)
        every = cos["all_iterates"]
        all_it = (
            estimate_from_cosines(every["canary"], every["unseen"], delta=delta) if every else None
        )
        return CanaryEstimate(
            delta=delta,
            final=final,
            all_iterates=all_it,
            num_canaries=self.num_canaries,
            rounds_observed=self._rounds_observed,
            mean_participations=float(self._participations.mean()),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (directions are regenerated by
        [`begin`][dpfl.audit.CanaryAudit.begin]).

        Warning:
            Holds the audit's seed: whoever has it knows the canary directions.
        """
        return {
            "num_canaries": self.num_canaries,
            "entropy": self._entropy,
            "round": self._round,
            "participations": self._participations.tolist(),
            "rounds_observed": self._rounds_observed,
            "total": None if self._total is None else self._total.clone(),
            "max_cos": None if self._max_cos is None else self._max_cos.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][dpfl.audit.CanaryAudit.state_dict] output.

        Call it after [`begin`][dpfl.audit.CanaryAudit.begin] with the same template and clipper.

        Args:
            state: The dict from ``state_dict()`` of an audit with the same canaries and seed.

        Raises:
            ValueError: if ``state`` does not match this audit (nothing changes then).
            RuntimeError: before [`begin`][dpfl.audit.CanaryAudit.begin].
        """
        rows = self._require_begun()
        keys = ("num_canaries", "entropy", "round", "participations", "rounds_observed")
        for key in (*keys, "total", "max_cos"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}; pass CanaryAudit.state_dict() output")
        if state["num_canaries"] != self.num_canaries or (
            state["entropy"] != self._entropy and self.seed is not None
        ):
            raise ValueError("state comes from a CanaryAudit with another num_canaries or seed")
        total, max_cos = state["total"], state["max_cos"]
        if (total is None) != (max_cos is None) or (
            total is not None
            and (total.shape != (rows.shape[1],) or max_cos.shape != (rows.shape[0],))
        ):
            raise ValueError("state's accumulated statistics do not match the template")
        if len(state["participations"]) != self.num_canaries:
            raise ValueError("state['participations'] must have one count per canary")
        round_ = require_int("state['round']", state["round"], minimum=0)
        observed = require_int("state['rounds_observed']", state["rounds_observed"], minimum=0)
        if state["entropy"] != self._entropy:  # unseeded audit resumed: adopt the stored seed
            entropy = require_int("state['entropy']", state["entropy"], minimum=0)
            previous = self._entropy
            self._entropy = entropy
            try:
                self.begin(*self._begun_with)
            except BaseException:
                self._entropy = previous
                self.begin(*self._begun_with)
                raise
        self._round, self._rounds_observed = round_, observed
        self._participations = np.asarray(state["participations"], dtype=np.int64)
        self._total = None if total is None else total.clone().to(torch.float64)
        self._max_cos = None if max_cos is None else max_cos.clone().to(torch.float32)


def _cosines(rows: Tensor, change: Tensor) -> Tensor:
    """Cosine of ``change`` with every row (0 where either has norm 0)."""
    norm = float(change.norm())
    if norm == 0.0:
        return torch.zeros(rows.shape[0])
    dots = rows.double() @ change
    return (dots / (rows.double().norm(dim=1) * norm)).float()
