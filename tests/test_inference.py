"""denselm.inference: batching, per-batch progress, load errors, and training-path token ids."""

from __future__ import annotations

import numpy as np
import pytest

from test_encode import PROMPT, save_tiny_denselm
from tiny_models import make_model_dir

from denselm.errors import InputNotFound, UserError
from denselm.inference import load_encoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_encoder(save_tiny_denselm(tmp_path_factory.mktemp("m") / "m"), device="cpu", show_progress=False,
                        batch_size=4)


def test_batches_are_longest_first_within_rows_and_tokens(encoder):
    lengths = [3, 9, 1, 7, 5, 5]
    batches = encoder.batches(lengths, batch_size=4, max_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0][0] == 1  # the longest first
    for b in batches:
        assert len(b) <= 4 and len(b) * max(lengths[i] for i in b) <= 20 or len(b) == 1


def test_progress_callback_advances_per_batch(encoder):
    calls = []
    encoder.on_batch = calls.append
    try:
        emb = encoder.encode_corpus([f"text number {i}" for i in range(10)])
    finally:
        encoder.on_batch = None
    assert calls == [4, 4, 2] and emb.shape[0] == 10


def test_results_do_not_depend_on_batching(encoder):
    texts = [("word " * (i % 7 + 1)).strip() for i in range(9)]
    a = encoder.encode_corpus(texts, batch_size=2)
    b = encoder.encode_corpus(texts, batch_size=9)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(InputNotFound, match="does not exist"):
        load_encoder(tmp_path / "absent", device="cpu")
    plain = make_model_dir(tmp_path / "plain")
    with pytest.raises(UserError, match="has no denselm.json .*pass a preset"):
        load_encoder(plain, device="cpu")
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        load_encoder(plain, device="cpu", preset="nope")
    assert load_encoder(plain, device="cpu", preset="plain", show_progress=False).template == "none"


def test_empty_input_is_a_data_error(encoder):
    with pytest.raises(ValueError, match="nothing to encode"):
        encoder.encode_corpus([])
    assert encoder.prompt == PROMPT
