"""The one place where tokext attaches hooks to a model.

:func:`attached` validates every hook name before registering anything, registers inside
``try``, counts firings, and on exit removes exactly the handles it created (in reverse order),
also when the body raises. A user's own hooks and enclosing ``attached`` blocks are untouched.
:func:`capture_inputs` records each forward call's tokens and attention mask, which
interventions and statistics need to tell padding and past (cached) keys apart.
"""

from __future__ import annotations

import difflib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from tokext.errors import InputError, LayerIndexError

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]


def pattern_hook_name(layer: int) -> str:
    """Name of the post-softmax attention hook of ``layer``: [batch, head, query, key]."""
    return f"blocks.{layer}.attn.hook_pattern"


def resolve_layers(model: Any, layers: int | Sequence[int] | None) -> list[int]:
    """Validate layer indices against ``model`` and return them sorted; ``None`` means all layers.

    Negative indices count from the end, as in Python.
    """
    n_layers = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise LayerIndexError(f"layer indices must be integers, got {layer!r}")
        if not -n_layers <= layer < n_layers:
            raise LayerIndexError(f"layer {layer} out of range for a model with {n_layers} layers (0..{n_layers - 1})")
        out.append(layer % n_layers)
    if not out:
        raise LayerIndexError("empty list of layers")
    return sorted(set(out))


def resolve_heads(model: Any, heads: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    """Validate (layer, head) pairs against ``model``; ``None`` stays ``None`` (all heads)."""
    if heads is None:
        return None
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    out = []
    for pair in heads:
        try:
            layer, head = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise InputError(f"heads must be (layer, head) pairs, got {pair!r}") from None
        if not 0 <= layer < n_layers:
            raise LayerIndexError(f"layer {layer} in heads out of range (0..{n_layers - 1})")
        if not 0 <= head < n_heads:
            raise LayerIndexError(f"head {head} of layer {layer} out of range (0..{n_heads - 1})")
        out.append((layer, head))
    return sorted(set(out))


@dataclass
class HookRun:
    """Handle returned by :func:`attached`: how often each hook name fired inside the block."""

    fired: Counter = field(default_factory=Counter)


@contextmanager
def attached(model: Any, hooks: Sequence[tuple[str, HookFn]]) -> Iterator[HookRun]:
    """Attach ``(hook_name, fn)`` pairs for the duration of the block; ``fn(tensor, hook)``.

    A hook returning a tensor replaces the activation (TransformerLens convention). Every name is
    checked first; an unknown one raises :class:`InputError` with a suggestion and nothing is
    attached.
    """
    points = []
    hook_dict = model.hook_dict
    for name, fn in hooks:
        if name not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InputError(f"model has no hook point {name!r}.{hint}")
        if not callable(fn):
            raise InputError(f"hook for {name!r} is not callable: {fn!r}")
        points.append((name, hook_dict[name], fn))

    run = HookRun()
    handles: list[tuple[Any, Any]] = []
    try:
        for name, point, fn in points:
            handles.append((point, point.add_hook(_counting(fn, name, run.fired), dir="fwd")))
        yield run
    finally:
        for point, handle in reversed(handles):
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)


def _counting(fn: HookFn, name: str, fired: Counter) -> HookFn:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor | None:
        fired[name] += 1
        return fn(tensor, hook)

    hook.__name__ = getattr(fn, "__name__", "tokext_hook")
    return hook


@dataclass
class ForwardInputs:
    """Inputs of the model call in progress.

    ``tokens`` [batch, new positions] (``None`` for string input), ``attention_mask``
    [batch, past + new positions] or ``None`` (no padding), and ``past_len``, the number of keys
    already in the KV cache (0 outside cached generation).
    """

    tokens: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    past_len: int = 0


@contextmanager
def capture_inputs(model: Any) -> Iterator[ForwardInputs]:
    """Record each forward call's tokens, attention mask and cache length into one live object."""
    current = ForwardInputs()

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        tokens = args[0] if args else kwargs.get("input")
        current.tokens = tokens if isinstance(tokens, torch.Tensor) else None
        if current.tokens is not None and current.tokens.ndim == 1:
            current.tokens = current.tokens[None]
        current.attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        elif current.attention_mask is not None and current.tokens is not None:
            past = int(current.attention_mask.shape[1] - current.tokens.shape[1])
        current.past_len = past

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield current
    finally:
        handle.remove()


@contextmanager
def module_pre_hooks(pairs: Sequence[tuple[torch.nn.Module, Callable[[torch.Tensor], None]]]) -> Iterator[None]:
    """Call ``fn(input)`` with the first positional input of each ``module`` for the duration of the
    block (torch forward pre-hooks that read and never replace); removes exactly these handles on exit,
    also when the body raises."""
    for module, fn in pairs:
        if not isinstance(module, torch.nn.Module) or not callable(fn):
            raise InputError(f"module_pre_hooks takes (module, callable) pairs, got ({module!r}, {fn!r})")

    def reading(fn: Callable[[torch.Tensor], None]) -> Callable:
        def pre_hook(module: Any, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                fn(args[0])

        return pre_hook

    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_pre_hook(reading(fn)))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
