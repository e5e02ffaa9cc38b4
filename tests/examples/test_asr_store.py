"""The on-disk feature store: equality with in-memory features, validation, resumption, cache
location, and the lazy federated dataset, on real encoded FLAC/MP3 files (see conftest.py)."""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from examples.asr import store as store_module
from examples.asr.data import Utterance, load_audio, read_common_voice, read_librispeech
from examples.asr.features import cached_features, log_mel
from examples.asr.store import (
    StoredBatches,
    StoredFederatedDataset,
    extract_features,
)
from examples.asr.text import CharTokenizer
from examples.asr.train import make_batches


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_store_batches_equal_in_memory_batches(librispeech_root: Path, tmp_path: Path) -> None:
    utts = read_librispeech(librispeech_root, "train-clean-100").utterances()
    store = extract_features(utts, cache_dir=tmp_path / "cache", workers=1)
    assert len(store) == len(utts) and store.skipped == ()
    memory = cached_features(utts, cache_dir=tmp_path / "old")
    tok = CharTokenizer()
    for seed in (None, 3):
        lazy = StoredBatches(store, utts, tok, batch_size=2, seed=seed)
        eager = make_batches([memory[u.utterance_id] for u in utts], [u.transcript for u in utts],
                             tok, batch_size=2, seed=seed)
        assert len(lazy) == len(eager)
        for a, b in zip(lazy, eager, strict=True):
            assert torch.equal(a.features, b.features) and a.texts == b.texts
            assert torch.equal(a.lengths, b.lengths) and torch.equal(a.targets, b.targets)
    reference = log_mel(load_audio(utts[0].audio_path))
    assert store[utts[0].utterance_id].dtype == torch.float32
    assert (store[utts[0].utterance_id] - reference).abs().max() < 5e-3 * (1 + reference.abs().max())


def test_truncated_and_corrupt_files_are_counted_skips(librispeech_root: Path,
                                                       common_voice_root: Path,
                                                       tmp_path: Path) -> None:
    data = read_librispeech(librispeech_root, "train-clean-360", on_error="skip")
    kinds = {(s.path.name, s.kind) for s in data.skipped}
    assert ("301-7.trans.txt", "missing transcript file") in kinds  # the chapter is visible
    assert {"301-7-0000.flac", "301-7-0001.flac"} <= {s.path.name for s in data.skipped}
    store = extract_features(data.utterances(), cache_dir=tmp_path, workers=1, name="fl")
    bad = {s.path.name: s for s in store.skipped}
    assert set(bad) == {"300-1-0001.flac", "300-1-0002.flac"}  # header-valid, body broken
    assert all(s.kind == "corrupt audio" and "decoded" in s.reason for s in bad.values())
    assert "300-1-0000" in store and "300-1-0001" not in store

    cv = read_common_voice(common_voice_root, tsv="train.tsv", on_error="skip")
    cv_store = extract_features(cv.utterances(), cache_dir=tmp_path, workers=1, name="cv")
    skipped = {s.path.name: s.kind for s in (*cv.skipped, *cv_store.skipped)}
    assert skipped == {"truncated.mp3": "truncated audio", "corrupt.mp3": "corrupt audio",
                       "missing.mp3": "missing audio"}
    assert len(cv_store) == 6


def test_truncated_mp3_is_caught_by_its_frame_count(common_voice_root: Path) -> None:
    samples, _, reason = store_module.check_audio(common_voice_root / "clips" / "truncated.mp3")
    assert samples is None and reason is not None and reason.startswith("truncated audio")
    good, rate, ok = store_module.check_audio(common_voice_root / "clips" / "common_voice_en_1000.mp3")
    assert ok is None and good is not None and rate == 48000


def test_audio_too_short_for_its_transcript_is_skipped(librispeech_root: Path,
                                                       tmp_path: Path) -> None:
    utt = read_librispeech(librispeech_root, "dev-clean").utterances()[0]
    wordy = Utterance(utt.user_id, utt.audio_path, "a" * 200, utt.utterance_id)
    store = extract_features([wordy], cache_dir=tmp_path, workers=1)
    assert len(store) == 0 and store.skipped[0].kind == "audio too short for its transcript"


def test_extraction_resumes_after_interruption(librispeech_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHUNK_SIZE", 2)
    utts = read_librispeech(librispeech_root, "train-clean-100").utterances()  # 6: 3 packs
    store = extract_features(utts, cache_dir=tmp_path, workers=1)
    packs = sorted(store.directory.glob("*.f16"))
    assert len(packs) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in packs}
    middle = packs[1].read_bytes()
    packs[1].with_suffix(".json").unlink()  # killed after the data file, before the index
    del store
    again = extract_features(utts, cache_dir=tmp_path, workers=1)
    assert again.directory == packs[0].parent and len(again) == 6
    assert packs[0].stat().st_mtime_ns == stamps[packs[0].name]  # not recomputed
    assert packs[2].stat().st_mtime_ns == stamps[packs[2].name]
    assert packs[1].read_bytes() == middle


@pytest.mark.slow
def test_worker_count_does_not_change_the_stored_bytes(librispeech_root: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHUNK_SIZE", 2)
    utts = read_librispeech(librispeech_root, "train-clean-100").utterances()
    one = extract_features(utts, cache_dir=tmp_path / "one", workers=1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    two = extract_features(utts, cache_dir=tmp_path / "two", workers=2)
    names = sorted(p.name for p in one.directory.iterdir() if p.suffix in (".f16", ".json"))
    assert len(names) == 6
    assert names == sorted(p.name for p in two.directory.iterdir() if p.suffix in (".f16", ".json"))
    for name in names:
        assert (one.directory / name).read_bytes() == (two.directory / name).read_bytes()


def test_default_cache_is_outside_the_dataset(librispeech_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPFL_CACHE", str(tmp_path / "home-cache"))
    before = _files(librispeech_root)
    utts = read_librispeech(librispeech_root, "dev-clean").utterances()
    store = extract_features(utts, workers=1)
    cached_features(utts)
    assert _files(librispeech_root) == before  # nothing written into the dataset
    assert store.directory == tmp_path / "home-cache" / "features" / "packs"
    assert len(list(store.directory.glob("*.json"))) == 1  # cached_features shares the entries


def test_errors_name_the_split_the_id_and_both_files(librispeech_root: Path,
                                                      tmp_path: Path) -> None:
    utts = read_librispeech(librispeech_root, "dev-clean").utterances()
    twin = Utterance("x", utts[1].audio_path, "hello", utts[0].utterance_id)
    with pytest.raises(ValueError, match="dev-clean.*900-5-0000.*900-5-0000.flac.*900-5-0001.flac"):
        extract_features([*utts, twin], cache_dir=tmp_path, workers=1, name="dev-clean")
    with pytest.raises(ValueError, match="900-5-0000.*both.*900-5-0000.flac.*900-5-0001.flac"):
        cached_features([utts[0], twin], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="dev-other.*found 0"):
        extract_features([], cache_dir=tmp_path, name="dev-other")
    with pytest.raises(ValueError, match="workers"):
        extract_features(utts, cache_dir=tmp_path, workers=0)


def test_federated_dataset_reads_one_user_at_a_time(librispeech_root: Path,
                                                    tmp_path: Path) -> None:
    data = read_librispeech(librispeech_root, "train-clean-100")
    store = extract_features(data.utterances(), cache_dir=tmp_path, workers=1)
    dataset = StoredFederatedDataset(store, data.users, CharTokenizer(), batch_size=2, seed=0)
    assert list(dataset.user_ids()) == ["100", "101"]
    batches = dataset.user_data("101")
    texts = [t for b in batches for t in b.texts]
    assert sorted(texts) == sorted(u.transcript for u in data.users["101"])
    assert sum(len(b) for b in batches) == 3 and [len(b) for b in batches] in ([2, 1], [1, 2])
    with pytest.raises(KeyError, match="nobody"):
        dataset.user_data("nobody")


def test_in_run_monitoring_scores_a_seeded_sample_of_the_eval_set(
        librispeech_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.asr import splits as splits_module
    from examples.asr.cli import build_parser, fill_presets

    args = fill_presets(build_parser().parse_args(
        ["--librispeech-root", str(librispeech_root), "--cache-dir", str(tmp_path / "c"),
         "--workers", "1"]))
    args.progress = False
    splits = splits_module.load_splits(args)
    tok = CharTokenizer()
    full = splits_module.prepare_data(splits, args, tok)
    assert full.monitor_batches.num_utterances() == full.eval_utterances == 4  # all, when few
    monkeypatch.setattr(splits_module, "MONITOR_UTTERANCES", 3)
    texts = []
    for _ in range(2):  # the same sample every time (seeded)
        data = splits_module.prepare_data(splits, args, tok)
        texts.append(sorted(t for b in data.monitor_batches for t in b.texts))
    assert texts[0] == texts[1] and len(texts[0]) == 3
    assert set(texts[0]) <= {t for b in data.eval_batches for t in b.texts}
    assert data.eval_batches.num_utterances() == 4  # the final table still scores all


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_one_changed_file_is_the_only_one_extracted_again(
        quick_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21.8: touching one file, adding one transcript line or moving the dataset extracts
    only what changed (the cache grows by one utterance, not by a split), and the entry of a
    changed file is collected once no store is open. Real FLAC files of the --quick corpus."""
    split = tmp_path / "data" / "fl-train"
    shutil.copytree(quick_corpus / "fl-train", split)  # copy2: modification times kept
    decoded: list[str] = []
    real_check = store_module.check_audio

    def counting(path: str | os.PathLike[str]) -> Any:
        decoded.append(Path(path).name)
        return real_check(path)

    monkeypatch.setattr(store_module, "check_audio", counting)
    cache = tmp_path / "cache"

    def extract(root: Path) -> tuple[Any, list[str]]:
        decoded.clear()
        gc.collect()  # no store of the cache left open: collection may run
        utts = read_librispeech(root, verify_audio=False).utterances()
        return extract_features(utts, cache_dir=cache, workers=1, name="fl-train"), list(decoded)

    store, first = extract(split)
    assert len(first) == len(store) == 480
    full = _size(cache)
    target = sorted(split.rglob("*.flac"))[100]
    utt = target.stem
    features = store[utt]
    one_utterance = features.numel() * 2
    del store

    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # touch
    store, again = extract(split)
    assert again == [target.name]  # only the touched file, not its split
    assert torch.equal(store[utt], features) and len(store) == 480
    assert _size(cache) - full < one_utterance + 4096  # one utterance more, not a split
    del store

    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    store, again = extract(split)
    assert again == [target.name]
    assert _size(cache) - full < one_utterance + 4096  # the previous copy was collected
    del store

    chapter = target.parent  # one new utterance and its transcript line
    trans = next(chapter.glob("*.trans.txt"))
    shutil.copy(target, chapter / f"{utt}9.flac")
    trans.write_text(trans.read_text() + f"{utt}9 A NEW LINE\n")
    store, again = extract(split)
    assert again == [f"{utt}9.flac"] and len(store) == 481
    del store

    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "data", moved)
    store, again = extract(moved / "fl-train")
    assert again == [] and len(store) == 481  # a moved dataset reuses its features
    assert torch.equal(store[utt], features)


def test_mostly_dead_packs_are_compacted_and_open_stores_are_never_collected(
        librispeech_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21.8: a pack whose files mostly changed is rewritten with its live entries (no
    re-extraction), a removed file's entry is dropped, and nothing is collected while a store
    of the cache is open (it may be reading those packs)."""
    monkeypatch.setattr(store_module, "CHUNK_SIZE", 4)
    split = librispeech_root / "train-clean-100"
    utts = read_librispeech(split).utterances()  # 6 files: packs of 4 and 2
    store = extract_features(utts, cache_dir=tmp_path, workers=1)
    packs = store.directory
    before = {p.name for p in packs.glob("*.json")}
    for u in utts[:3]:  # 3 of the first pack's 4 files change
        os.utime(u.audio_path, ns=(0, u.audio_path.stat().st_mtime_ns + 10**9))
    held = extract_features(utts, cache_dir=tmp_path, workers=1)  # `store` is still open
    assert before <= {p.name for p in packs.glob("*.json")}  # nothing collected
    live = {u.utterance_id: held[u.utterance_id] for u in utts}
    del store, held
    gc.collect()
    again = extract_features(utts, cache_dir=tmp_path, workers=1)
    remaining = {p.name for p in packs.glob("*.json")}
    assert len(before & remaining) == 1  # the first pack was rewritten, the second kept
    assert all(torch.equal(again[u.utterance_id], live[u.utterance_id]) for u in utts)
    assert _size(packs) == sum(f.numel() * 2 for f in live.values()) + sum(
        p.stat().st_size for p in packs.glob("*.json")) + (packs / ".lock").stat().st_size
    del again
    gc.collect()
    utts[5].audio_path.unlink()  # a removed file: its entry goes at the next listing
    rest = read_librispeech(split, on_error="skip").utterances()
    store = extract_features(rest, cache_dir=tmp_path, workers=1)
    assert len(store) == 5
    assert _size(packs) == sum(store[u.utterance_id].numel() * 2 for u in rest) + sum(
        p.stat().st_size for p in packs.glob("*.json")) + (packs / ".lock").stat().st_size
