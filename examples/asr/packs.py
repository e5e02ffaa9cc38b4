"""The feature cache on disk: per-utterance entries in packs, their index, and collection.

API:
    ``packs_dir(cache_dir) -> Path``: ``<cache_dir>/features/packs``, where the packs live.
    ``entry_key(path) -> str``: the cache key of one audio file as it is on disk now.
    ``Entry``: one cached utterance (features in a pack, or the reason it cannot be used).
    ``load_index(directory) -> Index``: every pack's entries, by key.
    ``write_pack(directory, records) -> str``: write one pack atomically; returns its name.
    ``collect(directory, index, current) -> Collected``: drop entries of changed or removed
        files, delete packs left without live entries, compact packs that are mostly dead.
    ``CacheLock``: the shared/exclusive lock that keeps collection away from stores in use.

Layout: a pack is two files, ``<name>.f16`` (the ``(frames, 80)`` float16 matrices of its
entries, little-endian, back to back) and ``<name>.json`` (its index: for each entry the key,
the file's resolved path when it was extracted, the frame count and the seconds of audio, or
the reason the file cannot be used). The index is renamed into place after the data, so a pack
with an index is complete and a killed extraction leaves only whole packs. A pack's name hashes
its keys, so the same work gives the same files whatever the number of workers.

Key: :data:`examples.asr.features.FEATURE_VERSION`, :data:`PACK_FORMAT`, and the file's name,
size and modification time (ns). Not its folder: a dataset moved with ``mv`` or ``rsync -a``
(which keep modification times) reuses its features; not the transcript: editing or adding a
transcript line extracts nothing but a new file. One changed file is one new entry; nothing
else of its split is extracted again.

Collection (:func:`collect`) runs under the exclusive lock, that is only when no store of this
cache is open in any process (a store holds the shared lock while it lives). An entry is dead
when the current listing shows its file (same resolved path) with other contents (size or
modification time), when its file was removed from a folder of the current listing, or when
another pack holds the same key. A pack without live entries is deleted; a pack with more dead
than live bytes is rewritten with its live entries only (their bytes are copied, not extracted
again), so the packs never hold more than about twice the live features. Entries of datasets
that the current run does not list are left alone (they may be in use elsewhere).

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 5.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from examples.asr.features import FEATURE_VERSION, N_MELS

__all__ = [
    "PACK_FORMAT",
    "CacheLock",
    "Collected",
    "Entry",
    "Index",
    "Record",
    "collect",
    "entry_key",
    "load_index",
    "packs_dir",
    "write_pack",
]

PACK_FORMAT = 2
"""Version of the pack layout (1 was one store folder per utterance list)."""
_BYTES_PER_FRAME = N_MELS * 2


def packs_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Where the packs of cache ``cache_dir`` live."""
    return Path(cache_dir) / "features" / "packs"


def entry_key(path: str | os.PathLike[str]) -> str:
    """The cache key of the audio file ``path`` as it is on disk now (see the module docstring).

    A file that cannot be stat-ed gets the key of a missing file (its extraction records why).
    """
    p = Path(path)
    try:
        stat = p.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size = mtime = -1
    blob = json.dumps([FEATURE_VERSION, PACK_FORMAT, p.name, size, mtime])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Entry:
    """One cached file: where its features are, or why it cannot be used.

    Attributes:
        key: :func:`entry_key` of the file when it was extracted.
        path: the file's resolved path when it was extracted.
        pack: the pack holding the entry.
        offset: first frame of its features in the pack's data file (0 for a skip).
        frames: feature frames (0 for a skip).
        seconds: seconds of audio (0.0 for a skip).
        reason: why the file cannot be used (``None`` for usable audio).
    """

    key: str
    path: str
    pack: str
    offset: int = 0
    frames: int = 0
    seconds: float = 0.0
    reason: str | None = None


@dataclass(frozen=True)
class Record:
    """One extraction result, as :func:`write_pack` takes it.

    Attributes:
        key: the file's :func:`entry_key`.
        path: the file's resolved path.
        features: ``(frames, 80)`` float16 features, or ``None`` if the file cannot be used.
        seconds: seconds of audio.
        reason: why the file cannot be used (``None`` with features).
    """

    key: str
    path: str
    features: np.ndarray | None
    seconds: float = 0.0
    reason: str | None = None


@dataclass
class Index:
    """The entries of every pack in a directory.

    Attributes:
        entries: ``key -> Entry``; where two packs hold a key, the first pack by name wins.
        packs: ``pack -> its entries`` in pack order (duplicates included).
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    packs: dict[str, list[Entry]] = field(default_factory=dict)


def load_index(directory: str | os.PathLike[str]) -> Index:
    """Read the index of every complete pack in ``directory`` (empty if there is none).

    Raises:
        ValueError: if a pack index is unreadable or of another format (names the file).
    """
    index = Index()
    folder = Path(directory)
    if not folder.is_dir():
        return index
    for path in sorted(folder.glob("*.json")):
        entries = _read_pack_index(path)
        index.packs[path.stem] = entries
        for entry in entries:
            index.entries.setdefault(entry.key, entry)
    return index


def _read_pack_index(path: Path) -> list[Entry]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != PACK_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {PACK_FORMAT}")
        entries: list[Entry] = []
        offset = 0
        for key, file, frames, seconds in meta["entries"]:
            entries.append(Entry(key, file, path.stem, offset, int(frames), float(seconds)))
            offset += int(frames)
        entries += [Entry(key, file, path.stem, reason=str(reason))
                    for key, file, reason in meta["skipped"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"feature cache pack index {path} is damaged ({exc}); delete it and "
                         f"its .f16 file to extract those utterances again") from exc
    return entries


def write_pack(directory: str | os.PathLike[str], records: Iterable[Record]) -> str:
    """Write ``records`` as one pack (data first, then the index); return the pack's name.

    The name hashes the records' keys, so writing the same records twice gives the same files.
    """
    records = list(records)
    name = hashlib.sha256("\n".join(r.key for r in records).encode()).hexdigest()[:20]
    usable = [r for r in records if r.features is not None]
    meta = {
        "format": PACK_FORMAT,
        "entries": [[r.key, r.path, int(r.features.shape[0]), round(float(r.seconds), 6)]
                    for r in usable if r.features is not None],
        "skipped": [[r.key, r.path, str(r.reason)] for r in records if r.features is None],
    }
    data = b"".join(np.ascontiguousarray(r.features, dtype="<f2").tobytes()
                    for r in usable if r.features is not None)
    base = Path(directory) / name
    tag = uuid.uuid4().hex[:8]
    tmp_data, tmp_index = Path(f"{base}.f16.{tag}.tmp"), Path(f"{base}.json.{tag}.tmp")
    tmp_data.write_bytes(data)
    os.replace(tmp_data, f"{base}.f16")
    tmp_index.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp_index, f"{base}.json")  # last: a pack with an index is complete
    return name


def read_features(directory: Path, entry: Entry) -> np.ndarray:
    """The float16 ``(frames, 80)`` features of ``entry``, read from its pack."""
    with open(directory / f"{entry.pack}.f16", "rb") as handle:
        handle.seek(entry.offset * _BYTES_PER_FRAME)
        raw = handle.read(entry.frames * _BYTES_PER_FRAME)
    if len(raw) != entry.frames * _BYTES_PER_FRAME:
        raise OSError(f"feature cache pack {directory / entry.pack}.f16 is damaged (short "
                      "read); delete it and its .json file")
    return np.frombuffer(raw, dtype="<f2").reshape(entry.frames, N_MELS)


@dataclass(frozen=True)
class Collected:
    """What :func:`collect` did: entries dropped, packs deleted and rewritten, bytes freed."""

    dead_entries: int = 0
    deleted_packs: int = 0
    compacted_packs: int = 0
    freed_bytes: int = 0


def _dead(index: Index, current: Mapping[str, str]) -> set[tuple[str, int]]:
    """``(pack, position)`` of every dead entry (see the module docstring)."""
    listed_dirs = {str(Path(p).parent) for p in current}
    dead: set[tuple[str, int]] = set()
    for pack, entries in index.packs.items():
        for i, entry in enumerate(entries):
            now = current.get(entry.path)
            if index.entries[entry.key] is not entry:
                dead.add((pack, i))  # a duplicate: another pack's copy is the one read
            elif now is not None and now != entry.key:
                dead.add((pack, i))  # the file changed since it was extracted
            elif (now is None and str(Path(entry.path).parent) in listed_dirs
                  and not os.path.exists(entry.path)):
                dead.add((pack, i))  # removed (or renamed) from a folder that is listed
    return dead


def collect(directory: str | os.PathLike[str], index: Index,
            current: Mapping[str, str]) -> Collected:
    """Drop dead entries from the packs in ``directory``; call under :meth:`CacheLock.exclusive`.

    Args:
        directory: the packs directory.
        index: its :func:`load_index` (updated in place to what remains).
        current: ``resolved path -> entry_key`` of every file the current run lists.

    Returns:
        What was collected.
    """
    folder = Path(directory)
    for leftover in folder.glob("*.tmp"):  # of killed writers (none can be running now)
        leftover.unlink(missing_ok=True)
    dead = _dead(index, current)
    stats = {"dead_entries": len(dead), "deleted_packs": 0, "compacted_packs": 0,
             "freed_bytes": 0}
    for pack in sorted({p for p, _ in dead}):
        entries = index.packs[pack]
        live = [e for i, e in enumerate(entries) if (pack, i) not in dead]
        dead_bytes = sum(e.frames for i, e in enumerate(entries) if (pack, i) in dead)
        live_bytes = sum(e.frames for e in live)
        if live and dead_bytes <= live_bytes:
            continue  # mostly live: keep it whole until more of it dies
        if live:
            records = [Record(e.key, e.path, None if e.reason is not None
                              else read_features(folder, e), e.seconds, e.reason) for e in live]
            new = write_pack(folder, records)
            stats["compacted_packs"] += 1
        _remove_pack(folder, pack)
        stats["deleted_packs"] += 0 if live else 1
        stats["freed_bytes"] += dead_bytes * _BYTES_PER_FRAME
        del index.packs[pack]
        if live:
            index.packs[new] = _read_pack_index(folder / f"{new}.json")
    index.entries = {}
    for pack in sorted(index.packs):
        for entry in index.packs[pack]:
            index.entries.setdefault(entry.key, entry)
    return Collected(**stats)


def _remove_pack(folder: Path, pack: str) -> None:
    (folder / f"{pack}.json").unlink(missing_ok=True)  # first: the pack stops being complete
    (folder / f"{pack}.f16").unlink(missing_ok=True)


class CacheLock:
    """The lock file of a packs directory: shared while stores read it, exclusive to collect.

    ``flock`` locks belong to the open file, so two stores of one process also exclude each
    other's collection. The lock is released when the object is closed or garbage-collected
    (or the process ends).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / ".lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def exclusive(self) -> bool:
        """Try to take the lock exclusively without waiting; True if taken."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def shared(self) -> None:
        """Hold the lock shared (waits while another process collects)."""
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_fd": None}  # a copy in another process holds no lock
