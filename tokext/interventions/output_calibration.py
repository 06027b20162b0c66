"""Calibrating the output-level ablations on texts: where massive activations appear, and mean head outputs.

- :func:`calibrate_massive_ablation` finds, on calibration texts, the layer where massive
  activations first appear (Sun et al.'s criterion, :func:`tokext.attention.residual.massive_mask`),
  their dims and each dim's mean (signed) massive value, and returns the configured
  :class:`~tokext.MassiveActivationAblation`.
- :func:`calibrate_head_means` averages each head's output z^h over every real calibration token and
  returns the configured :class:`~tokext.HeadOutputAblation` (``mode="mean"``).

Both run plain forward passes (no intervention) over right-padded batches, reading
``hook_resid_post`` / ``hook_z`` with the padding mask; texts are strings or token ids, as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokext.attention.residual import ABS_THRESHOLD, RATIO, massive_mask
from tokext.errors import InputError
from tokext.interventions.base import as_head_pairs, check_number, model_device
from tokext.interventions.head_output import HeadOutputAblation, z_hook_name
from tokext.interventions.residual import MassiveActivationAblation, resid_hook_name
from tokext.models.hooks import attached, resolve_heads
from tokext.models.inputs import Inputs, batches, encode, pad_id


def _run(model: Any, texts: Inputs, hooks_for: Any, batch_size: int, max_len: int | None) -> int:
    """Forward every batch of ``texts`` with the hooks ``hooks_for(mask)`` returns; the number of sequences."""
    seqs = encode(model, texts, max_len=max_len)
    device = model_device(model)
    with torch.inference_mode():
        for batch in batches(seqs, batch_size, pad_id(model)):
            tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            with attached(model, hooks_for(mask)):
                model(tokens, attention_mask=mask)
    return len(seqs)


def calibrate_massive_ablation(
    model: Any,
    texts: Inputs,
    mode: str = "zero",
    *,
    abs_threshold: float = ABS_THRESHOLD,
    ratio: float = RATIO,
    min_share: float = 0.5,
    batch_size: int = 8,
    max_len: int | None = None,
) -> MassiveActivationAblation:
    """The :class:`MassiveActivationAblation` that Sun et al.'s exp3 applies, fitted on ``texts``.

    ``layer``: the first block whose output holds a massive activation in at least ``min_share`` of
    the sequences; ``dims``: every dim with a massive entry there; ``means``: each dim's mean signed
    value over its massive entries there (filled for both modes, used by ``mode="mean"``). Raises
    :class:`InputError` when no layer qualifies, naming the largest ratio seen.
    """
    check_number("min_share", min_share, low=0.0, high=1.0, low_open=True)
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    sums = torch.zeros(n_layers, d_model, dtype=torch.float64)
    counts = torch.zeros(n_layers, d_model, dtype=torch.float64)
    sequences = torch.zeros(n_layers, dtype=torch.float64)

    def hooks_for(mask: torch.Tensor) -> list:
        def make(layer: int) -> Any:
            def read(h: torch.Tensor, hook: Any) -> None:
                found = massive_mask(h, mask, abs_threshold, ratio)
                values = torch.where(found, h.detach(), 0.0).double()
                sums[layer] += values.sum((0, 1)).cpu()
                counts[layer] += found.sum((0, 1)).double().cpu()
                sequences[layer] += found.flatten(1).any(1).sum().double().cpu()

            return read

        return [(resid_hook_name(layer), make(layer)) for layer in range(n_layers)]

    n = _run(model, texts, hooks_for, batch_size, max_len)
    share = sequences / max(n, 1)
    qualifying = (share >= min_share).nonzero().flatten().tolist()
    if not qualifying:
        raise InputError(
            f"no massive activations (|h| > {abs_threshold} and >= {ratio} x the median) in at least "
            f"{min_share:.0%} of the {n} calibration sequences at any layer (best share {float(share.max()):.0%}): "
            "nothing to ablate"
        )
    layer = qualifying[0]
    dims = counts[layer].nonzero().flatten().tolist()
    means = (sums[layer, dims] / counts[layer, dims]).tolist()
    return MassiveActivationAblation(
        layer, tuple(dims), mode=mode, means=tuple(means), abs_threshold=abs_threshold, ratio=ratio
    )


def calibrate_head_means(
    model: Any,
    texts: Inputs,
    heads: Sequence[tuple[int, int]],
    *,
    batch_size: int = 8,
    max_len: int | None = None,
) -> HeadOutputAblation:
    """``HeadOutputAblation(heads, "mean", means)`` with each head's output z^h averaged over every
    real token of ``texts`` (``means[i]``: ``d_head`` numbers for ``heads[i]``)."""
    pairs = as_head_pairs("heads", heads, allow_none=False)
    resolve_heads(model, pairs)
    layers = sorted({layer for layer, _ in pairs})
    d_head = int(model.cfg.d_head)
    sums = {pair: torch.zeros(d_head, dtype=torch.float64) for pair in pairs}
    tokens_seen = [0]

    def hooks_for(mask: torch.Tensor) -> list:
        def make(layer: int) -> Any:
            def read(z: torch.Tensor, hook: Any) -> None:
                real = mask.to(z.device, torch.bool)[..., None]
                for pair in pairs:
                    if pair[0] == layer:
                        sums[pair] += (z[:, :, pair[1]] * real).double().sum((0, 1)).cpu()
                if layer == layers[0]:
                    tokens_seen[0] += int(mask.sum())

            return read

        return [(z_hook_name(layer), make(layer)) for layer in layers]

    _run(model, texts, hooks_for, batch_size, max_len)
    if tokens_seen[0] == 0:
        raise InputError("no calibration tokens: texts are empty")
    means = tuple(tuple((sums[pair] / tokens_seen[0]).tolist()) for pair in pairs)
    return HeadOutputAblation(pairs, mode="mean", means=means)
