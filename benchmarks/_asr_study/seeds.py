"""Seed models of the study: the shipped checkpoint when there is one, else trained once and cached.

Each depth has its own seed model, trained by a :class:`examples.asr.seed.SeedRecipe` (central
LARS). When the recipe is one of :data:`examples.asr.seed.RECIPES` and its checkpoint is shipped
in the repository, the study loads it (the record is checked against the code by
:func:`examples.asr.seed.check_record`); otherwise it trains the recipe with
:func:`examples.asr.seed.train_seed` once and caches weights and record under
``$DPFL_CACHE/asr_study`` (default ``~/.cache/dpfl``), one trainer at a time (a file lock), so
the study still runs from a checkout without the checkpoint. The model's identity (shipped
SHA-256, or the recipe's hash when trained here) is part of every cell key of its depth, so
cells of a locally trained model never mix with cells of the shipped one.

``seed_models.json`` (in the results folder) records per depth where the model came from, its
SHA-256, its parameter count and its eval WER/CER on the study's eval set, and whether it passes
the CER gate.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks._asr_study.grid import ROOT, Protocol, Study
from benchmarks._study import now as _now
from benchmarks._study import write_json as _write_json
from examples.asr.corpus import CorpusConfig, default_cache_dir
from examples.asr.model import CTCTransformer
from examples.asr.seed import (
    RECIPES,
    SeedRecipe,
    check_record,
    load_shipped,
    save_seed,
    shipped_path,
    train_seed,
)
from examples.asr.text import CharTokenizer
from examples.asr.train import Batch, evaluate


def corpus_config(protocol: Protocol) -> CorpusConfig:
    """The embedded corpus of ``protocol`` (``"default"`` or ``"quick"``)."""
    if protocol.corpus == "quick":
        return CorpusConfig.quick(seed=0)
    if protocol.corpus == "default":
        return CorpusConfig()
    raise ValueError(f"unknown corpus {protocol.corpus!r}; use 'default' or 'quick'")


def seed_recipe(protocol: Protocol, depth: int) -> SeedRecipe:
    """The recipe of ``depth``'s seed model (the diagnostic depth trains ``diag_seed_steps``)."""
    steps = protocol.diag_seed_steps if depth == protocol.diag_depth and depth not in protocol.depths \
        else protocol.seed_steps
    return SeedRecipe(corpus=corpus_config(protocol), model=protocol.model,
                      model_overrides=(*protocol.model_overrides, ("n_layers", depth)), steps=steps,
                      lr=protocol.seed_lr, batch_size=protocol.seed_batch_size)


def recipe_hash(recipe: SeedRecipe) -> str:
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def shipped_name(recipe: SeedRecipe) -> str | None:
    """The name of the shipped checkpoint trained by ``recipe`` (None if there is none)."""
    for name, r in RECIPES.items():
        if r == recipe and shipped_path(name).is_file():
            return name
    return None


def seed_identity(recipe: SeedRecipe) -> str:
    """``shipped:<name>:<sha256>`` (checked against the code) or ``trained:<recipe hash>``.

    Raises:
        ValueError: if a shipped checkpoint of this recipe exists but its record does not match
            the code (see :func:`examples.asr.seed.check_record`).
    """
    name = shipped_name(recipe)
    if name is not None:
        return f"shipped:{name}:{check_record(name)['sha256'][:16]}"
    return f"trained:{recipe_hash(recipe)}"


def model_size(recipe: SeedRecipe) -> tuple[int, int]:
    """Parameter count and number of parameter tensors of the recipe's model (no allocation)."""
    with torch.device("meta"):
        model = CTCTransformer(recipe.model_config())
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


def resolve_study(protocol: Protocol) -> Study:
    """``protocol`` with every depth's seed identity and model size (diagnostic depth included)."""
    ids, params, tensors = {}, {}, {}
    for depth in dict.fromkeys((*protocol.depths, protocol.diag_depth)):
        recipe = seed_recipe(protocol, depth)
        ids[depth] = seed_identity(recipe)
        params[depth], tensors[depth] = model_size(recipe)
    return Study(protocol, ids, params, tensors)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_or_trained(recipe: SeedRecipe) -> tuple[CTCTransformer, dict[str, Any], str]:
    """The recipe's model from the study cache, training it there first if needed."""
    cache = default_cache_dir() / "asr_study"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"seed-v2-{recipe_hash(recipe)}.pt"
    meta = path.with_suffix(".json")
    with open(cache / f"{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer; the others wait and then load its model
        source = "cache"
        if path.is_file() and meta.is_file():
            record = json.loads(meta.read_text())
            if record.get("recipe") != recipe.to_dict() or record.get("sha256") != _sha256(path):
                raise ValueError(f"{path}: cached seed model does not match its record or recipe; "
                                 "delete it (and its .json) to retrain")
        else:
            n = recipe.model_config().n_layers
            print(f"seed model ({n} blocks): training {recipe.steps} LARS steps (no shipped checkpoint; "
                  f"cached in {path}) ...", flush=True)
            t0 = time.time()
            model, record = train_seed(recipe, workers=1)
            save_seed(path, model, record)
            record = json.loads(meta.read_text())
            print(f"seed model ({n} blocks) trained in {time.time() - t0:.0f}s: eval CER "
                  f"{record['scores']['eval_cer']:.1%}", flush=True)
            source = "trained"
    model = CTCTransformer(recipe.model_config())
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    model.eval()
    return model, {**record, "path": str(path)}, source


_LOADED: dict[str, tuple[CTCTransformer, dict[str, Any]]] = {}


def seed_model(study: Study, depth: int, eval_batches: list[Batch], out: Path) -> tuple[CTCTransformer, dict[str, Any]]:
    """The seed model of ``depth`` (memoized per process) and its entry in ``seed_models.json``.

    The entry is written the first time a model is seen (or when its SHA-256 changed) with the
    model's eval WER/CER on the study's eval set and whether it passes the CER gate.
    """
    sid = study.seed_ids[depth]
    if sid in _LOADED:
        return _LOADED[sid]
    recipe = seed_recipe(study.protocol, depth)
    name = shipped_name(recipe)
    if name is not None:
        model, record = load_shipped(name)
        path = shipped_path(name)
        source, where = "shipped", (path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path))
    else:
        model, record, source = _cached_or_trained(recipe)
        where = record.pop("path")
    index_path = out / "seed_models.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    entry = index.get(str(depth))
    if entry is None or entry.get("sha256") != record["sha256"]:
        rates, _ = evaluate(model, eval_batches, CharTokenizer())
        previous = [] if entry is None else [*entry.get("previous", []),
                                             {k: entry.get(k) for k in ("seed_id", "sha256", "eval_cer")}]
        entry = {
            "n_layers": depth, "params": study.params[depth], "tensors": study.tensors[depth],
            "seed_id": sid, "source": source, "checkpoint": where, "recipe_name": name,
            "recipe": recipe.to_dict(), "sha256": record["sha256"], "record_scores": record.get("scores"),
            "train_s": record.get("train_s"), "eval_wer": rates.wer, "eval_cer": rates.cer,
            "eval_utterances": sum(len(b) for b in eval_batches), "cer_gate": study.protocol.cer_gate,
            "passes_gate": bool(rates.cer <= study.protocol.cer_gate),
            "diagnostic_only": depth not in study.protocol.depths, "recorded": _now(),
            **({"previous": previous} if previous else {}),
        }
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}  # re-read: other runners
        index[str(depth)] = entry
        _write_json(index_path, index)
        print(f"seed model ({depth} blocks, {source}): eval WER {rates.wer:.1%} CER {rates.cer:.1%}"
              f"{'' if entry['passes_gate'] else f' - fails the CER gate {study.protocol.cer_gate:.0%}'}",
              flush=True)
    _LOADED[sid] = (model, entry)
    return model, entry


def failing_depths(study: Study, out: Path) -> set[int]:
    """Depths of the grid whose recorded seed model (the current one) fails the CER gate."""
    index_path = out / "seed_models.json"
    index: Mapping[str, Any] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    bad = set()
    for depth in study.protocol.depths:
        e = index.get(str(depth))
        if e and e.get("seed_id") == study.seed_ids[depth] and not (
                math.isfinite(e["eval_cer"]) and e["eval_cer"] <= study.protocol.cer_gate):
            bad.add(depth)
    return bad
