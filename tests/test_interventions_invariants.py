"""Invariants of every intervention (hypothesis): on plain tensors through the hook functions, and
on tiny models through ``intervene``.

- causal and padding zeros stay zero; entries stay finite and non-negative;
- rows sum to 1 wherever the intervention renormalises;
- ``alpha=0``, ``scale=1``, ``temperature=1``, ``beta=1`` are the identity;
- composition order is respected;
- a padded batch (left or right) equals one-by-one runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.models_fixtures import VOCAB, _tokenizer, tiny_gpt2, tiny_llama, tiny_native  # noqa: F401  (fixtures)
from tokext.interventions.ablation import HeadAblation
from tokext.interventions.base import RunContext
from tokext.interventions.calibration import SinkCalibration
from tokext.interventions.emulation import EarlyLayerEmulation
from tokext.interventions.intervene import intervene
from tokext.interventions.patching import PatternPatch
from tokext.interventions.rebalance import SinkRebalance
from tokext.interventions.temperature import AttentionTemperature
from tokext.interventions.zerotuning import ZeroTuning
from tokext.models.architectures import LayerAttention
from tokext.models.hooks import ForwardInputs, pattern_hook_name

N_LAYERS, N_HEADS = 3, 2
FAKE = SimpleNamespace(cfg=SimpleNamespace(n_layers=N_LAYERS, n_heads=N_HEADS, d_vocab=VOCAB), tokenizer=_tokenizer())
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def attention_batches(draw):
    """Random softmax patterns per layer with causal masking and left or right padding."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    side = draw(st.sampled_from(["left", "right"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        n = draw(st.integers(1, length))
        mask[row, :n] = True
        if side == "left":
            mask[row] = mask[row].flip(0)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = causal[None] & mask[:, None, :] & mask[:, :, None]  # [batch, query, key]
    sharp = draw(st.floats(0.1, 8.0))
    patterns = []
    for _ in range(N_LAYERS):
        scores = torch.randn(batch, N_HEADS, length, length, generator=gen) * sharp
        p = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        patterns.append(torch.nan_to_num(p, nan=0.0))  # pad query rows see nothing: zeros
    tokens = torch.randint(3, VOCAB, (batch, length), generator=gen)
    return patterns, mask, tokens, visible


def apply(interventions, patterns, mask, tokens):
    """Run the interventions' hook functions layer by layer, in order, on copies of ``patterns``."""
    ctx = RunContext(ForwardInputs(tokens=tokens, attention_mask=mask.long(), past_len=0), shared_points=set())
    hooks = [h for iv in interventions for h in iv.hooks(FAKE, ctx)]
    out = []
    for layer, pattern in enumerate(patterns):
        p = pattern.clone()
        for name, fn in hooks:
            if name == pattern_hook_name(layer):
                result = fn(p, None)
                p = p if result is None else result
        out.append(p)
    return out


interventions = st.one_of(
    st.builds(
        lambda a, t, r: EarlyLayerEmulation(alpha=a, threshold=t, renormalize=r),
        st.floats(0.0, 2.0),
        st.floats(0.0, 0.5),
        st.booleans(),
    ),
    st.builds(lambda a: EarlyLayerEmulation(alpha=a, uniform=True), st.floats(0.0, 2.0)),
    st.builds(
        lambda t, b, f: SinkCalibration(tau=t, beta=b, exclude_first=f), st.floats(0.01, 0.9), unit, st.booleans()
    ),
    st.builds(
        lambda t, s, r: SinkRebalance(t, scale=s, renormalize=r),
        st.sampled_from(["first", "categories", (0, 1), ("digit", "first")]),
        st.floats(0.0, 3.0),
        st.booleans(),
    ),
    st.builds(AttentionTemperature, st.floats(0.2, 5.0)),
    st.just(PatternPatch(0, (1, 2))),
    st.builds(lambda m: HeadAblation([(1, 0), (2, 1)], m), st.sampled_from(["zero", "mean", "first"])),
    st.tuples(st.floats(0.05, 5.0), st.floats(0.05, 5.0))
    .filter(lambda g: g != (1.0, 1.0))
    .map(lambda g: ZeroTuning(gamma=g[0], head_gammas=[(1, 0, g[1])])),
)


def renormalises(iv) -> bool:
    if isinstance(iv, EarlyLayerEmulation):
        return iv.renormalize
    if isinstance(iv, SinkRebalance):
        return iv.renormalize
    if isinstance(iv, HeadAblation):
        return iv.mode != "zero"
    return True


@FAST
@given(attention_batches(), interventions)
def test_zeros_stay_zero_and_rows_sum_to_one(batch, iv):
    patterns, mask, tokens, visible = batch
    for layer, p in enumerate(apply([iv], patterns, mask, tokens)):
        assert torch.isfinite(p).all() and (p >= 0).all(), f"{iv!r} layer {layer}"
        assert (p[~visible[:, None].expand_as(p)] == 0).all(), f"{iv!r} wrote outside the visible keys"
        if renormalises(iv):
            sums = p.sum(-1)[mask[:, None].expand(-1, N_HEADS, -1)]
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5), f"{iv!r} layer {layer}: {sums}"


identities = st.one_of(
    st.builds(
        lambda t, r, u: EarlyLayerEmulation(alpha=0.0, threshold=t, renormalize=r and not u, uniform=u),
        st.floats(0.0, 0.5),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(
        lambda t, r: SinkRebalance(t, scale=1.0, renormalize=r),
        st.sampled_from(["first", "categories", (0, 2)]),
        st.booleans(),
    ),
    st.just(AttentionTemperature(1.0)),
    st.builds(lambda t, f: SinkCalibration(tau=t, beta=1.0, exclude_first=f), st.floats(0.01, 0.9), st.booleans()),
)


@FAST
@given(attention_batches(), identities)
def test_neutral_parameters_are_the_identity(batch, iv):
    patterns, mask, tokens, _ = batch
    for before, after in zip(patterns, apply([iv], patterns, mask, tokens)):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


@FAST
@given(attention_batches(), interventions, interventions)
def test_chained_hooks_apply_in_order(batch, first, second):
    patterns, mask, tokens, _ = batch
    chained = apply([first, second], patterns, mask, tokens)
    for layer, (a, b) in enumerate(zip(chained, apply([second], apply([first], patterns, mask, tokens), mask, tokens))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"{first!r} then {second!r}, layer {layer}")


def _capture_layers(model, tokens, mask, *ivs):
    """Incoming and outgoing pattern of every layer inside ``intervene(model, *ivs)``."""
    incoming, outgoing = {}, {}
    n = model.cfg.n_layers

    def keep(store, layer):
        return lambda p, hook: store.__setitem__(layer, p.clone())

    before = [(pattern_hook_name(layer), keep(incoming, layer)) for layer in range(n)]
    after = [(pattern_hook_name(layer), keep(outgoing, layer)) for layer in range(n)]
    with torch.no_grad(), model.hooks(fwd_hooks=before), intervene(model, *ivs), model.hooks(fwd_hooks=after):
        logits = model(tokens, attention_mask=mask)
    return [incoming[layer] for layer in range(n)], [outgoing[layer] for layer in range(n)], logits


@pytest.mark.parametrize(
    "pair",
    [
        (AttentionTemperature(0.5), SinkRebalance(scale=0.2)),
        (EarlyLayerEmulation(alpha=1.0), SinkCalibration()),
        (SinkCalibration(beta=0.0), EarlyLayerEmulation(alpha=1.0, renormalize=True)),
    ],
    ids=repr,
)
def test_composition_order_on_model(tiny_native, pair):
    model = tiny_native
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    incoming, outgoing, ab = _capture_layers(model, tokens, mask, *pair)
    expected = apply(list(pair), incoming, mask.bool(), tokens)
    for layer, (got, want) in enumerate(zip(outgoing, expected)):
        diff = float((got - want).abs().max())
        assert diff < 1e-6, f"layer {layer}: max_diff={diff}"
    with torch.no_grad():
        with intervene(model, pair[0]), intervene(model, pair[1]):
            nested = model(tokens, attention_mask=mask)
        with intervene(model, pair[1], pair[0]):
            swapped = model(tokens, attention_mask=mask)
    real = mask.bool()
    assert float((nested - ab).abs()[real].max()) < 1e-6
    assert float((swapped - ab).abs()[real].max()) > 1e-4


native_interventions = interventions.filter(lambda iv: not (isinstance(iv, SinkRebalance) and iv.needs_tokens))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.integers(1, 9), min_size=2, max_size=4),
    st.sampled_from(["left", "right"]),
    native_interventions,
    st.integers(0, 1000),
)
def test_padded_batch_equals_one_by_one_native(tiny_native, lengths, side, iv, seed):
    _padded_vs_alone(tiny_native, lengths, side, iv, seed)


@pytest.mark.parametrize(
    "iv",
    [
        EarlyLayerEmulation(alpha=1.0),
        SinkCalibration(),
        SinkRebalance("categories", 0.1),
        AttentionTemperature(0.5),
        PatternPatch(0, (2,)),
        HeadAblation([(1, 2)], "first"),
        ZeroTuning(gamma=0.25),
    ],
    ids=repr,
)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_padded_batch_equals_one_by_one_hf(request, name, iv, side):
    _padded_vs_alone(request.getfixturevalue(name), [7, 2, 5], side, iv, 0)


def _padded_vs_alone(model, lengths, side, iv, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, int(model.cfg.d_vocab), (n,), generator=gen) for n in lengths]
    length = max(lengths)
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        tokens[row, span], mask[row, span] = seq, 1
    with torch.no_grad(), intervene(model, iv):
        batched = model(tokens, attention_mask=mask)
        for row, seq in enumerate(seqs):
            alone = model(seq[None])
            span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
            diff = float((batched[row, span] - alone[0]).abs().max())
            assert diff < 1e-5, f"{iv!r}, {side} padding, row {row}: max_diff={diff}"


@pytest.mark.parametrize(
    "attention",
    [
        LayerAttention(),
        LayerAttention(window=3),
        LayerAttention(causal=False),
        LayerAttention(causal=False, window=2),
    ],
    ids=["causal", "causal window", "bidirectional", "bidirectional window"],
)
def test_visible_counts_are_the_column_sums_of_visible(attention):
    """ACT's counts of real queries per key in O(T) (the fused kernel's path) equal the [query, key]
    mask's column sums (the block path), with left padding."""
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ctx = RunContext(ForwardInputs(tokens=torch.ones(3, 9, dtype=torch.long), attention_mask=mask, past_len=0))
    ctx.layout = [attention]
    pattern = torch.zeros(3, 2, 9, 9)
    want = ctx.visible(pattern, 0).sum(1).float()
    assert torch.equal(ctx.visible_counts(pattern, 0), want)
    assert float(want.max()) > 1
