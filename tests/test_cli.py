"""The `denselm` entry point: every subcommand has help; bad usage exits 2 with one line."""

import subprocess
import sys

import pytest

from denselm.cli import COMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: denselm" in capsys.readouterr().out


def test_unknown_command_and_unknown_flag():
    assert main(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--queries", "a", "--corpus", "b", "--output", "c", "--bogus"])
    assert exit_info.value.code == 2


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "denselm.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout
