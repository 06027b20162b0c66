"""The streaming engine calls TransformerLens's normalisation bridges' wrapped norm directly.

On its native path a norm bridge computes the norm once in Python for ``hook_scale`` and
``hook_normalized`` and once as the wrapped module, and returns the wrapped module's result; the
engine skips the first while no hook point of the norm has a hook. Checked: the logits are the
bridge's own, bit for bit; a hook added inside the block fires and can still edit; the bridge's own
forward is back after the block.
"""

from __future__ import annotations

import pytest
import torch

from tests import conformance as C
from tokext.attention.engines.streaming import streaming


def _forward(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_logits_are_the_bridges_own_bit_for_bit(monkeypatch):
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    bridge_norms = []
    own = NormalizationBridge._hf_autograd_forward_with_hooks
    monkeypatch.setattr(
        NormalizationBridge, "_hf_autograd_forward_with_hooks", lambda self, x: bridge_norms.append(1) or own(self, x)
    )
    model = C.family_bridge("Llama")
    tokens = torch.randint(3, C.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    norm = model.blocks[0].ln1.original_component
    handle = norm.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        with streaming(model):
            bridge_norms.clear()  # (loading the model may have run it)
            fast = _forward(model, tokens)
            n_fast = len(calls)
        assert not bridge_norms, "the bridge computed its own norms although nothing hooks them"
        slow = _forward(model, tokens)  # hook engine: the bridge's own norms
        assert torch.equal(fast, slow) or float((fast - slow).abs().max()) < 1e-5
        with streaming(model):  # the bridge's own norm path under the streaming attention
            point = model.blocks[0].ln1.hook_scale
            point.add_hook(lambda t, hook: None)
            try:
                own = _forward(model, tokens)
            finally:
                point.remove_hooks()
        assert bridge_norms, "a hooked norm did not take the bridge's own path"
        assert torch.equal(fast, own), "the shortcut changed the logits"
        assert n_fast >= 1, "the wrapped norm did not run under the shortcut"
    finally:
        handle.remove()


# TransformerLens warns that the edit landed: the point of the test
@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale:UserWarning")
def test_a_hook_added_inside_the_block_fires_and_edits():
    model = C.family_bridge("Llama")
    tokens = torch.randint(3, C.VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    seen = []
    with streaming(model):
        base = _forward(model, tokens)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.ln2.hook_scale")
        point = model.blocks[1].ln2.hook_normalized
        point.add_hook(lambda t, hook: seen.append(1) or t * 0.0)
        try:
            edited = _forward(model, tokens)
        finally:
            point.remove_hooks()
    assert "blocks.1.ln2.hook_scale" in cache and cache["blocks.1.ln2.hook_scale"].shape[:2] == (1, 10)
    assert seen and float((edited - base).abs().max()) > 1e-3, "a hook edit of the norm did not reach the logits"


def test_the_bridges_forward_is_back_after_the_block():
    model = C.family_bridge("Llama")
    norm = model.blocks[0].ln1
    with streaming(model):
        assert "forward" in norm.__dict__
    assert "forward" not in norm.__dict__
