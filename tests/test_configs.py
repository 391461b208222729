"""Every shipped config parses, and opens with the command that runs it."""

from pathlib import Path

import pytest

from denselm.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.name))
def test_config_parses_and_documents_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "denselm" in first, f"{path} must open with the command that runs it"
    cfg = load_config(path)
    assert cfg.model.name_or_path and cfg.train.output_dir
