"""Log-mel features, SpecAugment and the feature cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.asr.data import DataError, Utterance, load_audio
from examples.asr.features import (
    HOP_LENGTH,
    N_MELS,
    SpecAugment,
    SpecAugmentConfig,
    cached_features,
    log_mel,
)


def _speechlike(num_samples: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16000
    chirp = torch.sin(2 * math.pi * (200 + 1500 * t) * t)
    return 0.2 * chirp * torch.rand(1, generator=gen) + 0.05 * torch.randn(
        num_samples, generator=gen
    )


@given(num_samples=st.integers(min_value=800, max_value=48000), seed=st.integers(0, 2**16))
def test_log_mel_shape_and_per_utterance_normalisation(num_samples: int, seed: int) -> None:
    feats = log_mel(_speechlike(num_samples, seed))
    assert feats.shape == (1 + num_samples // HOP_LENGTH, N_MELS)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert feats.mean(dim=0).abs().max() < 1e-4
    assert (feats.std(dim=0, unbiased=False) - 1).abs().max() < 1e-3


def test_log_mel_frame_rate_and_scale_invariance() -> None:
    one_second = log_mel(_speechlike(16000, 0))
    assert one_second.shape[0] == 101  # 10 ms hop
    # per-utterance normalisation removes a constant gain (log of a scaled power spectrum)
    assert (log_mel(3.0 * _speechlike(16000, 0)) - one_second).abs().max() < 1e-3


def test_log_mel_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="waveform"):
        log_mel(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="waveform"):
        log_mel(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        log_mel(torch.tensor([0.0, float("nan")] * 200))


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of True in a 1-D bool tensor."""
    runs, current = [], 0
    for value in mask.tolist() + [False]:
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@given(
    frames=st.integers(1, 400),
    freq_masks=st.integers(0, 3),
    max_freq_width=st.integers(0, 40),
    time_masks=st.integers(0, 12),
    max_time_width=st.integers(0, 60),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_spec_augment_masks_stay_within_configured_widths(
    frames: int,
    freq_masks: int,
    max_freq_width: int,
    time_masks: int,
    max_time_width: int,
    ratio: float,
    seed: int,
) -> None:
    config = SpecAugmentConfig(
        freq_masks=freq_masks,
        max_freq_width=max_freq_width,
        time_masks=time_masks,
        max_time_width=max_time_width,
        max_time_ratio=ratio,
        mask_value=-7.0,
    )
    feats = torch.rand(frames, N_MELS) + 1.0
    before = feats.clone()
    out = SpecAugment(config)(feats, torch.Generator().manual_seed(seed))
    assert torch.equal(feats, before)  # input untouched
    masked = out == -7.0
    assert torch.equal(out[~masked], feats[~masked])
    rows, cols = masked.all(dim=1), masked.all(dim=0)
    # every masked cell lies in a fully masked row (time mask) or column (frequency mask)
    assert torch.equal(masked, rows[:, None] | cols[None, :])
    time_cap = min(max_time_width, math.floor(ratio * frames))
    if frames > 0 and not rows.all():
        assert int(cols.sum()) <= freq_masks * min(max_freq_width, N_MELS)
    if not cols.all():
        assert int(rows.sum()) <= time_masks * time_cap
        if time_masks == 1:
            assert all(r <= time_cap for r in _runs(rows))
    if freq_masks == 1 and not rows.all():
        assert all(r <= max_freq_width for r in _runs(cols))


def test_spec_augment_paper_widths_and_determinism() -> None:
    aug = SpecAugment()  # paper: 2 x (< 30 bins), 10 x (<= min(50, 0.1 T) frames)
    feats = torch.randn(1000, N_MELS)
    widths_f, widths_t = [], []
    for seed in range(40):
        out = aug(feats, torch.Generator().manual_seed(seed))
        again = aug(feats, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
        masked = out == 0
        widths_f += _runs(masked.all(dim=0))
        widths_t.append(int(masked.all(dim=1).sum()))
    assert max(widths_f) <= 2 * 29 and max(widths_t) <= 10 * 50
    assert max(widths_f) > 15 and max(widths_t) > 150  # masks are actually drawn wide
    outs = {aug(feats, torch.Generator().manual_seed(s)).sum().item() for s in range(5)}
    assert len(outs) == 5


def test_spec_augment_config_validation() -> None:
    with pytest.raises(ValueError, match="freq_masks"):
        SpecAugmentConfig(freq_masks=-1)
    with pytest.raises(ValueError, match="max_time_ratio"):
        SpecAugmentConfig(max_time_ratio=1.5)
    with pytest.raises(TypeError, match="generator"):
        SpecAugment()(torch.zeros(10, N_MELS), 0)  # type: ignore[arg-type]
    small = SpecAugmentConfig.small()
    assert small.max_freq_width < SpecAugmentConfig().max_freq_width
    assert small.time_masks < SpecAugmentConfig().time_masks


def _utterances(folder: Path, count: int) -> list[Utterance]:
    folder.mkdir(parents=True, exist_ok=True)
    utts = []
    for i in range(count):
        path = folder / f"u{i}.flac"
        wave = _speechlike(8000 + 1600 * i, i).numpy().astype(np.float32)
        soundfile.write(path, wave, 16000, format="FLAC")
        utts.append(Utterance("user", path, "some words", f"u{i}"))
    return utts


def test_cached_features_compute_once_then_load(tmp_path: Path) -> None:
    utts = _utterances(tmp_path / "audio", 3)
    cache = tmp_path / "cache"
    first = cached_features(utts, cache_dir=cache)
    packs = cache / "features" / "packs"
    files = sorted(packs.glob("*.f16"))
    assert len(files) == 1 and list(first) == ["u0", "u1", "u2"]
    stamp = files[0].stat().st_mtime_ns
    second = cached_features(utts, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == stamp  # loaded, not rewritten
    for key, feats in first.items():
        assert torch.equal(second[key], feats)
        reference = log_mel(load_audio(utts[int(key[1:])].audio_path))
        assert (feats - reference).abs().max() < 5e-3 * (1 + reference.abs().max())  # float16
    assert files[0].stat().st_size == sum(f.shape[0] for f in first.values()) * N_MELS * 2
    # editing an audio file extracts that file again, and only that file
    soundfile.write(utts[1].audio_path, _speechlike(4000, 9).numpy(), 16000, format="FLAC")
    third = cached_features(utts, cache_dir=cache)
    assert third["u1"].shape[0] == 1 + 4000 // HOP_LENGTH
    assert torch.equal(third["u0"], first["u0"]) and files[0].stat().st_mtime_ns == stamp
    new = set(packs.glob("*.f16")) - set(files)
    assert len(new) == 1 and next(iter(new)).stat().st_size == third["u1"].numel() * 2


def test_cached_features_default_location_is_the_user_cache_not_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    utts = _utterances(tmp_path / "corpus" / "split", 2)
    monkeypatch.setenv("DPFL_CACHE", str(tmp_path / "cache"))
    feats = cached_features(utts, dtype=torch.float16)
    assert feats["u0"].dtype == torch.float16
    assert sorted(p.name for p in (tmp_path / "corpus").rglob("*")) == [
        "split", "u0.flac", "u1.flac"]  # datasets are often read-only: nothing written there
    assert len(list((tmp_path / "cache" / "features" / "packs").glob("*.json"))) == 1


def test_cached_features_names_an_unreadable_file(tmp_path: Path) -> None:
    utts = _utterances(tmp_path / "audio", 2)
    utts[1].audio_path.write_bytes(b"not audio")
    with pytest.raises(DataError, match="u1.flac"):
        cached_features(utts, cache_dir=tmp_path / "cache")


def test_cached_features_rejects_duplicates_and_empty(tmp_path: Path) -> None:
    utts = _utterances(tmp_path, 1)
    with pytest.raises(ValueError, match="distinct"):
        cached_features(utts * 2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        cached_features([], cache_dir=tmp_path)
