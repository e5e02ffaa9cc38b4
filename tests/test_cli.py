"""The ``dpfl`` console script: ``dpfl privacy epsilon|calibrate|extrapolate``."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpfl.accounting.calibration import epsilon_for
from dpfl.accounting.extrapolation import extrapolate
from dpfl.cli import build_parser, main

REQUIRED_KEYS = {"epsilon", "delta", "noise_multiplier", "sample_rate", "rounds", "accountant"}


def _dpfl_script() -> str:
    beside_python = Path(sys.executable).with_name("dpfl")
    found = str(beside_python) if beside_python.exists() else shutil.which("dpfl")
    assert found, "the dpfl console script is not installed (pip install -e .)"
    return found


def _run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- real subprocesses
def test_installed_script_prints_json_epsilon() -> None:
    proc = subprocess.run(
        [
            _dpfl_script(),
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1.1",
            "--sample-rate",
            "0.01",
            "--rounds",
            "500",
            "--delta",
            "1e-6",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert REQUIRED_KEYS <= set(data)
    assert data["epsilon"] == pytest.approx(epsilon_for(1.1, 0.01, 500, 1e-6), rel=1e-12)
    assert (data["noise_multiplier"], data["sample_rate"], data["rounds"]) == (1.1, 0.01, 500)
    assert data["accountant"] == "rdp" and data["delta"] == 1e-6


def test_installed_script_rejects_bad_argument_with_status_2() -> None:
    proc = subprocess.run(
        [
            _dpfl_script(),
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1.0",
            "--sample-rate",
            "1.5",
            "--rounds",
            "10",
            "--delta",
            "1e-6",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "--sample-rate" in proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------- in process
def test_epsilon_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(
        capsys,
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "2.0",
        "--sample-rate",
        "0.05",
        "--rounds",
        "100",
        "--delta",
        "1e-5",
    )
    assert code == 0
    expected = epsilon_for(2.0, 0.05, 100, 1e-5)
    assert f"epsilon = {expected:.4f}" in out
    assert "rdp" in out


def test_epsilon_with_pld(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(
        capsys,
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "2.0",
        "--sample-rate",
        "0.05",
        "--rounds",
        "100",
        "--delta",
        "1e-5",
        "--accountant",
        "pld",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["accountant"] == "pld"
    assert data["epsilon"] == pytest.approx(
        epsilon_for(2.0, 0.05, 100, 1e-5, accountant="pld"), rel=1e-12
    )


def test_calibrate_json_meets_target(capsys: pytest.CaptureFixture[str]) -> None:
    # full participation (q = 1) keeps each RDP evaluation in closed form, so this stays fast
    argv = "privacy calibrate --epsilon 3.0 --sample-rate 1 --rounds 200 --delta 1e-6 --json"
    code, out, _ = _run_main(capsys, *argv.split(), "--rtol", "1e-2")
    assert code == 0
    data = json.loads(out)
    assert REQUIRED_KEYS <= set(data)
    assert data["epsilon"] <= 3.0
    assert epsilon_for(data["noise_multiplier"] / 1.01, 1.0, 200, 1e-6) > 3.0
    assert data["target_epsilon"] == 3.0
    assert data["sample_rate"] == 1.0 and data["rounds"] == 200


def test_extrapolate_json_matches_library(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(
        capsys,
        "privacy",
        "extrapolate",
        "--sigma-dp",
        "1e-5",
        "--cohort",
        "204800",
        "--population",
        "6.95e6",
        "--rounds",
        "2006",
        "--delta",
        "1e-9",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    ref = extrapolate(sigma_dp=1e-5, cohort_size=204800, population=6.95e6, rounds=2006, delta=1e-9)
    assert REQUIRED_KEYS <= set(data)
    assert data["epsilon"] == pytest.approx(ref.epsilon, rel=1e-12)
    assert data["noise_multiplier"] == pytest.approx(ref.noise_multiplier)
    assert data["population"] == 6.95e6


def test_extrapolate_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(
        capsys,
        "privacy",
        "extrapolate",
        "--sigma-dp",
        "1e-3",
        "--cohort",
        "100",
        "--population",
        "1e4",
        "--rounds",
        "50",
        "--delta",
        "1e-6",
    )
    assert code == 0 and "sigma_dp" in out and "epsilon =" in out


def test_zero_noise_json_epsilon_is_null(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(
        capsys,
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "0",
        "--sample-rate",
        "0.5",
        "--rounds",
        "3",
        "--delta",
        "1e-6",
        "--json",
    )
    assert code == 0 and json.loads(out)["epsilon"] is None


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (
            "privacy epsilon --noise-multiplier -1 --sample-rate 0.1 --rounds 5 --delta 1e-6".split(),
            "--noise-multiplier",
        ),
        (
            "privacy epsilon --noise-multiplier 1 --sample-rate 0.1 --rounds 5 --delta 2".split(),
            "--delta",
        ),
        (
            "privacy epsilon --noise-multiplier 1 --sample-rate 0.1 --rounds -5 --delta 1e-6".split(),
            "--rounds",
        ),
        (
            "privacy epsilon --noise-multiplier 1 --sample-rate 0.1 --rounds 2.5 --delta 1e-6".split(),
            "--rounds",
        ),
        ("privacy epsilon --noise-multiplier 1 --sample-rate 0.1 --rounds 5".split(), "--delta"),
        (
            "privacy epsilon --noise-multiplier 1 --sample-rate 0.1 --rounds 5 --delta 1e-6 --accountant moments".split(),
            "--accountant",
        ),
        (
            "privacy calibrate --epsilon 0 --sample-rate 0.1 --rounds 5 --delta 1e-6".split(),
            "--epsilon",
        ),
        (
            "privacy calibrate --epsilon 1 --sample-rate 0 --rounds 5 --delta 1e-6".split(),
            "--sample-rate",
        ),
        (
            "privacy calibrate --epsilon 1e-6 --sample-rate 1 --rounds 100 --delta 1e-9 --max-noise-multiplier 10".split(),
            "cannot be met",
        ),
        (
            "privacy extrapolate --sigma-dp 1e-3 --cohort 500 --population 100 --rounds 5 --delta 1e-6".split(),
            "--cohort",
        ),
        (
            "privacy extrapolate --sigma-dp 0 --cohort 5 --population 100 --rounds 5 --delta 1e-6".split(),
            "--sigma-dp",
        ),
        (
            "privacy extrapolate --sigma-dp 1e-3 --cohort 5 --population -100 --rounds 5 --delta 1e-6".split(),
            "--population",
        ),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str
) -> None:
    code, out, err = _run_main(capsys, *argv)
    assert code == 2
    assert option in err
    assert out == ""


@pytest.mark.parametrize("argv", [[], ["privacy"], ["nonsense"]])
def test_missing_command_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = _run_main(capsys, *argv)
    assert code == 2 and "usage" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(capsys, "privacy", "calibrate", "--help")
    assert code == 0 and "--sample-rate" in out


# --------------------------------------------------------------------------- bad inputs (issue 11)
EPS = "privacy epsilon --sample-rate 0.01 --rounds 10 --delta 1e-5".split()


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        # PLD work bounded up front: no numpy memory error
        (
            ["--noise-multiplier", "1", "--rounds", "1000000000000", "--accountant", "pld"],
            "--rounds",
        ),
        (["--noise-multiplier", "1", "--rounds", "1e12", "--accountant", "pld"], "--rounds"),
        (
            [
                "--noise-multiplier",
                "1",
                "--accountant",
                "pld",
                "--value-discretization-interval",
                "1e-9",
            ],
            "--value-discretization-interval",
        ),
        (["--noise-multiplier", "1e-30", "--accountant", "pld"], "--noise-multiplier"),
        # negative numbers are values, not options, and are then rejected by name
        (["--noise-multiplier", "1", "--delta", "-1e-5"], "--delta"),
        (["--noise-multiplier", "-1e-3"], "--noise-multiplier"),
        (["--noise-multiplier", "1", "--rounds", "-1e3"], "--rounds"),
    ],
)
def test_bad_inputs_exit_2_naming_the_option_without_traceback(
    capsys: pytest.CaptureFixture[str], extra: list[str], option: str
) -> None:
    code, out, err = _run_main(capsys, *EPS, *extra)
    assert code == 2, err
    assert f"argument {option}" in err
    assert "Traceback" not in err and "expected one argument" not in err
    assert out == ""


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_huge_noise_multiplier_gives_a_tiny_upper_bound(
    capsys: pytest.CaptureFixture[str], accountant: str
) -> None:
    # dp_accounting overflows (z**2) beyond ~1e154; dpfl accounts any z above its cap as the cap,
    # which is conservative since epsilon does not increase with z.
    code, out, err = _run_main(
        capsys, *EPS, "--noise-multiplier", "1e160", "--accountant", accountant, "--json"
    )
    assert code == 0, err
    eps = json.loads(out)["epsilon"]
    capped = epsilon_for(1e6, 0.01, 10, 1e-5, accountant=accountant)  # type: ignore[arg-type]
    assert 0 <= eps == capped < 1e-3


def test_negative_delta_reaches_validation_in_a_subprocess() -> None:
    proc = subprocess.run(
        [_dpfl_script(), *EPS[:-1], "-1e-5", "--noise-multiplier", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "argument --delta" in proc.stderr and "(0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def _subcommands() -> list[tuple[str, argparse.ArgumentParser]]:
    found = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append((f"{prefix} {name}".strip(), sub))
                    walk(f"{prefix} {name}", sub)

    walk("", build_parser())
    return found


@pytest.mark.parametrize("name", [name for name, _ in _subcommands()])
def test_every_subcommand_and_option_is_documented(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    parser = dict(_subcommands())[name]
    assert parser.description, f"dpfl {name} has no description"
    code, out, _ = _run_main(capsys, *name.split(), "--help")
    assert code == 0
    assert parser.description.split()[0] in out
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or "-h" in action.option_strings:
            continue
        assert action.help, f"dpfl {name} {action.option_strings}: no help text"
        if action.default not in (None, False) and not action.required:
            shown = parser._get_formatter()._expand_help(action)
            assert f"default: {action.default}" in shown, (name, action.option_strings, shown)


# --------------------------------------------------------------------------- dpfl audit errors
_COUNTS = ["--false-positives", "0", "--trials-out", "3", "--false-negatives", "0",
           "--trials-in", "3", "--delta", "1e-5"]  # fmt: skip


def _with(args: list[str], option: str, value: str) -> list[str]:
    if option not in args:
        return [*args, option, value]
    out = list(args)
    out[out.index(option) + 1] = value
    return out


@pytest.mark.parametrize(
    ("cosines", "argv_extra", "option"),
    [
        ({"final": {"canary": ["abc", 0.1], "unseen": [0.1, 0.2]}}, [], "--cosines"),
        ({"final": {"canary": [0.5, 0.1], "unseen": [0.1, True]}}, [], "--cosines"),
        ({"final": {"canary": [0.5], "unseen": [0.1, 0.2]}}, [], "--cosines"),
        ({"final": {"canary": 3, "unseen": [0.1, 0.2]}}, [], "--cosines"),
        ({"final": {"canary": [0.5, 0.1], "unseen": [0.1, 0.2]},
          "all_iterates": {"canary": [0.1, None], "unseen": [0.1, 0.2]}}, [], "--cosines"),
        ({}, [], "--cosines"),
        ({"final": {"canary": [0.5, 0.1], "unseen": [0.1, 0.2]}}, ["--delta", "2"], "--delta"),
    ],
    ids=["text", "bool", "one-value", "not-a-list", "null-in-all-iterates", "no-final", "delta"],
)
def test_audit_estimate_errors_name_the_option_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path, cosines, argv_extra, option  # type: ignore[no-untyped-def]
) -> None:
    """Issue 21 p19: every bad input of ``dpfl audit estimate`` is exit 2 with one error line
    that names the option (not ``could not convert string to float: 'abc'``)."""
    path = tmp_path / "cosines.json"
    path.write_text(json.dumps(cosines))
    argv = ["audit", "estimate", "--cosines", str(path), "--delta", "1e-5"]
    code, out, err = _run_main(capsys, *(argv if not argv_extra else [*argv[:4], *argv_extra]))
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"error: argument {option}: " in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--false-positives", "5", "--false-positives"),  # more than --trials-out
        ("--false-negatives", "4", "--false-negatives"),  # more than --trials-in
        ("--trials-out", "0", "--trials-out"),
        ("--trials-in", "0", "--trials-in"),
        ("--false-positives", "-1", "--false-positives"),
        ("--confidence", "1.5", "--confidence"),
        ("--delta", "0", "--delta"),
    ],
)
def test_audit_bound_errors_name_the_option_in_one_line(
    capsys: pytest.CaptureFixture[str], option: str, value: str, named: str
) -> None:
    code, out, err = _run_main(capsys, "audit", "bound", *_with(_COUNTS, option, value))
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"error: argument {named}: " in errors[0], err
