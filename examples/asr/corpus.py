"""The embedded default ASR corpus: espeak-ng speech, written in LibriSpeech layout, cached.

No dataset can be downloaded here, so the ASR example ships a corpus generator. Sentences come
from :mod:`examples.asr.sentences`; espeak-ng (through ``espeakng_loader`` and ``ctypes``) speaks
them with many distinct "speakers" (voice variant x rate x pitch x pitch range, plus a recording
channel). The result is written as 16 kHz FLAC with ``<speaker>-<chapter>.trans.txt`` transcripts
in the standard LibriSpeech layout, so :func:`examples.asr.data.read_librispeech` reads it.

API:
    ``CorpusConfig`` (frozen; ``CorpusConfig()`` is the default corpus with 670 speakers,
    ``CorpusConfig.quick()`` a small one for ``--quick`` runs and tests).
    ``ensure_corpus(config=None, *, cache_dir=None, workers=2, progress=False) -> Path``: the corpus root,
    generated on first use and reused afterwards; pass it with a split name to
    ``read_librispeech(root, split)``.
    ``SPLITS``: ``("seed-train", "seed-dev", "fl-train", "eval")``, disjoint speaker sets.
    ``plan_speakers(config) -> list[Speaker]`` and ``load_manifest(root) -> dict``.

Domain shift (mirroring the paper's LibriSpeech seed model fine-tuned on Common Voice): seed
speakers (``seed-train``, ``seed-dev``) use voice variants m1-m4/f1-f2 at moderate rates over a
clean channel; federated (``fl-train``) and evaluation (``eval``) speakers use other variants,
a wider range of rates, and a per-speaker channel (low-pass filter at 5-7.5 kHz, gain and white
noise at 30-40 dB SNR), so a seed model transfers imperfectly and federated fine-tuning can
visibly lower the WER on ``eval``.

Cache: ``$DPFL_CACHE`` or ``~/.cache/dpfl``, directory ``corpus-<hash of config>``. Generation
writes into a temporary sibling directory and renames it into place only when complete (the
manifest ``corpus.json`` is its last file), so an interrupted generation is never reused.

Determinism: the corpus is a function of the config alone. espeak-ng seeds its noise generator
(breathy voices) from the clock, so every utterance reseeds it; and its output depends on what a
process synthesized before, so each of ``config.shards`` fixed shards runs in a fresh process;
``workers`` only changes how many run at once, never the audio.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, sections 4-5.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, fields
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

from examples.asr.sentences import generate_sentences

__all__ = [
    "CORPUS_FORMAT",
    "SPLITS",
    "CorpusConfig",
    "EspeakSynthesizer",
    "Speaker",
    "corpus_dir",
    "default_cache_dir",
    "ensure_corpus",
    "load_manifest",
    "plan_speakers",
    "target_slice",
]

CORPUS_FORMAT = 6
"""Bumped whenever the generator's output changes, so old caches are not reused."""
SPLITS = ("seed-train", "seed-dev", "fl-train", "eval")
"""Split directories of the corpus; their speaker sets are disjoint."""
SAMPLE_RATE = 16_000
MANIFEST = "corpus.json"
CHAPTER = 1

_SEED_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2")
_TARGET_VARIANTS = ("m5", "m6", "m7", "m8", "f3", "f4", "f5")


@dataclass(frozen=True)
class CorpusConfig:
    """What to generate. Every field enters the cache key.

    Attributes:
        seed: master seed of speakers, sentences and channel noise.
        seed_train_speakers / seed_dev_speakers / fl_train_speakers / eval_speakers: speakers per
            split (``fl_train_speakers`` are the federated users).
        seed_train_utterances / dev_utterances / fl_train_utterances: utterances per speaker in
            ``seed-train``, in ``seed-dev`` and ``eval``, and in ``fl-train``.
        domain_shift: seed and FL/eval speakers come from different voice/channel domains
            (see the module docstring); ``False`` draws every split from one domain.
        shards: number of fresh-process synthesis shards (part of the output's definition).
        seed_target_speakers: how many of the ``seed_train_speakers`` are drawn from the
            federated (target) domain instead of the seed domain (the reference code's 10/90
            configurations put a slice of target-domain speakers into the seed set). They are
            distinct speakers from every ``fl-train`` user and ``eval`` speaker.
    """

    seed: int = 0
    seed_train_speakers: int = 200
    seed_dev_speakers: int = 20
    fl_train_speakers: int = 400
    eval_speakers: int = 50
    seed_train_utterances: int = 24
    dev_utterances: int = 8
    fl_train_utterances: int = 8
    domain_shift: bool = True
    shards: int = 4
    seed_target_speakers: int = 24

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "domain_shift":
                if not isinstance(value, bool):
                    raise TypeError(f"domain_shift must be a bool, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{f.name} must be an integer, got {type(value).__name__} {value!r}")
            minimum = 0 if f.name in ("seed", "seed_target_speakers") else 1
            if value < minimum:
                raise ValueError(f"{f.name} must be >= {minimum}, got {value}")
        if self.seed_target_speakers > self.seed_train_speakers:
            raise ValueError(f"seed_target_speakers ({self.seed_target_speakers}) must be <= "
                             f"seed_train_speakers ({self.seed_train_speakers})")

    @classmethod
    def quick(cls, *, seed: int = 0) -> CorpusConfig:
        """A small corpus (124 speakers, about 1,400 utterances) for ``--quick`` runs."""
        return cls(
            seed=seed, seed_train_speakers=40, seed_dev_speakers=8, fl_train_speakers=60,
            eval_speakers=16, seed_train_utterances=20, dev_utterances=5, fl_train_utterances=8,
            shards=2, seed_target_speakers=4,
        )

    def speakers_per_split(self) -> dict[str, int]:
        """Number of speakers in each of :data:`SPLITS`."""
        return dict(zip(SPLITS, (self.seed_train_speakers, self.seed_dev_speakers,
                                 self.fl_train_speakers, self.eval_speakers), strict=True))

    def utterances_per_split(self) -> dict[str, int]:
        """Utterances per speaker in each of :data:`SPLITS`."""
        return dict(zip(SPLITS, (self.seed_train_utterances, self.dev_utterances,
                                 self.fl_train_utterances, self.dev_utterances), strict=True))

    def fingerprint(self) -> str:
        """Short hash of the config and :data:`CORPUS_FORMAT` (the cache key)."""
        blob = json.dumps({"format": CORPUS_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice plus a recording channel.

    Attributes:
        speaker_id: LibriSpeech-style integer id, unique across all splits.
        split: one of :data:`SPLITS`.
        variant: espeak-ng voice variant (``"en+<variant>"``).
        rate: words per minute. pitch / pitch_range: espeak-ng pitch parameters (0-100).
        gain_db: output gain. lowpass_hz: low-pass cut-off, 0 for none.
        snr_db: white-noise signal-to-noise ratio, 0 for no noise.
    """

    speaker_id: int
    split: str
    variant: str
    rate: int
    pitch: int
    pitch_range: int
    gain_db: float
    lowpass_hz: float
    snr_db: float


def _draw_speaker(rng: random.Random, speaker_id: int, split: str, target: bool) -> Speaker:
    if target:
        return Speaker(
            speaker_id, split, rng.choice(_TARGET_VARIANTS), rng.randint(140, 205),
            rng.randint(25, 75), rng.randint(25, 80), round(rng.uniform(-6.0, 0.0), 2),
            float(rng.randrange(5000, 7501, 100)), float(rng.randint(30, 40)),
        )
    return Speaker(
        speaker_id, split, rng.choice(_SEED_VARIANTS), rng.randint(150, 185),
        rng.randint(35, 65), rng.randint(35, 70), 0.0, 0.0, 0.0,
    )


def plan_speakers(config: CorpusConfig) -> list[Speaker]:
    """The config's speakers, split by split; deterministic in ``config``.

    Ids start at 100 and increase; no two speakers share (variant, rate, pitch, pitch range).
    """
    rng = random.Random(f"dpfl-corpus/{config.seed}/speakers")
    speakers: list[Speaker] = []
    seen: set[tuple[str, int, int, int]] = set()
    next_id = 100
    for split, count in config.speakers_per_split().items():
        target = config.domain_shift and split in ("fl-train", "eval")
        if not config.domain_shift:
            target = rng.random() < 0.5
        for index in range(count):
            if split == "seed-train" and config.domain_shift:
                target = index < config.seed_target_speakers
            while True:
                speaker = _draw_speaker(rng, next_id, split, target)
                key = (speaker.variant, speaker.rate, speaker.pitch, speaker.pitch_range)
                if key not in seen:
                    break
            seen.add(key)
            speakers.append(speaker)
            next_id += 1
    return speakers


def target_slice(config: CorpusConfig) -> frozenset[str]:
    """Speaker ids (as strings, like the readers' user ids) of the ``seed-train`` speakers drawn
    from the target domain (:attr:`CorpusConfig.seed_target_speakers`; empty without a domain
    shift)."""
    if not config.domain_shift:
        return frozenset()
    seed_train = [sp for sp in plan_speakers(config) if sp.split == "seed-train"]
    return frozenset(str(sp.speaker_id) for sp in seed_train[: config.seed_target_speakers])


def default_cache_dir() -> Path:
    """``$DPFL_CACHE`` if set, else ``~/.cache/dpfl``."""
    env = os.environ.get("DPFL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dpfl"


def corpus_dir(config: CorpusConfig, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``config``'s corpus lives (whether or not it exists yet)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"corpus-{config.fingerprint()}"


def load_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``corpus.json`` (format, fingerprint, config, speakers) from a generated corpus.

    Raises:
        FileNotFoundError: if ``root`` is not a complete generated corpus.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a complete generated corpus")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def ensure_corpus(
    config: CorpusConfig | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    progress: bool = False,
) -> Path:
    """Return the root of ``config``'s corpus, generating it on first use.

    Args:
        config: what to generate; default ``CorpusConfig()`` (670 speakers, 8,560 utterances).
        cache_dir: parent directory of the corpus; default :func:`default_cache_dir`.
        workers: synthesis processes run at once (does not change the output). They are
            started with the ``spawn`` method, so a script calling this must guard its entry
            point with ``if __name__ == "__main__":``.
        progress: show a progress bar (utterances written) while generating.

    Returns:
        The corpus root, holding one LibriSpeech-style directory per split in :data:`SPLITS`
        and the manifest ``corpus.json``.

    Raises:
        TypeError / ValueError: on a bad ``config`` or ``workers``.
        RuntimeError: if espeak-ng fails; nothing half-written is left in place.

    Examples:
        >>> root = ensure_corpus(CorpusConfig.quick())  # doctest: +SKIP
        >>> users = read_librispeech(root, "fl-train").users  # doctest: +SKIP
    """
    config = CorpusConfig() if config is None else config
    if not isinstance(config, CorpusConfig):
        raise TypeError(f"config must be a CorpusConfig, got {type(config).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    final = corpus_dir(config, cache_dir)
    if (final / MANIFEST).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _generate(config, tmp, workers, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # a stale incomplete dir: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_temporaries(final: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary directories of killed generations of this corpus (older than an hour:
    a generation takes minutes, so a younger one may still be running in another process)."""
    now = time.time()
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _generate(config: CorpusConfig, out: Path, workers: int, *, progress: bool = False) -> None:
    speakers = plan_speakers(config)
    per_split = config.utterances_per_split()
    tasks: list[tuple[int, str, list[dict[str, Any]]]] = [
        (config.seed, str(out), []) for _ in range(config.shards)
    ]
    for i, speaker in enumerate(speakers):
        tasks[i % config.shards][2].append({**asdict(speaker), "count": per_split[speaker.split]})
    out.mkdir(parents=True)
    for split in SPLITS:
        (out / split).mkdir()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=min(workers, config.shards), maxtasksperchild=1) as pool:
        pending = pool.map_async(_generate_shard, tasks, chunksize=1)
        if progress:
            _show_progress(pending, out, sum(per_split[s.split] for s in speakers))
        pending.get()
    manifest = {
        "format": CORPUS_FORMAT,
        "fingerprint": config.fingerprint(),
        "config": asdict(config),
        "sample_rate": SAMPLE_RATE,
        "speakers": [asdict(s) for s in speakers],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _show_progress(pending: Any, out: Path, total: int) -> None:
    """Count the FLAC files written under ``out`` until ``pending`` is ready."""
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="utt", desc="synthesizing corpus (espeak-ng)",
              dynamic_ncols=True) as bar:
        while not pending.ready():
            pending.wait(2.0)
            done = sum(1 for _ in out.glob("*/*/*/*.flac"))
            bar.update(done - bar.n)


def _generate_shard(task: tuple[int, str, list[dict[str, Any]]]) -> int:
    """Synthesize one shard's speakers into ``out`` (runs in a fresh spawned process)."""
    import soundfile

    seed, out, speakers = task
    synth = EspeakSynthesizer()
    written = 0
    for spec in speakers:
        count = spec.pop("count")
        speaker = Speaker(**spec)
        folder = Path(out) / speaker.split / str(speaker.speaker_id) / str(CHAPTER)
        folder.mkdir(parents=True)
        sentences = generate_sentences(count, seed=f"dpfl-corpus/{seed}/{speaker.speaker_id}")
        lines = []
        for index, text in enumerate(sentences):
            samples = synth.synthesize(
                text, variant=speaker.variant, rate=speaker.rate, pitch=speaker.pitch,
                pitch_range=speaker.pitch_range,
                seed=seed * 1_000_003 + speaker.speaker_id * 1009 + index,
            )
            audio = _resample(samples.astype(np.float64) / 32768.0, synth.sample_rate,
                              lowpass_hz=speaker.lowpass_hz)
            audio *= 10.0 ** (speaker.gain_db / 20.0)
            if speaker.snr_db:
                noise_rng = np.random.default_rng([seed, speaker.speaker_id, index])
                power = float(np.mean(audio**2)) / 10.0 ** (speaker.snr_db / 10.0)
                noise = noise_rng.standard_normal(audio.shape[0], dtype=np.float32)
                audio += np.sqrt(power) * noise
            utt = f"{speaker.speaker_id}-{CHAPTER}-{index:04d}"
            buffer = io.BytesIO()  # encode in memory: one file write instead of many small ones
            soundfile.write(buffer, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC",
                            subtype="PCM_16")
            (folder / f"{utt}.flac").write_bytes(buffer.getvalue())
            lines.append(f"{utt} {text.upper()}\n")
            written += 1
        (folder / f"{speaker.speaker_id}-{CHAPTER}.trans.txt").write_text("".join(lines))
    return written


def _resample(audio: np.ndarray, rate: int, *, lowpass_hz: float) -> np.ndarray:
    """Band-limited resampling of ``audio`` from ``rate`` to 16 kHz in the frequency domain.

    One real FFT: keep the bins below 8 kHz (with a short cosine taper from 7.2 kHz), optionally
    weight them with a 4th-order Butterworth magnitude response at ``lowpass_hz`` (zero phase),
    and invert at the new length. Pure numpy, so synthesis workers need not import scipy.signal
    (several seconds per fresh process on a loaded machine).
    """
    g = gcd(SAMPLE_RATE, rate)
    up, down = SAMPLE_RATE // g, rate // g
    n = -(-audio.shape[0] // down) * down  # zero-pad to a whole number of resampling periods
    m = n // down * up
    spectrum = np.fft.rfft(audio, n)[: m // 2 + 1]
    freqs = np.arange(spectrum.shape[0]) * (SAMPLE_RATE / m)
    taper_from = 0.45 * SAMPLE_RATE
    gain = np.where(freqs <= taper_from, 1.0,
                    0.5 + 0.5 * np.cos(np.pi * (freqs - taper_from) / (SAMPLE_RATE / 2 - taper_from)))
    if lowpass_hz:
        gain = gain / np.sqrt(1.0 + (freqs / lowpass_hz) ** 8)
    out = np.fft.irfft(spectrum * gain, m) * (m / n)
    return out[: round(audio.shape[0] * up / down)]


# ---------------------------------------------------------------------------------------------
# espeak-ng through ctypes

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_AUTO = 0
_PARAMETERS = {"rate": 1, "pitch": 3, "pitch_range": 4}
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class EspeakSynthesizer:
    """The process's espeak-ng synthesizer (22,050 Hz ``int16``); construct one per process.

    espeak-ng is a process-global library whose output depends on the calls made before; use a
    fresh process wherever bit-identical output matters (as :func:`ensure_corpus` does).

    Raises:
        RuntimeError: if the library cannot be initialised.
    """

    def __init__(self) -> None:
        import espeakng_loader

        self._data = Path(espeakng_loader.get_data_path())
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self._data).encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed for data path {self._data}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference while C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib

    def _collect(self, wav: Any, num_samples: int, events: Any) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def synthesize(
        self, text: str, *, variant: str, rate: int, pitch: int, pitch_range: int, seed: int = 0
    ) -> np.ndarray:
        """Speak ``text`` with voice ``en+<variant>`` and return ``int16`` samples.

        Args:
            text: the sentence.
            variant: an installed variant (a file in espeak-ng's ``voices/!v``), e.g. ``"m3"``.
            rate: words per minute (80-450). pitch, pitch_range: 0-100.
            seed: seeds espeak-ng's own noise generator (breathy voices such as f2, f3, f5
                draw from it; espeak-ng otherwise seeds it from the clock).

        Raises:
            ValueError: if ``variant`` is not installed.
            RuntimeError: if espeak-ng fails or returns no audio.
        """
        if not (self._data / "voices" / "!v" / variant).is_file():
            raise ValueError(f"variant {variant!r} is not an installed espeak-ng voice variant")
        if self._lib.espeak_SetVoiceByName(f"en+{variant}".encode()) != 0:
            raise RuntimeError(f"espeak_SetVoiceByName failed for en+{variant}")
        for name, value in (("rate", rate), ("pitch", pitch), ("pitch_range", pitch_range)):
            self._lib.espeak_SetParameter(_PARAMETERS[name], int(value), 0)
        self._lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
        self._chunks = []
        encoded = text.encode("utf-8")
        status = self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0,
                                        _CHARS_AUTO, None, None)
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak_Synth failed (status {status}) for text {text!r}")
        return np.concatenate(self._chunks)
