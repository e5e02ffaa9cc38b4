"""Differentially private federated fine-tuning of a CTC transformer ASR model, end to end.

Reproduces the pipeline of Pelikan et al. (arXiv:2310.00098) with dpfl at a size that runs on a
laptop: a seed model is trained centrally with LARS on one set of speakers, then fine-tuned with
federated learning on other speakers (the users), once without noise and once with user-level DP
(per-layer clipping, Gaussian noise, LAMB on the server), and scored by greedy-decoding WER and
CER on held-out speakers. ε is reported for the run itself and, paper-style, extrapolated to the
paper's cohort 204,800 / population 69.5M / 2,034 rounds at the same σ_DP.

Data: with no data option, an embedded synthetic corpus (espeak-ng speech in LibriSpeech layout)
is generated once and cached; ``--librispeech-root`` / ``--common-voice-root`` use real data.

Usage::

    python examples/asr_librispeech.py                 # default run
    python examples/asr_librispeech.py --quick         # smoke run: tiny corpus, model and rounds
    python examples/asr_librispeech.py --noise-seed 0  # reproducible table (seeded DP noise)
    python examples/asr_librispeech.py --target-epsilon 8 --rounds 200 --cohort-size 64
    torchrun --nproc-per-node 2 examples/asr_librispeech.py --quick   # cohort split over ranks

Measured from a fresh cache on 2 CPU cores (docs/asr.md, "The default
run, measured"): the default run 13 min 43 s with the shipped seed model (about 540 MB of
corpus and feature cache, 55 MB of run outputs), ``--quick`` 46 s (90 MB of cache, 4 MB per run). The DP noise is unseeded (OS
entropy), so the FL + DP row varies from run to run while the seed and no-noise rows and ε do
not; ``--noise-seed`` makes the whole table repeatable (simulations only: not private).

Data: features are extracted once, by ``--workers`` processes, into an on-disk store under
``--cache-dir`` (default ``$DPFL_CACHE`` or ``~/.cache/dpfl``, never inside a dataset) and read
per batch and per user (:mod:`examples.asr.store`), so memory does not grow with the corpus.
Only files not cached yet are extracted (one entry per audio file: a touched file is extracted
again alone). Files that cannot be used (missing or corrupt audio, audio that decodes shorter
than its header says, a missing transcript) are skipped, counted per split with reasons,
printed and recorded in ``results.json``; ``--strict`` makes any skip an error, naming the
files (what the listing finds before any extraction).

Outputs: a run directory, by default a new ``runs/asr/<YYYYmmdd-HHMMSS>/``
(``runs/asr-quick/...`` with ``--quick``), or ``--output-dir``: ``run.json`` (command line),
``seed_model.pt``, per-round JSON-lines logs ``fl_no_noise.jsonl`` / ``fl_dp.jsonl`` /
``fl_dp_other_clip.jsonl`` (FL + DP with the other ``--clip`` mode at the same noise, the paper's
per-layer vs global comparison; ``--no-compare-clip`` skips it), checkpoints ``ckpt_<stage>/``
(after every DP round; ``--resume`` continues the latest run, or the one in ``--output-dir``,
which must hold a run; ``--overwrite`` replaces it), ``results.json`` and ``results.md`` (the
printed table). The folder is created when training starts, so a run refused before leaves
nothing behind. Usage and data problems end with one line on stderr and exit status 2, before
any work where they can be known then (every option at start, the data when it is listed).
No stage prints or records a time without ``--unsafe-metrics``.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any  # noqa: E402

from examples.asr.cli import PRESETS, UserError, build_parser  # noqa: E402

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    build_parser().parse_args()  # prints the help and exits before torch is imported below

from examples.asr.pipeline import PAPER_SCALE, run_pipeline  # noqa: E402
from examples.asr.report import format_table  # noqa: E402
from examples.asr.splits import load_splits, prepare_data, sample_utterances  # noqa: E402

__all__ = ["PAPER_SCALE", "PRESETS", "UserError", "build_parser", "format_table", "load_splits",
           "main", "prepare_data", "run_pipeline", "sample_utterances"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv``), run the pipeline and return its results."""
    args = build_parser().parse_args(argv)
    try:
        return run_pipeline(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
