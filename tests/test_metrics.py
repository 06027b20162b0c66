"""The pure-function metrics API (``tokext.received_attention`` and friends) on patterns written out
by hand, and on a padded batch of a tiny Llama against :func:`tokext.collect_attention_stats`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokext
from tokext.attention.collect import category_table
from tokext.errors import InputError
from tokext.models.hooks import attached, pattern_hook_name
from tokext.models.loading import load_model

# One sequence of three real tokens, one head. Rows are queries, columns keys (causal).
PATTERN = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.6, 0.1, 0.3]]]], dtype=torch.float64)
VISIBLE = torch.tensor([[[True, False, False], [True, True, False], [True, True, True]]])
FIRST, PUNCT, SPACE, DIGIT, OTHER = range(5)


def test_exported_from_the_package():
    from tokext.attention import masks, metrics

    for name in (
        "received_attention",
        "row_entropy",
        "category_mass",
        "sink_rate",
        "hidden_sink_mask",
        "token_category",
        "CATEGORIES",
    ):
        assert getattr(tokext, name) is getattr(metrics, name), name
        assert name in tokext.__all__
    assert tokext.visible_keys is masks.visible_keys


def test_visible_keys_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert tokext.visible_keys(mask).tolist() == [
        [[True, False, False], [True, True, False], [True, True, True]],
        [[True, False, False], [True, True, False], [False, False, False]],  # pad query sees nothing
    ]


def test_received_attention_by_hand():
    # alpha_k = (column k summed over queries q >= k) / (number of such queries, 3 - k)
    # alpha_0 = (1 + 0.5 + 0.6) / 3 = 0.7;  alpha_1 = (0.5 + 0.1) / 2 = 0.3;  alpha_2 = 0.3 / 1
    alpha = tokext.received_attention(PATTERN, VISIBLE)
    assert alpha.shape == (1, 1, 3)
    assert alpha[0, 0].tolist() == pytest.approx([0.7, 0.3, 0.3])


def test_row_entropy_by_hand():
    # row 0 sees one key: undefined (NaN); row 1 is uniform over 2 keys: log 2 / log 2 = 1
    # row 2: -(0.6 log 0.6 + 0.1 log 0.1 + 0.3 log 0.3) / log 3 = 0.8979 / 1.0986 = 0.8173
    h = tokext.row_entropy(PATTERN, VISIBLE)[0, 0]
    assert math.isnan(h[0])
    assert h[1].item() == pytest.approx(1.0)
    assert h[2].item() == pytest.approx(0.8173, abs=1e-4)


def test_category_mass_by_hand():
    categories = torch.tensor([[FIRST, PUNCT, OTHER]])
    mass = tokext.category_mass(PATTERN, VISIBLE, categories)[0, 0]
    assert np.allclose(
        mass.numpy(),
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],  # row 0: everything on the first token
            [0.5, 0.5, 0.0, 0.0, 0.0],
            [0.6, 0.1, 0.0, 0.0, 0.3],
        ],
    )


def test_rows_are_renormalised_over_visible_keys():
    # an edited pattern: row 2 scaled by 2, and mass on a key the query cannot see (dropped)
    edited = PATTERN.clone()
    edited[0, 0, 2] *= 2
    edited[0, 0, 1, 2] = 0.7
    assert torch.allclose(tokext.received_attention(edited, VISIBLE), tokext.received_attention(PATTERN, VISIBLE))
    assert torch.allclose(tokext.row_entropy(edited, VISIBLE), tokext.row_entropy(PATTERN, VISIBLE), equal_nan=True)


def test_padded_keys_and_rows():
    # second sequence: two real tokens then a pad; its pad key is seen by nobody, its pad row is empty
    pattern = torch.cat(
        [PATTERN, torch.tensor([[[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.2, 0.2, 0.6]]]], dtype=torch.float64)]
    )
    visible = tokext.visible_keys(torch.tensor([[1, 1, 1], [1, 1, 0]]))
    alpha = tokext.received_attention(pattern, visible)[1, 0]
    # alpha_0 = (1 + 0.25) / 2; alpha_1 = 0.75 / 1; key 2 is a pad: NaN
    assert alpha[:2].tolist() == pytest.approx([0.625, 0.75]) and math.isnan(alpha[2])
    h = tokext.row_entropy(pattern, visible)[1, 0]
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert math.isnan(h[0]) and h[1].item() == pytest.approx(expected) and math.isnan(h[2])
    mass = tokext.category_mass(pattern, visible, torch.tensor([[FIRST, PUNCT, OTHER], [FIRST, DIGIT, OTHER]]))[1, 0]
    assert np.allclose(mass.numpy(), [[1, 0, 0, 0, 0], [0.25, 0, 0, 0.75, 0], [0, 0, 0, 0, 0]])


def test_sink_rate_by_hand():
    # 2 of the 3 non-NaN values exceed 0.3 (strictly): 66.7 %
    assert tokext.sink_rate(torch.tensor([0.7, 0.2, 0.31, float("nan")])) == pytest.approx(200 / 3)
    assert tokext.sink_rate(np.array([[0.7, 0.3], [0.1, 0.9]])) == pytest.approx(50.0)  # numpy works too
    assert tokext.sink_rate(np.array([0.5, 0.4]), eps=0.45) == pytest.approx(50.0)
    assert math.isnan(tokext.sink_rate(torch.tensor([float("nan")])))


def test_hidden_sink_mask_by_hand():
    received = torch.tensor([[0.7, 0.3, 0.05, 0.3000001, float("nan")]])
    # position 0 is never a hidden sink; > tau is strict; NaN is not a sink
    assert tokext.hidden_sink_mask(received, tau=0.25).tolist() == [[False, True, False, True, False]]
    assert tokext.hidden_sink_mask(received, tau=0.3).tolist() == [[False, False, False, True, False]]
    assert received[0, 0] == 0.7  # the input is left alone


def test_bad_shapes_are_clear():
    with pytest.raises(InputError, match=r"\[batch, head, query, key\]"):
        tokext.received_attention(PATTERN[0], VISIBLE)
    with pytest.raises(InputError, match="Bool"):
        tokext.row_entropy(PATTERN, VISIBLE.long())
    with pytest.raises(InputError, match="does not match"):
        tokext.category_mass(PATTERN, VISIBLE[:, :2], torch.zeros(1, 3, dtype=torch.long))


def test_random_padded_batch_matches_collect_attention_stats(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    gen = torch.Generator().manual_seed(7)
    lengths = [7, 3, 9, 5]
    vocab = model.cfg.d_vocab
    seqs = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]
    stats = tokext.collect_attention_stats(model, seqs, batch_size=3, progress=False)

    # one right-padded batch, patterns captured directly
    width = max(lengths)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tokens[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    patterns = {}

    def keep(pattern, hook):
        patterns[hook.name] = pattern.detach().double()

    with attached(model, [(pattern_hook_name(layer), keep) for layer in range(model.cfg.n_layers)]), torch.no_grad():
        model(tokens, attention_mask=mask)
    visible = tokext.visible_keys(mask)
    categories = category_table(model)[tokens]
    categories[:, 0] = FIRST  # right padding: every row's first real token is at position 0
    n_real_rows = int(mask.sum())

    alpha0 = []
    for layer in range(model.cfg.n_layers):
        p = patterns[pattern_hook_name(layer)]
        alpha = tokext.received_attention(p, visible).numpy()  # [batch, head, key], NaN on pads
        assert np.allclose(stats.received[layer], np.nanmean(alpha, axis=0), atol=1e-6)
        entropy = tokext.row_entropy(p, visible).numpy()  # [batch, head, query]
        assert np.allclose(stats.entropy[layer], np.nanmean(entropy, axis=(0, 2)), atol=1e-6)
        mass = tokext.category_mass(p, visible, categories).sum((0, 2)) / n_real_rows
        assert np.allclose(stats.category_mass[layer], mass.numpy(), atol=1e-6)
        alpha0.append(np.nanmean(alpha, axis=0)[:, 0])
        hidden = tokext.hidden_sink_mask(torch.from_numpy(alpha), tau=0.1)
        expected = {(int(b), layer, int(h), int(k)) for b, h, k in hidden.nonzero().tolist()}
        found = stats.hidden_sinks(0.1)
        got = {(r.sequence, r.layer, r.head, r.position) for r in found.itertuples() if r.layer == layer}
        assert got == expected, layer
    assert stats.sink_rate(0.3) == pytest.approx(tokext.sink_rate(np.stack(alpha0), 0.3))
    assert len(stats.hidden_sinks(0.1)) > 0


# ---------------------------------------------------------------------- windows, encoders, learned sinks


def test_visible_keys_with_a_window_by_hand():
    from tokext.models.architectures import LayerAttention

    mask = torch.tensor([[0, 1, 1, 1, 1]])  # one left pad
    window = tokext.visible_keys(mask, attention=LayerAttention(window=2)).int().tolist()
    assert window == [[[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]]
    both = tokext.visible_keys(mask, attention=LayerAttention(causal=False)).int().tolist()
    assert both == [[[0] * 5] + [[0, 1, 1, 1, 1]] * 4]
    near = tokext.visible_keys(mask, attention=LayerAttention(causal=False, window=1)).int().tolist()
    assert near[0][2] == [0, 1, 1, 1, 0]  # |i - k| <= 1
    # a decode step of a window cache: 1 query, the last 2 keys of 5 positions
    step = tokext.visible_keys(mask, 1, n_keys=2, attention=LayerAttention(window=2)).int().tolist()
    assert step == [[[1, 1]]]


@pytest.mark.parametrize("attention", ["causal", "window2", "window3", "bidirectional", "bidirectional-window1"])
def test_visibility_counts_equal_sums_of_the_mask(attention):
    from tokext.attention.masks import visibility_counts
    from tokext.models.architectures import LayerAttention

    kind = {
        "causal": LayerAttention(),
        "window2": LayerAttention(window=2),
        "window3": LayerAttention(window=3),
        "bidirectional": LayerAttention(causal=False),
        "bidirectional-window1": LayerAttention(causal=False, window=1),
    }[attention]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]])
    visible = tokext.visible_keys(mask, attention=kind)
    n_queries, n_keys = visibility_counts(mask.bool(), kind)
    assert torch.equal(n_queries, visible.sum(1).float()) and torch.equal(n_keys, visible.sum(2).float())


def test_learned_sink_metrics_by_hand():
    # one row of 2 visible keys [0.3, 0.5]: the sink has 0.2; entropy over 3 outcomes, log 3
    pattern = torch.tensor([[[[1.0, 0.0], [0.3, 0.5]]]])
    visible = tokext.visible_keys(torch.ones(1, 2, dtype=torch.long))
    alpha = tokext.received_attention(pattern, visible, learned_sink=True)
    assert torch.allclose(alpha[0, 0], torch.tensor([(1.0 + 0.3) / 2, 0.5]))
    share = tokext.learned_sink_share(pattern, visible)
    assert torch.allclose(share[0, 0], torch.tensor([0.0, 0.2]))
    entropy = tokext.row_entropy(pattern, visible, learned_sink=True)[0, 0]
    expected = -(0.3 * math.log(0.3) + 0.5 * math.log(0.5) + 0.2 * math.log(0.2)) / math.log(3)
    assert entropy[0] == pytest.approx(0.0) and entropy[1] == pytest.approx(expected, abs=1e-6)
    # without the sink the row is renormalised: 0.3/0.8 and 0.5/0.8
    plain = tokext.received_attention(pattern, visible)
    assert torch.allclose(plain[0, 0], torch.tensor([(1.0 + 0.375) / 2, 0.625]))
