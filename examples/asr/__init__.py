"""The paper's ASR pipeline on dpfl: corpus, readers, features, model and training.

Data side: :mod:`examples.asr.corpus` (embedded espeak-ng corpus in LibriSpeech layout),
:mod:`examples.asr.sentences` (its sentence grammar), :mod:`examples.asr.data` (LibriSpeech and
Common Voice readers, audio loading) and :mod:`examples.asr.features` (log-mel features,
SpecAugment, feature cache).

Model side: :mod:`examples.asr.text` (character tokenizer, greedy CTC decoding, WER/CER),
:mod:`examples.asr.model` (the CTC transformer and its ``paper``/``small``/``tiny`` configs),
:mod:`examples.asr.train` (central LARS seed training, evaluation) and
:mod:`examples.asr.federated` (DP federated fine-tuning through ``dpfl.simulation.run_rounds``).
The command line lives in ``examples/asr_librispeech.py``.
"""
