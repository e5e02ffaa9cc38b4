"""The stages of an ASR run: run directory, data, seed model, FL without noise, FL with DP.

:func:`run_pipeline` runs them in order (on every rank under ``torchrun``) and returns the
results dict that :mod:`examples.asr.report` prints as the final table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from dpfl.accounting import extrapolate
from dpfl.audit import CanaryAudit
from dpfl.simulation import CheckpointError, DistContext, init_distributed, shutdown_distributed
from examples.asr.cli import UserError, check_args, fill_presets
from examples.asr.corpus import default_cache_dir
from examples.asr.features import SpecAugment, SpecAugmentConfig
from examples.asr.federated import FederatedConfig, resolve_noise, run_federated
from examples.asr.model import CTCTransformer, get_config
from examples.asr.report import data_report, format_table, jsonable, summary
from examples.asr.rundir import claim_run_directory, plan_run_directory
from examples.asr.seed import check_record, load_shipped, shipped_path
from examples.asr.splits import load_splits, prepare_data
from examples.asr.text import CharTokenizer
from examples.asr.train import Augment, Batch, evaluate, train_central

__all__ = ["PAPER_SCALE", "check_cohort", "resolve_output_dir", "run_pipeline"]

PAPER_SCALE = {"cohort_size": 204_800, "population": 69_500_000, "rounds": 2_034, "delta": 1e-9}
"""The paper's extrapolation point (table in design notes 2.4: σ_DP 3e-6 gives ε 7.2, RDP)."""


_T = TypeVar("_T")


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """The run directory :func:`examples.asr.rundir.plan_run_directory` chooses (nothing is
    written; the folder is created when training starts).

    Raises:
        UserError: as :func:`~examples.asr.rundir.plan_run_directory`.
    """
    return plan_run_directory(args).path


def check_cohort(cohort_size: int, population: int, where: str) -> None:
    """Refuse a cohort larger than the population (Poisson sampling would clamp its rate to 1
    while σ_DP = z / S is reported for the S that was asked for).

    Raises:
        UserError: naming ``--cohort-size`` and the population.
    """
    if cohort_size > population:
        raise UserError(
            f"--cohort-size {cohort_size} is larger than the population: {where} has "
            f"{population} users; choose --cohort-size {population} or less (σ_DP = z / S is "
            "only the noise on the mean if S users are expected per round)")


def _on_rank0(dist: DistContext | None, fn: Callable[[], _T]) -> _T:
    """``fn()`` on rank 0, its result (or its UserError) shared with every rank."""
    if dist is None:
        return fn()
    chosen: list[Any] = [None]
    if dist.rank == 0:
        try:
            chosen[0] = fn()
        except UserError as exc:
            chosen[0] = exc
    tdist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], UserError):
        raise chosen[0]
    result: _T = chosen[0]
    return result


def _rank0(dist: DistContext | None) -> bool:
    return dist is None or dist.rank == 0


def _say(dist: DistContext | None, *msg: object) -> None:
    if _rank0(dist):
        print(*msg, flush=True)


def _rates(model: torch.nn.Module, batches: Sequence[Batch], tok: CharTokenizer) -> dict[str, float]:
    rates, _ = evaluate(model, batches, tok)
    return {"wer": rates.wer, "cer": rates.cer}


def shipped_seed_reason(args: argparse.Namespace) -> str | None:
    """Why this run trains its seed model instead of loading the shipped one (None: it loads it).

    The shipped checkpoint is the ``small`` recipe of :mod:`examples.asr.seed` on the default
    embedded corpus; any option that would change that model trains it instead.
    """
    if getattr(args, "train_seed", False):
        return "--train-seed"
    if args.quick:
        return "--quick (tiny model, quick corpus)"
    if args.librispeech_root is not None or args.common_voice_root is not None:
        return "real data"
    if args.model != "small":
        return f"--model {args.model}"
    if args.specaugment != "none":
        return f"--specaugment {args.specaugment}"
    given = getattr(args, "seed_options_given", [])
    if given:
        return ", ".join("--" + name.replace("_", "-") for name in given)
    return None


def _seed_model(
    args: argparse.Namespace, model: CTCTransformer, batches: Sequence[Batch],
    augment: Augment | None,
    dist: DistContext | None,
) -> dict[str, Any]:
    """Load the shipped seed model or train it (rank 0), or reload it on ``--resume``; returns
    where it came from (``{"source": "shipped" | "trained" | "reused", ...}``)."""
    path = args.output_dir / "seed_model.pt"
    reason = shipped_seed_reason(args)
    if reason is None:
        record = check_record("small")
        key: dict[str, Any] = {"shipped": "small", "sha256": record["sha256"]}
        origin: dict[str, Any] = {"source": "shipped", "checkpoint": str(shipped_path("small")),
                                  "recipe_steps": record["recipe"]["steps"]}
    else:
        key = {"model": model.config.to_dict(), "steps": args.seed_steps, "lr": args.seed_lr,
               "batch_size": args.batch_size, "seed": args.seed, "data": args.data_source}
        origin = {"source": "trained", "why": reason, "steps": args.seed_steps}
    if _rank0(dist):
        reused = False
        if args.resume and path.is_file():
            blob = torch.load(path, weights_only=True, map_location="cpu")
            if blob["key"] == json.loads(json.dumps(key)):
                model.load_state_dict(blob["state"])
                reused = True
                print(f"seed model: reusing {path}", flush=True)
        if not reused and reason is None:
            shipped, _ = load_shipped("small")
            model.load_state_dict(shipped.state_dict())
            print(f"seed model: shipped checkpoint {shipped_path('small').name} (recipe 'small': "
                  f"{record['recipe']['steps']:,} LARS steps on the embedded corpus; record "
                  "checked against the code; --train-seed trains one here)", flush=True)
        elif not reused:
            t0 = time.time()
            print(f"seed model: training ({reason}): {args.seed_steps:,} LARS steps", flush=True)
            losses = train_central(
                model, batches, steps=args.seed_steps, lr=args.seed_lr, warmup_steps=args.seed_steps // 10,
                augment=augment, seed=args.seed, progress=True,
            )
            took = f" in {time.time() - t0:.0f}s" if args.unsafe_metrics else ""
            print(f"seed model: {args.seed_steps} LARS steps{took}, "
                  f"final loss {sum(losses[-20:]) / max(1, len(losses[-20:])):.3f}", flush=True)
        if not reused:
            torch.save({"key": key, "state": model.state_dict()}, path)
    if dist is not None:
        tdist.barrier()
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu")["state"])
    return origin


def _vectorized(args: argparse.Namespace, model: CTCTransformer, augment: Augment | None) -> bool:
    """``--vectorized`` (the script refuses it with LayerDrop or SpecAugment, which ``vmap``
    cannot trace; here they would only make dpfl warn and fall back to the loop)."""
    return bool(getattr(args, "vectorized", False)) and model.config.layerdrop == 0 and augment is None


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Data, seed model, FL without noise, FL with DP, table; returns the results dict."""
    started = time.time()
    args = fill_presets(args)
    check_args(args)  # every option, before any work
    torch.set_num_threads(args.threads)
    dist = init_distributed(timeout_s=7200.0) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    # every rank writes into the folder rank 0 chose; it is created when training starts
    plan = _on_rank0(dist, lambda: plan_run_directory(args))
    args.output_dir = plan.path
    tok = CharTokenizer()

    # Data (rank 0 first, so that the corpus and the feature store are built once).
    if dist is not None and dist.rank != 0:
        tdist.barrier()
    t0 = time.time()
    args.progress = _rank0(dist)
    splits = load_splits(args)
    args.data_source = splits.source
    check_cohort(args.cohort_size, len(splits.fl_users), f"the FL data {splits.names.get('fl')}")
    data = prepare_data(splits, args, tok)
    if dist is not None and dist.rank == 0:
        tdist.barrier()
    took = f" ({time.time() - t0:.0f}s incl. corpus and features)" if args.unsafe_metrics else ""
    _say(dist, f"data: {splits.source}\n  seed {len(data.seed_batches.store)} utterances, FL "
         f"{len(data.dataset)} users / {data.fl_utterances} utterances, eval "
         f"{data.eval_utterances} utterances{took}")
    _say(dist, data_report(data.report))
    check_cohort(args.cohort_size, len(data.dataset),
                 f"the FL data {splits.names.get('fl')}, after skipping unusable files,")

    # Training starts: only now does the run claim its folder (a refused run leaves nothing).
    args.output_dir = _on_rank0(dist, lambda: claim_run_directory(plan))
    _say(dist, f"run directory: {args.output_dir}")
    seed_batches, ev_batches, dev_batches = data.seed_batches, data.eval_batches, data.dev_batches
    dataset = data.dataset
    augment = None if args.specaugment == "none" else SpecAugment(
        SpecAugmentConfig.small() if args.specaugment == "small" else SpecAugmentConfig())

    # Seed model, centrally with LARS.
    with torch.random.fork_rng():  # seeded initialisation, caller's RNG state untouched
        torch.manual_seed(args.seed)
        model = CTCTransformer(get_config(args.model))
    device = torch.device(args.device) if args.device else (dist.device if dist else torch.device("cpu"))
    model.to(device)
    _say(dist, f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters")
    seed_origin = _seed_model(args, model, seed_batches, augment, dist)
    seed_state = {k: v.clone() for k, v in model.state_dict().items()}
    results: dict[str, Any] = {
        "data": {"source": splits.source, "seed_utterances": data.seed_batches.num_utterances(),
                 "fl_users": len(dataset), "fl_utterances": data.fl_utterances,
                 "eval_utterances": data.eval_utterances, "splits": data.report},
        "model": model.config.to_dict(),
        "seed_model": seed_origin,
        # what the printed numbers depend on besides the command line (see docs/asr.md,
        # "Determinism"): the float kernels torch picks for this CPU and the thread count
        "environment": {"torch": torch.__version__,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "threads": args.threads, "device": str(device)}}

    def score(m: torch.nn.Module) -> dict[str, float]:
        out = _rates(m, ev_batches, tok)
        if dev_batches:
            dev = _rates(m, dev_batches, tok)
            out.update(dev_wer=dev["wer"], dev_cer=dev["cer"])
        return out

    if _rank0(dist):
        results["seed"] = score(model)
        _say(dist, f"seed model: {summary(results['seed'])}")

    # Federated fine-tuning: without noise, then with DP.
    population = len(dataset)
    z, sigma_dp = resolve_noise(
        noise_multiplier=args.noise_multiplier, sigma_dp=args.sigma_dp, target_epsilon=args.target_epsilon,
        cohort_size=args.cohort_size, population=population, rounds=args.rounds, delta=args.delta,
        accountant=args.accountant)
    base = FederatedConfig(
        rounds=args.rounds, cohort_size=args.cohort_size, local_steps=args.local_steps,
        local_lr=args.local_lr, server_optimizer=args.server_optimizer, server_lr=args.server_lr,
        server_lr_decay=args.server_lr_decay, clip=args.clip, clip_allocation=args.clip_allocation,
        clip_bound=args.clip_bound, noise_multiplier=0.0, accountant=args.accountant,
        delta=args.delta, sampling=args.sampling, seed=args.seed,
        noise_seed=args.noise_seed, secure_noise=args.secure_noise,
        vectorized=_vectorized(args, model, augment))
    # in-run monitoring on a sample of the eval set (cheap); the table below scores all of it
    eval_fn = (lambda m: _rates(m, data.monitor_batches, tok))  # noqa: E731
    stages = [("fl_no_noise", base), ("fl_dp", replace(base, noise_multiplier=z))]
    if args.compare_clip and z > 0:
        # The paper's headline next to the DP row: the same noise with the other clipping mode.
        other = "global" if args.clip == "per-layer" else "per-layer"
        stages.append(("fl_dp_other_clip", replace(base, noise_multiplier=z, clip=other)))
    for name, cfg in stages:
        model.load_state_dict(seed_state)
        _say(dist, f"{name}: {cfg.rounds} rounds, cohort {cfg.cohort_size} of {population}, "
             f"z={cfg.noise_multiplier:.4g} (σ_DP={cfg.sigma_dp():.3g}), C={cfg.clip_bound:g} {cfg.clip}"
             f"{', vectorized' if cfg.vectorized else ''}")
        t0 = time.time()
        audit = (CanaryAudit(args.canaries, seed=args.seed)
                 if args.canaries and cfg.noise_multiplier > 0 else None)
        try:
            run = run_federated(
                model, dataset, cfg, augment=augment, log_path=args.output_dir / f"{name}.jsonl",
                checkpoint_dir=args.output_dir / f"ckpt_{name}", resume=args.resume,
                eval_fn=eval_fn, eval_every=args.eval_every, dist=dist, audit=audit)
        except CheckpointError as exc:  # e.g. --resume with other privacy settings
            raise UserError(f"{exc} (or start a new run without --resume)") from exc
        if _rank0(dist):
            entry = {**score(model), "epsilon": run.epsilon, "delta": run.delta,
                     "rounds": run.rounds_completed, "stop_reason": run.stop_reason,
                     **cfg.to_dict()}
            if args.unsafe_metrics:  # every stage's time depends on its realised cohorts
                entry["time_s"] = round(time.time() - t0, 1)
            if run.audit is not None:
                entry["audit"] = run.audit
                _say(dist, f"{name}: empirical ε {run.audit['empirical_epsilon']:.3g} "
                     f"({args.canaries} canaries, one-shot estimate) vs proven ε {run.epsilon:.4g}")
            results[name] = entry
            _say(dist, f"{name}: {summary(entry)}  ε={run.epsilon:.4g}")
    if sigma_dp > 0:
        ext = extrapolate(
            sigma_dp=sigma_dp, cohort_size=PAPER_SCALE["cohort_size"],
            population=PAPER_SCALE["population"], rounds=int(PAPER_SCALE["rounds"]),
            delta=PAPER_SCALE["delta"], accountant=args.accountant)
        results["extrapolated"] = {**PAPER_SCALE, "sigma_dp": sigma_dp, "noise_multiplier":
                                   ext.noise_multiplier, "epsilon": ext.epsilon, "accountant": args.accountant}
    if args.unsafe_metrics:  # the wall time depends on the stages' realised cohorts
        results["wall_time_s"] = round(time.time() - started, 1)
    if _rank0(dist):
        table = format_table(results)
        print("\n" + table, flush=True)
        (args.output_dir / "results.json").write_text(json.dumps(jsonable(results), indent=2) + "\n")
        (args.output_dir / "results.md").write_text(table + "\n")
        out = args.output_dir
        print(f"\nwritten to {out}/: results.json and results.md (this table), seed_model.pt, "
              f"round logs {', '.join(f'{n}.jsonl' for n, _ in stages)}, checkpoints "
              f"{', '.join(f'ckpt_{n}/' for n, _ in stages)} (continue with --resume --output-dir "
              f"{out}); corpus and feature "
              f"cache: {args.cache_dir or default_cache_dir()}", flush=True)
    if dist is not None:
        shutdown_distributed()
    return results
