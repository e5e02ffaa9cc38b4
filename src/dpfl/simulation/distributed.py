"""Multi-process DP-FedAvg on ``torch.distributed`` (gloo on CPU, NCCL on GPU, ``torchrun``).

Protocol of one round with ``W`` workers (implemented by
[`dpfl.simulation.run_rounds`][dpfl.simulation.run_rounds]):

1. Every rank holds the same sampler (same seed and state) and draws the **same** cohort; rank
   ``r`` trains the shard ``cohort[r::W]``
   ([`dpfl.simulation.sampling.shard`][dpfl.simulation.shard]).
2. Each rank clips and sums its own users into a
   [`dpfl.aggregate.DPAggregator`][dpfl.aggregate.DPAggregator].
3. ``release(reduce=ctx.all_reduce_sum_)``: one all-reduce (per dtype) of the clipped sums and
   statistics, **before** noise.
4. Noise is added once to the global sum. With ``Privacy(noise_seed=...)`` (simulations) every
   rank holds a generator seeded with that seed, adds the **identical** noise and ends with the
   bitwise identical model without a broadcast. Without a noise seed (the default: OS entropy,
   or ``secure_noise``) rank 0's noised mean is broadcast to the other ranks.
5. Only rank 0 charges the write-ahead journal, writes logs and checkpoints, and holds the
   checkpoint directory's lock; every rank charges its own in-memory accountant identically.

Failure handling: the process group is created with a ``timeout``; every collective is wrapped so
that a dead or stuck peer (connection closed, timeout) raises
[`DistributedError`][dpfl.simulation.DistributedError] naming the rank, the operation and the likely
cause, instead of hanging. With gloo a killed peer is detected at the next collective in
milliseconds; a peer that stays alive but stops answering is detected after ``timeout_s``. With
NCCL, keep ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` at its default so the watchdog aborts stuck
collectives after the timeout.

Warning:
    Privacy: seeded noise is reproducible from the noise seed. Anyone who learns it can subtract
    the noise; seeds are for simulations only.

References: Pelikan et al., arXiv 2310.00098 (cohorts of 1,024 users per round, trained in
parallel).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from dpfl._checks import require_positive
from dpfl._errors import DPFLError

__all__ = ["DistContext", "DistributedError", "init_distributed", "shutdown_distributed"]

T = TypeVar("T")


class DistributedError(RuntimeError, DPFLError):
    """A collective failed: a peer rank died, was killed, or did not answer within the timeout."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torch.distributed`` run (rank, world size, device, timeout).

    Build it with [`init_distributed`][dpfl.simulation.init_distributed]; pass it as ``dist=`` to
    [`dpfl.simulation.run_rounds`][dpfl.simulation.run_rounds].

    Attributes:
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of processes.
        device: Device of the collectives' tensors (the model's device): CPU for gloo, this
            process's GPU for NCCL.
        timeout_s: Seconds after which a collective that gets no answer fails.
    """

    rank: int
    world_size: int
    device: torch.device
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the only rank that writes logs and checkpoints."""
        return self.rank == 0

    def shard(self, cohort: Sequence[T]) -> list[T]:
        """Return this rank's share ``cohort[rank::world_size]`` of the (identical) cohort.

        Args:
            cohort: The round's cohort, the same sequence on every rank.
        """
        return list(cohort[self.rank :: self.world_size])

    def _collective(self, op: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            return fn()
        except RuntimeError as exc:  # DistBackendError and gloo/NCCL errors are RuntimeErrors
            elapsed = time.monotonic() - start
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {op} failed after {elapsed:.1f}s; a peer rank "
                f"probably died, was killed or hung (timeout {self.timeout_s:g}s). Check the other "
                f"ranks' logs, then restart the job (resume=True continues from the last "
                f"checkpoint). Cause: {first}"
            ) from exc

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` in place across all ranks: one flattened all-reduce per dtype.

        This is the ``reduce=`` hook of
        [`DPAggregator.release`][dpfl.aggregate.DPAggregator.release].

        Args:
            tensors: The tensors to sum, the same shapes and dtypes on every rank.

        Raises:
            DistributedError: If a peer is dead or does not answer within the timeout.
        """
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.reshape(-1).to(self.device) for t in group])
            self._collective(
                f"all_reduce of {len(group)} {dtype} tensors", partial(tdist.all_reduce, flat)
            )
            _unflatten_(flat, group)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (one flattened broadcast per dtype).

        Args:
            tensors: The tensors to overwrite, the same shapes and dtypes on every rank.

        Raises:
            DistributedError: If a peer is dead or does not answer within the timeout.
        """
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.reshape(-1).to(self.device) for t in group])
            self._collective(
                f"broadcast of {len(group)} {dtype} tensors", partial(tdist.broadcast, flat, src=0)
            )
            _unflatten_(flat, group)

    def broadcast_int(self, value: int | None) -> int:
        """Return rank 0's ``value`` (a non-negative int < 2**63) on every rank.

        Args:
            value: Rank 0's value; ignored on the other ranks (``None`` is read as 0).

        Raises:
            DistributedError: If a peer is dead or does not answer within the timeout.
        """
        own = value if self.is_main and value is not None else 0
        buf = torch.tensor([own], dtype=torch.int64, device=self.device)
        self._collective("broadcast", lambda: tdist.broadcast(buf, src=0))
        return int(buf.item())

    def check_same(self, name: str, value: Any) -> None:
        """Raise unless every rank passes an equal ``value`` (JSON-able, e.g. a configuration).

        Only a 62-bit fingerprint of ``value`` travels (one all-reduce of two integers).

        Args:
            name: What ``value`` is, for the error message.
            value: This rank's value (serialised with ``json.dumps``, ``str`` for the rest).

        Raises:
            DistributedError: If a peer fails.
            ValueError: If the ranks disagree (naming ``name``).
        """
        blob = json.dumps(value, sort_keys=True, default=str).encode()
        digest = int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 2
        buf = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        self._collective(f"check of {name}", lambda: tdist.all_reduce(buf, op=tdist.ReduceOp.MAX))
        if int(buf[0]) != digest or int(-buf[1]) != digest:
            raise ValueError(
                f"rank {self.rank}: {name} differs between ranks; every rank must be started "
                "with the same settings, seeds and sampler"
            )

    def barrier(self) -> None:
        """Wait for all ranks (bounded by the timeout)."""
        self._collective("barrier", lambda: tdist.barrier())


def _unflatten_(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def init_distributed(
    *, backend: str | None = None, timeout_s: float = 300.0, device: torch.device | None = None
) -> DistContext:
    """Join the process group described by the ``torchrun`` environment and return a context.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``, or by hand). Joins an existing default group instead if one is initialised.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; ``None`` picks NCCL when CUDA is available, else gloo.
        timeout_s: Seconds after which a collective (or the rendezvous) without answer fails;
            this bounds how long survivors wait for a dead or stuck rank. It must exceed the
            longest time one rank can spend between collectives: a round's local training, plus
            evaluation and checkpoint writing, which only rank 0 does.
        device: Device for the collectives; default ``cuda:LOCAL_RANK`` for NCCL, CPU for gloo.

    Returns:
        The [`DistContext`][dpfl.simulation.DistContext] of this process.

    Raises:
        ValueError: If the environment variables are missing or ``timeout_s`` is not positive.

    Examples:
        In a script started by ``torchrun --nproc-per-node 2 train.py`` (``torchrun`` sets the
        environment; one process alone cannot show it, so this is not a doctest):

        ```python
        ctx = init_distributed(backend="gloo", timeout_s=60)
        try:
            result = run_rounds(..., dist=ctx)
        finally:
            shutdown_distributed()
        ```

        The [scale tutorial](https://dpfl-dev.github.io/dpfl/tutorials/scale/) has a complete
        ``train.py``; the test suite runs it with two gloo ranks.
    """
    timeout = require_positive("timeout_s", timeout_s)
    if not tdist.is_available():  # pragma: no cover - torch builds without distributed
        raise RuntimeError("this torch build has no torch.distributed support")
    if not tdist.is_initialized():
        missing = [
            v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
        ]
        if missing:
            raise ValueError(
                f"environment variables {missing} are not set; launch with torchrun or set "
                "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    backend_name = str(tdist.get_backend())
    if device is None:
        if backend_name == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
    return DistContext(
        rank=tdist.get_rank(), world_size=tdist.get_world_size(), device=device, timeout_s=timeout
    )


def shutdown_distributed() -> None:
    """Leave the process group (no-op when none is initialised)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
