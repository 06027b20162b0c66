"""What every intervention shares: a frozen parameter dataclass plus a per-run context.

An :class:`Intervention` holds only its hyperparameters (validated in ``__post_init__``). Binding
it to a model (:meth:`Intervention.hooks`) validates layers and heads against the model and
returns TransformerLens ``fwd_hooks``; state that lives for one forward pass or one generation
(a source layer's mask, accumulated column sums, the token history of a KV-cached generation)
is kept in closures and in a :class:`RunContext`, never on the dataclass and never in TL's
``hook.ctx``.

Patterns are ``blocks.{l}.attn.hook_pattern`` tensors [batch, head, query, key]. With a KV cache
the queries are the last ``query`` positions of the sequence so far, and a layer's keys its last
``key`` positions (a sliding-window layer's cache keeps only its window). What a query can see
comes from the model's :class:`~tokext.models.architectures.AttentionLayout`, per layer.

Half-precision patterns are edited in float32 and cast back (:func:`bind`), so renormalisations
and ratios never overflow or divide by an underflowed zero.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from tokext.attention.masks import CAUSAL, sees
from tokext.errors import InputError, LayerIndexError
from tokext.models.architectures import AttentionLayout, LayerAttention
from tokext.models.devices import input_device
from tokext.models.hooks import ForwardInputs, HookFn, resolve_heads, resolve_layers
from tokext.models.info import model_info
from tokext.models.probes import require_pattern_edits

Hooks = list[tuple[str, HookFn]]


class RunContext:
    """Per-run facts about the forward pass in flight, shared by the hooks of one run.

    ``inputs`` is the live :class:`~tokext.models.hooks.ForwardInputs` that
    :func:`tokext.models.hooks.capture_inputs` fills (or, for :meth:`Intervention.hooks` used alone,
    one filled from ``embed.hook_in``, with no attention mask). ``layout`` is what each layer's
    queries can see (:class:`~tokext.models.architectures.AttentionLayout`; default: causal).
    ``shared_points`` names hook points that carry hooks not owned by this run; their tensors are
    never edited in place (someone else may hold a reference). ``None`` means unknown: never edit
    in place. ``earlier_points`` names the hook points used by the interventions listed before the
    one being bound (they act first there), so an intervention that could act at an earlier point
    (the temperature's pre-softmax scores) keeps the order; ``enclosing_points`` those an enclosing
    streaming block already edits.

    Positions: the sequence so far has ``total`` positions (the 2-D attention mask's length, or
    cached + new); the queries are its last ``query`` positions and a layer's keys its last
    ``key`` positions (all of them, or the window a sliding-window cache keeps). Under the
    streaming engine a pattern is a block of rows and columns of that (``block``, set by the
    engine), and every method here answers for the block.
    """

    def __init__(
        self,
        inputs: ForwardInputs | None = None,
        shared_points: set[str] | None = None,
        strict: bool = False,
        earlier_points: set[str] | None = None,
        layout: AttentionLayout | None = None,
        enclosing_points: set[str] | None = None,
    ):
        self.inputs = inputs if inputs is not None else ForwardInputs()
        self.shared_points = shared_points
        self.earlier_points = earlier_points if earlier_points is not None else set()
        self.enclosing_points = enclosing_points if enclosing_points is not None else set()
        self.strict = strict  # inputs are captured: a batch of strings has unknown padding
        self.layout = layout
        self.block: Any = None  # the streaming engine's BlockGeometry of the block in flight (None: whole)
        self._history: torch.Tensor | None = None
        self._history_of: torch.Tensor | None = None

    # ------------------------------------------------------------------ geometry and masks

    def inplace_ok(self, name: str, pattern: torch.Tensor) -> bool:
        """Whether ``pattern`` (the tensor at hook ``name``) may be overwritten."""
        if self.shared_points is None or name in self.shared_points:
            return False
        return not (torch.is_grad_enabled() and pattern.requires_grad)

    def attention(self, layer: int | None) -> LayerAttention:
        """What a query of ``layer`` sees (causal when the layer or the layout is unknown)."""
        if layer is None or self.layout is None:
            return CAUSAL
        return self.layout[layer]

    def _shape(self, pattern: torch.Tensor) -> tuple[int, int, int, int, int, int]:
        """``(queries of the call, first row, row stop, keys of the layer, first column, column stop)``:
        the whole pattern, or the block a streaming engine hands over (``self.block``)."""
        block = self.block
        if block is None:
            n_q, n_k = int(pattern.shape[-2]), int(pattern.shape[-1])
            return n_q, 0, n_q, n_k, 0, n_k
        return block.n_queries, block.q_start, block.q_stop, block.n_keys, block.k_start, block.k_stop

    def sequence_mask(self, pattern: torch.Tensor) -> torch.Tensor | None:
        """The call's 2-D [batch, total] mask as Bool, checked against the pattern; None without one."""
        mask = self.inputs.attention_mask
        batch = pattern.shape[0]
        n_q, _, _, n_k, _, _ = self._shape(pattern)
        if mask is None:
            if self.strict and self.inputs.tokens is None and batch > 1:
                raise InputError(
                    "this intervention needs to know which tokens are padding, and a batch of strings "
                    "hides it: tokenize (tokext.models.inputs.encode / pad) and pass token ids with attention_mask"
                )
            return None
        if mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] < max(n_q, n_k):
            raise InputError(
                f"attention_mask of shape {tuple(mask.shape)} does not match the attention pattern "
                f"{tuple(pattern.shape)} [batch, head, query, key]: pass a 2-D [batch, past + new] 0/1 mask"
            )
        return mask.to(device=pattern.device, dtype=torch.bool)

    def total(self, pattern: torch.Tensor) -> int:
        """Positions in the sequence so far (cached + new). Needs no padding mask: a batch of strings
        (padding unknown) still has a length."""
        mask = self.sequence_mask(pattern) if self.inputs.attention_mask is not None else None
        if mask is not None:
            return int(mask.shape[1])
        n_q, _, _, n_k, _, _ = self._shape(pattern)
        return max(n_k, int(self.inputs.past_len) + n_q)

    def key_positions(self, pattern: torch.Tensor) -> torch.Tensor:
        """Long [key]: the position in the sequence of each key (column) of this pattern."""
        total = self.total(pattern)
        _, _, _, n_k, k0, k1 = self._shape(pattern)
        return torch.arange(total - n_k + k0, total - n_k + k1, device=pattern.device)

    def query_positions(self, pattern: torch.Tensor) -> torch.Tensor:
        """Long [query]: the position in the sequence of each query (row) of this pattern."""
        total = self.total(pattern)
        n_q, q0, q1, _, _, _ = self._shape(pattern)
        return torch.arange(total - n_q + q0, total - n_q + q1, device=pattern.device)

    def diagonal_offset(self, pattern: torch.Tensor) -> int:
        """The ``offset`` of ``pattern.diagonal(offset, -2, -1)``: each query's own key."""
        n_q, q0, _, n_k, k0, _ = self._shape(pattern)
        return (n_k - n_q + q0) - k0

    def attention_mask(self, pattern: torch.Tensor) -> torch.Tensor | None:
        """Bool [batch, key]: real (non-pad) keys of this pattern, or ``None`` when the call had no mask."""
        mask = self.sequence_mask(pattern)
        return None if mask is None else mask[:, self.key_positions(pattern)]

    def real_queries(self, pattern: torch.Tensor) -> torch.Tensor | None:
        """Bool [batch, query]: real query rows (``None``: all)."""
        mask = self.sequence_mask(pattern)
        return None if mask is None else mask[:, self.query_positions(pattern)]

    def visible(self, pattern: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Bool [batch or 1, query, key]: the query sees the key (within ``layer``'s reach, both real)."""
        reach = sees(self.query_positions(pattern), self.key_positions(pattern), self.attention(layer))[None]
        keys, queries = self.attention_mask(pattern), self.real_queries(pattern)
        if keys is None or queries is None:  # both or neither: the call had no mask
            return reach
        return reach & keys[:, None, :] & queries[:, :, None]

    def visible_counts(self, pattern: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Float [batch or 1, key]: how many real queries see each key (0 on pad keys), the column
        sums of :meth:`visible` without its [query, key] mask (a difference of cumulative sums)."""
        queries, keys = self.query_positions(pattern), self.key_positions(pattern)
        attention = self.attention(layer)
        real_q = self.real_queries(pattern)
        weights = torch.ones(1, len(queries), device=pattern.device) if real_q is None else real_q.float()
        cumulative = torch.nn.functional.pad(weights.cumsum(1), (1, 0))  # [batch, query + 1]
        if attention.causal:  # queries at the key's position and after it (within the window)
            last = torch.full_like(keys, int(queries[-1])) if attention.window is None else keys + attention.window - 1
            first = keys
        elif attention.window is None:
            first, last = torch.full_like(keys, int(queries[0])), torch.full_like(keys, int(queries[-1]))
        else:
            first, last = keys - attention.window, keys + attention.window
        start = (first - queries[0]).clamp(0, len(queries))
        stop = (last - queries[0] + 1).clamp(0, len(queries))
        stop = torch.maximum(stop, start)
        counts = cumulative[:, stop] - cumulative[:, start]
        real_k = self.attention_mask(pattern)
        return counts if real_k is None else counts * real_k

    def first_position(self, pattern: torch.Tensor) -> torch.Tensor:
        """Long [batch]: position of each row's first real token (its "position 0" under left padding)."""
        mask = self.sequence_mask(pattern)
        if mask is None:
            return torch.zeros(pattern.shape[0], dtype=torch.long, device=pattern.device)
        return mask.to(torch.int8).argmax(1)

    def key_offsets(self, pattern: torch.Tensor) -> torch.Tensor:
        """Long [batch, key]: each key's position counted from its row's first real token."""
        return self.key_positions(pattern)[None, :] - self.first_position(pattern)[:, None]

    def first_key_mask(self, pattern: torch.Tensor) -> torch.Tensor:
        """Bool [batch, key]: each row's first real key (none in a row without real keys, none in a
        streaming block of keys that does not hold it)."""
        keys = self.key_offsets(pattern) == 0
        mask = self.attention_mask(pattern)
        return keys if mask is None else keys & mask

    def key_tokens(self, pattern: torch.Tensor) -> torch.Tensor:
        """Long [batch, key]: token id of every key, the KV-cached ones included.

        The history of a cached generation is accumulated across decode steps, so the
        generation must start (its prefill must run) inside the same run.
        """
        batch = pattern.shape[0]
        n_q = self._shape(pattern)[0]
        tokens = self.inputs.tokens
        if tokens is None or tuple(tokens.shape) != (batch, n_q):
            raise InputError(
                "this intervention needs the token ids of the forward pass: call the model on a "
                "[batch, pos] token tensor (not strings) inside `tokext.intervene`"
            )
        total = self.total(pattern)
        history = self._history
        if self._history_of is not tokens or history is None or history.shape[1] != total:
            past = total - n_q
            if past == 0:
                history = tokens
            elif history is not None and tuple(history.shape) == (batch, past):
                history = torch.cat([history, tokens.to(history.device)], dim=1)
            else:
                raise InputError(
                    f"token ids of the {past} cached keys are unknown: start the cached generation "
                    "(its prefill) inside the same `tokext.intervene` block"
                )
            self._history, self._history_of = history, tokens
        return history[:, self.key_positions(pattern)].to(pattern.device)


def learned_sink_share(pattern: torch.Tensor) -> torch.Tensor:
    """[..., query, 1]: the learned sink's share of each row of a learned-sink layer, ``1 - sum_j p_ij``
    (0 where an earlier, unnormalised edit made the row sum to more than 1).

    The share is a difference of numbers near 1, so edits that use it work in float64
    (:func:`in_float64`): in float32 a small share would keep only a few significant digits.
    """
    return (1.0 - pattern.sum(-1, keepdim=True)).clamp_min(0.0)


def in_float64(edit: Callable[[torch.Tensor, bool], torch.Tensor]) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """An ``edit(sub, inplace)`` computed on a float64 copy and cast back (for learned-sink shares)."""

    def wrapped(sub: torch.Tensor, inplace: bool) -> torch.Tensor:
        out = edit(sub.double(), True).to(sub.dtype)
        return sub.copy_(out) if inplace else out

    return wrapped


def align_keys(tensor: torch.Tensor, have: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """``tensor`` [..., key] over the key positions ``have`` (contiguous), re-indexed to the positions
    ``want``: shared positions are copied, the others are 0 (another layer's window, another block)."""
    if have.numel() == want.numel() and bool((have == want).all()):
        return tensor
    out = tensor.new_zeros(*tensor.shape[:-1], want.numel())
    if have.numel() == 0 or want.numel() == 0:
        return out
    a, c = int(have[0]), int(want[0])
    lo, hi = max(a, c), min(a + have.numel(), c + want.numel())
    if hi > lo:
        out[..., lo - c : hi - c] = tensor[..., lo - a : hi - a]
    return out


def on_heads(
    pattern: torch.Tensor, heads: torch.Tensor | None, inplace: bool, edit: Callable[[torch.Tensor, bool], torch.Tensor]
) -> torch.Tensor:
    """Apply ``edit(sub_pattern, inplace)`` to the chosen heads (all when ``heads`` is None)."""
    if heads is None:
        return edit(pattern, inplace)
    owned = not (torch.is_grad_enabled() and pattern.requires_grad)
    sub = edit(pattern.index_select(1, heads), owned)  # index_select copies: the edit owns it
    if inplace:
        return pattern.index_copy_(1, heads, sub)
    return pattern.index_copy(1, heads, sub)


def rescale_rows(edited: torch.Tensor, target_sum: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Scale each row of ``edited`` to ``target_sum`` [..., 1]; rows summing to 0 stay 0."""
    total = edited.sum(-1, keepdim=True)
    ratio = torch.where(total > 0, target_sum / torch.where(total > 0, total, 1.0), 0.0)
    return edited.mul_(ratio) if inplace else edited * ratio


def split_row_mass(pattern: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mass on the ``keys`` and on the other keys, ``([..., query, 1], [..., query, 1])``.

    ``keys`` is Bool ``[batch, heads or 1, 1, key]``. One batched matrix-vector product reads the
    pattern once; both parts are summed directly (never as a difference), so a row whose mass is
    all on ``keys`` gets exactly 0 for the rest.
    """
    weights = torch.stack([keys, ~keys], dim=-1).to(pattern.dtype).squeeze(-3)  # [batch, h, key, 2]
    both = torch.matmul(pattern, weights)  # [batch, head, query, 2]
    return both[..., :1], both[..., 1:]


def scale_entries(
    pattern: torch.Tensor,
    keys: torch.Tensor,
    gain_on_keys: torch.Tensor | float,
    gain_elsewhere: torch.Tensor | float,
    inplace: bool,
) -> torch.Tensor:
    """``pattern`` times ``gain_on_keys`` where ``keys`` (Bool ``[batch, h, 1, key]``) and times
    ``gain_elsewhere`` elsewhere; the gains are per row (``[..., query, 1]``) or scalars.

    When the keys are a few columns (sinks, the first token) the whole pattern is scaled once and
    only those columns are recomputed, instead of building a full-size gain tensor.
    """
    n_k = pattern.shape[-1]
    columns = keys.reshape(-1, n_k).any(0).nonzero().flatten()
    if len(columns) * 8 > n_k:  # many keys: one full-size gain tensor is cheaper than gathering
        gain = torch.where(keys, gain_on_keys, gain_elsewhere)
        return pattern.mul_(gain) if inplace else pattern * gain
    picked = pattern.index_select(-1, columns)
    picked = picked * torch.where(keys.index_select(-1, columns), gain_on_keys, gain_elsewhere)
    scaled = pattern.mul_(gain_elsewhere) if inplace else pattern * gain_elsewhere
    return scaled.index_copy_(-1, columns, picked) if inplace else scaled.index_copy(-1, columns, picked)


# ---------------------------------------------------------------------- the base class


@dataclass(frozen=True, repr=False)
class Intervention:
    """Base of every intervention. Subclasses are frozen dataclasses of hyperparameters.

    Subclasses implement :meth:`_check` (parameter validation, raising :class:`InputError`),
    :meth:`edited_layers` (validated against the model) and :meth:`_make_hooks`.
    """

    needs_tokens = False  # class attribute: whether the hooks read token ids (categories)

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:  # pragma: no cover - overridden
        pass

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        raise NotImplementedError

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        raise NotImplementedError

    def check_inputs(self, model: Any, lengths: list[int]) -> None:
        """Raise :class:`InputError` when inputs of these token ``lengths`` cannot be edited (a position
        beyond every sequence); entry points that know their inputs call it before any forward pass."""

    def hooks(self, model: Any, ctx: RunContext | None = None) -> Hooks:
        """TransformerLens ``fwd_hooks`` applying this intervention, with fresh per-run state.

        For ``model.run_with_hooks(tokens, fwd_hooks=intervention.hooks(model))``; for several
        interventions use :func:`tokext.fwd_hooks` (concatenated lists lose their order where
        an intervention can act pre-softmax). Used this way the hooks cannot see an attention
        mask: inputs are taken to be unpadded. Prefer :func:`tokext.intervene`, which also
        handles padding. ``ctx`` is for :func:`tokext.intervene`'s own binding.
        """
        if ctx is None:
            return fwd_hooks(model, self)
        self.edited_layers(model)  # validates layers and heads against the model
        return self._make_hooks(model, ctx)

    def __repr__(self) -> str:
        """Class name and the parameters that differ from their defaults (names it in tables)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
            if default is dataclasses.MISSING or value != default:
                parts.append(f"{f.name}={_compact(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _compact(value: Any) -> str:
    """``repr`` with long runs written as ranges (still valid Python that the constructors accept)."""

    def run(xs: list[int], shortest: int = 4) -> bool:
        return len(xs) >= shortest and xs == list(range(xs[0], xs[0] + len(xs)))

    if isinstance(value, tuple) and value and all(is_int(x) for x in value) and run(list(value)):
        return f"range({value[0]}, {value[-1] + 1})"
    if isinstance(value, tuple) and value and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        layers = sorted({p[0] for p in value})
        heads = sorted({p[1] for p in value})
        full = len(value) == len(layers) * len(heads) and len(set(value)) == len(value)
        if full and len(value) >= 4 and (len(layers) == 1 or run(layers, 2)) and run(heads, 2):
            span = lambda xs: f"[{xs[0]}]" if len(xs) == 1 else f"range({xs[0]}, {xs[-1] + 1})"  # noqa: E731
            return f"[(l, h) for l in {span(layers)} for h in {span(heads)}]"
    return repr(value)


# ---------------------------------------------------------------------- binding to a model

FORWARD_HOOK = "embed.hook_in"
"""Fires once per forward pass, before any attention: counts passes, records token ids."""


def fwd_hooks(model: Any, *interventions: Intervention) -> list[tuple[str, HookFn]]:
    """TransformerLens ``fwd_hooks`` applying ``interventions`` in order, for ``run_with_hooks``.

    The same binding as :func:`intervene` (one shared per-run state; each intervention acts
    after the ones listed before it), without its padding information: inputs are taken to be
    unpadded. Build the list where it runs: where the temperature acts (pre-softmax scores or
    the pattern) depends on the hooks attached to the model at this moment.

    >>> from tokext.models import native_model
    >>> from tokext.interventions import AttentionTemperature, SinkRebalance
    >>> model = native_model()
    >>> hooks = fwd_hooks(model, SinkRebalance(scale=0.5), AttentionTemperature(2.0))
    >>> logits = model.run_with_hooks(torch.randint(0, 64, (1, 8)), fwd_hooks=hooks)
    """
    validate(model, interventions, "fwd_hooks")
    ctx = RunContext(layout=model_layout(model))
    hooks = bind(model, interventions, ctx)
    if any(iv.needs_tokens for iv in interventions) and FORWARD_HOOK in model.hook_dict:

        def record_tokens(tokens: torch.Tensor, hook: Any) -> None:
            if not tokens.is_floating_point():
                ctx.inputs.tokens = tokens if tokens.ndim == 2 else tokens[None]

        hooks.insert(0, (FORWARD_HOOK, record_tokens))
    return hooks


def check_inputs(model: Any, interventions: Sequence[Intervention], lengths: list[int]) -> None:
    """Every intervention's :meth:`Intervention.check_inputs` for sequences of these lengths."""
    if lengths:
        for iv in interventions:
            iv.check_inputs(model, lengths)


def validate(model: Any, interventions: Sequence[Intervention], caller: str) -> None:
    """Type-check, validate layers and heads, and refuse models whose edited patterns do not land."""
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise InputError(f"{caller} takes Intervention objects, got {iv!r}")
    edited = sorted({layer for iv in interventions for layer in iv.edited_layers(model)})
    if edited:
        require_pattern_edits(model, edited)


def model_layout(model: Any) -> AttentionLayout | None:
    """The model's :class:`AttentionLayout` (``None`` for stand-ins that are not models)."""
    return model_info(model).attention if isinstance(model, torch.nn.Module) else None


def bind(
    model: Any, interventions: Sequence[Intervention], ctx: RunContext, fired: Counter | None = None
) -> list[tuple[str, HookFn]]:
    """Every intervention's hooks, in order; each is bound knowing the hook points of those before it.

    Every hook sees half-precision tensors in float32 (:func:`in_float32`).
    """
    hooks: list[tuple[str, HookFn]] = []
    for i, iv in enumerate(interventions):
        ctx.earlier_points = {name for name, _ in hooks}
        bound = [(name, in_float32(fn)) for name, fn in iv.hooks(model, ctx)]
        hooks += bound if fired is None else [(name, _counted(fn, fired, i)) for name, fn in bound]
    return hooks


def in_float32(fn: HookFn) -> HookFn:
    """``fn`` run on a float32 copy of a float16 / bfloat16 tensor, its result cast back.

    Edits renormalise rows and divide by row masses; in half precision a mass can underflow to
    zero or a ratio overflow, and a NaN then spreads through every later layer.
    """

    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor | None:
        if tensor.dtype not in (torch.float16, torch.bfloat16):
            return fn(tensor, hook)
        out = fn(tensor.float(), hook)
        if out is None:
            return None
        limits = torch.finfo(tensor.dtype)  # a masked score stays finite (an -inf row would be NaN)
        return out.clamp_(limits.min, limits.max).to(tensor.dtype)

    return _described_like(hook, fn)


def _described_like(hook: HookFn, fn: HookFn) -> HookFn:
    """``hook`` carrying ``fn``'s name and attributes (what the streaming engine reads of a stage)."""
    hook.__name__ = getattr(fn, "__name__", "tokext_intervention")
    hook.__dict__.update(getattr(fn, "__dict__", {}))
    return hook


def _counted(fn: HookFn, fired: Counter, index: int) -> HookFn:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor | None:
        fired[index] += 1
        return fn(tensor, hook)

    counted = _described_like(hook, fn)
    describe = getattr(fn, "stream_fused", None)
    if describe is not None:  # the fused kernel applying the edit counts as the hook firing

        def fused(call: Any) -> Any:
            edit = describe(call)
            if edit is not None:
                fired[index] += 1
            return edit

        counted.stream_fused = fused  # type: ignore[attr-defined]
    return counted


# ---------------------------------------------------------------------- validation helpers


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise :class:`InputError` unless ``value`` is a finite real number in the given range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InputError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise InputError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (numpy integers too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> None:
    """Raise :class:`~tokext.errors.InputError` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}")


def as_int_tuple(name: str, value: Any, *, allow_none: bool = True) -> tuple[int, ...] | None:
    """A layer spec (int or sequence of ints) as a tuple, for hashable, readable dataclass fields."""
    if value is None:
        if allow_none:
            return None
        raise InputError(f"{name} is required")
    items = [value] if is_int(value) else value
    try:
        items = list(items)
    except TypeError:
        raise InputError(f"{name} must be an int or a sequence of ints, got {value!r}") from None
    if not items or not all(is_int(x) for x in items):
        raise InputError(f"{name} must be a non-empty int or sequence of ints, got {value!r}")
    return tuple(int(x) for x in items)


@overload
def as_head_pairs(name: str, value: Any, *, allow_none: Literal[False]) -> tuple[tuple[int, int], ...]: ...
@overload
def as_head_pairs(name: str, value: Any, *, allow_none: bool = True) -> tuple[tuple[int, int], ...] | None: ...
def as_head_pairs(name: str, value: Any, *, allow_none: bool = True) -> tuple[tuple[int, int], ...] | None:
    """(layer, head) pairs as a tuple of int pairs."""
    if value is None:
        if allow_none:
            return None
        raise InputError(f"{name} is required: a sequence of (layer, head) pairs")
    try:
        raw = [tuple(pair) for pair in value]
    except TypeError:
        raise InputError(f"{name} must be a sequence of (layer, head) pairs, got {value!r}") from None
    if not raw or any(len(pair) != 2 or not all(is_int(x) for x in pair) for pair in raw):
        raise InputError(f"{name} must be a non-empty sequence of integer (layer, head) pairs, got {value!r}")
    return tuple((int(layer), int(head)) for layer, head in raw)


def head_selection(
    model: Any,
    layers: Sequence[int] | None,
    heads: Sequence[tuple[int, int]] | None,
    default_layers: list[int] | None = None,
) -> dict[int, list[int] | None]:
    """Layer -> chosen head indices (``None``: every head), validated against ``model``.

    With both ``layers`` and ``heads``, the pairs whose layer is listed are kept.
    """
    chosen = (
        resolve_layers(model, layers)
        if layers is not None
        else (default_layers if default_layers is not None else resolve_layers(model, None))
    )
    if heads is None:
        return {layer: None for layer in chosen}
    pairs = [p for p in resolve_heads(model, heads) if p[0] in chosen]
    if not pairs:
        raise LayerIndexError(f"none of the heads {list(heads)} lies in the chosen layers {chosen}")
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(layer, []).append(head)
    n_heads = int(model.cfg.n_heads)
    return {layer: (None if len(h) == n_heads else h) for layer, h in sorted(out.items())}


def head_index(heads: list[int] | None, device: torch.device) -> torch.Tensor | None:
    """``heads`` as a long tensor on ``device`` for indexing the head axis (``None``: every head)."""
    return None if heads is None else torch.tensor(heads, dtype=torch.long, device=device)


def model_device(model: Any) -> torch.device:
    """The device that the model's inputs go to."""
    return input_device(model)
