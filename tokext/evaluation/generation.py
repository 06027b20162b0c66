"""Batched greedy decoding that gives exactly the tokens of recomputing the sequence each step.

Prompts are left-padded into batches (the next token of every row is then read at the last
column) with explicit position ids from the attention mask, so a padded row decodes as it would
alone. With ``use_kv_cache=True`` each step feeds only the new token and the Hugging Face cache;
with ``False`` (and always for TransformerLens-native models, which have no cache) the whole
sequence is recomputed. Active :func:`tokext.intervene` blocks apply at every step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokext.attention.engines.choose import choose_engine
from tokext.attention.engines.streaming import active_engine, streaming
from tokext.errors import InputError, SequenceTooLongError
from tokext.models.devices import input_device
from tokext.models.info import model_info
from tokext.models.inputs import Inputs, batches, encode, pad_id


def greedy_generate(
    model: Any,
    prompts: Inputs,
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    prepend_bos: bool | None = None,
    stop_strings: Sequence[str] = (),
    engine: str = "hooks",
) -> list[list[int]]:
    """Greedy continuation of each prompt: only the new token ids, in input order.

    ``prompts``: strings, a [n, pos] token tensor or lists of token ids (``prepend_bos`` as in
    :func:`tokext.models.inputs.encode`). With ``stop_at_eos`` a row stops after emitting EOS (kept as
    its last token); native models have no tokenizer, so pass ``eos_token_id`` or
    ``stop_at_eos=False``. A row also stops once the text of its new tokens contains one of
    ``stop_strings`` (the tokens are kept; cutting the text at the stop string is the caller's job).
    ``engine``: ``"hooks"``, ``"streaming"`` or ``"auto"`` (by the longest prompt plus the new
    tokens), as in :func:`tokext.intervene`; inside a streaming ``intervene`` block generation always
    streams.

    >>> from tokext.models import native_model
    >>> out = greedy_generate(native_model(), [[1, 2, 3], [4, 5]], 4, stop_at_eos=False)
    >>> [len(row) for row in out]
    [4, 4]
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    seqs = encode(model, prompts, prepend_bos=prepend_bos)
    info = model_info(model)
    longest = max(int(s.numel()) for s in seqs)
    if longest + max_new_tokens > info.n_ctx:
        raise SequenceTooLongError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context of {info.n_ctx}"
        )
    eos = eos_token_id
    if eos is None and getattr(model, "tokenizer", None) is not None:
        eos = model.tokenizer.eos_token_id
    if stop_at_eos and eos is None:
        raise InputError("stop_at_eos=True needs an EOS id: pass eos_token_id=... or stop_at_eos=False")
    stop = _stop_check(model, stop_strings)
    native = info.source == "native"
    results: list[list[int]] = [[] for _ in seqs]
    if max_new_tokens == 0:
        return results
    which = (
        "streaming"
        if active_engine(model) is not None
        else choose_engine(model, engine, batch=min(batch_size, len(seqs)), length=longest + max_new_tokens)
    )
    with streaming(model) if which == "streaming" else contextlib.nullcontext():
        _generate_all(
            model,
            seqs,
            results,
            max_new_tokens,
            batch_size=batch_size,
            use_kv_cache=use_kv_cache,
            native=native,
            eos=eos if stop_at_eos else None,
            stop=stop,
        )
    return results


def _generate_all(
    model: Any,
    seqs: list[torch.Tensor],
    results: list[list[int]],
    max_new_tokens: int,
    *,
    batch_size: int,
    use_kv_cache: bool,
    native: bool,
    eos: int | None,
    stop: Callable[[list[int]], bool] | None,
) -> None:
    for batch in batches(seqs, batch_size, pad_id(model), side="left"):
        with warnings.catch_warnings():  # transformers 5.2x renamed the cache kwarg the bridge passes
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            rows = _generate_batch(
                model,
                batch.tokens,
                batch.attention_mask,
                max_new_tokens,
                use_cache=use_kv_cache and not native,
                explicit_positions=not native,
                eos=eos,
                filler=pad_id(model),
                stop=stop,
            )
        for row, index in zip(rows, batch.indices):
            results[index] = row


def _stop_check(model: Any, stop_strings: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """Whether a row's new tokens, decoded, contain a stop string (``None``: no stop strings)."""
    if isinstance(stop_strings, str):
        raise InputError("stop_strings must be a list of strings, not one string: wrap it in a list")
    strings = [s for s in stop_strings if s]
    if not strings:
        return None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("stop_strings need a model with a tokenizer to decode the new tokens")
    return lambda ids: any(s in tokenizer.decode(ids) for s in strings)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _generate_batch(
    model: Any,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    max_new: int,
    *,
    use_cache: bool,
    explicit_positions: bool,
    eos: int | None,
    filler: int,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    device = input_device(model)
    tokens, mask = tokens.to(device), mask.to(device)
    n = tokens.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    extra: dict[str, Any] = {}
    with torch.inference_mode():
        if explicit_positions:
            extra["position_ids"] = _positions(mask)
        if use_cache:
            logits, cache = model(tokens, attention_mask=mask, return_type="logits_and_cache", use_cache=True, **extra)
        else:
            logits = model(tokens, attention_mask=mask, **extra)
        for step in range(max_new):
            nxt = logits[:, -1].argmax(-1).to(device)  # the logits live on the last layer's device
            nxt = torch.where(done, torch.full_like(nxt, filler), nxt)
            for row in (~done).nonzero().flatten().tolist():
                out[row].append(int(nxt[row]))
                if stop is not None and stop(out[row]):
                    done[row] = True
            if eos is not None:
                done |= nxt == eos
            if step == max_new - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if explicit_positions:
                extra["position_ids"] = _positions(mask)
            if use_cache:
                if explicit_positions:
                    extra["position_ids"] = extra["position_ids"][:, -1:]
                logits, cache = model(
                    nxt[:, None], attention_mask=mask, past_key_values=cache, return_type="logits_and_cache", **extra
                )
            else:
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                logits = model(tokens, attention_mask=mask, **extra)
    return out
