"""The data of an ASR run: read the splits, extract features into the store, report skips.

:func:`load_splits` reads real LibriSpeech / Common Voice or the embedded synthetic corpus into
the roles of a run (seed training, federated users, evaluation); :func:`prepare_data` extracts
their features into the on-disk store (:mod:`examples.asr.store`), counts what was skipped and
why, and builds the lazy batches and the federated dataset.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from examples.asr.cli import UserError
from examples.asr.corpus import CorpusConfig, ensure_corpus, target_slice
from examples.asr.data import (
    DataError,
    SkippedFile,
    SpeechData,
    Utterance,
    read_common_voice,
    read_librispeech,
    summarize_skips,
)
from examples.asr.store import StoredBatches, StoredFederatedDataset, extract_splits
from examples.asr.text import CharTokenizer

__all__ = ["MONITOR_UTTERANCES", "STRICT_NAMED", "PreparedData", "Splits", "load_splits",
           "prepare_data", "refuse_skips", "sample_utterances"]

MONITOR_UTTERANCES = 100
"""Utterances of the in-run evaluation every ``--eval-every`` rounds (a seeded sample of the
eval set, to keep monitoring cheap); the final table scores the whole eval set."""


@dataclass
class Splits:
    """Utterances of each role: seed training, federated users, evaluation.

    ``names`` says where each role's data came from (split directory or TSV) and ``skipped``
    what the readers dropped from it; both are keyed by role (``seed``, ``fl``, ``eval``,
    ``seed_dev``).
    """

    source: str
    seed: list[Utterance]
    fl_users: dict[str, list[Utterance]]
    eval: list[Utterance]
    seed_dev: list[Utterance]  # held-out speakers of the seed domain (may be empty)
    names: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, tuple[SkippedFile, ...]] = field(default_factory=dict)


def _read(what: str, reader: Any, *a: Any, **kw: Any) -> SpeechData:
    try:
        data: SpeechData = reader(*a, **kw)
    except (FileNotFoundError, DataError) as exc:
        raise UserError(f"{what}: {exc}") from exc
    if data.num_utterances == 0:
        skipped = f" ({len(data.skipped)} files skipped; see the reasons above)" if data.skipped else ""
        for entry in data.skipped[:3]:
            print(f"  skipped {entry.path}: {entry.reason}", flush=True)
        raise UserError(f"{what} has no usable utterances (found 0){skipped}")
    return data


def load_splits(args: argparse.Namespace) -> Splits:
    """Read the data: real LibriSpeech / Common Voice, or the embedded corpus."""
    ls, cv = args.librispeech_root, args.common_voice_root
    if ls is None and cv is None:
        config = CorpusConfig.quick(seed=0) if args.quick else CorpusConfig()
        workers = getattr(args, "workers", None) or max(1, args.threads)
        root = ensure_corpus(config, cache_dir=args.cache_dir, workers=workers,
                             progress=getattr(args, "progress", True))
        parts = {role: _read(f"synthetic split {root / split}", read_librispeech, root, split,
                             verify_audio=False)
                 for role, split in (("seed", "seed-train"), ("fl", "fl-train"),
                                     ("eval", "eval"), ("seed_dev", "seed-dev"))}
        names = {role: str(root / split) for role, split in (
            ("seed", "seed-train"), ("fl", "fl-train"), ("eval", "eval"), ("seed_dev", "seed-dev"))}
        # The example's seed model sees the seed domain only (the paper's LibriSpeech seed): the
        # corpus's target-domain slice of seed-train is for the study's seed models.
        dropped = target_slice(config)
        seed = [u for u in parts["seed"].utterances() if u.user_id not in dropped]
        names["seed"] += f" (seed-domain speakers: {len(dropped)} target-domain speakers left out)"
        return Splits(f"embedded synthetic corpus ({root})", seed,
                      parts["fl"].users, parts["eval"].utterances(), parts["seed_dev"].utterances(),
                      names, {k: v.skipped for k, v in parts.items()})
    names: dict[str, str] = {}
    parts = {}
    if ls is not None:
        names["seed"] = str(ls / args.seed_split)
        parts["seed"] = _read(f"LibriSpeech split {names['seed']}", read_librispeech, ls,
                              args.seed_split, on_error="skip")
    if cv is None:  # seed and FL on disjoint LibriSpeech speakers
        for role, split in (("fl", args.fl_split), ("eval", args.eval_split)):
            names[role] = str(ls / split)
            parts[role] = _read(f"LibriSpeech split {names[role]}", read_librispeech, ls, split,
                                on_error="skip")
        return Splits(f"LibriSpeech {ls}", parts["seed"].utterances(), parts["fl"].users,
                      parts["eval"].utterances(), [], names,
                      {k: v.skipped for k, v in parts.items()})
    for role, tsv in (("fl", "train.tsv"), ("eval", "dev.tsv")):
        names[role] = str(cv / tsv)
        parts[role] = _read(f"Common Voice index {names[role]}", read_common_voice, cv, tsv=tsv,
                            on_error="skip")
    fl = parts["fl"].users
    skipped = {k: v.skipped for k, v in parts.items()}
    if ls is not None:  # the paper: LibriSpeech seed, Common Voice users
        return Splits(f"LibriSpeech {ls} (seed) + Common Voice {cv} (FL)",
                      parts["seed"].utterances(), fl, parts["eval"].utterances(), [], names, skipped)
    if len(fl) < 3:
        raise UserError(
            f"Common Voice index {names['fl']} has {len(fl)} user(s) (client_id values); a "
            "Common-Voice-only run needs at least 3 (a tenth, at least one, trains the seed "
            "model, and the federated users must be at least 2); add --librispeech-root for the "
            "seed model")
    ids = sorted(fl)  # Common Voice only: a tenth of the users for the seed model
    random.Random(args.seed).shuffle(ids)
    cut = max(1, len(ids) // 10)
    seed = [u for uid in ids[:cut] for u in fl.pop(uid)]
    names["seed"] = f"{names['fl']} ({cut} of {len(ids)} users)"
    return Splits(f"Common Voice {cv}", seed, fl, parts["eval"].utterances(), [], names, skipped)


STRICT_NAMED = 10
"""How many unusable files a ``--strict`` refusal names (then the count of the others)."""


def refuse_skips(stage: str, skipped: Sequence[SkippedFile]) -> None:
    """``--strict``: refuse if anything was skipped, naming the first :data:`STRICT_NAMED` files
    with what is wrong with each, and the count.

    Raises:
        UserError: if ``skipped`` is not empty (one line).
    """
    if not skipped:
        return
    kinds: dict[str, int] = {}
    for entry in skipped:
        kinds[entry.kind] = kinds.get(entry.kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    named = "; ".join(f"{e.path} ({e.kind})" for e in skipped[:STRICT_NAMED])
    more = f"; and {len(skipped) - STRICT_NAMED} more" if len(skipped) > STRICT_NAMED else ""
    raise UserError(f"--strict: {len(skipped)} file(s) unusable at {stage} ({summary}): "
                    f"{named}{more}; fix the data or run without --strict to skip them")


def sample_utterances(utts: Sequence[Utterance], limit: int, seed: int) -> list[Utterance]:
    """At most ``limit`` utterances drawn uniformly at random with ``seed``, in their order."""
    if len(utts) <= limit:
        return list(utts)
    keep = sorted(random.Random(f"dpfl-eval-sample/{seed}").sample(range(len(utts)), limit))
    return [utts[i] for i in keep]


@dataclass
class PreparedData:
    """Feature-backed data of a run: lazy batches and the per-split data report."""

    seed_batches: StoredBatches
    eval_batches: StoredBatches
    dev_batches: StoredBatches | None
    monitor_batches: StoredBatches  # a sample of eval_batches' utterances (MONITOR_UTTERANCES)
    dataset: StoredFederatedDataset
    report: dict[str, Any]
    fl_utterances: int
    eval_utterances: int


def prepare_data(splits: Splits, args: argparse.Namespace, tok: CharTokenizer) -> PreparedData:
    """Extract features into the on-disk store, drop and report skipped files, build batches.

    Raises:
        UserError: if a split ends up with too little data, or with ``--strict`` if a file is
            unusable: those the readers found when listing are refused before any extraction.
    """
    if args.strict:  # what the listing found unusable, before extracting anything
        refuse_skips("listing", [e for entries in splits.skipped.values() for e in entries])
    eval_utts = sample_utterances(splits.eval, args.max_eval_utterances, args.seed)
    dev_utts = sample_utterances(splits.seed_dev, args.max_eval_utterances, args.seed)
    fl_utts = [u for utts in splits.fl_users.values() for u in utts]
    roles: dict[str, list[Utterance]] = {"seed": splits.seed, "fl": fl_utts, "eval": eval_utts}
    if dev_utts:
        roles["seed_dev"] = dev_utts
    try:
        stores = extract_splits(roles, cache_dir=args.cache_dir, workers=args.workers,
                                progress=getattr(args, "progress", True))
    except ValueError as exc:  # duplicate ids, named with both files
        raise UserError(str(exc)) from exc
    report: dict[str, Any] = {}
    for role, utts in roles.items():
        store = stores[role]
        read_skips = splits.skipped.get(role, ())
        listed = {"eval": len(splits.eval), "seed_dev": len(splits.seed_dev)}.get(role, len(utts))
        unreadable = sum(1 for e in read_skips if e.path.suffix not in (".txt", ".tsv"))
        report[role] = {
            "source": splits.names.get(role, ""),
            "found": listed + unreadable,
            "not_sampled": listed - len(utts),
            "used": len(store),
            "hours": round(store.hours(), 3),
            "skipped": summarize_skips([*read_skips, *store.skipped]),
        }
    if args.strict:  # what decoding found unusable (the listing's were refused above)
        refuse_skips("feature extraction", [e for r in roles for e in stores[r].skipped])
    seed_utts = [u for u in splits.seed if u.utterance_id in stores["seed"]]
    users = {uid: kept for uid, utts in splits.fl_users.items()
             if (kept := [u for u in utts if u.utterance_id in stores["fl"]])}
    eval_kept = [u for u in eval_utts if u.utterance_id in stores["eval"]]
    dev_kept = [u for u in dev_utts if dev_utts and u.utterance_id in stores["seed_dev"]]
    for role, count, need in (("seed", len(seed_utts), 1), ("fl", len(users), 2),
                              ("eval", len(eval_kept), 1)):
        if count < need:
            unit = "users" if role == "fl" else "usable utterances"
            raise UserError(f"{role} data {splits.names.get(role, '')} has {count} {unit} after "
                            f"skipping {report[role]['skipped']['count']} file(s); need at least "
                            f"{need}")
    dataset = StoredFederatedDataset(stores["fl"], users, tok, batch_size=args.local_batch_size,
                                     seed=args.seed)
    return PreparedData(
        seed_batches=StoredBatches(stores["seed"], seed_utts, tok, batch_size=args.batch_size,
                                   seed=args.seed),
        eval_batches=StoredBatches(stores["eval"], eval_kept, tok, batch_size=64),
        monitor_batches=StoredBatches(
            stores["eval"], sample_utterances(eval_kept, MONITOR_UTTERANCES, args.seed + 1), tok,
            batch_size=64),
        dev_batches=(StoredBatches(stores["seed_dev"], dev_kept, tok, batch_size=64)
                     if dev_kept else None),
        dataset=dataset, report=report,
        fl_utterances=sum(len(v) for v in users.values()), eval_utterances=len(eval_kept))
