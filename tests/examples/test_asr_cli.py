"""The command line on real-layout data: skip reports, --strict, too-little-data errors, run
directories and a second run of the same command (exit status 2 for user errors)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from examples.asr.data import Utterance, read_common_voice
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
    assert line.startswith("error: --strict: 3 file(s) unusable at listing")


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


def _no_work_done(cache: Path, out: Path) -> None:
    """Nothing was extracted or trained, and nothing blocks the same command later."""
    assert not list(cache.glob("features/packs/*.f16")), "features were extracted"
    assert not out.exists() or not any(out.iterdir()), f"{out} holds {list(out.iterdir())}"


@pytest.mark.parametrize("flags, culprit", [
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--cohort-size", "0"], "--cohort-size must be at least 1"),
    (["--local-steps", "0"], "--local-steps must be at least 1"),
    (["--delta", "1"], "--delta must lie in (0, 1), got 1.0"),
    (["--delta", "0"], "--delta must lie in (0, 1)"),
    (["--target-epsilon", "-1"], "--target-epsilon must be > 0 and finite, got -1.0"),
    (["--target-epsilon", "inf"], "--target-epsilon must be > 0 and finite"),
    (["--noise-multiplier", "nan"], "--noise-multiplier must be >= 0 and finite"),
    (["--sigma-dp", "-0.1"], "--sigma-dp must be >= 0 and finite"),
    (["--clip-bound", "0"], "--clip-bound must be > 0 and finite"),
    (["--local-lr", "-1"], "--local-lr must be > 0"),
    (["--server-lr-decay", "1.5"], "--server-lr-decay must lie in (0, 1]"),
    (["--noise-seed", "-1"], "--noise-seed must be an integer in [0, 2**63), got -1"),
    (["--noise-seed", str(2**64)], f"--noise-seed must be an integer in [0, 2**63), got {2**64}"),
    (["--seed", "-3"], "--seed must be at least 0"),
    (["--device", "gpu7"], "--device 'gpu7' is not a torch device"),
])
def test_flags_are_checked_before_any_work(flags: list[str], culprit: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21.15: an out-of-range option is one line and exit 2 at once, naming the option,
    not a traceback after seed training."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    line = _exit_2(["--quick", "--cache-dir", str(cache), "--output-dir", str(out), *flags],
                   capsys)
    assert line == f"error: {culprit}" or line.startswith(f"error: {culprit}"), line
    assert not cache.exists() and not out.exists()  # nothing generated, nothing claimed


def test_cache_and_output_folders_are_checked_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21.15: a --cache-dir that is a file (or under one) or read-only is refused at once."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flags, culprit in (
            (["--cache-dir", str(a_file)], f"--cache-dir {a_file} is a file, not a folder"),
            (["--cache-dir", str(a_file / "sub")], f"--cache-dir {a_file / 'sub'}: {a_file} is a file"),
            (["--output-dir", str(a_file)], f"--output-dir {a_file} is a file, not a folder")):
        assert _exit_2(["--quick", *flags], capsys).startswith(f"error: {culprit}")
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = _exit_2(["--quick", "--cache-dir", str(locked / "cache")], capsys)
        assert line.startswith(f"error: --cache-dir {locked / 'cache'} cannot be created in")


def test_cohort_larger_than_the_population_is_refused_when_listing(
        librispeech_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21.7: --cohort-size above the number of FL users would be clamped to everyone while
    σ_DP is printed for the cohort asked for; it is refused before any extraction."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    line = _exit_2(_libri(librispeech_root, cache, "--output-dir", str(out), "--cohort-size",
                          "4"), capsys)
    assert "--cohort-size 4 is larger than the population" in line
    assert "train-clean-360 has 3 users" in line and "--cohort-size 3 or less" in line
    _no_work_done(cache, out)


@pytest.mark.slow
def test_strict_names_every_unusable_file_before_extracting_and_a_refusal_blocks_nothing(
        librispeech_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issues 21.9 and 21.11: --strict refuses what the listing found before extracting any
    feature, naming each file (not only the first); a refused run leaves nothing in its output
    folder, so the same command succeeds once the data is fixed."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = _libri(librispeech_root, cache, "--strict", "--output-dir", str(out))
    line = _exit_2(argv, capsys)
    assert line.startswith("error: --strict: 3 file(s) unusable at listing (2 no transcript, "
                           "1 missing transcript file): ")
    for name in ("301-7.trans.txt", "301-7-0000.flac", "301-7-0001.flac"):
        assert name in line
    _no_work_done(cache, out)

    shutil.rmtree(librispeech_root / "train-clean-360" / "301" / "7")  # fix the listing
    line = _exit_2(argv, capsys)  # the two broken FLAC bodies show only when decoded
    assert line.startswith("error: --strict: 2 file(s) unusable at feature extraction "
                           "(2 corrupt audio): ")
    assert "300-1-0001.flac" in line and "300-1-0002.flac" in line
    assert not out.exists()

    for n in (1, 2):
        (librispeech_root / "train-clean-360" / "300" / "1" / f"300-1-000{n}.flac").unlink()
    trans = librispeech_root / "train-clean-360" / "300" / "1" / "300-1.trans.txt"
    trans.write_text(trans.read_text().splitlines()[0] + "\n")
    results = main(argv)  # the same command, after fixing the data
    assert results["data"]["splits"]["fl"]["skipped"]["count"] == 0
    assert json.loads((out / "run.json").read_text())["argv"] is not None


def test_resume_of_a_folder_without_a_run_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21.14: --resume --output-dir <typo> must not silently start a second run."""
    typo = tmp_path / "runs" / "typo"
    line = _exit_2([*TINY, "--quick", "--resume", "--output-dir", str(typo),
                    "--cache-dir", str(tmp_path / "cache")], capsys)
    assert line.startswith(f"error: --resume: {typo} does not exist")
    typo.mkdir(parents=True)
    line = _exit_2([*TINY, "--quick", "--resume", "--output-dir", str(typo),
                    "--cache-dir", str(tmp_path / "cache")], capsys)
    assert line.startswith(f"error: --resume: {typo} holds no run")
    assert not (tmp_path / "cache").exists()


def test_common_voice_index_problems_are_one_line_errors_up_front(
        common_voice_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21.10: a non-UTF-8 byte names the file and line (not a traceback), a byte-order
    mark is not part of the first column's name, and a 2-client corpus is refused before any
    extraction (a Common-Voice-only run needs 3)."""
    cache = tmp_path / "cache"
    cv = tmp_path / "cv-copy"
    shutil.copytree(common_voice_root, cv)
    train = cv / "train.tsv"
    text = train.read_text(encoding="utf-8")

    train.write_bytes(text.encode("utf-8").replace(b"The cat", b"The c\xe4t", 1))
    line = _exit_2([*TINY, "--common-voice-root", str(cv), "--cache-dir", str(cache),
                    "--output-dir", str(tmp_path / "a")], capsys)
    bad_line = 1 + next(i for i, row in enumerate(text.splitlines()) if "The cat" in row)
    assert f"{train}: line {bad_line}, byte" in line and "not UTF-8 (byte 0xe4)" in line

    train.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Excel saves "UTF-8"
    def rows_of(root: Path) -> list[tuple[str, str, str]]:
        data = read_common_voice(root, tsv="train.tsv", on_error="skip")
        return [(u.user_id, u.utterance_id, u.transcript) for u in data.utterances()]

    assert rows_of(cv) == rows_of(common_voice_root) and len(rows_of(cv)) == 7

    rows = text.splitlines()
    two = [rows[0]] + [r for r in rows[1:] if r.split("\t")[0] in ("00" * 32, "01" * 32)]
    train.write_text("\n".join(two) + "\n", encoding="utf-8")
    line = _exit_2([*TINY, "--common-voice-root", str(cv), "--cache-dir", str(cache),
                    "--output-dir", str(tmp_path / "b")], capsys)
    assert "2 user(s)" in line and "needs at least 3" in line
    _no_work_done(cache, tmp_path / "b")
