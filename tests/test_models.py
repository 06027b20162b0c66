"""Model loading: the pattern-edit check made on load, and the GGUF conversion cache."""

from __future__ import annotations

import pytest
import torch

from tests.models_fixtures import llama_dir, opt_dir
from tests.test_bad_input import attached_hooks
from tokext import models
from tokext.errors import UneditableAttentionError
from tokext.hooks import attached, pattern_hook_name
from tokext.models import load_model, model_info


def _uniform_pattern_changes_logits(model, layer: int) -> bool:
    """Independent probe: replace one layer's pattern by uniform causal attention, compare logits."""
    tokens = torch.tensor([[5, 9, 14, 20, 7, 11]])

    def uniform(pattern, hook):
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad():
        base = model(tokens)
        with attached(model, [(pattern_hook_name(layer), uniform)]):
            edited = model(tokens)
    return float((edited - base).abs().max()) > 1e-3


@pytest.fixture()
def loaded_bridges(monkeypatch):
    """Every bridge that load_model builds during the test (also when load_model then raises)."""
    built = []
    real = models._boot_hf_dir

    def keep(*args, **kwargs):
        bridge = real(*args, **kwargs)
        built.append(bridge)
        return bridge

    monkeypatch.setattr(models, "_boot_hf_dir", keep)
    return built


def test_require_editable_refuses_opt_without_leaving_hooks(loaded_bridges):
    with pytest.raises(UneditableAttentionError) as info:
        load_model(str(opt_dir()), require_editable=True)
    message = str(info.value)
    assert message.startswith("tiny-opt: writes to hook_pattern do not reach the logits in layers [0, 1]")
    assert "Pattern interventions cannot work on this model" in message
    (bridge,) = loaded_bridges
    assert attached_hooks(bridge) == 0
    # what the check claimed, measured independently: a uniform pattern leaves OPT's logits alone
    with pytest.warns(UserWarning):
        assert not _uniform_pattern_changes_logits(bridge, 0)
    assert attached_hooks(bridge) == 0


def test_opt_loads_without_require_editable_and_remembers_the_answer():
    bridge = load_model(str(opt_dir()))
    assert model_info(bridge).pattern_edit_lands == {0: False, 1: False}
    assert model_info(bridge).editable is False
    assert attached_hooks(bridge) == 0


def test_llama_loads_with_require_editable_and_reports_edits_landing(loaded_bridges, monkeypatch):
    bridge = load_model(str(llama_dir()), require_editable=True)
    # measured on load: the answer is there without calling check_pattern_edits
    assert model_info(bridge).pattern_edit_lands == {0: True, 1: True, 2: True}
    assert model_info(bridge).editable is True
    assert attached_hooks(bridge) == 0
    for layer in range(3):
        assert _uniform_pattern_changes_logits(bridge, layer), layer
    # remembered: a second question runs no forward pass
    monkeypatch.setattr(models, "_check_edits", lambda *a, **k: pytest.fail("check ran twice"))
    assert models.check_pattern_edits(bridge) == {0: True, 1: True, 2: True}
    models.require_pattern_edits(bridge)
