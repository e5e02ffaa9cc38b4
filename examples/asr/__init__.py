"""The paper's ASR pipeline on dpfl: corpus, readers, features, model and training.

Data side: :mod:`examples.asr.corpus` (embedded espeak-ng corpus in LibriSpeech layout),
:mod:`examples.asr.sentences` (its sentence grammar), :mod:`examples.asr.data` (LibriSpeech and
Common Voice readers, audio loading), :mod:`examples.asr.features` (log-mel features,
SpecAugment), :mod:`examples.asr.store` (extraction into the on-disk cache, lazy batches and
users) and :mod:`examples.asr.packs` (the cache's per-file entries, index and collection).

Model side: :mod:`examples.asr.text` (character tokenizer, greedy CTC decoding, WER/CER),
:mod:`examples.asr.model` (the CTC transformer and its ``paper``/``small``/``tiny`` configs),
:mod:`examples.asr.train` (central LARS seed training, evaluation) and
:mod:`examples.asr.federated` (DP federated fine-tuning through ``dpfl.simulation.run_rounds``).
Run side: :mod:`examples.asr.cli` (options, presets, user errors), :mod:`examples.asr.splits`
(the run's data and its skip report), :mod:`examples.asr.rundir` (the run directory, claimed
when training starts), :mod:`examples.asr.pipeline` (seed model, FL without noise and with DP)
and :mod:`examples.asr.report` (printed table, ``results.json``).
The script ``examples/asr_librispeech.py`` is their command-line entry point.
"""
