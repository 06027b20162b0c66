"""The golden side of the explorer tests: what its page must show, computed without tokext.

Patterns come from a separately loaded transformers model (``output_attentions=True``) or from the
plain eager forward of :mod:`tests.reference_interventions` with an edit in it; the head scores are
written from their definitions, one row at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import AutoTokenizer

from tests import reference_interventions as R
from tests.tiny_hf import reference_attentions


def token_ids(directory, text: str, max_tokens: int) -> list[int]:
    """The ids of ``text`` (the tokenizer's defaults), first ``max_tokens`` of them."""
    return AutoTokenizer.from_pretrained(directory)(text).input_ids[:max_tokens]


def labels(directory, ids: list[int]) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]


def baseline_patterns(directory, ids: list[int]) -> np.ndarray:
    """[layer, head, query, key] from transformers' eager attention of the full sequence ``ids``."""
    attentions, _ = reference_attentions(directory, torch.tensor([ids]))
    return np.stack([a[0].numpy() for a in attentions])


def edited_patterns(directory, ids: list[int], edit) -> np.ndarray:
    """[layer, head, query, key] after ``edit`` in every layer of the reference eager forward."""
    recorded = {}

    def recording(layer, p, info):
        out = edit(layer, p, info)
        recorded[layer] = out[0].double().numpy()
        return out

    R.reference_logits(directory, torch.tensor([ids]), edit=recording)
    return np.stack([recorded[layer] for layer in sorted(recorded)])


def first_token_sink_removed():
    """The reference of ``SinkRebalance()``: attention to the first token scaled to 0, rows renormalised."""
    return R.ref_rebalance(lambda info, b, j: j == info.first(b))


def scores(pattern: np.ndarray, eps: float = 0.3) -> dict[str, np.ndarray]:
    """First-token mass, normalised entropy, learned-sink mass [layer, head] and sinks [layer, head, key].

    Rows are renormalised over their visible keys for the first two (as tokext's statistics do);
    the learned-sink mass is 1 - the raw row sum; key k is a sink when the mean of its
    renormalised weight over the queries i >= k exceeds ``eps``.
    """
    n_layers, n_heads, t, _ = pattern.shape
    first = np.zeros((n_layers, n_heads))
    entropy = np.zeros((n_layers, n_heads))
    sink_mass = np.zeros((n_layers, n_heads))
    sinks = np.zeros((n_layers, n_heads, t), dtype=bool)
    for layer in range(n_layers):
        for head in range(n_heads):
            rows = [pattern[layer, head, i, : i + 1] / pattern[layer, head, i, : i + 1].sum() for i in range(t)]
            first[layer, head] = sum(row[0] for row in rows) / t
            if t > 1:
                entropy[layer, head] = sum(
                    -sum(p * math.log(p) for p in rows[i] if p > 0) / math.log(i + 1) for i in range(1, t)
                ) / (t - 1)
            else:
                entropy[layer, head] = np.nan
            sink_mass[layer, head] = sum(1 - pattern[layer, head, i, : i + 1].sum() for i in range(t)) / t
            for k in range(t):
                sinks[layer, head, k] = sum(rows[i][k] for i in range(k, t)) / (t - k) > eps
    return {"first_token_mass": first, "entropy": entropy, "learned_sink_mass": sink_mass, "sinks": sinks}


def page_pattern(run: dict, layer: int, head: int, decimals: int) -> np.ndarray:
    """The [query, key] weights an explorer payload run holds for one head (NaN above the diagonal)."""
    flat = np.asarray(run["patterns"][layer][head], dtype=float) / 10**decimals
    t = int((math.isqrt(8 * flat.size + 1) - 1) // 2)
    out = np.full((t, t), np.nan)
    out[np.tril_indices(t)] = flat
    return out
