"""The shipped seed checkpoints are what their recipes in the code produce (checked, not retrained).

Guarantee: the main job (and the study) never load a seed model whose recorded recipe, corpus
fingerprint or bytes differ from what the code would train; a changed recipe or a changed file
is refused with a message naming what differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from examples.asr import seed as seed_mod
from examples.asr.cli import build_parser, fill_presets
from examples.asr.corpus import CorpusConfig
from examples.asr.model import CTCTransformer
from examples.asr.pipeline import shipped_seed_reason
from examples.asr.seed import RECIPES, check_record, load_shipped, shipped_path

SHIPPED = [name for name in RECIPES if shipped_path(name).is_file()]


def test_the_main_jobs_recipe_and_a_gate_passing_recipe_are_shipped() -> None:
    assert {"small", "small-target"} <= set(SHIPPED)
    assert not RECIPES["small"].target_slice and RECIPES["small-target"].target_slice


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_matches_its_recipe_and_the_corpus(name: str) -> None:
    record = check_record(name)  # recipe, corpus format and SHA-256 against the code
    recipe = RECIPES[name]
    assert record["recipe"]["corpus_fingerprint"] == recipe.corpus.fingerprint()
    assert recipe.corpus == CorpusConfig()  # the default corpus of the main job and the study
    model, _ = load_shipped(name)
    fresh = CTCTransformer(recipe.model_config())
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in fresh.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    scores = record["scores"]
    assert scores["dev_cer"] <= 0.10  # it transcribes held-out speakers of its seed domain
    if recipe.target_slice:  # the study's CER gate on the shifted domain
        assert scores["eval_cer"] <= 0.15
    else:  # seed domain only: the shifted domain is what federated fine-tuning has to close
        assert scores["eval_cer"] > 3 * scores["dev_cer"]


def test_a_changed_recipe_or_a_changed_file_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    other = dataclasses.replace(RECIPES["small"], steps=RECIPES["small"].steps + 1)
    with pytest.raises(ValueError, match="steps"):
        check_record("small", other)
    other = dataclasses.replace(RECIPES["small"], corpus=CorpusConfig(seed_target_speakers=0))
    with pytest.raises(ValueError, match="corpus"):
        check_record("small", other)
    copy = tmp_path / "checkpoints"
    copy.mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(shipped_path("small").with_suffix(suffix), copy / f"seed-small{suffix}")
    monkeypatch.setattr(seed_mod, "CHECKPOINTS", copy)
    check_record("small")  # the intact copy passes
    blob = bytearray((copy / "seed-small.pt").read_bytes())
    blob[-100] ^= 1
    (copy / "seed-small.pt").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        check_record("small")


def _args(*argv: str) -> argparse.Namespace:
    return fill_presets(build_parser().parse_args(list(argv)))


def test_the_main_job_loads_the_shipped_seed_unless_an_option_changes_it() -> None:
    assert shipped_seed_reason(_args()) is None
    assert shipped_seed_reason(_args("--seed", "3")) is None  # FL seeds only
    assert shipped_seed_reason(_args("--train-seed")) == "--train-seed"
    assert shipped_seed_reason(_args("--seed-steps", "6000")) == "--seed-steps"
    assert "quick" in str(shipped_seed_reason(_args("--quick")))
    assert shipped_seed_reason(_args("--model", "tiny")) == "--model tiny"
    assert shipped_seed_reason(_args("--specaugment", "small")) == "--specaugment small"


def test_the_example_trains_its_seed_on_the_seed_domain_only(quick_cache: Path) -> None:
    """The corpus's target-domain slice of seed-train is left out of the example's seed role (as
    the shipped ``small`` recipe was trained), and kept for the study's recipes."""
    from examples.asr.corpus import CorpusConfig, plan_speakers, target_slice
    from examples.asr.splits import load_splits

    config = CorpusConfig.quick(seed=0)
    dropped = target_slice(config)
    assert len(dropped) == config.seed_target_speakers > 0
    target_variants = {sp.variant for sp in plan_speakers(config) if sp.split == "eval"}
    planned = {str(sp.speaker_id): sp for sp in plan_speakers(config)}
    assert all(planned[i].variant in target_variants for i in dropped)
    args = _args("--quick", "--cache-dir", str(quick_cache))
    splits = load_splits(args)
    seed_users = {u.user_id for u in splits.seed}
    assert seed_users and not seed_users & dropped
    assert len(seed_users) == config.seed_train_speakers - config.seed_target_speakers
