"""Turn prompts into token sequences and padded batches, with the checks every entry point needs.

Sequences are padded on the right by default: real queries then never see a pad key, positions
are unchanged, and a padded batch gives the same activations as one-by-one runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokext.errors import EmptyInputError, InputError, SequenceTooLongError
from tokext.models.info import model_info

Inputs = Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor]


def encode(
    model: Any,
    inputs: Inputs,
    *,
    max_len: int | None = None,
    prepend_bos: bool | None = None,
    any_length: bool = False,
) -> list[torch.Tensor]:
    """Tokenize ``inputs`` into a list of 1-D Long tensors, validated against the model.

    ``inputs``: a list of strings, a [n, pos] token tensor, or a list of token-id lists.
    ``prepend_bos``: ``None`` keeps the model's own tokenizer's default (recorded in
    :class:`~tokext.models.info.ModelInfo`; SmolLM2's adds no BOS, Llama-2's adds ``<s>``);
    True/False forces a leading BOS on or off. ``max_len`` keeps each sequence's first ``max_len``
    tokens (Gu et al. cut to 64).
    ``any_length``: accept sequences longer than the model's context (for callers that cut them into chunks).
    """
    if isinstance(inputs, str):
        raise InputError("inputs must be a list of strings, not a single string: wrap it in a list")
    if inputs is None or len(inputs) == 0:
        raise EmptyInputError("no inputs: pass at least one prompt")
    if max_len is not None and max_len < 1:
        raise InputError(f"max_len must be at least 1, got {max_len}")
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 1:
            inputs = inputs[None]
        if inputs.ndim != 2:
            raise InputError(f"token tensor must be [batch, pos], got shape {tuple(inputs.shape)}")
        seqs = [row.long() for row in inputs]
    elif all(isinstance(x, str) for x in inputs):
        seqs = _tokenize_strings(model, [str(x) for x in inputs], prepend_bos)
    else:
        try:
            seqs = [torch.as_tensor(list(x), dtype=torch.long) for x in inputs]
        except (TypeError, ValueError):
            raise InputError("inputs must be strings, a token tensor, or lists of token ids") from None
    vocab = int(model.cfg.d_vocab)
    n_ctx = model_info(model).n_ctx
    out = []
    for i, seq in enumerate(seqs):
        if seq.numel() == 0:
            raise EmptyInputError(f"input {i} is empty after tokenization")
        if int(seq.min()) < 0 or int(seq.max()) >= vocab:
            raise InputError(f"input {i} has token ids outside the vocabulary (0..{vocab - 1})")
        if max_len is not None:
            seq = seq[:max_len]
        if seq.numel() > n_ctx and not any_length:
            raise SequenceTooLongError(
                f"input {i} has {seq.numel()} tokens, more than the model's context of {n_ctx}; "
                "pass max_len to truncate"
            )
        out.append(seq)
    return out


def _tokenize_strings(model: Any, texts: list[str], prepend_bos: bool | None) -> list[torch.Tensor]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("this model has no tokenizer: pass token ids instead of strings")
    bos = tokenizer.bos_token_id
    seqs = []
    for i, text in enumerate(texts):
        if not text.strip():
            raise EmptyInputError(f"input {i} is an empty or blank string")
        ids = list(tokenizer(text).input_ids)
        if prepend_bos is True and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        elif prepend_bos is False and bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        elif prepend_bos is True and bos is None:
            raise InputError("prepend_bos=True but the tokenizer has no BOS token")
        seqs.append(torch.tensor(ids, dtype=torch.long))
    return seqs


def bos_policy(model: Any, prepend_bos: bool | None = None) -> str:
    """How :func:`encode` treats BOS for ``model``, in words, for tables and metadata.

    >>> from tokext.models import native_model
    >>> bos_policy(native_model())
    'no BOS (tokenizer default)'
    """
    info = model_info(model)
    if prepend_bos is None:
        return info.bos_description
    token = getattr(getattr(model, "tokenizer", None), "bos_token", None) or "BOS"
    return f"{token} prepended (prepend_bos=True)" if prepend_bos else "no BOS (prepend_bos=False)"


def pad_id(model: Any) -> int:
    """The id used for padding: the tokenizer's pad, else its EOS, else 0 (pads are masked anyway)."""
    tokenizer = getattr(model, "tokenizer", None)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return 0


@dataclass
class Batch:
    """A padded batch: ``tokens`` and ``attention_mask`` [batch, pos]; ``indices`` into the inputs."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    indices: list[int]

    @property
    def lengths(self) -> torch.Tensor:
        """Real (unpadded) tokens per sequence, [batch]."""
        return self.attention_mask.sum(1)


def pad(seqs: Sequence[torch.Tensor], pad_token: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D sequences into ([batch, pos] tokens, [batch, pos] attention mask)."""
    if side not in ("right", "left"):
        raise InputError(f"padding side must be 'right' or 'left', got {side!r}")
    length = max(int(s.numel()) for s in seqs)
    tokens = torch.full((len(seqs), length), pad_token, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = int(seq.numel())
        span = slice(0, n) if side == "right" else slice(length - n, length)
        tokens[row, span] = seq
        mask[row, span] = 1
    return tokens, mask


def batches(
    seqs: Sequence[torch.Tensor],
    batch_size: int,
    pad_token: int,
    *,
    side: str = "right",
    sort_by_length: bool = True,
) -> Iterator[Batch]:
    """Yield padded batches; sorting by length first keeps padding (and wasted compute) small."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(seqs)))
    if sort_by_length:
        order.sort(key=lambda i: -int(seqs[i].numel()))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tokens, mask = pad([seqs[i] for i in idx], pad_token, side=side)
        yield Batch(tokens=tokens, attention_mask=mask, indices=idx)
