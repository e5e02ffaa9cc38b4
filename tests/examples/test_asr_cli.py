"""The command line on real-layout data: skip reports, --strict, too-little-data errors, run
directories and a second run of the same command (exit status 2 for user errors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from examples.asr.data import Utterance
from examples.asr_librispeech import build_parser, main, sample_utterances

TINY = ["--model", "tiny", "--seed-steps", "2", "--rounds", "1", "--cohort-size", "2",
        "--local-steps", "1", "--eval-every", "1", "--workers", "1", "--threads", "1",
        "--batch-size", "4"]


def _libri(root: Path, cache: Path, *extra: str) -> list[str]:
    return [*TINY, "--librispeech-root", str(root), "--cache-dir", str(cache), *extra]


def _exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.slow
def test_skips_are_counted_per_split_and_recorded(librispeech_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    results = main(_libri(librispeech_root, tmp_path / "cache", "--output-dir", str(out)))
    fl = results["data"]["splits"]["fl"]
    assert fl["used"] == 7 and fl["found"] == 11 and fl["skipped"]["count"] == 5
    kinds = {k: v["count"] for k, v in fl["skipped"]["by_kind"].items()}
    assert kinds == {"corrupt audio": 2, "no transcript": 2, "missing transcript file": 1}
    assert any("301-7.trans.txt" in e
               for e in fl["skipped"]["by_kind"]["missing transcript file"]["examples"])
    assert results["data"]["splits"]["seed"]["skipped"]["count"] == 0
    stored = json.loads((out / "results.json").read_text())
    assert stored["data"]["splits"]["fl"]["skipped"]["count"] == 5
    printed = capsys.readouterr().out
    assert "2 x corrupt audio" in printed and "300-1-0001.flac" in printed
    assert f"written to {out}/" in printed and "ckpt_fl_dp" in printed

    # --strict turns the skips into one error line, exit status 2.
    line = _exit_2(_libri(librispeech_root, tmp_path / "cache", "--strict", "--output-dir",
                          str(tmp_path / "strict")), capsys)
    assert line.startswith("error: --strict: 5 file(s) skipped")


@pytest.mark.slow
def test_the_same_command_twice_gets_two_run_directories(
    librispeech_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = _libri(librispeech_root, tmp_path / "cache", "--noise-seed", "0")  # reproducible noise
    main(argv)
    main(argv)
    runs = sorted(p for p in (tmp_path / "runs" / "asr").iterdir())
    assert len(runs) == 2 and all((r / "results.json").is_file() for r in runs)
    # same command, same machine: the same numbers and the same seed model, bit for bit
    first, second = (json.loads((r / "results.json").read_text()) for r in runs)
    for name in ("seed", "fl_no_noise", "fl_dp"):
        assert first[name]["wer"] == second[name]["wer"] and first[name]["cer"] == second[name]["cer"]
    states = [torch.load(r / "seed_model.pt", weights_only=True)["state"] for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # an explicit folder that holds a run needs --resume or --overwrite
    line = _exit_2([*argv, "--output-dir", str(runs[0])], capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    main([*argv, "--output-dir", str(runs[0]), "--overwrite"])
    main([*argv, "--output-dir", str(runs[0]), "--resume"])
    assert "seed model: reusing" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "asr-quick").exists()


def test_too_little_data_names_the_split_and_the_count(
    librispeech_root: Path, common_voice_root: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (librispeech_root / "dev-other").mkdir()
    line = _exit_2(_libri(librispeech_root, tmp_path / "cache", "--eval-split", "dev-other",
                          "--output-dir", str(tmp_path / "a")), capsys)
    assert "dev-other" in line and "found 0" in line
    line = _exit_2(_libri(librispeech_root, tmp_path / "cache", "--eval-split", "test-clean",
                          "--output-dir", str(tmp_path / "b")), capsys)
    assert "test-clean" in line and "does not exist" in line

    one_user = tmp_path / "cv1"
    shutil.copytree(common_voice_root, one_user)
    rows = (one_user / "train.tsv").read_text().splitlines()
    (one_user / "train.tsv").write_text("\n".join([rows[0], rows[1]]) + "\n")
    line = _exit_2([*TINY, "--common-voice-root", str(one_user), "--cache-dir",
                    str(tmp_path / "cache"), "--output-dir", str(tmp_path / "c")], capsys)
    assert "train.tsv" in line and "1 user(s)" in line

    (one_user / "train.tsv").write_text("client_id\tpath\nx\ty.mp3\n")
    line = _exit_2([*TINY, "--common-voice-root", str(one_user), "--cache-dir",
                    str(tmp_path / "cache"), "--output-dir", str(tmp_path / "d")], capsys)
    assert "train.tsv" in line and "sentence" in line


def test_resume_without_an_earlier_run_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    line = _exit_2([*TINY, "--quick", "--resume"], capsys)
    assert "no earlier run under runs/asr-quick" in line


def test_eval_sample_is_seeded_and_spread_over_speakers() -> None:
    utts = [Utterance(f"s{i // 10}", Path(f"{i}.flac"), "a", f"u{i:03d}") for i in range(200)]
    first = sample_utterances(utts, 20, seed=0)
    assert first == sample_utterances(utts, 20, seed=0)
    assert first != sample_utterances(utts, 20, seed=1)
    assert len({u.user_id for u in first}) > 5  # not the first two speakers
    assert first == sorted(first, key=lambda u: u.utterance_id)  # reader order kept
    assert sample_utterances(utts[:5], 20, seed=0) == utts[:5]


def test_help_states_every_default_once_and_documents_every_option() -> None:
    text = build_parser().format_help()
    assert "(default: None)" not in text
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
        assert action.help.count("default") <= 1 or action.dest == "output_dir", action.dest
    for flag in ("--cache-dir", "--device"):
        assert build_parser()._option_string_actions[flag].help.count("default") == 1
    assert "(default: small; with --quick: tiny)" in " ".join(text.split())


def test_dp_noise_is_unseeded_unless_a_noise_seed_is_given() -> None:
    from examples.asr.federated import FederatedConfig

    parser = build_parser()
    default = parser.parse_args([])
    assert default.noise_seed is None and default.secure_noise is False
    assert parser.parse_args(["--noise-seed", "7"]).noise_seed == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["--noise-seed", "7", "--secure-noise"])  # a seed is not secure
    dp = FederatedConfig(rounds=1, cohort_size=2, noise_multiplier=1.0, seed=0)
    assert dp.noise_seed is None and dp.noise_source() == "OS entropy (unseeded)"
    assert "simulation only" in FederatedConfig(
        rounds=1, cohort_size=2, noise_multiplier=1.0, noise_seed=3).noise_source()
    assert dp.to_dict()["noise"].startswith("OS entropy")


def test_canaries_option_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args([]).canaries == 0
    assert build_parser().parse_args(["--canaries", "50"]).canaries == 50
    line = _exit_2(["--canaries", "1"], capsys)
    assert "--canaries" in line
