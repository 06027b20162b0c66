"""Norm statistics on the real Gemma 3 270M (q/k norms, sliding windows, a real ``<bos>``) against
transformers itself, on both engines, with a padded batch: the conformance matrix's oracle
(tests/conformance.py) run on the converted checkpoint, as tests/test_smollm2_norms.py does for SmolLM2."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from tests import conformance as C
from tests.test_conformance import NORM_FIELDS, NORM_TOL, relative_error
from tokext.attention.collect import collect_attention_stats

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "Why is the sky blue?",
    "def add(a, b):\n    return a + b",
]
MASSIVE = {"abs_threshold": 100.0, "ratio": 1000.0}  # Sun et al.'s criterion as published


@pytest.fixture(scope="module")
def gemma():
    from tokext.models.loading import load_model

    return load_model("gemma3-270m")


@functools.cache
def _oracle(tokens: tuple[tuple[int, ...], ...]) -> dict:
    from transformers import AutoModelForCausalLM

    from tokext.models.gguf import converted_chunked_gguf
    from tokext.models.wheels import GEMMA3_270M

    C.register_oracle()
    hf = AutoModelForCausalLM.from_pretrained(
        converted_chunked_gguf(GEMMA3_270M), attn_implementation="tokext_oracle", dtype=torch.float32
    ).eval()
    runs = [C.oracle_norm_forward("Gemma 3", torch.tensor([list(seq)]), model=hf) for seq in tokens]
    return C.pool_oracle_norms(runs, hf.config.num_attention_heads, MASSIVE)


@pytest.mark.parametrize("engine", ["hooks", "streaming"])
def test_gemma_norms_match_transformers(gemma, engine):
    tokens = tuple(tuple(gemma.tokenizer(p).input_ids) for p in PROMPTS)
    assert all(seq[0] == gemma.tokenizer.bos_token_id for seq in tokens)  # its real <bos> first
    theirs = _oracle(tokens)
    stats = collect_attention_stats(
        gemma, [list(t) for t in tokens], batch_size=3, progress=False, engine=engine, norms=True
    )
    ours = {field: getattr(stats, field) for field in NORM_FIELDS}
    error, field = relative_error(ours, theirs)
    assert error < NORM_TOL, f"Gemma 3 270M ({engine}): relative max_diff={error:.3g} in {field}"
    table = stats.massive_activations(**MASSIVE)
    found = {(int(r.sequence), int(r.layer), int(r.position), int(r.dim)) for r in table.itertuples()}
    assert found == set(theirs["massive"])
    # what the real model shows: its <bos> sink carries a small value in most layers
    assert np.nanmean(stats.value_norm[:, :, 0] < np.nanmean(stats.value_norm[:, :, 1:], axis=-1)) > 0.5
