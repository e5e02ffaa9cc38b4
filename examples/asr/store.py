"""An on-disk feature store: features extracted once, in parallel and resumably, read lazily.

API:
    ``extract_features(utterances, *, cache_dir=None, workers=None, name="utterances",
    progress=False) -> FeatureStore``: log-mel features of every utterance, written once into
    ``<cache_dir>/features/<key>/`` by ``workers`` processes and reused afterwards.
    ``extract_splits({name: utterances}, ...) -> dict[name, FeatureStore]``: the same for several
    splits with one worker pool and one progress bar (what the command line uses).
    ``FeatureStore``: ``store[utterance_id] -> Tensor[frames, 80]`` (float32, read from disk on
    every access), ``num_frames(utterance_id)``, ``skipped`` (what could not be used, and why).
    ``StoredBatches(store, utterances, tokenizer, *, batch_size, seed=None)``: a lazy
    ``Sequence[Batch]`` with exactly the grouping of :func:`examples.asr.train.make_batches`.
    ``StoredFederatedDataset(store, users, tokenizer, *, batch_size, seed=None)``: a
    :class:`dpfl.simulation.FederatedDataset` whose ``user_data(u)`` reads user ``u`` only.

Memory: nothing here keeps features in RAM. A store is a directory of chunks of
:data:`CHUNK_SIZE` utterances, each a raw little-endian float16 file (``chunk-NNNNN.f16``, the
utterances' ``(frames, 80)`` matrices back to back) plus a JSON index (``chunk-NNNNN.json``:
ids, frame counts, skipped files). Reading an utterance is one ``os.pread`` of its bytes, so
the resident memory of a run grows with the number of utterances only through their ids and
frame counts (a few dozen bytes each), not with hours of audio. (Memory-mapping the chunks
would count every touched page in the process's RSS until unmapped; explicit reads keep the
page cache, which the kernel can drop, as the only copy.)

Key: ``<key>`` hashes :data:`examples.asr.features.FEATURE_VERSION`, :data:`STORE_FORMAT`, the
chunk size, and every utterance's id, transcript length, resolved path, size and modification
time, in order; edited audio or another utterance list gives another store. The default
``cache_dir`` is :func:`examples.asr.corpus.default_cache_dir` (``$DPFL_CACHE`` or
``~/.cache/dpfl``), never a directory of the dataset (datasets are often read-only).

Extraction is parallel (a ``spawn`` pool; each worker uses one torch thread, so the stored
bytes do not depend on ``workers``) and resumable: a chunk's index file is renamed into place
after its data file, so a killed run leaves only whole chunks, and the next run computes the
missing ones. Each file is validated by decoding it (see :func:`check_audio`): a decoder
error, a decoded length that disagrees with the header, or audio too short for its transcript
makes the utterance a counted skip instead of a crash in the middle of a run.

Why not lhotse: its ``LilcomChunkyWriter``/``NumpyHdf5Writer`` feature storage would do the
job, but it brings its own manifests, recording model and feature extractors (and h5py for
HDF5), for what here is a few hundred lines over ``soundfile`` and ``torchaudio`` that the
example already uses; the store's format is two plain files per chunk that ``numpy`` reads.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 5.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import soundfile
import torch
from torch import Tensor

from examples.asr.data import SAMPLE_RATE, SkippedFile, Utterance
from examples.asr.features import FEATURE_VERSION, N_MELS, log_mel
from examples.asr.text import CharTokenizer
from examples.asr.train import Batch, collate

__all__ = [
    "CHUNK_SIZE",
    "MAX_CHARS_PER_SECOND",
    "STORE_FORMAT",
    "FeatureStore",
    "StoredBatches",
    "StoredFederatedDataset",
    "check_audio",
    "extract_features",
    "extract_splits",
    "store_key",
]

STORE_FORMAT = 1
CHUNK_SIZE = 64
"""Utterances per chunk: the unit of work of one worker task and of resumption."""
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


def _features_of(path: str, transcript_chars: int) -> tuple[np.ndarray | None, str | None]:
    samples, rate, reason = check_audio(path)
    if samples is None:
        return None, reason
    seconds = samples.shape[0] / rate
    if transcript_chars > MAX_CHARS_PER_SECOND * seconds:
        return None, (f"audio too short for its transcript: {seconds:.2f} s for "
                      f"{transcript_chars} characters (truncated?)")
    wave = torch.from_numpy(np.ascontiguousarray(samples))
    if rate != SAMPLE_RATE:
        import torchaudio.functional

        wave = torchaudio.functional.resample(wave, rate, SAMPLE_RATE)
    return log_mel(wave).to(torch.float16).numpy(), None


def _extract_chunk(task: tuple[str, int, list[tuple[str, str, int]]]) -> tuple[int, int, int, float]:
    """Write one chunk (runs in a worker process, or in-process with ``workers=1``)."""
    directory, index, items = task
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stored bytes must not depend on the number of workers
    try:
        ids: list[str] = []
        frames: list[int] = []
        skipped: list[list[str]] = []
        parts: list[bytes] = []
        for utt_id, path, chars in items:
            feats, reason = _features_of(path, chars)
            if feats is None:
                skipped.append([utt_id, path, str(reason)])
                continue
            ids.append(utt_id)
            frames.append(int(feats.shape[0]))
            parts.append(feats.astype("<f2").tobytes())
    finally:
        torch.set_num_threads(threads)
    base = Path(directory) / f"chunk-{index:05d}"
    tag = uuid.uuid4().hex[:8]
    tmp_data, tmp_index = Path(f"{base}.f16.{tag}.tmp"), Path(f"{base}.json.{tag}.tmp")
    tmp_data.write_bytes(b"".join(parts))
    os.replace(tmp_data, f"{base}.f16")
    tmp_index.write_text(json.dumps({"ids": ids, "frames": frames, "skipped": skipped}))
    os.replace(tmp_index, f"{base}.json")  # last: a chunk with an index is complete
    return index, len(ids), len(skipped), sum(frames) / 100.0


def _worker_init() -> None:
    torch.set_num_threads(1)


def _check_unique(utterances: Sequence[Utterance], name: str) -> None:
    seen: dict[str, Path] = {}
    for u in utterances:
        if u.utterance_id in seen:
            raise ValueError(f"{name}: duplicate utterance id {u.utterance_id!r} "
                             f"({seen[u.utterance_id]} and {u.audio_path})")
        seen[u.utterance_id] = Path(u.audio_path)


def store_key(utterances: Sequence[Utterance]) -> str:
    """The store's directory name for ``utterances`` (see the module docstring)."""
    digest = hashlib.sha256(f"{FEATURE_VERSION}/{STORE_FORMAT}/{CHUNK_SIZE}".encode())
    for u in utterances:
        path = Path(u.audio_path)
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1
        record = [u.utterance_id, len(u.transcript), str(path.resolve()), size, mtime]
        digest.update(json.dumps(record).encode())
    return digest.hexdigest()[:24]


def extract_features(
    utterances: Sequence[Utterance],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    name: str = "utterances",
    progress: bool = False,
) -> FeatureStore:
    """Features of ``utterances`` in an on-disk store, computing only what is missing.

    Args:
        utterances: the utterances (distinct ids), e.g. one split as read by
            :func:`examples.asr.data.read_librispeech`; keep a user's utterances together so
            that reading one user touches few chunks.
        cache_dir: the cache root; the store is ``<cache_dir>/features/<key>``. Default
            :func:`examples.asr.corpus.default_cache_dir`.
        workers: extraction processes (default: the CPUs this process may use); ``1`` extracts
            in this process.
        name: what the utterances are (a split or directory), used in messages and errors.
        progress: show a progress bar.

    Returns:
        The :class:`FeatureStore` (files that failed validation are in its ``skipped``).

    Raises:
        ValueError: if ``utterances`` is empty (naming ``name``), has duplicate ids (naming the
            id and both files) or ``workers`` is not a positive integer.
    """
    return extract_splits({name: utterances}, cache_dir=cache_dir, workers=workers,
                          progress=progress)[name]


def extract_splits(
    splits: Mapping[str, Sequence[Utterance]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, FeatureStore]:
    """:func:`extract_features` of several named splits with one worker pool and progress bar.

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
    plans: dict[str, tuple[Path, int]] = {}
    todo: list[tuple[str, int, list[tuple[str, str, int]]]] = []
    total = 0
    for name, utterances in splits.items():
        if not utterances:
            raise ValueError(f"{name}: no utterances to extract features from (found 0)")
        _check_unique(utterances, name)
        directory = Path(cache_dir) / "features" / store_key(utterances)
        directory.mkdir(parents=True, exist_ok=True)
        items = [(u.utterance_id, str(u.audio_path), len(u.transcript)) for u in utterances]
        chunks = [(str(directory), i // CHUNK_SIZE, items[i : i + CHUNK_SIZE])
                  for i in range(0, len(items), CHUNK_SIZE)]
        todo += [t for t in chunks if not (directory / f"chunk-{t[1]:05d}.json").is_file()]
        plans[name] = (directory, len(chunks))
        total += len(items)
    if todo:
        label = ", ".join(splits) if len(splits) <= 4 else f"{len(splits)} splits"
        _run_tasks(todo, total=total, done=total - sum(len(t[2]) for t in todo),
                   workers=workers, name=label, progress=progress)
    return {name: FeatureStore(d, expected=n) for name, (d, n) in plans.items()}


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
            bar.write(f"features: {name}: resuming, {done} of {total} utterances already stored")
    try:
        if workers == 1 or len(tasks) == 1:
            results: Iterator[tuple[int, int, int, float]] = map(_extract_chunk, tasks)
            for _, ok, bad, _ in results:
                if bar is not None:
                    bar.update(ok + bad)
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=min(workers, len(tasks)), initializer=_worker_init) as pool:
            for _, ok, bad, _ in pool.imap_unordered(_extract_chunk, tasks, chunksize=1):
                if bar is not None:
                    bar.update(ok + bad)
    finally:
        if bar is not None:
            bar.close()


class FeatureStore:
    """Read access to an extracted store (see the module docstring); holds no features.

    Args:
        directory: the store directory written by :func:`extract_features`.
        expected: number of chunks that must be present (``None``: whatever is there).

    Raises:
        FileNotFoundError: if chunks are missing (an interrupted extraction: run it again).
    """

    def __init__(self, directory: str | os.PathLike[str], *, expected: int | None = None) -> None:
        self.directory = Path(directory)
        indexes = sorted(self.directory.glob("chunk-*.json"))
        if expected is not None and len(indexes) != expected:
            raise FileNotFoundError(
                f"feature store {self.directory} has {len(indexes)} of {expected} chunks; "
                "rerun the extraction to complete it")
        self._row: dict[str, int] = {}
        chunk_of: list[int] = []
        offsets: list[int] = []
        frames: list[int] = []
        skipped: list[SkippedFile] = []
        for index_file in indexes:
            chunk = int(index_file.stem.split("-")[1])
            meta = json.loads(index_file.read_text())
            offset = 0
            for utt_id, n in zip(meta["ids"], meta["frames"], strict=True):
                self._row[utt_id] = len(frames)
                chunk_of.append(chunk)
                offsets.append(offset)
                frames.append(n)
                offset += n
            skipped.extend(SkippedFile(Path(p), reason, reason.split(":")[0])
                           for _, p, reason in meta["skipped"])
        self._chunk = np.asarray(chunk_of, dtype=np.int32)
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
            raise KeyError(f"utterance {utterance_id!r} is not in feature store "
                           f"{self.directory} (skipped or never extracted)") from None

    def __getitem__(self, utterance_id: str) -> Tensor:
        """The ``(frames, 80)`` float32 features of ``utterance_id``, read from disk."""
        row = self._lookup(utterance_id)
        frames = int(self._frames[row])
        fd = self._fd(int(self._chunk[row]))
        nbytes = frames * N_MELS * 2
        raw = os.pread(fd, nbytes, int(self._offset[row]) * N_MELS * 2)
        if len(raw) != nbytes:
            raise OSError(f"feature store {self.directory} is damaged (short read); delete it")
        array = np.frombuffer(raw, dtype="<f2").reshape(frames, N_MELS)
        return torch.from_numpy(array.astype(np.float32))

    def _fd(self, chunk: int) -> int:
        fd = self._files.get(chunk)
        if fd is not None:
            self._files.move_to_end(chunk)
            return fd
        fd = os.open(self.directory / f"chunk-{chunk:05d}.f16", os.O_RDONLY)
        self._files[chunk] = fd
        if len(self._files) > _OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        """Close the open chunk files (reopened on the next read)."""
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}

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
