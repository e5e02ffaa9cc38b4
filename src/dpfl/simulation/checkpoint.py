"""Atomic, verified checkpoints for the round loop.

A checkpoint is a plain ``torch.save`` file holding a dict of tensors and primitive containers
(``dict``, ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool``, ``None``), so it loads with
``torch.load(weights_only=True)`` and never unpickles code. Three guards make a bad file fail loudly
instead of silently resuming from garbage:

* **Atomic write**: the file is written to a temporary file in the same directory, flushed and
  ``fsync``-ed, moved over the old checkpoint with ``os.replace`` and the directory is ``fsync``-ed;
  a crash at any instant leaves either the old or the new checkpoint, never a mix.
* **Integrity digest**: a SHA-256 over the canonical content (keys, types, shapes, dtypes, tensor
  bytes) is stored beside the payload and checked on load, so truncation *and* silent bit flips in
  tensor data are detected (the zip container of ``torch.save`` does not check its CRCs). The
  digest detects *accidental* corruption only: whoever can edit the file can recompute it, so
  it is no defence against deliberate edits. The round loop therefore also cross-checks the
  stored ledger against the round index and the write-ahead journal (see
  ``dpfl.simulation.journal``); protect the checkpoint directory like the model itself.
* **Compatibility checks**: ``check_model_state`` and ``check_config`` compare the stored
  model keys/shapes/dtypes and run configuration with the current ones.

Every failure raises [`CheckpointError`][dpfl.simulation.CheckpointError], whose message names the
file and the problem.

References: Pelikan et al., arXiv 2310.00098 (long DP-FL runs: 2,000 rounds must survive restarts
without double-counting privacy).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dpfl._errors import DPFLError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "check_config",
    "check_model_state",
    "load_checkpoint",
    "restore_run",
    "restore_states",
    "save_checkpoint",
    "state_digest",
]

CHECKPOINT_FORMAT = "dpfl.checkpoint"
CHECKPOINT_VERSION = 1
_RESERVED = ("format", "version", "digest")


class CheckpointError(ValueError, DPFLError):
    """A checkpoint file is corrupt, truncated, foreign or does not match the current run.

    The message starts with the file path and says what is wrong and how to fix it.
    """


def _feed(h: Any, obj: Any, where: str) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        header = f"T{t.dtype}{tuple(t.shape)}".encode()
        h.update(struct.pack("<Q", len(header)) + header)
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        h.update(b"D" + struct.pack("<Q", len(obj)))
        for key, value in obj.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where}: dict keys must be str or int, got {type(key).__name__}")
            _feed(h, key, where)
            _feed(h, value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<Q", len(obj)))
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}[{i}]")
    elif obj is None or isinstance(obj, (bool, int, str)):
        raw = repr(obj).encode()
        h.update(type(obj).__name__[0].encode() + struct.pack("<Q", len(raw)) + raw)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    else:
        raise TypeError(
            f"{where}: cannot checkpoint a {type(obj).__name__}; checkpoints hold only tensors, "
            "dicts, lists, tuples, str, int, float, bool and None (torch.load weights_only=True)"
        )


def state_digest(state: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of ``state``'s canonical content (reserved keys excluded).

    Args:
        state: A dict of tensors and primitive containers.

    Returns:
        The digest as a hex string; equal content gives an equal digest on any machine.

    Raises:
        TypeError: If ``state`` holds a value a ``weights_only`` load could not restore.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k not in _RESERVED}, "state")
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_failure_hint(exc: BaseException, directory: Path) -> str:
    """The likely cause of a failed write into ``directory``, for an error message.

    A full disk shows up as ``ENOSPC``/``EDQUOT`` from the OS, but torch's writer reports it as
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``; the free space of the
    device, read after the failure, tells the two causes apart.
    """
    code = getattr(exc, "errno", None)
    try:
        free: int | None = shutil.disk_usage(directory).free
    except OSError:
        free = None
    where = f"{free:,} bytes free in {directory}" if free is not None else f"in {directory}"
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 16 * 2**20):
        return f"the disk is most likely full (no space left on device: {where}); free some space"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the directory is not writable ({where}); fix its permissions or use another"
    return f"check free space ({where}) and that the directory is writable"


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically, with a format tag, version and integrity digest.

    Args:
        path: Destination file; its directory is created if needed.
        state: A dict of tensors and primitive containers; the keys ``format``, ``version`` and
            ``digest`` are reserved.

    Raises:
        ValueError: If ``state`` uses a reserved key.
        TypeError: If ``state`` holds a value that ``torch.load(weights_only=True)`` cannot load
            (nothing is written then).
        CheckpointError: If the write fails (a full disk, a read-only directory); the message
            names the file and the likely cause, and the previous checkpoint is left as it was.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "ckpt" / "checkpoint.pt"
        >>> model = torch.nn.Linear(2, 1)
        >>> save_checkpoint(path, {"round": 3, "model": model.state_dict()})
        >>> load_checkpoint(path)["round"]
        3
    """
    clash = [k for k in _RESERVED if k in state]
    if clash:
        raise ValueError(f"state must not use the reserved keys {clash}; rename them")
    payload = {**state, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    payload["digest"] = state_digest(payload)
    target = Path(path)
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException as exc:
        # torch reports a full disk as a RuntimeError; the hint reads the free space while the
        # partial temporary still holds it
        hint = write_failure_hint(exc, target.parent) if isinstance(exc, OSError | RuntimeError) else ""
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if hint:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{target}: writing the checkpoint failed ({first}); {hint}; the previous "
                "checkpoint, if any, is unchanged"
            ) from exc
        raise
    _fsync_dir(target.parent)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a checkpoint written by [`save_checkpoint`][dpfl.simulation.save_checkpoint]
    (tensors land on CPU).

    Args:
        path: The checkpoint file.

    Returns:
        The stored state without the reserved ``format``/``version``/``digest`` keys.

    Raises:
        CheckpointError: If the file is missing, unreadable, truncated, not a dpfl checkpoint, of
            an unsupported version, or its content does not match its digest (corruption).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(
            f"{p}: is a directory, not a checkpoint file; give the file (e.g. {p / 'checkpoint.pt'})"
        )
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged zip/pickle data
        raise CheckpointError(
            f"{p}: cannot read the checkpoint, the file is corrupt or truncated "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "delete it to start over or restore a copy"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a dpfl checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {payload.get('version')!r} is not supported "
            f"(this dpfl reads version {CHECKPOINT_VERSION})"
        )
    try:
        digest = state_digest(payload)
    except TypeError as exc:
        raise CheckpointError(f"{p}: checkpoint holds unexpected content: {exc}") from exc
    if payload.get("digest") != digest:
        raise CheckpointError(
            f"{p}: checkpoint is corrupt, its content does not match its SHA-256 digest "
            "(damaged on disk or edited); delete it to start over or restore a copy"
        )
    return {k: v for k, v in payload.items() if k not in _RESERVED}


def check_model_state(
    path: str | os.PathLike[str], saved: Mapping[str, Any], current: Mapping[str, torch.Tensor]
) -> None:
    """Raise unless ``saved`` has exactly ``current``'s keys, shapes and dtypes.

    Args:
        path: The checkpoint file (for the message).
        saved: The stored model ``state_dict``.
        current: The current model's ``state_dict``.

    Raises:
        CheckpointError: Naming the missing, unexpected and mismatched entries.
    """
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    wrong = []
    for key, tensor in current.items():
        other = saved.get(key)
        if key in saved and not isinstance(other, torch.Tensor):
            wrong.append(f"{key}: stored {type(other).__name__}, not a tensor")
        elif isinstance(other, torch.Tensor) and (
            other.shape != tensor.shape or other.dtype != tensor.dtype
        ):
            wrong.append(
                f"{key}: stored {tuple(other.shape)} {other.dtype}, "
                f"model has {tuple(tensor.shape)} {tensor.dtype}"
            )
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("shape/dtype mismatch: " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint was written for a different model ({', '.join(problems)}); "
            "resume with the same architecture or use a fresh checkpoint directory"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _diffs(saved: Any, current: Any, name: str = "") -> list[str]:
    """Differing settings, recursing where both sides hold a mapping (named ``a.b``)."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        keys = list(current) + [k for k in saved if k not in current]
        return [
            d
            for k in keys
            for d in _diffs(saved.get(k, "<absent>"), current.get(k, "<absent>"), f"{name}{k}.")
        ]
    if _same(saved, current):
        return []
    return [f"{name[:-1]}: checkpoint {saved!r}, this run {current!r}"]


def check_config(
    path: str | os.PathLike[str], saved: Mapping[str, Any], current: Mapping[str, Any]
) -> None:
    """Raise unless the stored run configuration equals the current one.

    Args:
        path: The checkpoint file (for the message).
        saved: The configuration stored in the checkpoint (a dict of primitives; nested
            component configurations are compared setting by setting, named ``a.b``).
        current: The configuration of the run that wants to resume.

    Raises:
        CheckpointError: Listing every differing setting with both values.
    """
    diffs = _diffs(saved, current)
    if diffs:
        raise CheckpointError(
            f"{path}: checkpoint was written by a run with a different configuration "
            f"({'; '.join(diffs)}); resume with the same settings or use a fresh checkpoint "
            "directory"
        )


def restore_states(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    model: torch.nn.Module,
    parts: Mapping[str, Any],
) -> None:
    """Load ``state["model"]`` into ``model`` and ``state[key]`` into each ``parts[key]``.

    All or nothing: the model's keys, shapes and dtypes are checked first, and if any
    ``load_state_dict`` fails the objects already restored get their previous state back.

    Args:
        path: The checkpoint file (for messages).
        state: The verified checkpoint content (from
            [`load_checkpoint`][dpfl.simulation.load_checkpoint]).
        model: The module to restore from ``state["model"]``.
        parts: Objects with ``state_dict``/``load_state_dict`` (sampler, optimizer, ...), by key.

    Raises:
        CheckpointError: If the model does not match, a part's state is missing, or a part
            rejects its state; nothing is changed then.
    """
    check_model_state(path, state.get("model", {}), model.state_dict())
    missing = [key for key in parts if state.get(key) is None]
    if missing:
        raise CheckpointError(f"{path}: checkpoint has no state for {missing}")
    backups = [(obj, copy.deepcopy(obj.state_dict())) for obj in parts.values()]
    try:
        for key, obj in parts.items():
            try:
                obj.load_state_dict(state[key])
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: cannot restore the {key} state: {exc}") from exc
        model.load_state_dict(state["model"])
    except BaseException:
        for obj, backup in backups:
            obj.load_state_dict(backup)
        raise


def restore_run(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    config: Mapping[str, Any],
    seed: int | None,
    model: torch.nn.Module,
    parts: Mapping[str, Any],
) -> int:
    """Check a verified run checkpoint against the current run, restore it, return its round.

    Args:
        path: The checkpoint file (for messages).
        state: The content from [`load_checkpoint`][dpfl.simulation.load_checkpoint] (keys
            ``round``, ``seed``, ``config``, ``model`` and one per part).
        config: The current run's configuration; must equal the stored one.
        seed: The seed the current run was given (``None``: accept the stored one).
        model: The model to restore.
        parts: The other stateful objects to restore, by key (see ``restore_states``).

    Returns:
        The index of the last round the checkpoint contains.

    Raises:
        CheckpointError: A different configuration, seed or model, a bad round index, or a part
            that rejects its state; nothing is changed then.
    """
    check_config(path, state.get("config", {}), config)
    if seed is not None and state.get("seed") != seed:
        raise CheckpointError(
            f"{path}: checkpoint was written with seed {state.get('seed')!r}, this run has seed "
            f"{seed!r}; resume with the same seed"
        )
    round_index = state.get("round")
    if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 0:
        raise CheckpointError(f"{path}: invalid round index {round_index!r}")
    restore_states(path, state, model, parts)
    return round_index
