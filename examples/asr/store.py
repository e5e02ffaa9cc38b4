"""The on-disk feature store: features extracted once per file, in parallel, read lazily.

API:
    ``extract_features(utterances, *, cache_dir=None, workers=None, name="utterances",
    progress=False) -> FeatureStore``: log-mel features of every utterance, extracted by
    ``workers`` processes into the per-utterance cache of :mod:`examples.asr.packs` and reused
    afterwards (only files not already cached are extracted).
    ``extract_splits({name: utterances}, ...) -> dict[name, FeatureStore]``: the same for several
    splits with one worker pool and one progress bar (what the command line uses).
    ``FeatureStore``: ``store[utterance_id] -> Tensor[frames, 80]`` (float32, read from disk on
    every access), ``num_frames(utterance_id)``, ``skipped`` (what could not be used, and why).
    ``StoredBatches(store, utterances, tokenizer, *, batch_size, seed=None)``: a lazy
    ``Sequence[Batch]`` with exactly the grouping of :func:`examples.asr.train.make_batches`.
    ``StoredFederatedDataset(store, users, tokenizer, *, batch_size, seed=None)``: a
    :class:`dpfl.simulation.FederatedDataset` whose ``user_data(u)`` reads user ``u`` only.

Memory: nothing here keeps features in RAM. A :class:`FeatureStore` is a view of one split over
the cache's packs (:mod:`examples.asr.packs`: raw little-endian float16 files plus a JSON index
each); reading an utterance is one ``os.pread`` of its bytes, so the resident memory of a run
grows with the number of utterances only through their ids and frame counts (a few dozen bytes
each), not with hours of audio. (Memory-mapping the packs would count every touched page in the
process's RSS until unmapped; explicit reads keep the page cache, which the kernel can drop, as
the only copy.)

Cache: one entry per audio file, keyed by the file's name, size and modification time and the
feature definition (:func:`examples.asr.packs.entry_key`), under ``<cache_dir>/features/packs``.
A changed file (``touch``, re-encoded) is one new entry, a moved dataset or a new transcript
line extracts nothing else again; the entries of changed or removed files are collected when no
store of the cache is open (:func:`examples.asr.packs.collect`). The default ``cache_dir`` is
:func:`examples.asr.corpus.default_cache_dir` (``$DPFL_CACHE`` or ``~/.cache/dpfl``), never a
directory of the dataset (datasets are often read-only).

Extraction is parallel (a ``spawn`` pool; each worker uses one torch thread, so the stored
bytes do not depend on ``workers``) and resumable: a pack's index is renamed into place after
its data, so a killed run leaves only whole packs, and the next run extracts the rest. Each file
is validated by decoding it (see :func:`check_audio`): a decoder error or a decoded length that
disagrees with the header makes the utterance a counted skip (cached as such) instead of a
crash in the middle of a run; audio too short for its transcript is a skip of the split that
lists it (checked when the store is opened, so editing a transcript extracts nothing).

Why not lhotse: its ``LilcomChunkyWriter``/``NumpyHdf5Writer`` feature storage would do the
job, but it brings its own manifests, recording model and feature extractors (and h5py for
HDF5), for what here is a few hundred lines over ``soundfile`` and ``torchaudio`` that the
example already uses; a pack is two plain files that ``numpy`` reads.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 5.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import soundfile
import torch
from torch import Tensor

from examples.asr.data import SAMPLE_RATE, SkippedFile, Utterance
from examples.asr.features import N_MELS, log_mel
from examples.asr.packs import (
    CacheLock,
    Collected,
    Entry,
    Index,
    Record,
    collect,
    entry_key,
    load_index,
    packs_dir,
    write_pack,
)
from examples.asr.text import CharTokenizer
from examples.asr.train import Batch, collate

__all__ = [
    "CHUNK_SIZE",
    "MAX_CHARS_PER_SECOND",
    "FeatureStore",
    "StoredBatches",
    "StoredFederatedDataset",
    "check_audio",
    "extract_features",
    "extract_splits",
]

CHUNK_SIZE = 64
"""Files per pack written by one worker task: the unit of work and of resumption."""
MAX_CHARS_PER_SECOND = 32.0
"""Transcripts longer than this many characters per second of audio are implausible (read
speech in LibriSpeech averages about 15; the synthetic corpus peaks at 29) and come close to the
model's 33 CTC output frames per second, above which CTC cannot align them at all. This flags
badly truncated audio whose header cannot tell (an MP3 without a frame-count tag); a truncated
MP3 *with* a Xing/LAME tag, as libsndfile and LAME write them, is caught by the frame count."""
_MP3_TOLERANCE = 1152  # one MPEG audio frame: encoder delay/padding make MP3 counts inexact
_OPEN_FILES = 32


def check_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray | None, int, str | None]:
    """Decode ``path`` fully and check it against its header.

    Returns:
        ``(samples, rate, None)`` with mono float32 samples, or ``(None, 0, reason)`` when the
        file is missing, cannot be decoded, is empty, or decodes to a different number of
        frames than its header declares (a truncated file).
    """
    try:
        info = soundfile.info(str(path))
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        return None, 0, f"corrupt audio: cannot be decoded ({exc})"
    if data.shape[0] == 0:
        return None, 0, "corrupt audio: no samples"
    tolerance = _MP3_TOLERANCE if str(info.format).upper() == "MP3" else 0
    if abs(data.shape[0] - info.frames) > tolerance:
        return None, 0, (f"truncated audio: decoded {data.shape[0]} frames, header declares "
                         f"{info.frames}")
    return data.mean(axis=1), int(rate), None


def _extract(key: str, path: str) -> Record:
    """Decode, check and featurize one file (float16 features, or the reason it is unusable)."""
    samples, rate, reason = check_audio(path)
    if samples is None:
        return Record(key, path, None, reason=reason)
    wave = torch.from_numpy(np.ascontiguousarray(samples))
    if rate != SAMPLE_RATE:
        import torchaudio.functional

        wave = torchaudio.functional.resample(wave, rate, SAMPLE_RATE)
    feats = log_mel(wave).to(torch.float16).numpy()
    return Record(key, path, feats, seconds=samples.shape[0] / rate)


def _extract_pack(task: tuple[str, list[tuple[str, str]]]) -> tuple[str, int]:
    """Extract ``(key, path)`` items into one pack (in a worker, or in-process with 1 worker)."""
    directory, items = task
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stored bytes must not depend on the number of workers
    try:
        records = [_extract(key, path) for key, path in items]
    finally:
        torch.set_num_threads(threads)
    return write_pack(directory, records), len(records)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _check_unique(utterances: Sequence[Utterance], name: str) -> None:
    seen: dict[str, Path] = {}
    for u in utterances:
        if u.utterance_id in seen:
            raise ValueError(f"{name}: duplicate utterance id {u.utterance_id!r} "
                             f"({seen[u.utterance_id]} and {u.audio_path})")
        seen[u.utterance_id] = Path(u.audio_path)


def extract_features(
    utterances: Sequence[Utterance],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    name: str = "utterances",
    progress: bool = False,
    check_transcripts: bool = True,
) -> FeatureStore:
    """Features of ``utterances`` in the on-disk cache, extracting only files not cached yet.

    Args:
        utterances: the utterances (distinct ids), e.g. one split as read by
            :func:`examples.asr.data.read_librispeech`; keep a user's utterances together so
            that reading one user touches few packs.
        cache_dir: the cache root; the packs are in ``<cache_dir>/features/packs``. Default
            :func:`examples.asr.corpus.default_cache_dir`.
        workers: extraction processes (default: the CPUs this process may use); ``1`` extracts
            in this process.
        name: what the utterances are (a split or directory), used in messages and errors.
        progress: show a progress bar.
        check_transcripts: count audio too short for its transcript (more than
            :data:`MAX_CHARS_PER_SECOND`) as a skip.

    Returns:
        The :class:`FeatureStore` (files that failed validation are in its ``skipped``).

    Raises:
        ValueError: if ``utterances`` is empty (naming ``name``), has duplicate ids (naming the
            id and both files) or ``workers`` is not a positive integer.
    """
    return extract_splits({name: utterances}, cache_dir=cache_dir, workers=workers,
                          progress=progress, check_transcripts=check_transcripts)[name]


def extract_splits(
    splits: Mapping[str, Sequence[Utterance]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = False,
    check_transcripts: bool = True,
) -> dict[str, FeatureStore]:
    """:func:`extract_features` of several named splits with one worker pool and progress bar.

    Before extracting, the cache's dead entries are collected if no store of it is open (see
    :func:`examples.asr.packs.collect`); the stores returned hold the cache's shared lock while
    they live, which keeps other runs' collection away from the packs they read.

    Returns:
        ``name -> FeatureStore``, one store per split.

    Raises:
        ValueError: as :func:`extract_features`, naming the split.
    """
    if workers is None:
        workers = _available_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if cache_dir is None:
        from examples.asr.corpus import default_cache_dir

        cache_dir = default_cache_dir()
    keys: dict[str, dict[str, str]] = {}  # split -> utterance id -> key
    current: dict[str, str] = {}  # resolved path -> key
    for name, utterances in splits.items():
        if not utterances:
            raise ValueError(f"{name}: no utterances to extract features from (found 0)")
        _check_unique(utterances, name)
        keys[name] = {}
        for u in utterances:
            path = str(Path(u.audio_path).resolve())
            key = current.setdefault(path, entry_key(path))
            keys[name][u.utterance_id] = key
    directory = packs_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lock = CacheLock(directory)
    if lock.exclusive():  # no store of this cache is open: collect what is dead
        index = load_index(directory)
        collected = collect(directory, index, current)
        if progress and collected.dead_entries:
            print(_collected_message(collected), flush=True)
        lock.shared()
    else:
        lock.shared()
        index = load_index(directory)
    todo = [(key, path) for path, key in current.items() if key not in index.entries]
    if todo:
        tasks = [(str(directory), todo[i : i + CHUNK_SIZE]) for i in range(0, len(todo), CHUNK_SIZE)]
        label = ", ".join(splits) if len(splits) <= 4 else f"{len(splits)} splits"
        _run_tasks(tasks, total=len(current), done=len(current) - len(todo), workers=workers,
                   name=label, progress=progress)
        index = load_index(directory)
    stores = {}
    for name, utterances in splits.items():
        missing = [u.audio_path for u in utterances if keys[name][u.utterance_id] not in index.entries]
        if missing:  # a pack vanished in between (deleted by hand): extract again
            raise FileNotFoundError(
                f"{name}: {len(missing)} file(s), e.g. {missing[0]}, have no features in "
                f"{directory} after extraction; run again to extract them")
        stores[name] = FeatureStore(directory, utterances, keys[name], index, lock=lock,
                                    check_transcripts=check_transcripts)
    return stores


def _collected_message(c: Collected) -> str:
    return (f"features: collected {c.dead_entries} entries of changed or removed files "
            f"({c.freed_bytes / 1e6:.1f} MB; {c.deleted_packs} packs deleted, "
            f"{c.compacted_packs} compacted)")


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _run_tasks(tasks: list[Any], *, total: int, done: int, workers: int, name: str,
               progress: bool) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, unit="utt", desc=f"features: {name}",
                   dynamic_ncols=True)
        if done:
            bar.write(f"features: {name}: {done} of {total} files already in the cache")
    try:
        if workers == 1 or len(tasks) == 1:
            results: Iterator[tuple[str, int]] = map(_extract_pack, tasks)
            for _, count in results:
                if bar is not None:
                    bar.update(count)
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=min(workers, len(tasks)), initializer=_worker_init) as pool:
            for _, count in pool.imap_unordered(_extract_pack, tasks, chunksize=1):
                if bar is not None:
                    bar.update(count)
    finally:
        if bar is not None:
            bar.close()


def _too_short(entry: Entry, transcript_chars: int) -> str | None:
    if transcript_chars > MAX_CHARS_PER_SECOND * entry.seconds:
        return (f"audio too short for its transcript: {entry.seconds:.2f} s for "
                f"{transcript_chars} characters (truncated?)")
    return None


class FeatureStore:
    """Read access to the features of one list of utterances; holds no features.

    Built by :func:`extract_splits` (the arguments are its internals): a view of the cache's
    packs that maps each usable utterance id to its bytes, and lists the others in ``skipped``.

    Args:
        directory: the packs directory.
        utterances: the utterances of the view.
        keys: ``utterance id -> entry key``.
        index: the packs' index (holding every key).
        lock: the cache lock this view keeps shared while it lives.
        check_transcripts: skip audio too short for its transcript.
    """

    def __init__(self, directory: str | os.PathLike[str], utterances: Sequence[Utterance],
                 keys: Mapping[str, str], index: Index, *, lock: CacheLock | None = None,
                 check_transcripts: bool = True) -> None:
        self.directory = Path(directory)
        self._lock = lock
        self._row: dict[str, int] = {}
        packs: dict[str, int] = {}
        pack_of: list[int] = []
        offsets: list[int] = []
        frames: list[int] = []
        skipped: list[SkippedFile] = []
        for u in utterances:
            entry = index.entries[keys[u.utterance_id]]
            reason = entry.reason
            if reason is None and check_transcripts:
                reason = _too_short(entry, len(u.transcript))
            if reason is not None:
                skipped.append(SkippedFile(Path(u.audio_path), reason, reason.split(":")[0]))
                continue
            self._row[u.utterance_id] = len(frames)
            pack_of.append(packs.setdefault(entry.pack, len(packs)))
            offsets.append(entry.offset)
            frames.append(entry.frames)
        self._packs = list(packs)
        self._pack = np.asarray(pack_of, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._frames = np.asarray(frames, dtype=np.int64)
        self.skipped: tuple[SkippedFile, ...] = tuple(skipped)
        self._files: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, utterance_id: object) -> bool:
        return utterance_id in self._row

    def ids(self) -> list[str]:
        """Ids of the stored (usable) utterances."""
        return list(self._row)

    def num_frames(self, utterance_id: str) -> int:
        """Feature frames of a stored utterance (no disk read)."""
        return int(self._frames[self._lookup(utterance_id)])

    def hours(self) -> float:
        """Hours of audio in the store (10 ms per frame)."""
        return float(self._frames.sum()) / 360_000.0

    def _lookup(self, utterance_id: str) -> int:
        try:
            return self._row[utterance_id]
        except KeyError:
            raise KeyError(f"utterance {utterance_id!r} is not in this feature store "
                           f"({self.directory}; skipped or never extracted)") from None

    def __getitem__(self, utterance_id: str) -> Tensor:
        """The ``(frames, 80)`` float32 features of ``utterance_id``, read from disk."""
        row = self._lookup(utterance_id)
        frames = int(self._frames[row])
        fd = self._fd(int(self._pack[row]))
        nbytes = frames * N_MELS * 2
        raw = os.pread(fd, nbytes, int(self._offset[row]) * N_MELS * 2)
        if len(raw) != nbytes:
            raise OSError(f"feature cache {self.directory} is damaged (short read in pack "
                          f"{self._packs[int(self._pack[row])]}); delete the pack")
        array = np.frombuffer(raw, dtype="<f2").reshape(frames, N_MELS)
        return torch.from_numpy(array.astype(np.float32))

    def _fd(self, pack: int) -> int:
        fd = self._files.get(pack)
        if fd is not None:
            self._files.move_to_end(pack)
            return fd
        fd = os.open(self.directory / f"{self._packs[pack]}.f16", os.O_RDONLY)
        self._files[pack] = fd
        if len(self._files) > _OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        """Close the open pack files (reopened on the next read)."""
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict(), "_lock": None}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.directory)!r}, utterances={len(self)})"


class StoredBatches(Sequence[Batch]):
    """Batches of ``utterances`` read from ``store`` on access; same grouping as ``make_batches``.

    Utterances are sorted by length and cut into batches of at most ``batch_size``; with a
    ``seed`` the batch order is shuffled exactly as :func:`examples.asr.train.make_batches`
    does, so both give identical batches for identical features.

    Raises:
        KeyError: if an utterance is not in the store (drop skipped ones first).
    """

    def __init__(self, store: FeatureStore, utterances: Sequence[Utterance],
                 tokenizer: CharTokenizer, *, batch_size: int, seed: int | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.store, self.tokenizer = store, tokenizer
        ids = [u.utterance_id for u in utterances]
        texts = [u.transcript for u in utterances]
        order = sorted(range(len(ids)), key=lambda i: store.num_frames(ids[i]))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
        self._batches = [([ids[i] for i in c], [texts[i] for i in c]) for c in chunks]

    def __len__(self) -> int:
        return len(self._batches)

    @overload
    def __getitem__(self, index: int) -> Batch: ...
    @overload
    def __getitem__(self, index: slice) -> list[Batch]: ...

    def __getitem__(self, index: int | slice) -> Batch | list[Batch]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        ids, texts = self._batches[index]
        return collate([self.store[i] for i in ids], texts, self.tokenizer)

    def num_utterances(self) -> int:
        """Utterances over all batches."""
        return sum(len(ids) for ids, _ in self._batches)


class StoredFederatedDataset:
    """A :class:`dpfl.simulation.FederatedDataset` over a :class:`FeatureStore`.

    ``user_data(u)`` reads user ``u``'s utterances from disk and returns them as a list of
    batches (grouped like :func:`examples.asr.train.make_batches` with ``seed``); nothing of any
    other user, and nothing is kept after the call.

    Args:
        store: the features.
        users: ``user_id -> utterances`` (all in ``store``); users in this order.
        tokenizer: encodes transcripts.
        batch_size: utterances per local step.
        seed: shuffles each user's batch order (as ``make_batches``).

    Raises:
        ValueError: if ``users`` is empty or a user has no utterances.
    """

    def __init__(self, store: FeatureStore, users: Mapping[Hashable, Sequence[Utterance]],
                 tokenizer: CharTokenizer, *, batch_size: int, seed: int | None = None) -> None:
        if not users:
            raise ValueError("users must contain at least one user")
        empty = [u for u, utts in users.items() if not utts]
        if empty:
            raise ValueError(f"users without utterances: {empty[:5]}")
        self.store, self.tokenizer = store, tokenizer
        self.batch_size, self.seed = batch_size, seed
        self._users = {u: list(utts) for u, utts in users.items()}
        self._ids = tuple(self._users)

    def user_ids(self) -> Sequence[Hashable]:
        """The user ids, in the mapping's order."""
        return self._ids

    def user_data(self, user_id: Hashable) -> list[Batch]:
        """User ``user_id``'s batches, read from the store now."""
        try:
            utts = self._users[user_id]
        except KeyError:
            raise KeyError(f"user {user_id!r} is not in this federated dataset") from None
        return list(StoredBatches(self.store, utts, self.tokenizer,
                                  batch_size=self.batch_size, seed=self.seed))

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"StoredFederatedDataset(num_users={len(self._ids)}, store={self.store!r})"
