"""Tests of the round loop: ledger, budget stop, log, eval cadence, bad inputs, DP composition."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpfl.accounting import PoissonRound, PrivacyBudget, RDPAccountant
from dpfl.clip import GlobalClip
from dpfl.optim import LAMB
from dpfl.simulation import (
    Checkpointing,
    Evaluation,
    InMemoryFederatedDataset,
    LocalTraining,
    Logging,
    PoissonSampler,
    Privacy,
    train_local,
)
from dpfl.simulation._progress import Progress
from dpfl.simulation.rounds import run_rounds
from tests._scripts.tiny_fl import ORDERS, loss_fn, make_dataset, make_model

Z, Q, DELTA = 1.0, 0.5, 1e-5


def accountant(budget: float | None = None) -> RDPAccountant:
    """An RDP accountant over integer orders (fast to evaluate; ε within ~1% of the default)."""
    return RDPAccountant(
        budget=None if budget is None else PrivacyBudget(budget, DELTA), orders=ORDERS
    )


def setup(model_seed: int = 0, *, lr: float = 0.01, budget: float | None = None, users: int = 12):
    model = make_model(model_seed)
    dataset = make_dataset(users)
    return dict(
        model=model,
        dataset=dataset,
        loss_fn=loss_fn,
        sampler=PoissonSampler(dataset.user_ids(), Q, seed=3),
        clipper=GlobalClip(0.5),
        noise_multiplier=Z,
        server_optimizer=LAMB(model.parameters(), lr=lr),
        accountant=accountant(budget),
        local_lr=0.1,
        local_steps=2,
        seed=7,
        noise_seed=7,
        delta=DELTA,
        progress=False,
    )


#: Flat test keyword -> (config object, field). ``call`` groups them into the config dataclasses.
_GROUPS = {
    "local_lr": ("local", "lr"),
    "local_steps": ("local", "steps"),
    "local_epochs": ("local", "epochs"),
    "vectorized": ("local", "vectorized"),
    "align": ("local", "align"),
    "clipper": ("privacy", "clipper"),
    "noise_multiplier": ("privacy", "noise_multiplier"),
    "accountant": ("privacy", "accountant"),
    "delta": ("privacy", "delta"),
    "noise_seed": ("privacy", "noise_seed"),
    "secure_noise": ("privacy", "secure_noise"),
    "drop_nonfinite": ("privacy", "drop_nonfinite"),
    "checkpoint_dir": ("checkpointing", "dir"),
    "checkpoint_every": ("checkpointing", "every"),
    "resume": ("checkpointing", "resume"),
    "log_path": ("logging", "path"),
    "progress": ("logging", "progress"),
    "progress_every": ("logging", "every"),
    "unsafe_metrics": ("logging", "unsafe_metrics"),
    "eval_fn": ("evaluation", "fn"),
    "eval_every": ("evaluation", "every"),
}
_CLASSES = {
    "local": LocalTraining,
    "privacy": Privacy,
    "checkpointing": Checkpointing,
    "logging": Logging,
    "evaluation": Evaluation,
}


def call(kw: dict[str, Any], **extra: Any):
    args = {**kw, **extra}
    model, dataset, fn = args.pop("model"), args.pop("dataset"), args.pop("loss_fn")
    groups: dict[str, dict[str, Any]] = {}
    for key in [k for k in args if k in _GROUPS]:
        group, field_name = _GROUPS[key]
        groups.setdefault(group, {})[field_name] = args.pop(key)
    for group, fields in groups.items():
        if group in ("checkpointing", "evaluation") and not {"dir", "fn"} & set(fields):
            continue  # cadence without a directory/hook: nothing to configure
        args[group] = _CLASSES[group](**fields)
    return run_rounds(model, dataset, fn, **args)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_log(path: Path) -> list[dict[str, Any]]:
    def strict(const: str) -> Any:
        raise ValueError(f"non-standard JSON constant {const}")

    return [json.loads(line, parse_constant=strict) for line in path.read_text().splitlines()]


def test_ledger_matches_rounds_run() -> None:
    kw = setup()
    result = call(kw, rounds=4)
    acc, sampler = kw["accountant"], kw["sampler"]
    assert result.stop_reason == "completed" and result.rounds_completed == 4
    assert [r.round for r in result.records] == [1, 2, 3, 4]
    assert acc.rounds == 4 and sampler.rounds_sampled == 4
    assert acc.ledger == [(PoissonRound(noise_multiplier=Z, sample_rate=Q), 4)]
    reference = accountant()
    reference.add_rounds(PoissonRound(noise_multiplier=Z, sample_rate=Q), 4)
    assert result.epsilon == pytest.approx(reference.epsilon(DELTA), rel=1e-12)
    eps = [r.epsilon for r in result.records]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(result.epsilon)


def test_budget_stop_does_not_run_or_count_the_round(tmp_path: Path) -> None:
    spec = PoissonRound(noise_multiplier=Z, sample_rate=Q)
    probe = accountant()
    probe.add_rounds(spec, 3)
    budget = (probe.epsilon(DELTA) + accountant_eps(4)) / 2  # 3 rounds fit, 4 do not
    kw = setup(budget=budget)
    result = call(kw, rounds=10, log_path=tmp_path / "log.jsonl")
    assert result.stop_reason == "budget" and result.rounds_completed == 3
    assert "budget" in result.stop_message and "round 4" in result.stop_message
    assert kw["accountant"].rounds == 3 and kw["sampler"].rounds_sampled == 3
    assert result.epsilon <= budget
    events = read_log(tmp_path / "log.jsonl")
    assert [e["round"] for e in events if e["event"] == "round"] == [1, 2, 3]
    stop = events[-1]
    assert stop["event"] == "stop" and stop["reason"] == "budget" and "budget" in stop["message"]
    # The stopped run is exactly the 3-round run: nothing of round 4 leaked into the model.
    plain = setup()
    call(plain, rounds=3)
    for k, v in params(plain["model"]).items():
        assert torch.equal(v, kw["model"].state_dict()[k])


def accountant_eps(rounds: int) -> float:
    acc = accountant()
    acc.add_rounds(PoissonRound(noise_multiplier=Z, sample_rate=Q), rounds)
    return acc.epsilon(DELTA)


@settings(max_examples=12)
@given(rounds=st.integers(1, 6), budget=st.floats(0.5, 40.0), every=st.integers(1, 4))
def test_property_ledger_never_exceeds_budget_and_counts_each_round(
    rounds: int, budget: float, every: int
) -> None:
    kw = setup(budget=budget, users=6)
    result = call(kw, rounds=rounds, eval_fn=lambda m: {"x": 1.0}, eval_every=every)
    acc = kw["accountant"]
    assert acc.rounds == result.rounds_completed == len(result.records)
    assert result.epsilon <= budget
    evals = [r.round for r in result.records if r.eval is not None]
    assert evals == [t for t in range(1, result.rounds_completed + 1) if t % every == 0]
    if result.stop_reason == "budget":
        assert result.rounds_completed < rounds
        assert acc.would_exceed(PoissonRound(noise_multiplier=Z, sample_rate=Q))
    else:
        assert result.rounds_completed == rounds


@settings(max_examples=15)
@given(
    bound=st.floats(1e-3, 10.0),
    cohort=st.integers(1, 5),
    model_seed=st.integers(0, 2**16),
)
def test_property_one_round_is_clipped_sum_over_expected_cohort(
    bound: float, cohort: int, model_seed: int
) -> None:
    """Without noise and with SGD(lr=1), one round adds sum(clip(Δ_u)) / S to the model."""
    kw = setup(model_seed)
    model, dataset = kw["model"], kw["dataset"]
    before = copy.deepcopy(model)
    users = list(dataset.user_ids())[model_seed % 6 :][:cohort]
    kw.update(
        sampler=PoissonSampler(users, 1.0, seed=model_seed),  # everyone, S = len(users)
        clipper=GlobalClip(bound),
        noise_multiplier=0.0,
        server_optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
    )
    result = call(kw, rounds=1, unsafe_metrics=True)
    expected = {n: p.detach().clone() for n, p in before.named_parameters()}
    for position, uid in enumerate(users):
        gen = torch.Generator().manual_seed(_local_seed(7, 1, position))
        delta = train_local(before, dataset.user_data(uid), loss_fn, lr=0.1, steps=2, generator=gen)
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
        scale = min(1.0, bound / norm) if norm > 0 else 1.0
        for n in expected:
            expected[n] += delta[n] * scale / cohort
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6)
    record = result.records[0]
    assert record.num_users == cohort and 0.0 <= record.fraction_clipped <= 1.0


def _local_seed(seed: int, *key: int) -> int:
    from dpfl.simulation._shard import derive_seed as _derive_seed

    return _derive_seed(seed, *key)


def test_jsonl_log_content(tmp_path: Path) -> None:
    log = tmp_path / "sub" / "log.jsonl"
    result = call(setup(), rounds=3, log_path=log, unsafe_metrics=True)
    events = read_log(log)
    assert [e["event"] for e in events] == ["start", "round", "round", "round", "stop"]
    start, *rounds_, stop = events
    assert start["config"]["noise_multiplier"] == Z and start["world_size"] == 1
    for e, rec in zip(rounds_, result.records, strict=True):
        assert e == json.loads(json.dumps(rec.to_dict()))
        assert set(e["timings"]) >= {"sample", "train", "aggregate", "server_step", "account"}
        assert e["num_users"] >= 0 and e["delta"] == DELTA and e["time_s"] > 0
    assert stop["reason"] == "completed" and stop["epsilon"] == pytest.approx(result.epsilon)


def test_log_encodes_infinite_epsilon_as_strict_json(tmp_path: Path) -> None:
    kw = setup()
    kw["noise_multiplier"] = 0.0
    result = call(kw, rounds=1, log_path=tmp_path / "log.jsonl")
    assert math.isinf(result.epsilon)
    events = read_log(tmp_path / "log.jsonl")  # raises on Infinity/NaN constants
    assert events[1]["epsilon"] == "inf"


def test_eval_hook_cadence() -> None:
    calls: list[int] = []
    kw = setup()

    def eval_fn(model: nn.Module) -> dict[str, float]:
        calls.append(kw["accountant"].rounds)
        return {"loss": 0.5, "rounds": float(kw["accountant"].rounds)}

    result = call(kw, rounds=7, eval_fn=eval_fn, eval_every=3, unsafe_metrics=True)
    assert calls == [3, 6]
    assert [r.round for r in result.records if r.eval is not None] == [3, 6]
    assert result.records[2].eval == {"loss": 0.5, "rounds": 3.0}
    assert "eval" in result.records[2].timings and "eval" not in result.records[0].timings


def test_plain_progress_lines_every_n_rounds() -> None:
    stream = io.StringIO()
    bar = Progress(5, 0, enabled=None, every=2, stream=stream)
    for t in range(1, 6):
        bar.update(t, num_users=3, epsilon=0.1 * t, time_s=0.01)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["2/5", "4/5", "5/5"]
    silent = io.StringIO()
    Progress(5, 0, enabled=False, every=1, stream=silent).update(
        1, num_users=1, epsilon=0, time_s=0
    )
    assert silent.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_shows_cohort_size_and_times_only_when_unsafe(terminal: bool) -> None:
    shown = {}
    for unsafe in (False, True):
        stream = _Terminal() if terminal else io.StringIO()
        bar = Progress(4, 0, enabled=True, every=1, stream=stream, unsafe=unsafe)
        for t in range(1, 5):
            bar.update(t, num_users=1234, epsilon=0.5, time_s=9.875)
        bar.close()
        shown[unsafe] = stream.getvalue()
    assert "1234" not in shown[False] and "9.875" not in shown[False]
    assert "it/s" not in shown[False] and "s/it" not in shown[False]  # no tqdm rate either
    assert "1234" in shown[True]


def test_tqdm_bar_on_a_terminal() -> None:
    stream = _Terminal()
    bar = Progress(4, 1, enabled=None, every=100, stream=stream)
    for t in range(2, 5):
        bar.update(t, num_users=3, epsilon=0.5, time_s=0.01)
    bar.message("stopped")
    bar.close()
    text = stream.getvalue()
    assert "4/4" in text and "dpfl: stopped" in text  # a tqdm bar (starting at 1/4), no plain lines
    assert "dpfl: round" not in text


UNSAFE = ("num_users", "num_dropped", "fraction_clipped", "mean_norm", "time_s", "timings")


def test_records_and_log_hold_no_cohort_statistics_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    result = call(setup(), rounds=3, log_path=log, eval_fn=lambda m: {"x": 1.0}, eval_every=1)
    for record in result.records:
        assert all(getattr(record, name) is None for name in UNSAFE), record
        assert record.eval == {"x": 1.0} and record.epsilon > 0
    events = read_log(log)
    assert events[0]["unsafe_metrics"] is False and "warning" not in events[0]
    for event in events[1:-1]:
        assert set(event) == {"event", "round", "epsilon", "delta", "eval"}, event
    assert "unsafe" not in capsys.readouterr().err


def test_unsafe_metrics_are_opt_in_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    result = call(setup(), rounds=2, log_path=log, unsafe_metrics=True)
    assert all(isinstance(r.num_users, int) and r.timings for r in result.records)
    start, *rounds_, _stop = read_log(log)
    assert start["unsafe_metrics"] is True and "NOT covered" in start["warning"]
    assert all(set(UNSAFE) <= set(e) for e in rounds_)
    assert "NOT covered by the differential-privacy guarantee" in capsys.readouterr().err


def test_vectorized_matches_sequential() -> None:
    seq, vec = setup(), setup()
    call(seq, rounds=2)
    call(vec, rounds=2, vectorized=True)
    for k, v in params(seq["model"]).items():
        torch.testing.assert_close(vec["model"].state_dict()[k], v, rtol=1e-5, atol=1e-6)


class _NoUsers:
    def user_ids(self) -> list[str]:
        return []

    def user_data(self, uid: str) -> Any:
        raise KeyError(uid)


def test_empty_population_is_rejected() -> None:
    kw = setup()
    with pytest.raises(ValueError, match="empty population"):
        call({**kw, "dataset": _NoUsers()}, rounds=1)
    with pytest.raises(ValueError, match="population"):
        PoissonSampler([], 0.5)


def _assert_state_unchanged(kw: dict[str, Any], before: dict[str, torch.Tensor]) -> None:
    assert kw["accountant"].rounds == 0 and kw["sampler"].rounds_sampled == 0
    for k, v in before.items():
        assert torch.equal(kw["model"].state_dict()[k], v)
    assert not kw["server_optimizer"].state


def test_user_without_data_names_the_user_and_changes_nothing() -> None:
    kw = setup()
    data = {uid: kw["dataset"].user_data(uid) for uid in kw["dataset"].user_ids()}
    data["u3"] = []
    kw["dataset"] = InMemoryFederatedDataset(data)
    kw["sampler"] = PoissonSampler(list(data), 1.0, seed=0)
    before = params(kw["model"])
    with pytest.raises(ValueError, match="'u3' has no data"):
        call(kw, rounds=2)
    _assert_state_unchanged(kw, before)


def nan_for(user_x: torch.Tensor):
    def fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loss = loss_fn(model, batch)
        return loss * math.nan if torch.equal(batch[0], user_x) else loss

    return fn


def test_nan_loss_names_the_user_and_changes_nothing() -> None:
    kw = setup()
    kw["sampler"] = PoissonSampler(kw["dataset"].user_ids(), 1.0, seed=0)
    kw["loss_fn"] = nan_for(kw["dataset"].user_data("u5")[0][0])
    before = params(kw["model"])
    with pytest.raises(ValueError, match="'u5'.*not finite"):
        call(kw, rounds=2)
    _assert_state_unchanged(kw, before)


def test_nan_loss_user_is_dropped_with_drop_nonfinite() -> None:
    kw = setup()
    kw["sampler"] = PoissonSampler(kw["dataset"].user_ids(), 1.0, seed=0)
    kw["loss_fn"] = nan_for(kw["dataset"].user_data("u5")[0][0])
    result = call(kw, rounds=1, drop_nonfinite=True, unsafe_metrics=True)
    record = result.records[0]
    assert record.num_dropped == 1 and record.num_users == 11
    assert all(torch.isfinite(p).all() for p in kw["model"].parameters())


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"rounds": 0}, "rounds"),
        ({"seed": -1}, "seed"),
        ({"local_steps": None}, "exactly one of steps and epochs"),
        ({"local_epochs": 1}, "exactly one of steps and epochs"),
        ({"delta": 1.5}, "Privacy.delta"),
        ({"noise_multiplier": -1.0}, "Privacy.noise_multiplier"),
        ({"local_lr": 0.0}, "LocalTraining.lr"),
        ({"noise_seed": 3, "secure_noise": True}, "noise_seed=None"),
        ({"checkpoint_dir": "x", "checkpoint_every": 0}, "Checkpointing.every"),
        ({"eval_fn": lambda m: {}, "eval_every": 0}, "Evaluation.every"),
        ({"progress_every": 0}, "Logging.every"),
        ({"vectorized": True, "local_steps": None, "local_epochs": 1}, "steps"),
        ({"align": lambda batches: batches}, "align only applies to vectorized=True"),
    ],
)
def test_invalid_arguments_name_the_parameter(extra: dict[str, Any], match: str) -> None:
    kw = setup()
    before = params(kw["model"])
    args = {"rounds": 2, **extra}
    with pytest.raises(ValueError, match=match):
        call(kw, **args)
    _assert_state_unchanged(kw, before)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: Privacy(object(), noise_multiplier=1.0, accountant=accountant(), delta=DELTA),
            "Privacy.clipper",
        ),
        (
            lambda: Privacy(
                GlobalClip(1.0), noise_multiplier=1.0, accountant=object(), delta=DELTA
            ),
            "Privacy.accountant",
        ),
        (
            lambda: Privacy(
                GlobalClip(1.0),
                noise_multiplier=1.0,
                accountant=accountant(),
                delta=DELTA,
                secure_noise=1,
            ),
            "Privacy.secure_noise",
        ),
        (lambda: LocalTraining(lr=0.1, steps=1.5), "LocalTraining.steps"),
        (lambda: LocalTraining(lr=0.1, steps=1, vectorized=True, align=3), "LocalTraining.align"),
        (lambda: Checkpointing(None), "Checkpointing.dir"),
        (lambda: Logging(path=3), "Logging.path"),
        (lambda: Evaluation(fn=3), "Evaluation.fn"),
    ],
)
def test_config_types_are_checked_when_built(build: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        build()


def test_flat_keyword_of_the_old_api_is_a_type_error() -> None:
    kw = setup()
    model, dataset = kw["model"], kw["dataset"]
    with pytest.raises(TypeError):
        run_rounds(
            model,
            dataset,
            loss_fn,
            sampler=kw["sampler"],
            rounds=1,  # type: ignore[call-arg]
            server_optimizer=kw["server_optimizer"],
            local_lr=0.1,
        )
    with pytest.raises(TypeError, match="privacy must be a Privacy"):
        run_rounds(
            model,
            dataset,
            loss_fn,
            sampler=kw["sampler"],
            rounds=1,
            server_optimizer=kw["server_optimizer"],
            local=LocalTraining(lr=0.1, steps=1),
            privacy={"noise_multiplier": 1.0},
        )  # type: ignore[arg-type]


def test_accountant_of_the_wrong_adjacency_fails_before_anything_changes(tmp_path: Path) -> None:
    from dpfl.simulation import FixedCohortSampler

    kw = setup()
    kw["sampler"] = FixedCohortSampler(kw["dataset"].user_ids(), 3, seed=0)
    log = tmp_path / "log.jsonl"
    log.write_text("previous run\n")
    with pytest.raises(ValueError, match="replace_one"):
        call(kw, rounds=2, log_path=log)
    _assert_state_unchanged(kw, params(kw["model"]))
    assert log.read_text() == "previous run\n"


def test_simulation_seed_does_not_seed_the_noise() -> None:
    """Issue 9: ``seed`` (local training) and the sampler seed reproduce everything but the DP
    noise, which is unseeded unless ``noise_seed`` is given explicitly."""
    default = Privacy(GlobalClip(1.0), noise_multiplier=1.0, accountant=accountant(), delta=DELTA)
    assert default.noise_seed is None and not default.secure_noise
    models = {}
    for name, noise_seed in (("a", None), ("b", None), ("c", 7), ("d", 7)):
        kw = setup()
        kw.pop("noise_seed")
        if noise_seed is not None:
            kw["noise_seed"] = noise_seed
        call(kw, rounds=2)
        models[name] = params(kw["model"])
    weights = [k for k in models["a"] if k.endswith("weight")]
    assert all(torch.equal(models["c"][k], models["d"][k]) for k in models["c"])  # same noise
    assert all(not torch.equal(models["a"][k], models["b"][k]) for k in weights)  # fresh noise


def test_plain_progress_prints_at_least_every_30_seconds_when_piped() -> None:
    """Output piped to a file or CI log: besides every ``every`` rounds, a line whenever ~30 s
    passed since the last one, so a slow run is never silent for minutes (round and ε only)."""
    stream = io.StringIO()
    bar = Progress(100, 0, enabled=None, every=10, stream=stream)
    now = [1000.0]
    bar._clock = lambda: now[0]
    bar._last_line = now[0]
    for t in range(1, 8):
        now[0] += 12.0  # 12 s per round: lines after rounds 3 (36 s) and 6 (72 s)
        bar.update(t, num_users=3, epsilon=0.01 * t, time_s=12.0)
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["3/100", "6/100"]
    assert all("users" not in line and "s/round" not in line for line in lines)
