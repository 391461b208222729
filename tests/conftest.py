"""Shared fixtures: tiny random-init Llama- and Qwen-style decoders built offline from configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import ARCHS, tiny_backbone  # noqa: E402


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def float64_backbone(arch):
    torch.manual_seed(0)
    return tiny_backbone(arch, dtype=torch.float64)
