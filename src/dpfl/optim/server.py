"""Apply a released mean model update to the server model as one optimizer step.

dpfl's sign convention for a model update is ``Δ = θ_user − θ_server``, so the server optimizer's
pseudo-gradient is ``g = −Δ``: with plain SGD at ``lr=1`` one
[`server_step`][dpfl.optim.server_step] gives ``θ + Δ`` (FedAvg); with [`LAMB`][dpfl.optim.LAMB] it
is the paper's adaptive, layer-wise-normalized server.

References:
    Pelikan et al., arXiv 2310.00098 (DP-FedAvg with a LAMB server optimizer);
    Reddi et al., arXiv 2003.00295 (adaptive federated optimization, pseudo-gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dpfl.optim._trust import NonFiniteGradientError, first_non_finite
from dpfl.optim.lamb import LAMB

__all__ = ["server_step"]


def _named_trainable(named_params: Mapping[str, Tensor] | nn.Module) -> dict[str, Tensor]:
    if isinstance(named_params, nn.Module):
        return {n: p for n, p in named_params.named_parameters() if p.requires_grad}
    if not isinstance(named_params, Mapping):
        raise TypeError(
            "named_params must be an nn.Module or a mapping {name: parameter}, got "
            f"{type(named_params).__name__}"
        )
    return {n: p for n, p in named_params.items() if p.requires_grad}


def _validate(
    optimizer: torch.optim.Optimizer, params: dict[str, Tensor], update: Mapping[str, Tensor]
) -> None:
    if not isinstance(update, Mapping):
        raise TypeError(f"update must be a mapping {{name: tensor}}, got {type(update).__name__}")
    missing = [k for k in params if k not in update]
    if missing:
        raise ValueError(
            f"update is missing key {missing[0]!r} ({len(missing)} missing in all); it must have "
            "one tensor per trainable parameter"
        )
    extra = [k for k in update if k not in params]
    if extra:
        raise ValueError(
            f"update has unexpected key {extra[0]!r} ({len(extra)} extra in all); it is not a "
            "trainable parameter of the model"
        )
    managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in params.items():
        u = update[name]
        if not isinstance(u, Tensor):
            raise TypeError(f"update[{name!r}] must be a tensor, got {type(u).__name__}")
        if not (u.is_floating_point() or (u.is_complex() and p.is_complex())):
            raise TypeError(
                f"update[{name!r}] has dtype {u.dtype} but parameter {name!r} is {p.dtype}; a "
                "model update must be a floating-point tensor (it is not cast silently)"
            )
        if u.shape != p.shape:
            raise ValueError(
                f"update[{name!r}] has shape {tuple(u.shape)} but parameter {name!r} has shape "
                f"{tuple(p.shape)}"
            )
        if id(p) not in managed:
            raise ValueError(
                f"parameter {name!r} is not in optimizer.param_groups; build the optimizer "
                "from the same model's parameters"
            )


def _non_finite_error(name: str) -> ValueError:
    return ValueError(f"update[{name!r}] contains NaN or infinite values")


def _check_finite(update: Mapping[str, Tensor], names: list[str]) -> None:
    """Raise naming the first key whose tensor has NaN/inf (one read pass via norms)."""
    bad = first_non_finite([update[n].detach() for n in names])
    if bad is not None:
        raise _non_finite_error(names[bad])


def _negates_itself(optimizer: torch.optim.Optimizer) -> bool:
    """True if the optimizer's ``maximize`` group flag negates the gradient (torch.optim, LAMB).

    Only optimizers known to implement ``maximize`` as "use −grad" qualify; others get a negated
    copy of the update instead.
    """
    known = isinstance(optimizer, (LAMB, *_TORCH_MAXIMIZERS))
    return known and all("maximize" in g for g in optimizer.param_groups)


_TORCH_MAXIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "NAdam", "RAdam", "RMSprop",
        "Rprop", "SGD",
    )
    if hasattr(torch.optim, name)
)  # fmt: skip


def server_step(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, Tensor] | nn.Module,
    update: Mapping[str, Tensor],
    *,
    check_finite: bool = True,
) -> None:
    """Take one server optimizer step with pseudo-gradient ``g = −update``.

    Everything is validated before any state changes. Then, for every parameter the optimizer
    manages, the existing ``.grad`` is set aside; the trainable parameters of ``named_params``
    get the update as their gradient, all others get ``.grad = None`` (so the optimizer leaves
    them alone); ``optimizer.step()`` runs; finally every ``.grad`` is restored to what it was
    before the call (None in the usual server loop, i.e. the gradients are cleared).
    ``update`` itself is never modified.

    No copy of the update is made when its dtype and device match the parameter's and the
    optimizer negates gradients through its ``maximize`` group flag ([`LAMB`][dpfl.optim.LAMB]
    and the ``torch.optim`` optimizers): ``.grad`` is ``update[name]`` itself and ``maximize`` is
    flipped for the step (then restored). Other optimizers get ``.grad = −update[name]``; a
    dtype or device mismatch costs one cast copy. The finiteness check is one read pass over
    the update before anything changes (with [`LAMB`][dpfl.optim.LAMB] it runs inside its step,
    which names the culprit parameter). It cannot share a pass with the step: fused LAMB updates
    each tensor before it reads the next one's gradient, and validate-before-mutate needs every
    coordinate checked before the first tensor changes. At the memory's read speed it costs about
    0.13x a fused LAMB step on the paper's model
    ([the optimizer benchmark](https://github.com/dpfl-dev/dpfl/blob/main/benchmarks/results/optim.md)).

    Args:
        optimizer: Any ``torch.optim.Optimizer`` over the model's parameters (e.g.
            [`LAMB`][dpfl.optim.LAMB], ``torch.optim.SGD``).
        named_params: The server model (``nn.Module``) or a ``{name: parameter}`` mapping.
            Parameters with ``requires_grad=False`` are frozen and must not appear in ``update``.
        update: The mean model update ``{name: Δ}`` with ``Δ = θ_user − θ_server`` (e.g. the
            noised mean released by ``DPAggregator.release``), one tensor per trainable
            parameter with the parameter's shape.
        check_finite: Reject updates containing NaN/inf (default True). Pass False only for an
            update known to be finite, e.g. checked where it was produced; a NaN/inf then
            reaches the parameters and optimizer state.

    Raises:
        ValueError: If ``update`` misses a trainable parameter, has an extra key, has a tensor of
            the wrong shape or non-finite values, or a parameter is not managed by the optimizer;
            the message names the key. Parameters, grads and optimizer state are then unchanged.
        TypeError: If an argument has the wrong type, or an update tensor is not floating point
            (e.g. int64; the message names the key). Nothing is changed.

    Warning:
        The update must already be the privatized (clipped, noised, fixed-denominator) mean;
        this function adds no privacy. Stepping on a non-private mean releases it through the
        model.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> delta = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
        >>> before = model.bias.detach().clone()
        >>> server_step(opt, model, delta)
        >>> bool(torch.allclose(model.bias, before + 0.5)), model.bias.grad is None
        (True, True)

    References:
        Pelikan et al., arXiv 2310.00098.
    """
    params = _named_trainable(named_params)
    _validate(optimizer, params, update)
    # LAMB checks the gradients itself, inside its step, before it changes anything.
    lamb = optimizer if check_finite and isinstance(optimizer, LAMB) else None
    if check_finite and lamb is None:
        _check_finite(update, list(params))
    negate = not _negates_itself(optimizer)
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = [p.grad for p in all_params]
    flags = [g.get("maximize") for g in optimizer.param_groups]
    try:
        for p in all_params:
            p.grad = None
        with torch.no_grad():
            for name, p in params.items():
                u = update[name].detach()
                if u.dtype != p.dtype or u.device != p.device:
                    u = u.to(device=p.device, dtype=p.dtype, copy=True)
                    p.grad = u.neg_() if negate else u
                else:  # the update itself is the gradient of the flipped-``maximize`` step
                    p.grad = torch.neg(u) if negate else u
        if not negate:
            for group, flag in zip(optimizer.param_groups, flags, strict=True):
                group["maximize"] = not flag
        scope = lamb.checking_finite() if lamb is not None else contextlib.nullcontext()
        try:
            with scope:
                optimizer.step()
        except NonFiniteGradientError as err:
            if lamb is None:
                raise
            names = {id(p): n for n, p in params.items()}
            raise _non_finite_error(names.get(id(err.param), "?")) from err
    finally:
        for group, flag in zip(optimizer.param_groups, flags, strict=True):
            if flag is not None:
                group["maximize"] = flag
        for p, g in zip(all_params, saved, strict=True):
            p.grad = g
