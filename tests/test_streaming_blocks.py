"""The streaming engine's block arithmetic against direct computations: the masks it writes on only
the columns some row cannot see, and ``sum p log p`` from each row's own key."""

from __future__ import annotations

import pytest
import torch

from tokext.attention.engines.streaming import _key_range, _mask_block, _sum_plogp_of_softmax
from tokext.attention.masks import sees
from tokext.models.architectures import LayerAttention

LAYOUTS = [
    LayerAttention(),
    LayerAttention(window=3),
    LayerAttention(window=40),
    LayerAttention(causal=False),
    LayerAttention(causal=False, window=2),
]


@pytest.mark.parametrize("attention", LAYOUTS, ids=lambda a: a.describe())
@pytest.mark.parametrize("first, last", [(0, 0), (0, 5), (4, 9), (10, 15), (3, 3)])
def test_block_mask_equals_the_full_visibility_mask(attention, first, last):
    n_keys = 16
    padding = torch.ones(2, n_keys, dtype=torch.bool)
    padding[1, :2] = False  # left padding in the second sequence
    lo, hi = _key_range(attention, first, last, n_keys)
    scores = torch.randn(2, 3, last - first + 1, hi - lo)
    expected = scores.clone()
    reach = (
        sees(torch.arange(first, last + 1), torch.arange(lo, hi), attention)[None, None] & padding[:, None, None, lo:hi]
    )
    expected[~reach.expand_as(expected)] = torch.finfo(scores.dtype).min
    _mask_block(scores, attention, first, last, lo, hi, padding)
    assert torch.equal(scores, expected)
    # the key range drops no key that a row sees
    everything = sees(torch.arange(first, last + 1), torch.arange(n_keys), attention)
    assert not everything[:, :lo].any() and not everything[:, hi:].any()


def test_sum_plogp_from_the_own_key_equals_xlogy_even_where_it_underflows():
    torch.manual_seed(0)
    rows, keys = 6, 10
    scores = torch.randn(1, 2, rows, keys) * 3
    scores[0, 1, 2, 4 + 2] = -200.0  # row 2's own key (column 4 + 2): its probability underflows to 0
    probs = torch.softmax(scores, -1)
    assert probs[0, 1, 2, 6] == 0
    ours = _sum_plogp_of_softmax(probs, scores, own_column=4, padding=None, first=4)
    reference = torch.special.xlogy(probs.double(), probs.double()).sum(-1)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)
