"""The per-layer trust ratio shared by dpfl's server optimizers, and their common base class.

"Layer-wise normalization" in DP federated learning is the trust ratio of LARS/LAMB applied on the
server, one ratio per parameter tensor h: the step for tensor h is rescaled so that its size is set
by ``‖θ_h‖`` rather than by the scale of the (noisy, clipped) pseudo-gradient. This module holds:

* [`trust_ratio`][dpfl.optim.trust_ratio], the vectorized kernel (ratio taken as 1 when either norm
  is 0, optionally clipped from above),
* [`trust_ratio_groups`][dpfl.optim.trust_ratio_groups], a helper that builds parameter groups
  excluding some named tensors (e.g. biases and LayerNorm parameters) from the ratio,
* ``_LayerwiseOptimizer``, the ``torch.optim.Optimizer`` base class of [`LAMB`][dpfl.optim.LAMB]
  and [`LARS`][dpfl.optim.LARS] (group validation, ``exclude_from_trust`` splitting, the choice
  between the ``torch._foreach_*`` fast path and the per-tensor reference path; LAMB adds a
  fused CPU path),
* [`NonFiniteGradientError`][dpfl.optim.NonFiniteGradientError], raised by
  ``step(check_finite=True)`` and [`server_step`][dpfl.optim.server_step], whose finiteness
  check is ``first_non_finite`` (re-exported here).

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv 2310.00098 (layer-wise
    normalization, section on server optimizers); You et al., arXiv 1708.03888 (LARS);
    You et al., arXiv 1904.00962 (LAMB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from dpfl._checks import require_non_negative, require_positive
from dpfl._errors import DPFLError
from dpfl._finite import first_non_finite, group_by_device_and_dtype

__all__ = [
    "NonFiniteGradientError",
    "first_non_finite",
    "group_by_device_and_dtype",
    "trust_ratio",
    "trust_ratio_groups",
]

_FOREACH_DEVICES = ("cpu", "cuda")


class NonFiniteGradientError(ValueError, DPFLError):
    """A gradient holds NaN or ±inf; raised by ``step(check_finite=True)`` before any change.

    A ``ValueError``, raised before any parameter or optimizer state changes.

    Args:
        message: What is wrong, naming the parameter group and index.
        param: The parameter tensor whose ``.grad`` is not finite.

    Attributes:
        param: The parameter tensor whose ``.grad`` is not finite (callers map it to a name).
    """

    def __init__(self, message: str, param: Tensor) -> None:
        super().__init__(message)
        self.param = param


def trust_ratio(
    weight_norm: Tensor,
    update_norm: Tensor,
    *,
    coefficient: float = 1.0,
    denominator: Tensor | None = None,
    trust_clip: float | None = None,
) -> Tensor:
    """Per-tensor trust ratio ``coefficient · ‖θ_h‖ / ‖r_h‖``, taken as 1 when either norm is 0.

    Works elementwise on a 0-d tensor (one parameter tensor) or on a stacked vector of norms (one
    entry per parameter tensor), so the per-tensor and ``foreach`` paths share one definition.

    Args:
        weight_norm: ``‖θ_h‖``, the L2 norm(s) of the parameter tensor(s).
        update_norm: ``‖r_h‖``, the L2 norm(s) of the update direction(s); also the zero test.
        coefficient: Multiplies the ratio (LARS's trust coefficient; 1 for LAMB).
        denominator: Divides instead of ``update_norm`` when given (LARS uses
            ``‖g‖ + λ‖θ‖ + eps``); the ratio is still 1 where either norm is 0.
        trust_clip: If set, the ratio is ``min(ratio, trust_clip)`` (applied after the zero-norm
            fallback, so a fallback ratio of 1 is clipped too).

    Returns:
        A tensor shaped like ``weight_norm`` holding the ratios.

    Examples:
        >>> trust_ratio(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([4.0, 5.0, 0.0]))
        tensor([0.5000, 1.0000, 1.0000])
    """
    denom = update_norm if denominator is None else denominator
    valid = (weight_norm > 0) & (update_norm > 0)
    # Divide by 1 where invalid so no inf/nan is produced and then masked away.
    safe = torch.where(valid, denom, torch.ones_like(denom))
    ratio = torch.where(valid, (coefficient * weight_norm) / safe, torch.ones_like(weight_norm))
    if trust_clip is not None:
        ratio = torch.clamp(ratio, max=trust_clip)
    return ratio


def trust_ratio_groups(
    named_params: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
    exclude: Callable[[str, Tensor], bool],
) -> list[dict[str, Any]]:
    """Split named parameters into a trust-ratio group and a ``trust_ratio=False`` group.

    Args:
        named_params: ``model.named_parameters()`` or a ``{name: parameter}`` mapping. Parameters
            with ``requires_grad=False`` are left out.
        exclude: ``exclude(name, param)`` returns True for tensors that must not get a trust
            ratio, e.g. ``lambda n, p: p.ndim <= 1`` (biases and LayerNorm) or
            ``lambda n, p: "norm" in n``.

    Returns:
        Parameter groups for [`LAMB`][dpfl.optim.LAMB] / [`LARS`][dpfl.optim.LARS]: first the
        included tensors, then the excluded ones with ``"trust_ratio": False``. Empty groups are
        omitted.

    Raises:
        TypeError: If ``exclude`` is not callable.

    Examples:
        >>> model = torch.nn.Linear(3, 2)
        >>> groups = trust_ratio_groups(model.named_parameters(), lambda n, p: n.endswith("bias"))
        >>> [len(g["params"]) for g in groups], groups[1]["trust_ratio"]
        ([1, 1], False)
    """
    if not callable(exclude):
        raise TypeError(f"exclude must be a callable (name, param) -> bool, got {exclude!r}")
    items = named_params.items() if isinstance(named_params, Mapping) else named_params
    included: list[Tensor] = []
    excluded: list[Tensor] = []
    for name, param in items:
        if param.requires_grad:
            (excluded if exclude(name, param) else included).append(param)
    groups: list[dict[str, Any]] = []
    if included:
        groups.append({"params": included})
    if excluded:
        groups.append({"params": excluded, "trust_ratio": False})
    return groups


def check_lr(lr: Any) -> float:
    """The learning rate as a float: a real number or a one-element floating-point Tensor, >= 0.

    A Tensor ``lr`` (as ``torch.optim`` accepts, e.g. updated in place by a scheduler) is read
    with ``.item()`` at each step.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                "lr as a Tensor must hold exactly one floating-point value, got "
                f"shape {tuple(lr.shape)} and dtype {lr.dtype}"
            )
        lr = lr.item()
    return require_non_negative("lr", lr)


def with_float_lr(group: Mapping[str, Any]) -> Mapping[str, Any]:
    """``group`` itself, or a copy with a Tensor ``lr`` read as a float (validated)."""
    if isinstance(group["lr"], Tensor):
        return {**group, "lr": check_lr(group["lr"])}
    return group


def validate_common(group: Mapping[str, Any]) -> None:
    """Validate the options every layer-wise optimizer shares (raises naming the option)."""
    if not isinstance(group["trust_ratio"], bool):
        raise TypeError(f"trust_ratio must be a bool, got {group['trust_ratio']!r}")
    if group["trust_clip"] is not None:
        require_positive("trust_clip", group["trust_clip"], allow_inf=True)
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"foreach must be None, True or False, got {group['foreach']!r}")


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """Base class: validates every parameter group and splits off ``exclude_from_trust`` tensors."""

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        exclude_from_trust: Callable[[Tensor], bool] | None,
    ) -> None:
        if exclude_from_trust is not None and not callable(exclude_from_trust):
            raise TypeError(
                "exclude_from_trust must be None or a callable param -> bool "
                f"(e.g. lambda p: p.ndim <= 1), got {exclude_from_trust!r}"
            )
        self._exclude_from_trust = exclude_from_trust
        super().__init__(params, defaults)

    def _validate_group(self, group: Mapping[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's options, split off excluded tensors, then register it.

        Raises:
            ValueError: If an option is out of range (the message names it); no group is added.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **param_group}
        self._validate_group(merged)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        pieces = [{**param_group, "params": params}]
        if self._exclude_from_trust is not None and merged["trust_ratio"]:
            keep = [p for p in params if not self._exclude_from_trust(p)]
            drop = [p for p in params if self._exclude_from_trust(p)]
            if keep and drop:
                pieces = [
                    {**param_group, "params": keep},
                    {**param_group, "params": drop, "trust_ratio": False},
                ]
            elif drop:
                pieces = [{**param_group, "params": drop, "trust_ratio": False}]
        added = 0
        try:
            for piece in pieces:
                super().add_param_group(piece)
                added += 1
        except Exception:
            del self.param_groups[len(self.param_groups) - added :]
            raise

    @staticmethod
    def _evaluate(closure: Callable[[], float] | None) -> float | None:
        """Run ``closure`` with gradients enabled (``step`` itself runs under ``no_grad``)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _params_with_grad(self, group: Mapping[str, Any]) -> list[tuple[Tensor, Tensor]]:
        """``(param, grad)`` for the group's parameters that have a gradient.

        Raises:
            RuntimeError: if any gradient is sparse (checked before any state changes).
        """
        pairs = [(p, p.grad) for p in group["params"] if p.grad is not None]
        for _, grad in pairs:
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return pairs

    @staticmethod
    def _use_foreach(group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """``foreach`` if set, else True when every tensor is dense and on CPU or CUDA."""
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return all(
            t.device.type in _FOREACH_DEVICES and t.layout == torch.strided for t in params + grads
        )
