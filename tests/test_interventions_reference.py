"""Each intervention, hooked into a real model, against its formula applied in an independent forward.

Tiny random Llama (grouped-query attention, RoPE) and GPT-2 models are loaded through
``tokext.load_model``; the reference is a plain eager forward written from their saved weights
(``reference_interventions.py``), with the intervention's formula applied row by row. The batch
is left-padded, so first-token, padding and position handling are exercised. For the
TransformerLens-native model the reference edit runs through ``run_with_hooks``.
"""

from __future__ import annotations

import pytest
import torch

from tests import reference_interventions as R
from tests.models_fixtures import CHARS, SPECIALS, encode_text, gpt2_dir, llama_dir, tiny_gpt2, tiny_llama, tiny_native  # noqa: F401  (fixtures)
from tokext.errors import InputError
from tokext.interventions.ablation import HeadAblation
from tokext.interventions.calibration import SinkCalibration
from tokext.interventions.emulation import EarlyLayerEmulation
from tokext.interventions.intervene import intervene
from tokext.interventions.patching import PatternPatch
from tokext.interventions.rebalance import SinkRebalance
from tokext.interventions.temperature import AttentionTemperature
from tokext.interventions.zerotuning import ZeroTuning
from tokext.models.hooks import pattern_hook_name

TEXTS = ["the cat sat. on a mat, ok", "hi! yes\nno", "q? 7"]
ABLATED = [(0, 0), (1, 3)]


def _is_first(info, b, j):
    return j == info.first(b)


def _is_non_semantic(info, b, j):
    token = int(info.tokens[b, j])
    char = CHARS[token - len(SPECIALS)] if token >= len(SPECIALS) else ""
    return j != info.first(b) and char in ".,!? \n"


def _is_position(*positions):
    return lambda info, b, j: (j - info.first(b)) in positions


_ZT_FACTORS = {
    (0, 0): 1.0,
    (0, 1): 0.25,
    (0, 2): 1.0,
    (0, 3): 1.0,
    (1, 0): 3.0,
    (1, 1): 3.0,
    (1, 2): 1.0,
    (1, 3): 3.0,
    (2, 0): 1.0,
    (2, 1): 1.0,
    (2, 2): 1.0,
    (2, 3): 4.0,
}
"""Per-head factors of the "zerotuning-heads" case, written out: gamma 3 on layer 1, overridden per head."""

CASES = {
    "emulation": (EarlyLayerEmulation(alpha=0.5), lambda: R.ref_emulation(alpha=0.5)),
    "emulation-default": (EarlyLayerEmulation(), lambda: R.ref_emulation()),
    "emulation-uniform": (
        EarlyLayerEmulation(alpha=0.5, uniform=True),
        lambda: R.ref_emulation(alpha=0.5, uniform=True),
    ),
    "emulation-renorm": (
        EarlyLayerEmulation(alpha=1.0, threshold=0.05, renormalize=True, layers=(1,)),
        lambda: R.ref_emulation(alpha=1.0, threshold=0.05, renormalize=True, layers=[1]),
    ),
    "emulation-source1": (
        EarlyLayerEmulation(alpha=1.0, source_layer=1, horizon=4.0, exclude_self=False),
        lambda: R.ref_emulation(alpha=1.0, source=1, horizon=4.0, exclude_self=False),
    ),
    "act": (SinkCalibration(), lambda: R.ref_act()),
    "act-heads": (
        SinkCalibration(tau=0.15, beta=0.0, heads=[(1, 0), (2, 3)], exclude_first=False),
        lambda: R.ref_act(tau=0.15, beta=0.0, heads={(1, 0), (2, 3)}, exclude_first=False),
    ),
    "rebalance-first": (SinkRebalance(), lambda: R.ref_rebalance(_is_first)),
    "rebalance-categories": (
        SinkRebalance("categories", scale=0.2, layers=(1, 2)),
        lambda: R.ref_rebalance(_is_non_semantic, scale=0.2, layers={1, 2}),
    ),
    "rebalance-positions": (
        SinkRebalance((0, 2), scale=3.0, renormalize=False, heads=[(0, 1), (2, 2)]),
        lambda: R.ref_rebalance(_is_position(0, 2), scale=3.0, renormalize=False, heads={(0, 1), (2, 2)}),
    ),
    "temperature": (AttentionTemperature(2.0), lambda: R.ref_temperature(2.0)),
    "temperature-heads": (
        AttentionTemperature(0.5, heads=[(0, 1), (2, 2)]),
        lambda: R.ref_temperature(0.5, heads={(0, 1), (2, 2)}),
    ),
    "temperature-layers": (AttentionTemperature(1.5, layers=(0, 2)), lambda: R.ref_temperature(1.5, layers={0, 2})),
    # composition: on HF models the temperature may act on the pre-softmax scores, which would put
    # it before every pattern edit of its layer; listed second it must still act second
    "then-temperature": (
        (SinkRebalance(scale=0.2), AttentionTemperature(0.7)),
        lambda: R.compose(R.ref_rebalance(_is_first, scale=0.2), R.ref_temperature(0.7)),
    ),
    "temperature-then": (
        (AttentionTemperature(0.5), SinkRebalance(scale=0.2)),
        lambda: R.compose(R.ref_temperature(0.5), R.ref_rebalance(_is_first, scale=0.2)),
    ),
    "patch-then-temperature": (
        (PatternPatch(0, (2,)), AttentionTemperature(2.0, layers=(0,))),
        lambda: R.compose(R.ref_patch(0, {2}), R.ref_temperature(2.0, layers={0})),
    ),
    "temperature-then-patch": (
        (AttentionTemperature(2.0, layers=(0,)), PatternPatch(0, (2,))),
        lambda: R.compose(R.ref_temperature(2.0, layers={0}), R.ref_patch(0, {2})),
    ),
    "emulation-then-temperature": (
        (EarlyLayerEmulation(alpha=1.0, renormalize=True), AttentionTemperature(2.0)),
        lambda: R.compose(R.ref_emulation(alpha=1.0, renormalize=True), R.ref_temperature(2.0)),
    ),
    "zerotuning-all": (ZeroTuning(gamma=0.5), lambda: R.ref_zerotuning(lambda layer, head: 0.5)),
    "zerotuning-heads": (
        ZeroTuning(gamma=3.0, layers=(1,), head_gammas=[(0, 1, 0.25), (1, 2, 1.0), (2, 3, 4.0)]),
        lambda: R.ref_zerotuning(lambda layer, head: _ZT_FACTORS[layer, head]),
    ),
    # rows that do not sum to 1 (uniform emulation scales every entry): ZeroTuning keeps each row's sum
    "emulation-then-zerotuning": (
        (EarlyLayerEmulation(alpha=1.0, uniform=True), ZeroTuning(gamma=2.0, layers=(1, 2))),
        lambda: R.compose(
            R.ref_emulation(alpha=1.0, uniform=True), R.ref_zerotuning(lambda layer, head: 2.0 if layer else 1.0)
        ),
    ),
    "patch": (PatternPatch(0, (1, 2)), lambda: R.ref_patch(0, {1, 2})),
    "patch-heads": (PatternPatch(1, (2,), heads=[(2, 1), (2, 3)]), lambda: R.ref_patch(1, {2}, {(2, 1), (2, 3)})),
    "ablation-zero": (HeadAblation(ABLATED, "zero"), lambda: R.ref_ablation(set(ABLATED), "zero")),
    "ablation-mean": (HeadAblation(ABLATED, "mean"), lambda: R.ref_ablation(set(ABLATED), "mean")),
    "ablation-first": (HeadAblation(ABLATED, "first"), lambda: R.ref_ablation(set(ABLATED), "first")),
}


def _interventions(case):
    chosen = CASES[case][0]
    return chosen if isinstance(chosen, tuple) else (chosen,)


def _left_padded_batch():
    seqs = [[1] + ids for ids in encode_text(TEXTS)]  # BOS first, like the tokenizer
    length = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tokens[row, length - len(seq) :] = torch.tensor(seq)
        mask[row, length - len(seq) :] = 1
    return tokens, mask


def _check(ours, reference, base, real, label):
    diff = float((ours - reference).abs()[real].max())
    moved = float((ours - base).abs()[real].max())
    assert diff < 1e-5, f"{label}: max_diff={diff:.3g} between hooked model and reference (moved {moved:.3g})"
    assert moved > 1e-3, f"{label}: intervention barely changed the logits (max |delta|={moved:.3g})"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_matches_reference_forward(kind, case, tiny_llama, tiny_gpt2):
    model, directory = (tiny_llama, llama_dir()) if kind == "llama" else (tiny_gpt2, gpt2_dir())
    reference_edit = CASES[case][1]
    tokens, mask = _left_padded_batch()
    with torch.no_grad():
        base = model(tokens, attention_mask=mask)
        with intervene(model, *_interventions(case)):
            ours = model(tokens, attention_mask=mask)
    reference = R.reference_logits(directory, tokens, mask, edit=reference_edit())
    plain = R.reference_logits(directory, tokens, mask)
    assert float((plain - base).abs()[mask.bool()].max()) < 1e-5  # the reference forward itself
    _check(ours, reference, base, mask.bool(), f"{kind}/{case}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_edit_on_native(case, tiny_native):
    model = tiny_native
    reference_edit = CASES[case][1]
    tokens, mask = _left_padded_batch()
    if case == "rebalance-categories":  # token categories need a tokenizer; native models have none
        with pytest.raises(InputError, match="tokenizer"), intervene(model, *_interventions(case)):
            model(tokens, attention_mask=mask)
        return
    edit = reference_edit()
    info = R.Info(real=mask.bool(), tokens=tokens)

    def make_hook(layer):
        return lambda pattern, hook: edit(layer, pattern, info)

    with torch.no_grad():
        base = model(tokens, attention_mask=mask)
        with intervene(model, *_interventions(case)):
            ours = model(tokens, attention_mask=mask)
        fwd_hooks = [(pattern_hook_name(layer), make_hook(layer)) for layer in range(model.cfg.n_layers)]
        reference = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=fwd_hooks)
    _check(ours, reference, base, mask.bool(), f"native/{case}")
