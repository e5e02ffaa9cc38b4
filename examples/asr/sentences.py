"""Word lists and a small grammar that generate the embedded corpus's sentences.

The synthetic corpus (:mod:`examples.asr.corpus`) needs text that a small CTC model can learn in
minutes: short sentences (3 to 8 words) over a modest vocabulary (a few hundred words), with enough
variety that a model has to spell rather than memorise whole sentences. Everything here is the
project's own: hand-written word lists and a handful of sentence templates.

API:
    ``generate_sentence(rng) -> str``: one sentence from a ``random.Random``.
    ``generate_sentences(count, *, seed) -> list[str]``: ``count`` sentences, deterministic in
    ``seed`` (an ``int`` or ``str``).
    ``VOCABULARY``: the sorted tuple of every word the grammar can emit.

Sentences are lower case and use only the paper's English alphabet (space, apostrophe, ``a``-``z``,
hyphen), so they are already normalised transcripts.

References:
    Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition:
    Benchmarks, Adaptive Optimizers and Gradient Clipping", arXiv:2310.00098, section 5
    (character-level English ASR).
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["MAX_WORDS", "MIN_WORDS", "VOCABULARY", "generate_sentence", "generate_sentences"]

MIN_WORDS = 3
"""Fewest words in a generated sentence."""
MAX_WORDS = 8
"""Most words in a generated sentence."""

_DETERMINERS = ("the", "a", "my", "your", "his", "her", "our", "their", "this", "that", "every")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve")
_NAMES = (
    "anna", "ben", "clara", "david", "emma", "frank", "grace", "henry", "isaac", "julia",
    "kevin", "laura", "mary", "nora", "oscar", "peter", "rosa", "sam", "tom", "victor",
)
_ADJECTIVES = (
    "big", "small", "old", "new", "red", "blue", "green", "yellow", "black", "white", "brown",
    "happy", "sad", "quiet", "loud", "warm", "cold", "dark", "bright", "heavy", "light",
    "quick", "slow", "young", "tall", "short", "clean", "dirty", "empty", "full", "soft",
    "hard", "sweet", "strange", "famous", "hungry", "tired", "busy", "lazy", "clever",
    "gentle", "broken", "golden", "wooden", "narrow", "wide", "lonely", "friendly", "careful",
    "well-known", "old-fashioned",
)
_NOUNS = (
    "dog", "cat", "horse", "bird", "fish", "farmer", "teacher", "doctor", "child", "king",
    "queen", "sailor", "baker", "driver", "painter", "student", "neighbour", "friend", "mother",
    "father", "sister", "brother", "house", "garden", "river", "forest", "mountain", "village",
    "city", "road", "bridge", "window", "door", "table", "chair", "book", "letter", "story",
    "song", "picture", "box", "basket", "bottle", "cup", "plate", "apple", "bread", "cheese",
    "coffee", "milk", "water", "stone", "flower", "tree", "boat", "train", "car", "bicycle",
    "clock", "lamp", "key", "coat", "hat", "shoe", "bag", "ball", "kitchen", "market", "school",
    "church", "station", "island", "castle", "field", "lake", "beach", "hill", "shop", "office",
    "hospital", "library", "morning", "evening", "winter", "summer", "storm", "wind", "fire",
    "moon", "sun", "star", "ship", "wagon", "candle", "mirror", "pocket", "ladder", "bell",
)
_TRANSITIVE = (
    "saw", "found", "lost", "took", "made", "brought", "carried", "painted", "cleaned", "opened",
    "closed", "sold", "bought", "wanted", "liked", "followed", "watched", "helped", "visited",
    "called", "dropped", "pushed", "pulled", "washed", "fixed", "kept", "left", "held", "needed",
    "remembered", "forgot", "chose", "built", "moved", "hid", "caught", "showed", "gave",
)
_INTRANSITIVE = (
    "slept", "laughed", "smiled", "waited", "walked", "ran", "jumped", "danced", "sang", "cried",
    "worked", "played", "stopped", "fell", "arrived", "returned", "listened", "whispered",
    "shouted", "stayed", "rested", "swam", "climbed", "wandered",
)
_BASE_VERBS = (
    "see", "find", "take", "make", "bring", "carry", "paint", "clean", "open", "close", "sell",
    "buy", "help", "visit", "call", "wash", "fix", "keep", "hold", "move", "catch", "show",
)
_ADVERBS = (
    "quickly", "slowly", "quietly", "loudly", "today", "yesterday", "again", "early", "late",
    "always", "never", "often", "soon", "happily", "carefully", "suddenly", "together", "alone",
    "outside", "inside", "there", "here", "tonight",
)
_PREPOSITIONS = (
    "in", "on", "under", "near", "behind", "beside", "across", "into", "over", "through",
    "from", "with", "without", "after", "before", "around", "past", "toward",
)
_PRONOUNS = ("he", "she", "they", "we", "i", "you")
_QUESTION_WORDS = ("where", "when", "why", "how")
_AUXILIARIES = ("can", "will", "should", "must", "could", "would")
_CONTRACTIONS = ("don't", "didn't", "can't", "won't", "wouldn't", "couldn't")
_PRESENT_SUBJECT = ("it's", "that's", "there's", "here's")


def _plural(noun: str) -> str:
    if noun == "child":
        return "children"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _noun_phrase(rng: random.Random) -> list[str]:
    roll = rng.random()
    if roll < 0.2:
        return [rng.choice(_NAMES)]
    if roll < 0.3:
        return [rng.choice(_NUMBERS), _plural(rng.choice(_NOUNS))]
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return words


def _subject(rng: random.Random) -> list[str]:
    return [rng.choice(_PRONOUNS)] if rng.random() < 0.3 else _noun_phrase(rng)


def _tail(rng: random.Random) -> list[str]:
    roll = rng.random()
    if roll < 0.35:
        return [rng.choice(_PREPOSITIONS), *_noun_phrase(rng)]
    if roll < 0.6:
        return [rng.choice(_ADVERBS)]
    return []


def _statement(rng: random.Random) -> list[str]:
    if rng.random() < 0.55:
        return [*_subject(rng), rng.choice(_TRANSITIVE), *_noun_phrase(rng), *_tail(rng)]
    return [*_subject(rng), rng.choice(_INTRANSITIVE), *_tail(rng)]


def _negation(rng: random.Random) -> list[str]:
    return [*_subject(rng), rng.choice(_CONTRACTIONS), rng.choice(_BASE_VERBS), *_noun_phrase(rng)]


def _question(rng: random.Random) -> list[str]:
    if rng.random() < 0.5:
        return [rng.choice(_AUXILIARIES), *_subject(rng), rng.choice(_BASE_VERBS), *_noun_phrase(rng)]
    return [rng.choice(_QUESTION_WORDS), "did", *_noun_phrase(rng), rng.choice(_BASE_VERBS), *_tail(rng)]


def _description(rng: random.Random) -> list[str]:
    return [rng.choice(_PRESENT_SUBJECT), *_noun_phrase(rng), *_tail(rng)]


_TEMPLATES: tuple[tuple[float, Callable[[random.Random], list[str]]], ...] = (
    (0.55, _statement),
    (0.15, _negation),
    (0.2, _question),
    (0.1, _description),
)


def _plural_nouns() -> tuple[str, ...]:
    return tuple(_plural(n) for n in _NOUNS)


VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {
            "an", "did",
            *_DETERMINERS, *_NUMBERS, *_NAMES, *_ADJECTIVES, *_NOUNS, *_plural_nouns(),
            *_TRANSITIVE, *_INTRANSITIVE, *_BASE_VERBS, *_ADVERBS, *_PREPOSITIONS, *_PRONOUNS,
            *_QUESTION_WORDS, *_AUXILIARIES, *_CONTRACTIONS, *_PRESENT_SUBJECT,
        }
    )
)
"""Every word the grammar can emit (plural nouns counted separately), sorted."""


def generate_sentence(rng: random.Random) -> str:
    """Draw one sentence of ``MIN_WORDS`` to ``MAX_WORDS`` words.

    Args:
        rng: the source of randomness; the result is a deterministic function of its state.

    Returns:
        A lower-case sentence over :data:`VOCABULARY`, words separated by single spaces.

    Examples:
        >>> s = generate_sentence(random.Random(0))
        >>> MIN_WORDS <= len(s.split()) <= MAX_WORDS
        True
    """
    weights = [w for w, _ in _TEMPLATES]
    while True:
        (template,) = rng.choices([t for _, t in _TEMPLATES], weights=weights)
        words = template(rng)
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            return " ".join(words)


def generate_sentences(count: int, *, seed: int | str) -> list[str]:
    """Draw ``count`` sentences, deterministic in ``seed``.

    Args:
        count: number of sentences (>= 0).
        seed: an ``int`` or ``str`` seeding a private ``random.Random`` (the global RNG is never
            touched).

    Returns:
        The sentences; repeats are possible but rare.

    Raises:
        ValueError: if ``count`` is negative.

    Examples:
        >>> generate_sentences(3, seed="speaker-7") == generate_sentences(3, seed="speaker-7")
        True
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    rng = random.Random(seed)
    return [generate_sentence(rng) for _ in range(count)]
