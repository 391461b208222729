"""Every shipped config parses, and opens with the command that runs it."""

from pathlib import Path

import pytest

from denselm.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses_and_documents_its_command(path):
    head = path.read_text().splitlines()[:3]
    assert all(line.startswith("#") for line in head[:1]), f"{path} must open with a comment"
    command = next((line for line in head if "denselm" in line), None)
    assert command, f"{path}: the opening comment must give the command that runs it"
    cfg = load_config(path)
    assert cfg.model.name_or_path
    if "denselm demo" not in command:  # the demo sets the output folder itself
        assert cfg.train.output_dir
