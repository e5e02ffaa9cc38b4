"""Vectorized local training of a whole cohort at once with ``torch.func``.

[`train_cohort_vectorized`][dpfl.simulation.train_cohort_vectorized] is the many-users version of
[`dpfl.simulation.train_local`][dpfl.simulation.train_local]: the trainable parameters are stacked
along a leading user axis, every local step evaluates all users' losses in one ``torch.func.vmap``
of ``torch.func.functional_call``, and one backward pass over the sum of the per-user losses gives
every user's gradient (the users' losses share no parameters, so the gradient of the sum with
respect to user ``u``'s slice is user ``u``'s own gradient). Per-user gradient clipping and the SGD
step are then a handful of batched tensor ops. For many small models this replaces thousands of tiny
kernel launches and Python-level module calls by a few large ones.

Where the cohort cannot be vectorized (users' batches differ in shape at some step, a batch holds
non-tensor leaves, or an op inside ``loss_fn``/the model has no ``vmap`` support), the function
warns once ([`VectorizationFallbackWarning`][dpfl.simulation.VectorizationFallbackWarning]) and runs
the sequential loop instead, which gives the same results.

The ``loss_fn`` contract under vectorization: ``loss_fn(model, batch)`` receives a
[`FunctionalModel`][dpfl.simulation.FunctionalModel] proxy, not the module. It may only *call* it
(``model(inputs)``) and do tensor maths on the outputs and the batch; it must not read the module's
parameters, submodules or attributes (the proxy raises ``AttributeError``), and must return a scalar
loss per user.

References:
    Pelikan et al., arXiv 2310.00098, section 2 (local training of every cohort member).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from dpfl._checks import require_int, require_positive, warn_at_caller
from dpfl._errors import DPFLError
from dpfl.simulation.local import (
    CLIP_EPS,
    NonFiniteLossError,
    check_loss,
    draw_seed,
    isolated_rng,
    train_local,
)

__all__ = [
    "FunctionalModel",
    "VectorizationError",
    "VectorizationFallbackWarning",
    "train_cohort_vectorized",
]

logger = logging.getLogger(__name__)


class VectorizationError(RuntimeError, DPFLError):
    """The cohort could not be vectorized and ``fallback=False`` forbade the sequential loop."""


class VectorizationFallbackWarning(UserWarning):
    """[`train_cohort_vectorized`][dpfl.simulation.train_cohort_vectorized] fell back to the sequential loop (same results, slower)."""


class _Unvectorizable(Exception):
    """Internal: the cohort's data cannot be stacked; carries the reason."""


class _AlignError(ValueError):
    """Internal: ``align`` broke its contract (a caller bug: raised, never a fallback)."""


class FunctionalModel:
    """A callable stand-in for a module, evaluated with given parameters and buffers.

    ``FunctionalModel(module, tensors)(*args, **kwargs)`` runs
    ``torch.func.functional_call(module, tensors, args, kwargs)``. It is what ``loss_fn`` receives
    under [`train_cohort_vectorized`][dpfl.simulation.train_cohort_vectorized]. Reading attributes
    of the proxy raises ``AttributeError``: a ``loss_fn`` that reads parameters (e.g. an explicit
    weight penalty over ``model.parameters()``) would otherwise silently see the server model
    instead of the user's.

    Args:
        module: The module whose ``forward`` is called.
        tensors: Parameter and buffer name -> tensor, used instead of the module's own.
    """

    __slots__ = ("_module", "_tensors")

    def __init__(self, module: nn.Module, tensors: dict[str, Tensor]) -> None:
        self._module = module
        self._tensors = tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._module, self._tensors, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"loss_fn read attribute {name!r} of the model: under train_cohort_vectorized, "
            "loss_fn may only call the model (model(inputs)); compute any parameter-dependent "
            "term inside the module's forward, or use train_local"
        )


def _user_name(user_ids: Sequence[Hashable] | None, u: int) -> str:
    return f"user {user_ids[u]!r}" if user_ids is not None else f"user at cohort index {u}"


def _stack_batches(
    cohort: list[list[Any]], steps: int, align: Callable[[list[Any]], list[Any]] | None = None
) -> list[tuple[list[Tensor], pytree.TreeSpec]]:
    """Stack each step's per-user batches along a new leading user axis (cached by batch index)."""
    cache: dict[tuple[int, ...], tuple[list[Tensor], pytree.TreeSpec]] = {}
    out = []
    for s in range(steps):
        key = tuple(s % len(b) for b in cohort)
        if key not in cache:
            step = [b[i] for b, i in zip(cohort, key, strict=True)]
            if align is not None:
                step = list(align(step))
                if len(step) != len(cohort):
                    raise _AlignError(
                        f"align returned {len(step)} batches for {len(cohort)} users; it must "
                        "return one batch per user, in order"
                    )
            flat = [pytree.tree_flatten(b) for b in step]
            leaves0, spec = flat[0]
            if any(not isinstance(x, Tensor) for x in leaves0):
                raise _Unvectorizable("a batch holds non-tensor leaves")
            for leaves, sp in flat[1:]:
                if sp != spec or any(
                    not isinstance(x, Tensor) or x.shape != y.shape or x.dtype != y.dtype
                    for x, y in zip(leaves, leaves0, strict=True)
                ):
                    raise _Unvectorizable("users' batch structures, shapes or dtypes differ")
            stacked = [torch.stack([lv[j] for lv, _ in flat]) for j in range(len(leaves0))]
            cache[key] = (stacked, spec)
        out.append(cache[key])
    return out


def _train_stacked(
    model: nn.Module,
    cohort: list[list[Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    lr: float,
    steps: int,
    max_grad_norm: float | None,
    seed: int,
    user_ids: Sequence[Hashable] | None,
    offset: int,
    align: Callable[[list[Any]], list[Any]] | None = None,
) -> dict[str, Tensor]:
    """The vectorized path; returns stacked updates ``{name: [U, *shape]}``."""
    batches = _stack_batches(cohort, steps, align)
    num_users = len(cohort)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fixed: dict[str, Tensor] = {
        n: p.detach() for n, p in model.named_parameters() if not p.requires_grad
    }
    fixed.update(dict(model.named_buffers()))
    names = list(trainable)
    stacked = [
        trainable[n].detach().unsqueeze(0).repeat(num_users, *([1] * trainable[n].dim()))
        for n in names
    ]
    for t in stacked:
        t.requires_grad_(True)

    def user_loss(params: list[Tensor], leaves: list[Tensor], spec: pytree.TreeSpec) -> Tensor:
        proxy = FunctionalModel(model, {**fixed, **dict(zip(names, params, strict=True))})
        return check_loss(loss_fn(proxy, pytree.tree_unflatten(leaves, spec)), None, 0)

    modes = [m.training for m in model.modules()]
    model.train()
    try:
        # The fused CPU attention kernels have no vmap batching rule (vmap would loop over users);
        # the math backend is plain batched matmuls and vectorizes.
        on_cpu = all(t.device.type == "cpu" for t in stacked)
        attention = sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext()
        with isolated_rng(seed, (p.device for p in stacked)), attention, torch.enable_grad():
            for step, (leaves, spec) in enumerate(batches):
                losses = vmap(
                    lambda p, b, spec=spec: user_loss(p, b, spec), randomness="different"
                )(stacked, leaves)
                grads = list(
                    torch.autograd.grad(
                        losses.sum(), stacked, allow_unused=True, materialize_grads=True
                    )
                )
                with torch.no_grad():
                    norms = torch.linalg.vector_norm(
                        torch.stack(
                            [
                                torch.linalg.vector_norm(g.reshape(num_users, -1), dim=1)
                                for g in grads
                            ]
                        ),
                        dim=0,
                    )
                    bad = ~(torch.isfinite(losses.detach()) & torch.isfinite(norms))
                    if bool(bad.any()):
                        u = int(bad.nonzero()[0, 0])
                        raise NonFiniteLossError(
                            f"{_user_name(user_ids, offset + u)}: the loss or gradient norm is "
                            f"not finite at local step {step} (loss={losses[u].item()!r}); "
                            "check the data or lower lr",
                            user_id=None if user_ids is None else user_ids[offset + u],
                            step=step,
                        )
                    if max_grad_norm is not None:
                        coef = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
                        grads = [g * coef.view(-1, *([1] * (g.dim() - 1))) for g in grads]
                    torch._foreach_add_(stacked, grads, alpha=-lr)
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
    with torch.no_grad():
        return {n: t.detach() - trainable[n].detach() for n, t in zip(names, stacked, strict=True)}


def train_cohort_vectorized(
    model: nn.Module,
    cohort_batches: Sequence[Sequence[Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    lr: float,
    steps: int,
    max_grad_norm: float | None = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    user_ids: Sequence[Hashable] | None = None,
    fallback: bool = True,
    chunk_size: int | None = None,
    align: Callable[[list[Any]], list[Any]] | None = None,
) -> list[dict[str, Tensor]]:
    """Train every user of a cohort from ``model`` at once; return each user's ``θ_user − θ``.

    Computes, for each user ``u``, what ``train_local(model, cohort_batches[u], loss_fn, lr=lr,
    steps=steps, max_grad_norm=max_grad_norm)`` computes (step ``s`` uses batch
    ``s % len(cohort_batches[u])``; per-step clipping with ``clip_grad_norm_`` semantics; plain
    SGD), but vectorized over users with ``torch.func``. Without randomness in the model the
    results agree with the sequential loop to float rounding. With dropout, users get distinct
    random streams (``vmap(randomness="different")``), reproducible for a seeded ``generator``
    but not identical to the sequential loop's streams.

    ``model`` is temporarily switched to training mode and restored afterwards; its parameters,
    buffers and gradients are not modified. Buffers are shared by all users and must not be
    updated in place (e.g. BatchNorm running statistics): such models fall back to the loop.

    Warning:
        ``loss_fn`` receives a [`FunctionalModel`][dpfl.simulation.FunctionalModel] proxy and may
        only call it; see the module
        docstring. The updates are not clipped to the DP bound: pass them to the aggregator.

    Args:
        model: The server model; parameters with ``requires_grad=True`` are trained.
        cohort_batches: One sequence of batches per user. Each batch is a tensor or a pytree
            (tuple/list/dict) of tensors; for vectorization every user's batch at a given step
            must have the same structure, shapes and dtypes.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        lr: Constant local learning rate, > 0.
        steps: Number of local steps per user, >= 1.
        max_grad_norm: Per-step, per-user gradient-norm bound, > 0, or ``None`` for no clipping.
        generator: Source of randomness: one generator for the cohort, or one per user. The
            vectorized path draws one seed per call (from each per-user generator, combined);
            the fallback path draws one per user (from that user's generator). ``None`` seeds
            from OS entropy.
        user_ids: Names of the users, for error messages (same length as ``cohort_batches``).
        fallback: If ``False``, raise [`VectorizationError`][dpfl.simulation.VectorizationError]
            instead of falling back.
        chunk_size: Train at most this many users at once (memory grows with
            ``chunk_size x model size x (parameters + gradients + activations)``); ``None`` trains
            the whole cohort in one vectorized pass. Results do not depend on it (except for
            randomness inside the model, whose streams differ per chunk).
        align: ``align(batches) -> batches``: given the users' batches of one step (one per
            user of a chunk, in order), returns them with equal structures, shapes and dtypes,
            e.g. variable-length sequences padded to the longest with a mask. The caller
            promises that it changes no user's loss (the sequential fallback trains on the
            original batches). ``None`` stacks the batches as they are.

    Returns:
        One update dict per user, in cohort order, keyed like ``model.named_parameters()``. On the
        vectorized path the tensors are views into stacked ``[num_users, *shape]`` tensors.

    Raises:
        ValueError: If an option is invalid or a user has no batches (the message names it).
        TypeError: If ``align`` is neither callable nor ``None``.
        NonFiniteLossError: If a user's loss or gradient norm becomes NaN/inf.
        VectorizationError: If vectorization fails and ``fallback=False``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1)
        >>> cohort = [[(torch.randn(8, 3), torch.randn(8, 1))] for _ in range(4)]
        >>> loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
        >>> updates = train_cohort_vectorized(model, cohort, loss_fn, lr=0.1, steps=10)
        >>> len(updates), tuple(updates[0]["weight"].shape)
        (4, (1, 3))

    References:
        arXiv 2310.00098, section 2 (local SGD with per-step clipping at 1.0, 10 local steps).
    """
    lr = require_positive("lr", lr)
    steps = require_int("steps", steps, minimum=1)
    if chunk_size is not None:
        chunk_size = require_int("chunk_size", chunk_size, minimum=1)
    if max_grad_norm is not None:
        max_grad_norm = require_positive("max_grad_norm", max_grad_norm)
    if align is not None and not callable(align):
        raise TypeError(f"align must be callable or None, got {type(align).__name__}")
    if user_ids is not None and len(user_ids) != len(cohort_batches):
        raise ValueError(
            f"user_ids has {len(user_ids)} entries but cohort_batches has {len(cohort_batches)}; "
            "pass one id per user"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (requires_grad=True); nothing to train")
    for u, b in enumerate(cohort_batches):
        if isinstance(b, Tensor):
            raise TypeError(
                f"cohort_batches[{u}] ({_user_name(user_ids, u)}) must be a sequence of batches, "
                "got a single Tensor; wrap it in a list ([batch])"
            )
    cohort = [list(b) for b in cohort_batches]
    for u, b in enumerate(cohort):
        if not b:
            raise ValueError(
                f"{_user_name(user_ids, u)} has no data: its batches are empty; remove it from "
                "the cohort or give it at least one batch"
            )
    if not cohort:
        return []
    if isinstance(generator, Sequence):
        if len(generator) != len(cohort):
            raise ValueError(
                f"generator has {len(generator)} entries but the cohort has {len(cohort)} users; "
                "pass one generator per user or a single generator"
            )
        gens: list[torch.Generator | None] = list(generator)
    else:
        gens = [generator] * len(cohort)
    # Remember the generators' states: on fallback they are rewound, so the fallback consumes
    # exactly what the sequential loop over train_local would.
    distinct = list({id(g): g for g in gens if g is not None}.values())
    saved = [g.get_state() for g in distinct]
    if isinstance(generator, Sequence):
        mixed = np.random.SeedSequence([draw_seed(g) for g in gens]).generate_state(1, np.uint64)
        seed = int(mixed[0]) >> 2
    else:
        seed = draw_seed(generator)
    chunk = len(cohort) if chunk_size is None else chunk_size
    updates: list[dict[str, Tensor]] = []
    try:
        for i, start in enumerate(range(0, len(cohort), chunk)):
            chunk_seed = (
                seed
                if i == 0
                else int(
                    np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]
                    >> np.uint64(2)
                )
            )
            stacked = _train_stacked(
                model,
                cohort[start : start + chunk],
                loss_fn,
                lr=lr,
                steps=steps,
                max_grad_norm=max_grad_norm,
                seed=chunk_seed,
                user_ids=user_ids,
                offset=start,
                align=align,
            )
            updates += [
                {n: t[u] for n, t in stacked.items()}
                for u in range(len(cohort[start : start + chunk]))
            ]
    except (NonFiniteLossError, _AlignError):
        raise
    except Exception as exc:  # noqa: BLE001 - any vmap/functional_call failure means "fall back"
        reason = str(exc) if isinstance(exc, _Unvectorizable) else f"{type(exc).__name__}: {exc}"
        if not fallback:
            raise VectorizationError(f"cannot vectorize this cohort: {reason}") from exc
        logger.debug("train_cohort_vectorized falls back to the sequential loop: %s", reason)
        warn_at_caller(
            f"train_cohort_vectorized fell back to the sequential loop ({reason.splitlines()[0]})",
            VectorizationFallbackWarning,
        )
        for g, state in zip(distinct, saved, strict=True):
            g.set_state(state)
        return list(_sequential(model, cohort, loss_fn, lr, steps, max_grad_norm, gens, user_ids))
    return updates


def _sequential(
    model: nn.Module,
    cohort: list[list[Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    lr: float,
    steps: int,
    max_grad_norm: float | None,
    generators: list[torch.Generator | None],
    user_ids: Sequence[Hashable] | None,
) -> Iterator[dict[str, Tensor]]:
    import copy

    scratch = copy.deepcopy(model)
    for u, batches in enumerate(cohort):
        yield train_local(
            model,
            batches,
            loss_fn,
            lr=lr,
            steps=steps,
            max_grad_norm=max_grad_norm,
            generator=generators[u],
            user_id=None if user_ids is None else user_ids[u],
            scratch=scratch,
        )
