"""The paper's ASR pipeline on dpfl: corpus, readers, features, model and training.

Data side: :mod:`examples.asr.corpus` (embedded espeak-ng corpus in LibriSpeech layout),
:mod:`examples.asr.sentences` (its sentence grammar), :mod:`examples.asr.data` (LibriSpeech and
Common Voice readers, audio loading) and :mod:`examples.asr.features` (log-mel features,
SpecAugment, feature cache).
"""
