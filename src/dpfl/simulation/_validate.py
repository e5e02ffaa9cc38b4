"""Argument checks of [`run_rounds`][dpfl.simulation.run_rounds], all made before any training or I/O."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl.audit.canary import CanaryAudit
from dpfl.query import DPQuery, check_noise_representable
from dpfl.simulation.config import Checkpointing, Evaluation, LocalTraining, Logging, Privacy


def _require_methods(name: str, obj: Any, methods: tuple[str, ...], what: str) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(f"{name} must be {what}; it lacks the method(s) {missing}")


def _require_instance(name: str, value: Any, cls: type, hint: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} ({hint}), got {type(value).__name__}")


def check_arguments(args: Mapping[str, Any]) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad argument; change nothing.

    ``args`` are [`run_rounds`][dpfl.simulation.run_rounds]' arguments by name.
    """
    model, dataset, loss_fn, sampler = args["model"], args["dataset"], args["loss_fn"], args["sampler"]
    server_optimizer, local, privacy = args["server_optimizer"], args["local"], args["privacy"]
    logging = args["logging"] if args["logging"] is not None else Logging()
    checkpointing, evaluation, audit = args["checkpointing"], args["evaluation"], args["audit"]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _require_methods("dataset", dataset, ("user_ids", "user_data"), "a FederatedDataset")
    if len(dataset.user_ids()) == 0:
        raise ValueError("dataset has no users (empty population); give it at least one user")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
    methods = ("sample", "round_spec", "state_dict", "load_state_dict")
    _require_methods("sampler", sampler, methods, "a PoissonSampler or FixedCohortSampler")
    if not isinstance(server_optimizer, torch.optim.Optimizer):
        raise TypeError(
            "server_optimizer must be a torch.optim.Optimizer over model's parameters"
        )
    _check_optimizer_manages(model, server_optimizer)
    _require_instance("local", local, LocalTraining, "LocalTraining(lr=..., steps=...)")
    _require_instance("privacy", privacy, Privacy, "Privacy(clipper, noise_multiplier, ...)")
    _require_instance("logging", logging, Logging, "Logging(path=...)")
    if checkpointing is not None:
        _require_instance("checkpointing", checkpointing, Checkpointing, "Checkpointing(dir)")
    if evaluation is not None:
        _require_instance("evaluation", evaluation, Evaluation, "Evaluation(fn, every=...)")
    if checkpointing is not None and Path(checkpointing.dir).exists():
        if not Path(checkpointing.dir).is_dir():
            raise ValueError(
                f"Checkpointing.dir {checkpointing.dir} exists and is not a directory"
            )
    if logging.path is not None and Path(logging.path).is_dir():
        raise ValueError(f"Logging.path {logging.path} is a directory; give a file path")
    population = getattr(sampler, "population", None)
    if population is not None:
        known = set(dataset.user_ids())
        unknown = [uid for uid in population if uid not in known]
        if unknown:
            raise ValueError(
                f"sampler has {len(unknown)} user id(s) that dataset does not hold, e.g. "
                f"{unknown[:3]!r}; build the sampler from dataset.user_ids()"
            )
    if audit is not None and not isinstance(audit, CanaryAudit):
        raise TypeError(f"audit must be a dpfl.audit.CanaryAudit or None, got {audit!r}")


def check_query(query: DPQuery, audit: CanaryAudit | None) -> None:
    """The loop's cross-checks of the run's query (before any round is charged)."""
    if query.adaptive and audit is not None:
        raise ValueError(
            "audit= with an adaptive query (AdaptiveClip) is not supported: the canaries are "
            "sized to a fixed bound; audit a run with a fixed clipper"
        )
    query.check_round()


def _check_optimizer_manages(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``optimizer`` manages every trainable parameter of ``model`` (by identity)."""
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in managed]
    if missing:
        raise ValueError(
            f"server_optimizer does not manage {len(missing)} trainable parameter(s) of model, "
            f"e.g. {missing[:3]}; build it from this model's parameters "
            "(server_optimizer=LAMB(model.parameters(), ...)), not another model's or a copy's"
        )


__all__ = ["check_arguments", "check_noise_representable", "check_query"]
