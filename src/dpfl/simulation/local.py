"""Local training of one user: SGD on a copy of the server model, returning ``θ_user − θ``.

This is step 2 of DP-FedAvg (arXiv 2310.00098, section 2): a user starts from the server model,
runs plain SGD with a constant learning rate and per-step gradient-norm clipping over its own
batches (optimizer state fresh for every user), and sends the model difference. dpfl's sign
convention is ``Δ = θ_user − θ_server``.

The returned update is *not* clipped to the DP bound: that is the aggregator's job
([`dpfl.aggregate.DPAggregator`][dpfl.aggregate.DPAggregator]). The per-step gradient clipping here
is the paper's local optimiser setting, unrelated to the privacy guarantee.

References:
    Pelikan et al., arXiv 2310.00098, section 2 (local SGD, constant LR, per-step clipping at 1.0,
    10 local steps).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dpfl._checks import require_int, require_positive
from dpfl._errors import DPFLError

__all__ = ["NonFiniteLossError", "train_local"]

LossFn = Callable[[Any, Any], Tensor]

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6); we use the same constant so the
# local optimiser matches the torch helper exactly.
CLIP_EPS = 1e-6


class NonFiniteLossError(ValueError, DPFLError):
    """A user's local loss or gradient became NaN or infinite (a ``ValueError``).

    Args:
        message: What became non-finite, for which user and at which step.
        user_id: The user whose training failed, or ``None``.
        step: The local step (0-based).

    Attributes:
        user_id: The user whose training failed (``None`` when the caller did not name it).
        step: The local step (0-based) at which the non-finite value appeared.
    """

    def __init__(self, message: str, *, user_id: Hashable | None, step: int) -> None:
        super().__init__(message)
        self.user_id = user_id
        self.step = step


def _check_schedule(steps: int | None, epochs: int | None) -> tuple[int | None, int | None]:
    if steps is not None and epochs is not None:
        raise ValueError(
            f"pass either steps or epochs, not both (got steps={steps}, epochs={epochs})"
        )
    if steps is not None:
        return require_int("steps", steps, minimum=1), None
    return None, require_int("epochs", 1 if epochs is None else epochs, minimum=1)


def _user_label(user_id: Hashable | None) -> str:
    return "the user" if user_id is None else f"user {user_id!r}"


def _batch_schedule(
    data: Iterable[Any], steps: int | None, epochs: int | None, user_id: Hashable | None
) -> Iterator[Any]:
    """Yield the batches of a local run: ``steps`` batches cycling over ``data``, or ``epochs`` passes."""
    if isinstance(data, Tensor):
        raise TypeError(
            f"data of {_user_label(user_id)} must be an iterable of batches, got a single Tensor; "
            "wrap it in a list ([batch])"
        )
    if isinstance(data, Iterator):  # a one-shot iterator cannot be cycled: materialise it once
        data = list(data)
    passes: Iterable[int] = itertools.count() if epochs is None else range(epochs)
    produced = 0
    for _ in passes:
        empty = True
        for batch in data:
            empty = False
            yield batch
            produced += 1
            if steps is not None and produced == steps:
                return
        if empty:
            raise ValueError(
                f"{_user_label(user_id)} has no data: its batches are empty; remove it from the "
                "population or give it at least one batch"
            )


def draw_seed(generator: torch.Generator | None) -> int:
    """Draw a 62-bit seed from ``generator``, or from OS entropy when it is ``None``."""
    if generator is None:
        return int.from_bytes(os.urandom(8), "little") >> 2
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


@contextlib.contextmanager
def isolated_rng(seed: int, devices: Iterable[torch.device]) -> Iterator[None]:
    """Seed torch's RNG with ``seed`` inside the block and restore the caller's RNG state after."""
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        # Seed only the generators in use: torch.manual_seed would also initialise every
        # accelerator backend lazily, which costs milliseconds per user on CUDA builds.
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def check_loss(loss: object, user_id: Hashable | None, step: int) -> Tensor:
    """Return ``loss`` if it is a one-element tensor, else raise ``TypeError`` naming the user."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        what = type(loss).__name__ if not isinstance(loss, Tensor) else f"shape {tuple(loss.shape)}"
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {what} for {_user_label(user_id)} at step "
            f"{step}; reduce the loss (e.g. .mean()) inside loss_fn"
        )
    return loss.reshape(())


def _writable(grad: Tensor) -> Tensor:
    """``grad``, or a dense copy where elements share memory (the in-place clip needs that).

    Autograd may return a gradient as an expanded view (e.g. of ``c * p.sum()``): a stride 0 in a
    dimension of size > 1, one memory location for many elements, which in-place ops refuse.
    """
    if any(st == 0 and n > 1 for st, n in zip(grad.stride(), grad.shape, strict=True)):
        return grad.contiguous()
    return grad


def _check_scratch(model: nn.Module, scratch: nn.Module) -> None:
    if scratch is model:
        raise ValueError("scratch must be a separate module (e.g. copy.deepcopy(model)), not model")
    ours = {n: p.shape for n, p in model.state_dict().items()}
    theirs = {n: p.shape for n, p in scratch.state_dict().items()}
    if ours != theirs:
        raise ValueError(
            "scratch must have the same parameter and buffer names and shapes as model; "
            "build it with copy.deepcopy(model)"
        )


def train_local(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn,
    *,
    lr: float,
    steps: int | None = None,
    epochs: int | None = None,
    max_grad_norm: float | None = 1.0,
    generator: torch.Generator | None = None,
    user_id: Hashable | None = None,
    scratch: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Train a copy of ``model`` on one user's batches and return the update ``θ_user − θ``.

    Each local step computes ``loss = loss_fn(copy, batch)``, its gradient with respect to the
    trainable parameters, clips the gradient's global L2 norm to ``max_grad_norm`` with
    ``torch.nn.utils.clip_grad_norm_`` semantics (scale ``min(1, C / (‖g‖ + 1e-6))``), and takes a
    plain SGD step ``θ ← θ − lr · g``. There is no momentum, so the optimizer state is fresh for
    every user by construction. The copy is put in training mode; ``model`` is never mutated
    (parameters, buffers, ``.grad`` and mode are all left as they were).

    Randomness inside ``loss_fn`` (e.g. dropout) uses torch's RNG seeded from ``generator`` within
    an isolated block (``torch.random.fork_rng``), so the caller's global RNG state is left
    unchanged; one seed is drawn from ``generator`` per call, so consecutive users differ.

    Args:
        model: The server model. Only parameters with ``requires_grad=True`` are trained.
        data: The user's batches (a re-iterable such as a list; a one-shot iterator is
            materialised). Each batch is passed unchanged to ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        lr: Constant local learning rate, > 0.
        steps: Number of local steps, cycling over ``data`` as needed. Mutually exclusive with
            ``epochs``.
        epochs: Number of passes over ``data`` (default 1 when ``steps`` is not given).
        max_grad_norm: Per-step gradient-norm bound, > 0, or ``None`` to disable clipping.
        generator: Source of the per-user seed; ``None`` seeds from OS entropy.
        user_id: Name of the user, used in error messages only.
        scratch: Optional module with the same architecture as ``model`` (e.g. one
            ``copy.deepcopy(model)`` reused across users). Its parameters and buffers are
            overwritten with ``model``'s, which avoids a deepcopy per user. Without it,
            ``model`` is deep-copied.

    Returns:
        ``{name: θ_user − θ}`` for every trainable parameter, keyed like ``model.named_parameters()``,
        as new tensors (no aliasing with ``model`` or ``scratch``).

    Raises:
        ValueError: If an option is invalid, the user has no batches, or ``model`` has no
            trainable parameters.
        NonFiniteLossError: (a ``ValueError``) if the loss or the gradient norm is NaN/inf; the
            message names the user and the step.
        TypeError: If ``loss_fn`` does not return a one-element tensor, or ``data`` is a single
            tensor instead of an iterable of batches.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1)
        >>> batches = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
        >>> update = train_local(model, batches, loss_fn, lr=0.1, steps=10)
        >>> sorted(update)
        ['bias', 'weight']

    References:
        arXiv 2310.00098, section 2 (local SGD with per-step clipping at 1.0).
    """
    lr = require_positive("lr", lr)
    steps, epochs = _check_schedule(steps, epochs)
    if max_grad_norm is not None:
        max_grad_norm = require_positive("max_grad_norm", max_grad_norm)
    server = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not server:
        raise ValueError("model has no trainable parameters (requires_grad=True); nothing to train")
    if scratch is None:
        work = copy.deepcopy(model)
    else:
        _check_scratch(model, scratch)
        scratch.load_state_dict(model.state_dict())
        work = scratch
    work.train()
    named = dict(work.named_parameters())
    names = list(server)
    params: list[Tensor] = [named[n] for n in names]
    for p in params:
        p.grad = None
    seed = draw_seed(generator)
    with isolated_rng(seed, (p.device for p in params)), torch.enable_grad():
        for step, batch in enumerate(_batch_schedule(data, steps, epochs, user_id)):
            loss = check_loss(loss_fn(work, batch), user_id, step)
            grads = [
                _writable(g)
                for g in torch.autograd.grad(
                    loss, params, allow_unused=True, materialize_grads=True
                )
            ]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if not bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
                what = "loss" if not torch.isfinite(loss.detach()) else "gradient norm"
                raise NonFiniteLossError(
                    f"{_user_label(user_id)}: the {what} is not finite at local step {step} "
                    f"(loss={loss.item()!r}); check the data or lower lr",
                    user_id=user_id,
                    step=step,
                )
            with torch.no_grad():
                if max_grad_norm is not None:
                    torch._foreach_mul_(grads, (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0))
                torch._foreach_add_(params, grads, alpha=-lr)
    with torch.no_grad():
        return {n: named[n].detach() - server[n].detach() for n in names}
