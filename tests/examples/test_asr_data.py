"""LibriSpeech / Common Voice readers and audio loading on small real directories."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from examples.asr.data import (
    DataError,
    Utterance,
    load_audio,
    read_common_voice,
    read_librispeech,
)


def _tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def _write_chapter(
    root: Path,
    speaker: str,
    chapter: str,
    texts: list[str],
    rate: int = 16000,
    *,
    transcript: bool = True,
) -> list[Path]:
    folder = root / speaker / chapter
    folder.mkdir(parents=True)
    paths, lines = [], []
    for i, text in enumerate(texts):
        utt = f"{speaker}-{chapter}-{i:04d}"
        path = folder / f"{utt}.flac"
        soundfile.write(path, _tone(rate, 0.2 + 0.05 * i), rate, format="FLAC")
        paths.append(path)
        lines.append(f"{utt} {text}\n")
    if transcript:
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return paths


@pytest.fixture
def libri(tmp_path: Path) -> Path:
    split = tmp_path / "LibriSpeech" / "dev-clean"
    _write_chapter(split, "84", "121123", ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"])
    _write_chapter(split, "84", "121550", ["AND IT'S A WELL-KNOWN FACT"], rate=22050)
    _write_chapter(split, "174", "50561", ["FORGOTTEN TOO THE NAME OF GILLIAN"], rate=48000)
    return tmp_path / "LibriSpeech"


def test_librispeech_groups_by_speaker_and_normalises(libri: Path) -> None:
    data = read_librispeech(libri, "dev-clean")
    assert list(data.users) == ["174", "84"]
    assert data.num_users == 2 and data.num_utterances == 4 and data.skipped == ()
    ids = [u.utterance_id for u in data.users["84"]]
    assert ids == ["84-121123-0000", "84-121123-0001", "84-121550-0000"]
    first = data.users["84"][0]
    assert isinstance(first, Utterance) and first.user_id == "84"
    assert first.transcript == "go do you hear"
    assert first.audio_path == libri / "dev-clean" / "84" / "121123" / "84-121123-0000.flac"
    assert data.users["84"][2].transcript == "and it's a well-known fact"
    assert all(u.user_id == k for k, us in data.users.items() for u in us)
    # the split directory itself is accepted as root
    assert read_librispeech(libri / "dev-clean").users == data.users


@pytest.mark.parametrize("rate", [16000, 22050, 48000])
def test_load_audio_resamples_to_16k_and_keeps_pitch(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "tone.flac"
    soundfile.write(path, _tone(rate, 1.0, freq=440.0), rate, format="FLAC")
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() - 16000) <= 1
    spectrum = torch.fft.rfft(wave).abs()
    peak_hz = int(spectrum.argmax()) * 16000 / wave.numel()
    assert abs(peak_hz - 440.0) <= 2.0
    assert wave.abs().max() == pytest.approx(0.3, abs=0.02)


def test_load_audio_mixes_channels_to_mono(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    left = _tone(16000, 0.5)
    soundfile.write(path, np.stack([left, -left], axis=1), 16000)
    assert load_audio(path).abs().max() < 1e-4


def test_load_audio_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"not a flac file at all" * 10)
    with pytest.raises(DataError, match="broken.flac") as info:
        load_audio(bad)
    assert info.value.path == bad
    with pytest.raises(DataError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac")
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(bad, sample_rate=0)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"fLaC" + b"\x00garbage" * 20)


def test_librispeech_corrupt_audio_raises_or_is_skipped(libri: Path) -> None:
    bad = libri / "dev-clean" / "84" / "121123" / "84-121123-0001.flac"
    _corrupt(bad)
    with pytest.raises(DataError, match="84-121123-0001.flac"):
        read_librispeech(libri, "dev-clean")
    data = read_librispeech(libri, "dev-clean", on_error="skip")
    assert [s.path for s in data.skipped] == [bad]
    assert "corrupt" in data.skipped[0].reason
    assert data.num_utterances == 3
    assert bad not in {u.audio_path for u in data.utterances()}


def test_librispeech_missing_transcript_file(libri: Path) -> None:
    paths = _write_chapter(libri / "dev-clean", "251", "136532", ["A", "B"], transcript=False)
    with pytest.raises(DataError, match=r"251-136532\.trans\.txt"):
        read_librispeech(libri, "dev-clean")
    data = read_librispeech(libri, "dev-clean", on_error="skip")
    assert "251" not in data.users and data.num_utterances == 4
    skipped = [s.path for s in data.skipped]
    assert skipped[0].name == "251-136532.trans.txt" and skipped[1:] == paths


def test_librispeech_missing_line_audio_or_text(libri: Path) -> None:
    chapter = libri / "dev-clean" / "174" / "50561"
    trans = chapter / "174-50561.trans.txt"
    trans.write_text(trans.read_text() + "174-50561-0007 NO SUCH AUDIO\n174-50561-0008 ...\n")
    orphan = chapter / "174-50561-0009.flac"
    soundfile.write(orphan, _tone(16000, 0.1), 16000, format="FLAC")
    with pytest.raises(DataError, match="174-50561-0007.flac"):
        read_librispeech(libri, "dev-clean")
    data = read_librispeech(libri, "dev-clean", on_error="skip")
    reasons = {s.path.name: s.reason for s in data.skipped}
    assert set(reasons) == {"174-50561-0007.flac", "174-50561-0008.flac", "174-50561-0009.flac"}
    assert "missing" in reasons["174-50561-0007.flac"]
    assert "empty" in reasons["174-50561-0008.flac"]  # "..." normalises to nothing
    assert "no line" in reasons["174-50561-0009.flac"]
    assert data.num_utterances == 4


def test_reader_argument_errors(libri: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        read_librispeech(libri, "dev-clean", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no-such-split"):
        read_librispeech(libri, "no-such-split")
    with pytest.raises(FileNotFoundError, match="validated.tsv"):
        read_common_voice(libri)


_HEADER = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\n"


@pytest.fixture
def common_voice(tmp_path: Path) -> Path:
    if "MP3" not in soundfile.available_formats():
        raise RuntimeError(
            "libsndfile without MP3 support: soundfile >= 0.12 with libsndfile >= 1.1 is required"
        )
    root = tmp_path / "en"
    (root / "clips").mkdir(parents=True)
    rows = [
        ("c1a2", "common_voice_en_1.mp3", "Hello, World!"),
        ("ffe0", "common_voice_en_2.mp3", "It\u2019s “quoted” \u2014 isn't it?"),
        ("c1a2", "common_voice_en_3.mp3", "Caf\u00e9 au lait; 3 cups."),
    ]
    lines = [_HEADER]
    for client, clip, sentence in rows:
        soundfile.write(root / "clips" / clip, _tone(48000, 0.5), 48000, format="MP3")
        lines.append(f"{client}\t{clip}\tsid\t{sentence}\t\t2\t0\t\n")
    (root / "validated.tsv").write_text("".join(lines), encoding="utf-8")
    return root


def test_common_voice_groups_by_client_and_reads_mp3(common_voice: Path) -> None:
    data = read_common_voice(common_voice)
    assert list(data.users) == ["c1a2", "ffe0"]
    texts = {u.utterance_id: u.transcript for u in data.utterances()}
    assert texts == {
        "common_voice_en_1": "hello world",
        "common_voice_en_3": "cafe au lait cups",
        "common_voice_en_2": "it's quoted isn't it",
    }
    wave = load_audio(data.users["ffe0"][0].audio_path)
    assert abs(wave.numel() - 8000) < 1200  # MP3 adds encoder padding
    peak_hz = int(torch.fft.rfft(wave).abs().argmax()) * 16000 / wave.numel()
    assert abs(peak_hz - 440.0) <= 5.0


def test_common_voice_errors_raise_or_skip(common_voice: Path) -> None:
    index = common_voice / "train.tsv"
    index.write_text(
        _HEADER
        + "c1a2\tcommon_voice_en_1.mp3\ts\tfine\t\t1\t0\t\n"
        + "c1a2\tmissing.mp3\ts\tno clip\t\t1\t0\t\n"
        + "d9\tcommon_voice_en_2.mp3\ts\t\t\t1\t0\t\n"
        + "d9\tbroken.mp3\ts\tcorrupt clip\t\t1\t0\t\n",
        encoding="utf-8",
    )
    (common_voice / "clips" / "broken.mp3").write_bytes(b"ID3" + b"\x00" * 5 + b"junk" * 40)
    with pytest.raises(DataError, match="missing.mp3"):
        read_common_voice(common_voice, tsv="train.tsv")
    data = read_common_voice(common_voice, tsv="train.tsv", on_error="skip")
    assert data.num_utterances == 1 and list(data.users) == ["c1a2"]
    assert [s.path.name for s in data.skipped] == [
        "missing.mp3",
        "common_voice_en_2.mp3",
        "broken.mp3",
    ]


def test_common_voice_missing_column(common_voice: Path) -> None:
    (common_voice / "dev.tsv").write_text("client_id\tpath\nx\ty.mp3\n")
    with pytest.raises(DataError, match=r"dev\.tsv.*sentence"):
        read_common_voice(common_voice, tsv="dev.tsv")
