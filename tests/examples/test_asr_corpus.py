"""The embedded espeak-ng corpus: determinism, disjoint splits, cache reuse, reader round trip."""

from __future__ import annotations

import os
import random
import string
import time
from pathlib import Path

import pytest
import soundfile
from hypothesis import given
from hypothesis import strategies as st

from examples.asr.corpus import (
    SPLITS,
    CorpusConfig,
    EspeakSynthesizer,
    corpus_dir,
    ensure_corpus,
    load_manifest,
    plan_speakers,
)
from examples.asr.data import load_audio, read_librispeech
from examples.asr.sentences import (
    MAX_WORDS,
    MIN_WORDS,
    VOCABULARY,
    generate_sentence,
    generate_sentences,
)

TINY = CorpusConfig(
    seed=3,
    seed_train_speakers=2,
    seed_dev_speakers=1,
    fl_train_speakers=3,
    eval_speakers=2,
    seed_train_utterances=2,
    dev_utterances=1,
    fl_train_utterances=2,
    shards=2,
    seed_target_speakers=1,
)
_ALPHABET = set(" '-" + string.ascii_lowercase)


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny config generated twice, with different worker counts."""
    first = ensure_corpus(TINY, cache_dir=tmp_path_factory.mktemp("cache-a"), workers=2)
    second = ensure_corpus(TINY, cache_dir=tmp_path_factory.mktemp("cache-b"), workers=1)
    return first, second


def test_generation_is_deterministic(two_corpora: tuple[Path, Path]) -> None:
    first, second = two_corpora
    assert first.name == second.name == f"corpus-{TINY.fingerprint()}"
    for split in SPLITS:
        a, b = read_librispeech(first, split), read_librispeech(second, split)
        assert list(a.users) == list(b.users)
        for ua, ub in zip(a.utterances(), b.utterances(), strict=True):
            assert (ua.utterance_id, ua.transcript) == (ub.utterance_id, ub.transcript)
            assert load_audio(ua.audio_path).equal(load_audio(ub.audio_path))


def test_reader_reads_the_corpus_back(two_corpora: tuple[Path, Path]) -> None:
    root = two_corpora[0]
    manifest = load_manifest(root)
    assert manifest["fingerprint"] == TINY.fingerprint()
    users: dict[str, set[str]] = {}
    for split in SPLITS:
        data = read_librispeech(root, split)
        assert data.skipped == ()
        assert data.num_users == TINY.speakers_per_split()[split]
        users[split] = set(data.users)
        for utts in data.users.values():
            assert len(utts) == TINY.utterances_per_split()[split]
            for u in utts:
                words = u.transcript.split()
                assert MIN_WORDS <= len(words) <= MAX_WORDS
                assert set(words) <= set(VOCABULARY)
                info = soundfile.info(str(u.audio_path))
                assert info.samplerate == 16000 and info.format == "FLAC"
                assert 0.3 < info.duration < 8.0
    # disjoint speaker sets across splits, matching the manifest
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not users[a] & users[b]
    by_split = {
        s: {str(sp["speaker_id"]) for sp in manifest["speakers"] if sp["split"] == s}
        for s in SPLITS
    }
    assert by_split == users


def test_cache_is_reused_not_regenerated(two_corpora: tuple[Path, Path]) -> None:
    root = two_corpora[0]
    flac = next(root.glob("fl-train/*/*/*.flac"))
    stamps = (
        (root / "corpus.json").stat().st_mtime_ns,
        flac.stat().st_mtime_ns,
        flac.stat().st_ino,
    )
    assert ensure_corpus(TINY, cache_dir=root.parent) == root
    after = ((root / "corpus.json").stat().st_mtime_ns, flac.stat().st_mtime_ns, flac.stat().st_ino)
    assert after == stamps
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary leftovers


def test_incomplete_corpus_is_never_reused(tmp_path: Path) -> None:
    config = CorpusConfig(
        seed=11,
        seed_train_speakers=1,
        seed_dev_speakers=1,
        fl_train_speakers=1,
        eval_speakers=1,
        seed_train_utterances=1,
        dev_utterances=1,
        fl_train_utterances=1,
        shards=1,
        seed_target_speakers=0,
    )
    half = corpus_dir(config, tmp_path)
    (half / "seed-train").mkdir(parents=True)  # what an interrupted run might leave
    (half / "seed-train" / "junk.flac").write_bytes(b"partial")
    killed = tmp_path / f".{half.name}.tmp-killed"  # left by a generation killed long ago
    running = tmp_path / f".{half.name}.tmp-running"  # maybe another process, right now
    for folder in (killed, running):
        (folder / "fl-train").mkdir(parents=True)
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    root = ensure_corpus(config, cache_dir=tmp_path, workers=1)
    assert root == half and (root / "corpus.json").is_file()
    assert not killed.exists() and running.exists()
    assert not (root / "seed-train" / "junk.flac").exists()
    assert sum(read_librispeech(root, s).num_utterances for s in SPLITS) == 4


def test_plan_speakers_default_population_and_domain_shift() -> None:
    config = CorpusConfig()
    speakers = plan_speakers(config)
    assert speakers == plan_speakers(CorpusConfig())
    counts = {s: sum(sp.split == s for sp in speakers) for s in SPLITS}
    assert counts["fl-train"] >= 400 and counts == config.speakers_per_split()
    assert len({sp.speaker_id for sp in speakers}) == len(speakers)
    voices = {(sp.variant, sp.rate, sp.pitch, sp.pitch_range) for sp in speakers}
    assert len(voices) == len(speakers)  # every speaker sounds different
    target_variants = {sp.variant for sp in speakers if sp.split in ("fl-train", "eval")}
    # seed-train: the first seed_target_speakers come from the target domain (the reference
    # code's 10/90 slice), the rest and every seed-dev speaker from the seed domain
    seed_train = [sp for sp in speakers if sp.split == "seed-train"]
    slice_ = seed_train[: config.seed_target_speakers]
    assert config.seed_target_speakers == 24
    assert all(sp.variant in target_variants and sp.snr_db > 0 for sp in slice_)
    seed_variants = {sp.variant for sp in speakers
                     if sp.split == "seed-dev" or sp in seed_train[config.seed_target_speakers:]}
    assert not seed_variants & target_variants
    assert all(sp.snr_db == 0 for sp in speakers if sp.variant in seed_variants)
    assert all(sp.snr_db > 0 for sp in speakers if sp.split in ("fl-train", "eval"))
    assert plan_speakers(CorpusConfig(seed=1)) != speakers
    assert CorpusConfig(seed=1).fingerprint() != config.fingerprint()
    assert CorpusConfig.quick().fingerprint() != config.fingerprint()


def test_config_and_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fl_train_speakers"):
        CorpusConfig(fl_train_speakers=0)
    with pytest.raises(TypeError, match="seed"):
        CorpusConfig(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed_target_speakers"):
        CorpusConfig(seed_train_speakers=10, seed_target_speakers=11)
    with pytest.raises(ValueError, match="workers"):
        ensure_corpus(TINY, cache_dir=tmp_path, workers=0)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="nosuchvoice"):
        EspeakSynthesizer().synthesize(
            "hello", variant="nosuchvoice", rate=170, pitch=50, pitch_range=50
        )


@given(seed=st.one_of(st.integers(), st.text(max_size=20)), count=st.integers(0, 30))
def test_sentences_are_short_in_vocabulary_and_deterministic(seed: int | str, count: int) -> None:
    sentences = generate_sentences(count, seed=seed)
    assert sentences == generate_sentences(count, seed=seed)
    assert len(sentences) == count
    for s in sentences:
        words = s.split(" ")
        assert MIN_WORDS <= len(words) <= MAX_WORDS
        assert set(words) <= set(VOCABULARY)
        assert set(s) <= _ALPHABET


def test_grammar_has_a_modest_vocabulary_and_variety() -> None:
    assert 200 <= len(VOCABULARY) <= 600
    sentences = [generate_sentence(random.Random(i)) for i in range(500)]
    assert len(set(sentences)) > 490
    used = {w for s in sentences for w in s.split()}
    assert len(used) > 0.6 * len(VOCABULARY)
    with pytest.raises(ValueError, match="count"):
        generate_sentences(-1, seed=0)
