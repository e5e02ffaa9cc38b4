"""Character vocabulary, greedy CTC decoding and WER/CER for the ASR example.

The paper's English models emit characters: a CTC blank, space, apostrophe, the 26 lower-case
letters and hyphen (30 symbols). Transcripts are normalised before they are encoded so that
LibriSpeech (upper case) and Common Voice (mixed case, punctuation) map onto the same alphabet.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 5.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer
import torch
from torch import Tensor

__all__ = [
    "BLANK",
    "CharTokenizer",
    "ErrorRates",
    "error_rates",
    "greedy_decode",
    "normalize_transcript",
]

BLANK = 0
"""Index of the CTC blank symbol in every :class:`CharTokenizer`."""

_ENGLISH_SYMBOLS: tuple[str, ...] = (" ", "'", *"abcdefghijklmnopqrstuvwxyz", "-")
_ALLOWED = frozenset(_ENGLISH_SYMBOLS)
_SPACES = re.compile(r"\s+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2013": "-", "\u2014": " "})


def normalize_transcript(text: str) -> str:
    """Map a raw transcript onto the English character alphabet.

    Lower-cases, strips accents (``"café"`` becomes ``"cafe"``), unifies apostrophes and
    hyphens, drops every other character (punctuation, digits) and collapses white space.

    Args:
        text: a transcript as found in LibriSpeech or Common Voice.

    Returns:
        The normalised transcript; it contains only space, apostrophe, ``a``-``z`` and hyphen.

    Examples:
        >>> normalize_transcript("  HELLO,  World's  end — café!")
        "hello world's end cafe"
    """
    text = unicodedata.normalize("NFKD", text).translate(_APOSTROPHES).translate(_DASHES)
    text = "".join(c for c in text.lower() if c in _ALLOWED or c.isspace())
    return _SPACES.sub(" ", text).strip()


class CharTokenizer:
    """Character tokenizer with the CTC blank at index 0.

    The default alphabet is the paper's English one: blank, space, apostrophe, ``a``-``z``,
    hyphen, so ``len(tokenizer) == 30``.

    Args:
        symbols: the non-blank symbols, one character each, in output order.

    Raises:
        ValueError: if ``symbols`` is empty, has duplicates or entries that are not one character.

    Examples:
        >>> tok = CharTokenizer()
        >>> tok.decode(tok.encode("it's a test"))
        "it's a test"
        >>> len(tok)
        30
    """

    def __init__(self, symbols: Sequence[str] = _ENGLISH_SYMBOLS) -> None:
        symbols = tuple(symbols)
        if not symbols:
            raise ValueError("symbols must contain at least one character")
        bad = [s for s in symbols if not isinstance(s, str) or len(s) != 1]
        if bad:
            raise ValueError(f"symbols must be single characters, got {bad[:3]!r}")
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must not contain duplicates")
        self._symbols = symbols
        self._index = {s: i + 1 for i, s in enumerate(symbols)}

    def __len__(self) -> int:
        return len(self._symbols) + 1

    @property
    def vocab_size(self) -> int:
        """Number of output classes including the blank."""
        return len(self)

    @property
    def symbols(self) -> tuple[str, ...]:
        """The non-blank symbols; ``symbols[i]`` has index ``i + 1``."""
        return self._symbols

    def encode(self, text: str) -> list[int]:
        """Normalise ``text`` and return its symbol indices (never the blank).

        Raises:
            ValueError: if the normalised text contains a character outside the alphabet
                (only possible with a custom alphabet).
        """
        out: list[int] = []
        for c in normalize_transcript(text):
            idx = self._index.get(c)
            if idx is None:
                raise ValueError(f"text contains {c!r}, which is not in the tokenizer's symbols")
            out.append(idx)
        return out

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Map indices back to text, skipping blanks (no repeat collapsing: see greedy_decode).

        Raises:
            ValueError: if an index is outside ``[0, len(self))``.
        """
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        chars = []
        for i in values:
            if not 0 <= int(i) < len(self):
                raise ValueError(f"ids contains {i}, outside [0, {len(self)})")
            if i != BLANK:
                chars.append(self._symbols[int(i) - 1])
        return "".join(chars)


def greedy_decode(
    log_probs: Tensor, lengths: Tensor | None, tokenizer: CharTokenizer
) -> list[str]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, remove blanks.

    No language model is used, as in the paper.

    Args:
        log_probs: ``(batch, frames, vocab)`` scores (log-probabilities or logits).
        lengths: ``(batch,)`` number of valid frames per utterance, or None for all frames.
        tokenizer: the tokenizer whose indices the model emits.

    Returns:
        One decoded string per utterance, white space collapsed.

    Raises:
        ValueError: if the shapes disagree.

    Examples:
        >>> tok = CharTokenizer()
        >>> a, b = tok.encode("ab")
        >>> frames = torch.tensor([a, a, 0, a, b, b, 0])
        >>> greedy_decode(torch.nn.functional.one_hot(frames, 30)[None].float(), None, tok)
        ['aab']
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (batch, frames, vocab), got shape {tuple(log_probs.shape)}")
    if log_probs.shape[-1] != len(tokenizer):
        raise ValueError(
            f"log_probs has {log_probs.shape[-1]} classes but the tokenizer has {len(tokenizer)}"
        )
    batch, frames = log_probs.shape[:2]
    if lengths is None:
        lengths = torch.full((batch,), frames, dtype=torch.long)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    best = log_probs.argmax(dim=-1).cpu()
    out = []
    for row, n in zip(best, lengths.tolist(), strict=True):
        seq = row[: int(n)]
        if seq.numel():
            keep = torch.ones_like(seq, dtype=torch.bool)
            keep[1:] = seq[1:] != seq[:-1]
            seq = seq[keep]
        text = tokenizer.decode(seq[seq != BLANK])
        out.append(_SPACES.sub(" ", text).strip())
    return out


@dataclass(frozen=True)
class ErrorRates:
    """Corpus-level word and character error rates (fractions, not percent)."""

    wer: float
    cer: float
    num_utterances: int


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRates:
    """Corpus-level WER and CER computed with jiwer over normalised transcripts.

    Args:
        references: ground-truth transcripts (normalised with :func:`normalize_transcript`;
            empty references are skipped).
        hypotheses: decoded transcripts, same order and length.

    Returns:
        The error rates; ``wer`` counts word substitutions, deletions and insertions over the
        number of reference words (it can exceed 1).

    Raises:
        ValueError: if the lengths differ or every reference is empty.
    """
    if len(references) != len(hypotheses):
        raise ValueError(
            f"references ({len(references)}) and hypotheses ({len(hypotheses)}) differ in length"
        )
    pairs = [
        (r, normalize_transcript(h))
        for r, h in ((normalize_transcript(r), h) for r, h in zip(references, hypotheses, strict=True))
        if r
    ]
    if not pairs:
        raise ValueError("references must contain at least one non-empty transcript")
    refs = [r for r, _ in pairs]
    hyps = [h for _, h in pairs]
    return ErrorRates(
        wer=float(jiwer.wer(refs, hyps)), cer=float(jiwer.cer(refs, hyps)), num_utterances=len(refs)
    )
