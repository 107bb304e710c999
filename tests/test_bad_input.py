"""Bad input files: every command that reads one answers with one line naming the file, exit code 2.

The CLI runs in-process (`variant_autoscaler.cli.main(argv)`), the same code path as the console
script, so these tests are fast; `test_plan_command.py` and friends cover the real subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.problem import InputError, read_text
from optimizer.profile_data import ProfileDataError, load_helix_layer_times, load_splitwise
from variant_autoscaler.cli import EXIT_BAD_INPUT, main
from variant_autoscaler.settings import load_settings_file

# Valid UTF-8 (bytes 0-11, "é" as two bytes), then at byte 12 a Latin-1 "é" (0xe9) that is not a UTF-8 sequence.
NOT_UTF8 = b"name: caf\xc3\xa9\n\xe9t\xe9: 1\n"
FIRST_BAD_BYTE = 12
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Exit code, stderr lines and stdout of one in-process CLI run."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


@pytest.mark.parametrize("command", ["plan", "flow", "place", "simulate"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_every_command_reports_a_file_that_is_not_utf8(command, suffix, tmp_path, capsys):
    path = tmp_path / f"input{suffix}"
    path.write_bytes(NOT_UTF8)
    code, err, _ = run_cli([command, str(path)], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == [f"error: {path}: not UTF-8 text (byte {FIRST_BAD_BYTE})"]


@pytest.mark.parametrize("command", ["plan", "flow", "place", "simulate"])
def test_every_command_reports_a_binary_file(command, tmp_path, capsys):
    path = tmp_path / "picture.yaml"
    path.write_bytes(BINARY)
    code, err, _ = run_cli([command, str(path)], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == [f"error: {path}: not UTF-8 text (byte 0)"]


def test_operator_settings_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "settings.yaml"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(InputError) as info:
        load_settings_file(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte {FIRST_BAD_BYTE})"
    code, err, _ = run_cli(["run", "--settings", str(path)], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == [f"error: {path}: not UTF-8 text (byte {FIRST_BAD_BYTE})"]


def test_measured_profile_tables_that_are_not_utf8(tmp_path):
    helix = tmp_path / "helix"
    helix.mkdir()
    (helix / "prompt_bs2time.csv").write_bytes(b"1,2\n2,3\n\xff\n")
    (helix / "decode_bs2time.csv").write_text("1,2\n2,3\n")
    with pytest.raises(ProfileDataError, match=r"prompt_bs2time.csv: not UTF-8 text \(byte 8\)$"):
        load_helix_layer_times(helix)
    splitwise = tmp_path / "perf_model.csv"
    splitwise.write_bytes(BINARY)
    with pytest.raises(ProfileDataError, match=r"perf_model.csv: not UTF-8 text \(byte 0\)$"):
        load_splitwise(splitwise)


def test_the_shared_reader_keeps_utf8_text_and_names_unreadable_files(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_bytes("model: Llama-3.1-8B  # ünïcödé\n".encode())
    assert read_text(path) == "model: Llama-3.1-8B  # ünïcödé\n"
    with pytest.raises(InputError, match="cannot read file"):
        read_text(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="cannot read file"):
        read_text(Path(tmp_path))
