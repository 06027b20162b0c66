"""Perplexity under interventions, paired with the baseline on the same chunks.

:func:`perplexity` scores text (strings or token ids) cut into chunks of at most ``max_len``
tokens: ``.perplexity`` is exp of the token-weighted mean NLL over every predicted token,
``.chunk_nll`` the mean NLL of each chunk. With interventions it also runs the baseline (no
intervention, same engine, same chunks) and ``.paired()`` gives the change in token-weighted mean NLL
with a percentile-bootstrap 95% CI over chunks (:func:`tokext.studies.paired.paired_mean_ci`) and the
perplexity ratio ``exp(delta)`` with its interval. Each chunk's contribution is its summed NLL
divided by the mean number of predicted tokens per chunk, so the mean of the per-chunk differences
is exactly the token-weighted difference and resampling chunks resamples whole chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokext.errors import InputError
from tokext.evaluation.perplexity import chunk_losses, cut_chunks
from tokext.models.info import model_info
from tokext.models.inputs import Inputs, encode
from tokext.studies.paired import paired_mean_ci


@dataclass(frozen=True)
class Perplexity:
    """Per-chunk summed NLL and predicted-token counts of one run, and (with interventions) the baseline's."""

    nll_sum: np.ndarray
    n_tokens: np.ndarray
    interventions: str = "none"
    baseline: Perplexity | None = None

    @property
    def mean_nll(self) -> float:
        """Token-weighted mean NLL over every predicted token (nats)."""
        return float(self.nll_sum.sum() / self.n_tokens.sum())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def chunk_nll(self) -> np.ndarray:
        """Mean NLL of each chunk."""
        return self.nll_sum / self.n_tokens

    def paired(self, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
        """Against the baseline on the same chunks: ``delta_nll`` (token-weighted, this run minus the
        baseline) with ``ci_lo`` / ``ci_hi``, ``ppl_ratio`` = exp(delta) with ``ratio_lo`` / ``ratio_hi``,
        both perplexities and the number of chunks."""
        if self.baseline is None:
            raise InputError("no baseline: run tokext.perplexity with at least one intervention (baseline=True)")
        scale = float(self.n_tokens.mean())
        delta, lo, hi = paired_mean_ci(
            self.baseline.nll_sum / scale, self.nll_sum / scale, n_boot=n_boot, seed=seed, level=level
        )
        return {
            "ppl_baseline": self.baseline.perplexity,
            "ppl": self.perplexity,
            "delta_nll": delta,
            "ci_lo": lo,
            "ci_hi": hi,
            "ppl_ratio": math.exp(delta),
            "ratio_lo": math.exp(lo),
            "ratio_hi": math.exp(hi),
            "n_chunks": len(self.nll_sum),
            "n_tokens": int(self.n_tokens.sum()),
        }


def perplexity(
    model: Any,
    texts_or_token_ids: Inputs,
    *interventions: Any,
    max_len: int | None = None,
    engine: str = "hooks",
    batch_size: int = 8,
    baseline: bool = True,
) -> Perplexity:
    """Perplexity of ``model`` on the text, with ``interventions`` active (module docstring).

    Each input is encoded as everywhere in tokext (BOS as the tokenizer adds it) and cut into
    consecutive chunks of at most ``max_len`` tokens (default: the model's context), each scored on
    its own. ``baseline``: with interventions, also run the baseline on the same chunks (for
    :meth:`Perplexity.paired`). Bad input (a position beyond every chunk, a bad layer) is an error
    before any forward pass.

    >>> from tokext.models import native_model
    >>> import torch
    >>> result = perplexity(native_model(), torch.randint(0, 64, (4, 12)), max_len=6)
    >>> len(result.chunk_nll), result.perplexity > 1
    (8, True)
    """
    from tokext.interventions.base import validate

    validate(model, interventions, "perplexity")
    limit = int(max_len) if max_len is not None else int(model_info(model).n_ctx)
    chunks = cut_chunks(encode(model, texts_or_token_ids, any_length=True), limit)
    sums, counts = chunk_losses(model, chunks, interventions, batch_size=batch_size, engine=engine)
    base = None
    if interventions and baseline:
        b_sums, b_counts = chunk_losses(model, chunks, (), batch_size=batch_size, engine=engine)
        base = Perplexity(b_sums, b_counts)
    name = " + ".join(repr(iv) for iv in interventions) or "none"
    return Perplexity(sums, counts, name, base)
