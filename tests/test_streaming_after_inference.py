"""The streaming engine's cached block masks serve calls with and without autograd alike.

Statistics run under ``torch.inference_mode``; a later forward pass that records gradients used to
reuse the masks made there and fail ("Inference tensors cannot be saved for backward").
"""

from __future__ import annotations

import torch

import tokext
from tokext.models.loading import load_model

BUDGET = 3 * 4096  # bytes: blocks of 3 query rows (one row: 4 heads x 64 keys x 16 bytes)


def test_a_gradient_pass_after_statistics_matches_the_hook_engine(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    tokens = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 4, 8, 6]])
    tokext.collect_attention_stats(model, tokens, engine="streaming", budget=BUDGET)  # inference mode
    with tokext.intervene(model, tokext.SinkRebalance(), engine="streaming", budget=BUDGET):
        streamed = model(tokens)
    streamed.sum().backward()  # records and runs backward through the cached masks
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), tokext.intervene(model, tokext.SinkRebalance(), engine="hooks"):
        eager = model(tokens)
    torch.testing.assert_close(streamed.detach(), eager, atol=1e-5, rtol=1e-5)
