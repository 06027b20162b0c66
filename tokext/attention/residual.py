"""The residual stream, measured: Sun et al. (2024)'s massive-activation criterion as pure functions.

A *massive activation* is one entry of a block's output ``h`` [batch, position, dim] (the residual
stream the next block reads) that is both large in absolute terms and huge against the rest of its
sequence: ``|h| > abs_threshold`` and ``|h| >= ratio x median |h|``, the median taken over every
real (position, dim) entry of that sequence at that layer. The defaults, 100 and 1000, are the
criterion of the reproduction of Sun et al. by bluorion-com/refine_massive_activations.

Statistics (:class:`~tokext.attention.stats.AttentionStats` with ``norms=True``) and interventions
(:class:`~tokext.MassiveActivationAblation`) both call these functions, so the two agree on which
entries are massive.
"""

from __future__ import annotations

import torch

from tokext.errors import InputError

ABS_THRESHOLD = 100.0
RATIO = 1000.0


def median_abs(h: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """Float [batch]: each sequence's median |h| over its real (position, dim) entries.

    ``h`` is [batch, position, dim]; ``real`` is Bool [batch, position] (default: every position).
    The median is torch's: for an even count, the lower of the two middle values. A sequence with
    no real position gets NaN.

    >>> median_abs(torch.tensor([[[1.0, -3.0], [2.0, 100.0]]])).tolist()
    [2.0]
    >>> median_abs(torch.tensor([[[1.0, -3.0], [2.0, 100.0]]]), torch.tensor([[True, False]])).tolist()
    [1.0]
    """
    if h.dim() != 3:
        raise InputError(f"h must be [batch, position, dim], got shape {tuple(h.shape)}")
    values = h.detach().abs().float()
    if real is not None:
        if real.shape != h.shape[:2]:
            raise InputError(f"real must be [batch, position] = {tuple(h.shape[:2])}, got {tuple(real.shape)}")
        values = values.masked_fill(~real.to(h.device, torch.bool)[..., None], float("nan"))
    return values.flatten(1).nanmedian(dim=1).values


def massive_mask(
    h: torch.Tensor,
    real: torch.Tensor | None = None,
    abs_threshold: float = ABS_THRESHOLD,
    ratio: float = RATIO,
    median: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [batch, position, dim]: the entries of ``h`` that are massive activations (module docstring).

    Padded positions (``real`` False) are never massive. ``median`` [batch] may be passed when it is
    already known (:func:`median_abs`).

    >>> h = torch.tensor([[[0.5, 0.2, 300.0], [0.1, -0.3, 0.4]]])
    >>> massive_mask(h).nonzero().tolist()
    [[0, 0, 2]]
    >>> massive_mask(h, abs_threshold=500.0).any().item()
    False
    """
    if abs_threshold < 0 or ratio < 0:
        raise InputError(f"abs_threshold and ratio must be >= 0, got {abs_threshold} and {ratio}")
    if median is None:
        median = median_abs(h, real)
    magnitude = h.detach().abs()
    mask = (magnitude > abs_threshold) & (magnitude >= ratio * median.to(magnitude.dtype)[:, None, None])
    if real is not None:
        mask &= real.to(h.device, torch.bool)[..., None]
    return mask
