"""Readers for LibriSpeech-layout and Common Voice corpora, grouped by user, plus audio loading.

API:
    ``read_librispeech(root, split=None, *, on_error="raise", verify_audio=True) -> SpeechData``
    ``read_common_voice(root, *, tsv="validated.tsv", on_error="raise", verify_audio=True) -> SpeechData``
    ``load_audio(path, *, sample_rate=16000) -> Tensor``: mono float32 samples, resampled.
    ``SpeechData``: ``users`` (``dict[user_id, list[Utterance]]``, users and utterances sorted by
    id) and ``skipped`` (``tuple[SkippedFile, ...]``, what ``on_error="skip"`` dropped and why).
    ``Utterance(user_id, audio_path, transcript, utterance_id)``: plain frozen data.
    ``DataError``: raised for missing or corrupt audio/transcripts; its message and ``path``
    name the file.
    ``summarize_skips(skipped) -> dict``: counts of skipped files by kind, first files named.

Users are LibriSpeech speakers and Common Voice ``client_id`` values, as in the paper. Readers
return file paths and transcripts only; audio is decoded later (:func:`load_audio`, or the
cached features of :mod:`examples.asr.features`).

Transcripts are normalised with :func:`examples.asr.text.normalize_transcript`: lower case,
accents stripped (``é`` -> ``e``), typographic apostrophes and hyphens unified, every other
character (punctuation, digits) removed and white space collapsed, leaving only the paper's
alphabet (space, apostrophe, ``a``-``z``, hyphen). A transcript that is empty after this is
treated as missing.

Audio is read with ``soundfile`` (FLAC, WAV, and MP3 with libsndfile >= 1.1), never with
``torchaudio.load``, and resampled to 16 kHz with ``torchaudio.functional.resample`` when needed.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 4 (users
    are speakers / ``client_id`` values).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import soundfile
import torch
from torch import Tensor

from examples.asr.text import normalize_transcript

__all__ = [
    "DataError",
    "SkippedFile",
    "SpeechData",
    "Utterance",
    "load_audio",
    "read_common_voice",
    "read_librispeech",
    "summarize_skips",
]

SAMPLE_RATE = 16_000
OnError = Literal["raise", "skip"]


class DataError(RuntimeError):
    """A missing or unreadable audio file or transcript; ``path`` names the file."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class Utterance:
    """One recording of one user.

    Attributes:
        user_id: the user (LibriSpeech speaker id or Common Voice ``client_id``).
        audio_path: the audio file.
        transcript: the normalised transcript (see the module docstring).
        utterance_id: unique id (LibriSpeech ``<speaker>-<chapter>-<n>``, Common Voice clip stem).
    """

    user_id: str
    audio_path: Path
    transcript: str
    utterance_id: str


@dataclass(frozen=True)
class SkippedFile:
    """A file dropped by ``on_error="skip"`` (or by feature extraction) and the reason.

    Attributes:
        path: the file.
        reason: what is wrong, in words.
        kind: a short category for counts (e.g. ``"missing transcript file"``,
            ``"truncated audio"``); see :func:`summarize_skips`.
    """

    path: Path
    reason: str
    kind: str = "other"


@dataclass(frozen=True)
class SpeechData:
    """Utterances grouped by user, and what was skipped while reading.

    Attributes:
        users: ``user_id -> utterances``, users and utterances sorted by id; no user is empty.
        skipped: the files dropped under ``on_error="skip"`` (empty under ``"raise"``).
    """

    users: dict[str, list[Utterance]]
    skipped: tuple[SkippedFile, ...]

    @property
    def num_users(self) -> int:
        """Number of users."""
        return len(self.users)

    @property
    def num_utterances(self) -> int:
        """Total number of utterances."""
        return sum(len(u) for u in self.users.values())

    def utterances(self) -> list[Utterance]:
        """All utterances, user by user."""
        return [u for utts in self.users.values() for u in utts]


class _Collector:
    """Accumulates utterances and applies the ``on_error`` policy."""

    def __init__(self, on_error: str, verify_audio: bool) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
        if not isinstance(verify_audio, bool):
            raise TypeError(f"verify_audio must be a bool, got {verify_audio!r}")
        self.on_error = on_error
        self.verify_audio = verify_audio
        self.users: dict[str, list[Utterance]] = {}
        self.skipped: list[SkippedFile] = []
        self.seen: dict[str, Path] = {}

    def fail(self, path: Path, reason: str, kind: str = "other") -> None:
        if self.on_error == "raise":
            raise DataError(path, reason)
        self.skipped.append(SkippedFile(path, reason, kind))

    def add(self, user_id: str, audio: Path, raw_transcript: str, utterance_id: str) -> None:
        transcript = normalize_transcript(raw_transcript)
        if not transcript:
            self.fail(audio, "transcript is missing or empty after normalisation",
                      "empty transcript")
            return
        if not audio.is_file():
            self.fail(audio, "audio file is missing", "missing audio")
            return
        if utterance_id in self.seen:
            self.fail(audio, f"duplicate utterance id {utterance_id!r} (also "
                             f"{self.seen[utterance_id]})", "duplicate id")
            return
        if self.verify_audio:
            reason = _audio_problem(audio)
            if reason is not None:
                self.fail(audio, reason, "corrupt audio")
                return
        self.seen[utterance_id] = audio
        self.users.setdefault(user_id, []).append(
            Utterance(user_id, audio, transcript, utterance_id)
        )

    def result(self) -> SpeechData:
        users = {
            k: sorted(v, key=lambda u: u.utterance_id) for k, v in sorted(self.users.items())
        }
        return SpeechData(users, tuple(self.skipped))


def _audio_problem(path: Path) -> str | None:
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        return f"audio file is corrupt or unreadable ({exc})"
    if info.frames <= 0:
        return "audio file contains no samples"
    return None


def read_librispeech(
    root: str | os.PathLike[str],
    split: str | None = None,
    *,
    on_error: OnError = "raise",
    verify_audio: bool = True,
) -> SpeechData:
    """Read a LibriSpeech-layout split: ``<split>/<speaker>/<chapter>/`` with ``.flac`` files
    and ``<speaker>-<chapter>.trans.txt`` (lines ``<utterance id> <TRANSCRIPT>``).

    Also reads the embedded corpus (:func:`examples.asr.corpus.ensure_corpus`).

    Args:
        root: the corpus root (e.g. ``.../LibriSpeech``), or the split directory itself when
            ``split`` is None.
        split: split directory under ``root`` (e.g. ``"train-clean-100"``, ``"fl-train"``).
        on_error: ``"raise"`` raises :class:`DataError` at the first missing transcript file,
            transcript line, audio file or corrupt audio; ``"skip"`` drops the affected files
            and lists them in :attr:`SpeechData.skipped`.
        verify_audio: open each audio file's header (catches truncated or corrupt files early;
            ``False`` is faster and defers such errors to :func:`load_audio`).

    Returns:
        The utterances grouped by speaker id.

    Raises:
        FileNotFoundError: if the split directory does not exist.
        DataError: under ``on_error="raise"``, naming the offending file.
        ValueError: if ``on_error`` is not ``"raise"`` or ``"skip"``.

    Examples:
        >>> data = read_librispeech("/data/LibriSpeech", "dev-clean")  # doctest: +SKIP
        >>> data.num_users  # doctest: +SKIP
        40
    """
    collector = _Collector(on_error, verify_audio)
    directory = Path(root) if split is None else Path(root) / split
    if not directory.is_dir():
        raise FileNotFoundError(f"LibriSpeech split directory {directory} does not exist")
    for speaker_dir in _subdirs(directory):
        for chapter_dir in _subdirs(speaker_dir):
            _read_chapter(speaker_dir.name, chapter_dir, collector)
    return collector.result()


def _subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _read_chapter(speaker: str, chapter_dir: Path, collector: _Collector) -> None:
    audio_files = {p.stem: p for p in chapter_dir.glob("*.flac")}
    trans = chapter_dir / f"{speaker}-{chapter_dir.name}.trans.txt"
    if not trans.is_file():
        if audio_files or collector.on_error == "raise":
            collector.fail(trans, f"transcript file is missing ({len(audio_files)} audio files "
                                  "in the chapter have no transcript)", "missing transcript file")
        for stem in sorted(audio_files):
            collector.skipped.append(SkippedFile(audio_files[stem], f"no transcript file {trans}",
                                                 "no transcript"))
        return
    seen: set[str] = set()
    for number, line in enumerate(_read_lines(trans, collector), start=1):
        if not line.strip():
            continue
        utt_id, _, text = line.strip().partition(" ")
        seen.add(utt_id)
        if not text.strip():
            collector.fail(trans, f"line {number} ({utt_id}) has an empty transcript",
                           "empty transcript")
            continue
        audio = audio_files.get(utt_id, chapter_dir / f"{utt_id}.flac")
        collector.add(speaker, audio, text, utt_id)
    for stem in sorted(set(audio_files) - seen):
        collector.fail(audio_files[stem], f"audio file has no line in {trans.name}",
                       "no transcript")


def _read_lines(path: Path, collector: _Collector) -> Iterable[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        collector.fail(path, f"transcript file is unreadable ({exc})", "missing transcript file")
        return []


def read_common_voice(
    root: str | os.PathLike[str],
    *,
    tsv: str = "validated.tsv",
    on_error: OnError = "raise",
    verify_audio: bool = True,
) -> SpeechData:
    """Read a Common Voice language directory: ``<tsv>`` plus ``clips/`` (MP3 clips).

    Args:
        root: the language directory (e.g. ``.../cv-corpus-XX/en``).
        tsv: the tab-separated index to read (``"validated.tsv"``, ``"train.tsv"``, ``"dev.tsv"``,
            ``"test.tsv"``); needs the columns ``client_id``, ``path`` and ``sentence``.
        on_error: as in :func:`read_librispeech` (missing clip, corrupt clip, empty sentence).
        verify_audio: open each clip's header (see :func:`read_librispeech`).

    Returns:
        The utterances grouped by ``client_id``.

    Raises:
        FileNotFoundError: if the TSV file does not exist.
        DataError: if the TSV lacks a required column, or (under ``on_error="raise"``) a row is
            unusable; the message names the file.
        ValueError: if ``on_error`` is not ``"raise"`` or ``"skip"``.

    Examples:
        >>> data = read_common_voice("/data/cv/en", tsv="train.tsv")  # doctest: +SKIP
    """
    collector = _Collector(on_error, verify_audio)
    index = Path(root) / tsv
    if not index.is_file():
        raise FileNotFoundError(f"Common Voice index {index} does not exist")
    reader = csv.DictReader(io.StringIO(_read_tsv(index), newline=""), delimiter="\t",
                            quoting=csv.QUOTE_NONE)
    missing = {"client_id", "path", "sentence"} - set(reader.fieldnames or ())
    if missing:
        raise DataError(index, f"missing required column(s) {sorted(missing)}")
    for row in reader:
        client, clip = (row.get("client_id") or "").strip(), (row.get("path") or "").strip()
        if not client or not clip:
            collector.fail(index, f"line {reader.line_num} lacks client_id or path",
                           "bad index row")
            continue
        collector.add(client, Path(root) / "clips" / clip, row.get("sentence") or "",
                      Path(clip).stem)
    return collector.result()


def _read_tsv(index: Path) -> str:
    """The text of a Common Voice index: UTF-8, with or without a byte-order mark.

    Raises:
        DataError: if the file cannot be read or is not UTF-8 (naming the line and column).
    """
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise DataError(index, f"cannot be read ({exc})") from exc
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is not part of a column name
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw[:start].count(b"\n") + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        raise DataError(index, f"line {line}, byte {column} is not UTF-8 (byte "
                               f"0x{raw[start]:02x}); save the file as UTF-8") from None


def load_audio(path: str | os.PathLike[str], *, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Decode an audio file to mono float32 samples at ``sample_rate`` Hz.

    Multi-channel audio is averaged; other rates are resampled with
    ``torchaudio.functional.resample``.

    Args:
        path: a file ``soundfile`` can read (FLAC, WAV, OGG, MP3 with libsndfile >= 1.1).
        sample_rate: the output rate in Hz (> 0).

    Returns:
        A 1-D float32 tensor.

    Raises:
        DataError: if the file is missing, unreadable or empty (the message names it).
        ValueError: if ``sample_rate`` is not a positive integer.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(path, f"cannot read audio ({exc})") from exc
    if data.shape[0] == 0:
        raise DataError(path, "audio file contains no samples")
    wave = torch.from_numpy(data).mean(dim=1)
    if rate != sample_rate:
        import torchaudio.functional

        wave = torchaudio.functional.resample(wave, int(rate), sample_rate)
    return wave.contiguous()


def summarize_skips(skipped: Iterable[SkippedFile], *, examples: int = 3) -> dict[str, Any]:
    """Counts of skipped files by kind, with the first ``examples`` files of each kind.

    Returns:
        ``{"count": n, "by_kind": {kind: {"count": k, "examples": ["path: reason", ...]}}}``,
        kinds ordered by decreasing count (plain data, ready for ``results.json``).
    """
    by_kind: dict[str, list[SkippedFile]] = {}
    total = 0
    for entry in skipped:
        by_kind.setdefault(entry.kind, []).append(entry)
        total += 1
    ordered = sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {"count": total, "by_kind": {
        kind: {"count": len(entries),
               "examples": [f"{e.path}: {e.reason}" for e in entries[:examples]]}
        for kind, entries in ordered}}
