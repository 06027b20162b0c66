"""Sun et al.'s massive-activation criterion (tokext.attention.residual) against numpy, sequence by sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokext.attention.residual import massive_mask, median_abs
from tokext.errors import InputError


def numpy_criterion(h: np.ndarray, real: np.ndarray, abs_threshold: float, ratio: float):
    """Per sequence: the lower median of |h| over real positions, then the two thresholds."""
    medians, masks = [], []
    for seq, keep in zip(h, real):
        values = np.sort(np.abs(seq[keep]).ravel())
        median = values[(len(values) - 1) // 2]  # the lower middle value, as torch.median
        mask = (np.abs(seq) > abs_threshold) & (np.abs(seq) >= ratio * median) & keep[:, None]
        medians.append(median)
        masks.append(mask)
    return np.array(medians), np.stack(masks)


def test_padded_batch_matches_numpy_per_sequence():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 6, generator=gen)
    h[0, 0, 4] = 2500.0  # massive, at the first token
    h[1, 2, 1] = -900.0  # massive with a negative sign
    h[2, 5, 0] = 5000.0  # huge, but on a pad position: never massive
    h[2, 1, 3] = 50.0  # large against the median, below the absolute threshold
    real = torch.ones(3, 7, dtype=torch.bool)
    real[2, 5:] = False
    medians, expected = numpy_criterion(h.numpy(), real.numpy(), 100.0, 20.0)
    np.testing.assert_allclose(median_abs(h, real).numpy(), medians, rtol=0, atol=0)
    got = massive_mask(h, real, abs_threshold=100.0, ratio=20.0).numpy()
    assert (got == expected).all()
    assert got.sum() == 2 and got[0, 0, 4] and got[1, 2, 1]


def test_ratio_binds_when_the_sequence_is_loud():
    # every entry is large, so |h| > 100 holds everywhere; only the ratio to the median decides
    h = torch.full((1, 4, 3), 200.0)
    h[0, 0, 0] = 199_999.0
    assert not massive_mask(h).any()  # 199,999 < 1000 x 200
    h[0, 0, 0] = 200_000.0
    assert massive_mask(h).nonzero().tolist() == [[0, 0, 0]]


def test_bad_shapes_are_refused():
    with pytest.raises(InputError, match=r"\[batch, position, dim\]"):
        median_abs(torch.zeros(4, 3))
    with pytest.raises(InputError, match="real must be"):
        median_abs(torch.zeros(1, 4, 3), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="must be >= 0"):
        massive_mask(torch.zeros(1, 4, 3), ratio=-1.0)
