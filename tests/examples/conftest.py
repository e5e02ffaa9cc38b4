"""Real encoded audio in the exact LibriSpeech / Common Voice layouts, with broken files.

The files are synthesized here (speech-like harmonic sounds) and encoded with ``soundfile``:
FLAC for LibriSpeech, MP3 (libsndfile >= 1.1, LAME) for Common Voice. Problems planted on
purpose, each with the skip kind the pipeline must report:

LibriSpeech (``<root>/LibriSpeech``; splits ``train-clean-100`` seed, ``train-clean-360`` FL,
``dev-clean`` eval):
    * ``train-clean-360/300/1/300-1-0001.flac`` cut to 100 bytes (header intact) -> corrupt audio
    * ``train-clean-360/300/1/300-1-0002.flac`` cut to half its size -> corrupt audio (the FLAC
      decoder loses sync)
    * ``train-clean-360/301/7/`` has audio but no ``301-7.trans.txt`` -> missing transcript file

Common Voice (``<root>/cv/en`` with ``train.tsv``, ``dev.tsv``, ``validated.tsv``, ``clips/``,
the real 13-column header):
    * ``truncated.mp3`` cut to half its size -> truncated audio (frame count below the header's)
    * ``corrupt.mp3`` random bytes after an ID3 tag -> corrupt audio
    * ``missing.mp3`` listed but absent -> missing audio
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile

CV_HEADER = ("client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\t"
             "age\tgender\taccents\tvariant\tlocale\tsegment")
WORDS = ("the cat sat on a mat", "go do you hear", "a small red fox ran", "we sing and play",
         "it is late now", "one more time please")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than about 10 s on 2 cores")


def speechlike(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal with a little noise (float32, [-1, 1])."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    f0 = 110 + 40 * rng.random()
    wave = sum(np.sin(2 * math.pi * f0 * k * t + rng.random() * 6) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * math.pi * (3 + 2 * rng.random()) * t)
    noise = 0.02 * rng.standard_normal(t.shape[0])
    return (0.15 * wave * envelope + noise).astype(np.float32)


def encode(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    """Encode ``wave`` in memory as FLAC or MP3."""
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=fmt)
    return buffer.getvalue()


def write_chapter(split: Path, speaker: str, chapter: str, count: int, *, seed: int,
                  transcript: bool = True, seconds: float = 1.2) -> list[Path]:
    """One LibriSpeech chapter folder with ``count`` FLAC files and its ``.trans.txt``."""
    folder = split / speaker / chapter
    folder.mkdir(parents=True)
    lines, paths = [], []
    for i in range(count):
        utt = f"{speaker}-{chapter}-{i:04d}"
        path = folder / f"{utt}.flac"
        path.write_bytes(encode(speechlike(seconds + 0.1 * i, seed * 100 + i), 16000, "FLAC"))
        lines.append(f"{utt} {WORDS[(seed + i) % len(WORDS)].upper()}\n")
        paths.append(path)
    if transcript:
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return paths


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.fixture
def librispeech_root(tmp_path: Path) -> Path:
    """A small LibriSpeech tree with the broken files listed in the module docstring."""
    root = tmp_path / "LibriSpeech"
    for n in range(2):
        write_chapter(root / "train-clean-100", str(100 + n), "10", 3, seed=n)
    for n in range(3):
        write_chapter(root / "train-clean-360", str(300 + n), "1", 3, seed=10 + n)
    write_chapter(root / "train-clean-360", "301", "7", 2, seed=20, transcript=False)
    bad = root / "train-clean-360" / "300" / "1"
    truncate(bad / "300-1-0001.flac", 100)
    half = bad / "300-1-0002.flac"
    truncate(half, half.stat().st_size // 2)
    for n in range(2):
        write_chapter(root / "dev-clean", str(900 + n), "5", 2, seed=30 + n)
    return root


@pytest.fixture
def common_voice_root(tmp_path: Path) -> Path:
    """A small Common Voice language folder (MP3 clips) with the broken files above."""
    if "MP3" not in soundfile.available_formats():
        pytest.skip("libsndfile without MP3 support")
    root = tmp_path / "cv" / "en"
    clips = root / "clips"
    clips.mkdir(parents=True)
    rows: dict[str, list[tuple[str, str, str]]] = {"train.tsv": [], "dev.tsv": []}
    for n in range(8):
        tsv = "dev.tsv" if n >= 6 else "train.tsv"
        client = f"{n % 4:02x}" * 32 if tsv == "train.tsv" else "ee" * 32
        clip = f"common_voice_en_{1000 + n}.mp3"
        (clips / clip).write_bytes(encode(speechlike(1.5, 50 + n, 48000), 48000, "MP3"))
        rows[tsv].append((client, clip, WORDS[n % len(WORDS)].capitalize() + "."))
    truncated = encode(speechlike(3.0, 99, 48000), 48000, "MP3")
    (clips / "truncated.mp3").write_bytes(truncated[: len(truncated) // 2])
    (clips / "corrupt.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00"
                                        + np.random.default_rng(0).bytes(600))
    rows["train.tsv"] += [("00" * 32, "truncated.mp3", "The cat sat on a mat."),
                          ("01" * 32, "corrupt.mp3", "Go do you hear."),
                          ("02" * 32, "missing.mp3", "We sing and play.")]
    for tsv, entries in rows.items():
        body = "".join(f"{c}\t{p}\tsid{i}\t{s}\t\t2\t0\t\t\t\t\ten\t\n"
                       for i, (c, p, s) in enumerate(entries))
        (root / tsv).write_text(CV_HEADER + "\n" + body, encoding="utf-8")
    (root / "validated.tsv").write_text((root / "train.tsv").read_text(encoding="utf-8"),
                                        encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def quick_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the ``--quick`` synthetic corpus (espeak-ng speech in LibriSpeech
    layout, 1,400 FLAC files), generated once per session; pass it as ``--cache-dir``."""
    from examples.asr.corpus import CorpusConfig, ensure_corpus

    cache = tmp_path_factory.mktemp("quick-cache")
    ensure_corpus(CorpusConfig.quick(seed=0), cache_dir=cache, workers=2)
    return cache


@pytest.fixture(scope="session")
def quick_corpus(quick_cache: Path) -> Path:
    """The root of the ``--quick`` synthetic corpus in :func:`quick_cache` (do not modify it)."""
    from examples.asr.corpus import CorpusConfig, corpus_dir

    return corpus_dir(CorpusConfig.quick(seed=0), quick_cache)
