"""The streaming attention engine: the model's own attention code, one block of query rows at a time.

Why this design. Attention is computed by the Hugging Face attention modules that the
TransformerLens bridge wraps (``blocks.{l}.attn.original_component``), so RoPE, q/k norms, GQA,
softcapping, sliding-window caches and learned sinks are transformers' own code, with one copy of
the weights. For the duration of an :class:`StreamingEngine` block:

- each attention bridge's ``forward`` calls its wrapped module instead of TransformerLens's eager
  reimplementation;
- the model's ``config._attn_implementation`` names an attention function registered through
  transformers' ``AttentionInterface``: it receives the projected queries, keys (cache included)
  and values, and computes ``softmax(q k^T)`` for one block of query rows at a time, over the keys
  those rows can see (the layer's :class:`~tokext.models.architectures.LayerAttention`), hands the
  block to the layer's stages (interventions) and observers (statistics), multiplies it by the
  values and drops it. Peak memory per layer is O(batch x heads x block x T); the block's rows
  adapt to a memory budget.
- an ``AttentionMaskInterface`` function under the same name replaces transformers' 4-D mask with
  the 2-D padding mask, shaped ``[batch, 1, 1, key]``: positions and padding are enough, and no
  [T, T] mask is built.

What needs more than one block:

- a two-pass stage (ACT's column means) sees every block of the layer once with
  ``geometry.phase == "observe"`` before a second pass applies it (``"apply"``): twice the layer's
  attention scores;
- a stage that reads another layer's pattern (early-layer emulation's mask, a pattern patch) has
  that layer's queries and keys kept (O(T x d) per head) and its block for the same rows computed
  again, replaying that layer's stages up to the one that records it.

Models whose attention does not go through ``AttentionInterface`` (Bloom, MPT: ALiBi written inline)
are refused, as are user hooks on ``hook_pattern`` / ``hook_attn_scores``, which would never fire.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokext.attention.engines import fused
from tokext.attention.engines.choose import DEFAULT_BUDGET, block_rows
from tokext.attention.engines.edits import FusedEdit, LayerCall
from tokext.attention.masks import sees
from tokext.errors import InputError, InterventionNotAppliedError, UneditableAttentionError
from tokext.models.architectures import LayerAttention
from tokext.models.info import model_info

NAME = "tokext_streaming"
STAGE_HOOKS = ("hook_pattern", "hook_attn_scores", "hook_z")
"""Attention hooks whose edits the engine runs as stages (TransformerLens hooks there are not used)."""
_ACTIVE: list[StreamingEngine] = []


@dataclass(frozen=True)
class BlockGeometry:
    """Where a block lies: rows ``q_start:q_stop`` of the call's ``n_queries`` queries, columns
    ``k_start:k_stop`` of the layer's ``n_keys`` keys (the queries are the keys' last positions)."""

    layer: int
    q_start: int
    q_stop: int
    n_queries: int
    k_start: int
    k_stop: int
    n_keys: int
    phase: str = "apply"  # "observe": the first pass of a two-pass stage


Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass
class Stage:
    """One step of a layer's chain: ``fn(block) -> replacement or None``.

    ``two_pass``: ``fn`` first sees every block of the layer with ``phase="observe"`` (its result
    ignored), then again with ``phase="apply"``. ``source``/``recorder``: ``fn`` needs what the stage
    ``recorder`` of layer ``source`` recorded for the same rows. ``replayable``: ``fn`` is a pure
    function of the block (it may run again on a recomputed block). ``fused``: the same edit of a
    whole layer call as the fused kernel applies it (:mod:`tokext.attention.engines.edits`), or None.
    """

    fn: Edit
    two_pass: bool = False
    replayable: bool = True
    source: int | None = None
    recorder: Edit | None = None
    fused: Callable[[LayerCall], FusedEdit | None] | None = None

    def reads(self) -> tuple[int, Edit]:
        """``(source, recorder)`` of a stage that reads another layer's recorded block."""
        if self.source is None or self.recorder is None:
            raise InterventionNotAppliedError("this stage reads no other layer's pattern")
        return self.source, self.recorder


@dataclass
class LayerChain:
    """What runs on one layer's blocks: score stages (masked, softcapped scores, before the softmax
    and before a learned sink's column joins it), pattern stages (probabilities), output stages (the
    layer's per-head output z = A V, [batch, query, head, d], before the output projection), observers
    (``observe(block, geometry, plogp)`` after every stage; ``plogp`` is each row's ``sum p log p``
    when the engine has it for free: an unedited softmax, else None), ``finish`` callbacks after
    the last block, and ``kv`` observers, called once per attention call, before any block, with the
    layer's keys and values as the attention uses them (after RoPE and q/k norms, cache included;
    ``[batch, kv head, key, d]``, one per KV head)."""

    scores: list[Stage] = field(default_factory=list)
    pattern: list[Stage] = field(default_factory=list)
    output: list[Stage] = field(default_factory=list)  # on the per-head output z [batch, query, head, d]
    observers: list[Callable[..., None]] = field(default_factory=list)
    finish: list[Callable[[], None]] = field(default_factory=list)
    kv: list[Callable[[torch.Tensor, torch.Tensor], None]] = field(default_factory=list)


@dataclass
class _Stored:
    """A layer's queries and keys of the call, kept for a later layer's stage (O(T x d) per head)."""

    query: torch.Tensor
    key: torch.Tensor
    sinks: torch.Tensor | None
    padding: torch.Tensor | None
    scaling: float
    softcap: float | None
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """The fused kernel's records of this call (keys above a threshold per row), by the id of the
    record stage's function."""


class StreamingEngine:
    """Run ``model``'s forward passes with streaming attention while :meth:`active` lasts.

    What runs on each layer's blocks is added and removed in nested parts (:meth:`adding`): an
    ``intervene`` block adds its interventions' stages, a statistics collection its observers, in
    the order they are entered. ``on_block(geometry)`` listeners are told where each block lies
    before its stages run (``None`` after a layer). ``budget``: bytes a block may hold;
    ``block_rows`` fixes the rows per block instead.
    """

    def __init__(self, model: Any, *, budget: int = DEFAULT_BUDGET, block_rows: int | None = None):
        self.model = model
        self.info = model_info(model)
        self.budget = int(budget)
        self.block_rows = block_rows
        self.calls: dict[int, int] = {}  # layer -> attention calls seen (every layer must be reached)
        self._parts: list[tuple[dict[int, LayerChain], Callable[[BlockGeometry | None], None] | None]] = []
        self._stored: dict[int, _Stored] = {}
        self._layer_of: dict[int, int] = {}
        self._merged: dict[int, LayerChain] = {}

    def chain(self, layer: int) -> LayerChain:
        """Everything that runs on ``layer``'s blocks, in the order the parts were added."""
        return self._merged.get(layer, _EMPTY)

    def _merge(self) -> None:
        merged: dict[int, LayerChain] = {}
        for chains, _ in self._parts:
            for layer, part in chains.items():
                chain = merged.setdefault(layer, LayerChain())
                chain.scores += part.scores
                chain.pattern += part.pattern
                chain.output += part.output
                chain.observers += part.observers
                chain.finish += part.finish
                chain.kv += part.kv
        self._merged = merged
        self._sources = {
            stage.source for chain in merged.values() for stage in chain.pattern if stage.source is not None
        }

    def on_block(self, geometry: BlockGeometry | None) -> None:
        """Tell every listener that a new query block starts (``None``: the whole layer in one piece)."""
        for _, listener in self._parts:
            if listener is not None:
                listener(geometry)

    # ------------------------------------------------------------------ installing

    def check(self) -> None:
        """Refuse what the engine cannot run exactly, before anything is installed."""
        if self.block_rows is not None and self.block_rows < 1:
            raise InputError(f"block_rows must be at least 1, got {self.block_rows}")
        config = getattr(getattr(self.model, "original_model", None), "config", None)
        if config is None:
            raise UneditableAttentionError(
                f"{self.info.name}: the streaming engine runs the attention of a Hugging Face model wrapped by "
                "TransformerLens, and this model wraps none (a TransformerLens-native model): use engine='hooks'"
            )
        family = self.info.attention.family
        if family in ("Bloom", "MPT"):
            raise UneditableAttentionError(
                f"{self.info.name} ({family}): its attention adds ALiBi inline instead of calling transformers' "
                "AttentionInterface, so the streaming engine cannot run it: use engine='hooks'"
            )
        foreign = [
            name
            for name, point in self.model.hook_dict.items()
            if name.endswith(("attn.hook_pattern", "attn.hook_attn_scores")) and point.fwd_hooks
        ]
        if foreign:
            raise InputError(
                f"hooks are attached to {foreign[:3]}{' ...' if len(foreign) > 3 else ''}: the streaming "
                "engine never materialises hook_pattern, so they would not fire; remove them or use "
                "engine='hooks'"
            )
        for layer, chain in self._merged.items():
            if len([stage for stage in chain.pattern if stage.two_pass]) > 1:
                raise InputError(
                    f"layer {layer}: two interventions need a first pass over the whole layer "
                    "(e.g. two SinkCalibrations); the streaming engine runs one: use engine='hooks'"
                )
            for stage in chain.pattern:
                if stage.source is not None:
                    self._check_replay(layer, stage)

    def _check_replay(self, layer: int, stage: Stage) -> None:
        if stage.source is None or stage.recorder is None:
            raise InputError(f"layer {layer} reads layer {stage.source}'s pattern, which nothing there records")
        source, recorder = stage.reads()
        chain = self.chain(source)
        recorders = [s.fn for s in chain.pattern]
        if recorder not in recorders:
            raise InputError(f"layer {layer} reads layer {source}'s pattern, which nothing there records")
        before = chain.scores + chain.pattern[: recorders.index(recorder)]
        if any(not s.replayable for s in before):
            raise InputError(
                f"layer {layer} reads layer {stage.source}'s pattern after an intervention there that "
                "keeps state across rows (SinkCalibration); the streaming engine cannot recompute it: "
                "list the reading intervention first, or use engine='hooks'"
            )

    @contextlib.contextmanager
    def adding(
        self,
        chains: dict[int, LayerChain] | None = None,
        on_block: Callable[[BlockGeometry | None], None] | None = None,
    ) -> Iterator[StreamingEngine]:
        """Run ``chains`` (after those added before) and tell ``on_block`` for the duration."""
        part = (chains or {}, on_block)
        self._parts.append(part)
        try:
            self._merge()
            self.check()
            yield self
        finally:
            self._parts = [p for p in self._parts if p is not part]
            self._merge()

    @contextlib.contextmanager
    def active(self) -> Iterator[StreamingEngine]:
        """Install the engine for the block; everything is restored on exit, also on error."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        self._merge()
        self.check()
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _padding_mask)
        configs = _configs(self.model.original_model)
        saved = [(c, c._attn_implementation) for c in configs]
        swapped = []
        try:
            for layer, block in enumerate(self.model.blocks):
                bridge = block.attn
                wrapped = bridge.original_component
                for module in wrapped.modules():
                    self._layer_of[id(module)] = layer
                object.__setattr__(bridge, "forward", _calling(wrapped))  # the bridge's __setattr__ forwards
                swapped.append(bridge)
            for module in self.model.modules():
                shortcut = _norm_shortcut(module)
                if shortcut is not None:
                    object.__setattr__(module, "forward", shortcut)
                    swapped.append(module)
            for config, _ in saved:
                config._attn_implementation = NAME
            _ACTIVE.append(self)
            yield self
        finally:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            for config, value in saved:
                config._attn_implementation = value
            for bridge in swapped:
                object.__delattr__(bridge, "forward")
            self._stored.clear()

    def require_every_layer(self) -> None:
        """Raise unless every layer's attention went through the engine."""
        missing = [layer for layer in range(self.info.n_layers) if not self.calls.get(layer)]
        if missing:
            raise InterventionNotAppliedError(
                f"{self.info.name}: layers {missing} did not call transformers' AttentionInterface, so the streaming "
                "engine never saw them: use engine='hooks'"
            )

    # ------------------------------------------------------------------ one attention call

    def attend(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """Blocked attention of one layer; returns ``[batch, query, head, d]`` as transformers expects."""
        layer = self._layer_of.get(id(module))
        if layer is None:
            raise InterventionNotAppliedError(
                f"an attention module the engine does not know ran: {type(module).__name__}"
            )
        self.calls[layer] = self.calls.get(layer, 0) + 1
        for see in self.chain(layer).kv:
            see(key, value)
        padding = (
            None if attention_mask is None else (attention_mask[:, 0, 0, :] > torch.finfo(attention_mask.dtype).min / 2)
        )
        if padding is not None and bool(padding.all()):
            padding = None  # nothing padded: checked once per layer call, not in every block
        stored = _Stored(
            query=query,
            key=key,
            sinks=getattr(module, "sinks", None),
            padding=padding,
            scaling=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
            softcap=float(softcap) if softcap else None,
        )
        if layer in self._sources:
            self._stored[layer] = stored
        chain = self.chain(layer)
        try:  # the fused kernel (or SDPA) where it computes the same numbers; None: the blocks below
            whole = BlockGeometry(layer, 0, query.shape[2], query.shape[2], 0, key.shape[2], key.shape[2])
            done = fused.attend(self, layer, stored, value, chain, whole)
        finally:
            self.on_block(None)
        if done is not None:
            for finish in chain.finish:
                finish()
            return done.transpose(1, 2).contiguous()
        batch, heads, n_q, dim = query.shape
        out = torch.empty(batch, heads, n_q, value.shape[-1], dtype=value.dtype, device=value.device)
        rows = self._rows(batch, key.shape[2])
        two_pass = next((i for i, s in enumerate(chain.pattern) if s.two_pass), None)
        try:
            if two_pass is not None:
                for start in range(0, n_q, rows):
                    self._probs(layer, stored, start, min(n_q, start + rows), chain, two_pass + 1, phase="observe")
                self.on_block(None)
            for start in range(0, n_q, rows):
                stop = min(n_q, start + rows)
                probs, geometry, plogp = self._probs(
                    layer, stored, start, stop, chain, len(chain.pattern), want_plogp=bool(chain.observers)
                )
                for observe in chain.observers:
                    observe(probs, geometry, plogp)
                out[:, :, start:stop] = _grouped(probs.to(value.dtype), value[:, :, geometry.k_start : geometry.k_stop])
        finally:
            self.on_block(None)
        for finish in chain.finish:
            finish()
        out = out.transpose(1, 2).contiguous()
        for stage in chain.output:
            out = _applied(stage.fn, out)
        return out

    def record_of(self, layer: int, recorder: Edit, like: _Stored) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused kernel's record of ``recorder`` (a stage of source ``layer``) in this forward pass,
        computed again from the source's stored queries and keys when that layer ran the pure-torch
        path; None when it cannot be had (a KV cache, other shapes, stages before the recorder)."""
        source = self._stored.get(layer)
        if source is None or source.query.shape[:3] != like.query.shape[:3] or source.key.shape[2] != like.key.shape[2]:
            return None
        got = source.records.get(id(recorder))
        if got is not None:
            return got
        chain = self.chain(layer)
        stage = chain.pattern[0] if chain.pattern else None
        if stage is None or stage.fn is not recorder or chain.scores or stage.fused is None:
            return None
        module = fused.kernel()
        batch, heads, n_q, _ = source.query.shape
        call = LayerCall(layer, batch, heads, n_q, source.key.shape[2], source.query.device, _never)
        edit = stage.fused(call)
        if module is None or edit is None or edit.record is None:
            return None
        got = fused.record(module, self.info.attention[layer], source, *edit.record)
        if got is not None:
            source.records[id(recorder)] = got
        return got

    def _rows(self, batch: int, n_keys: int) -> int:
        return self.block_rows if self.block_rows is not None else block_rows(self.model, batch, n_keys, self.budget)

    def _probs(
        self,
        layer: int,
        stored: _Stored,
        start: int,
        stop: int,
        chain: LayerChain,
        upto: int,
        phase: str = "apply",
        want_plogp: bool = False,
    ) -> tuple[torch.Tensor, BlockGeometry, torch.Tensor | None]:
        """Probabilities of rows ``start:stop`` after the score stages and the first ``upto`` pattern
        stages, their geometry, and (``want_plogp``, an unedited softmax without a sink) each row's
        ``sum p log p = sum p s - logsumexp(s)``, which costs no logarithm per entry."""
        attention = self.info.attention[layer]
        n_q, n_k = stored.query.shape[2], stored.key.shape[2]
        first, last = n_k - n_q + start, n_k - n_q + stop - 1  # positions (on the key axis) of the rows
        lo, hi = _key_range(attention, first, last, n_k)
        geometry = BlockGeometry(layer, start, stop, n_q, lo, hi, n_k, phase)
        # the scale goes on the [rows, d] queries, not on the [rows, keys] scores
        scores = _grouped(stored.query[:, :, start:stop] * stored.scaling, stored.key[:, :, lo:hi].transpose(-1, -2))
        if stored.softcap is not None:
            scores = torch.tanh(scores / stored.softcap) * stored.softcap
        _mask_block(scores, attention, first, last, lo, hi, stored.padding)
        self.on_block(geometry)
        for stage in chain.scores:
            scores = _applied(stage.fn, scores)
        plogp = None
        if stored.sinks is not None:  # the learned sink logit joins the softmax and is dropped after it
            column = stored.sinks.reshape(1, -1, 1, 1).to(scores).expand(*scores.shape[:-1], 1)
            combined = torch.cat([scores, column], dim=-1)
            combined = combined - combined.max(dim=-1, keepdim=True).values
            probs = torch.softmax(combined, dim=-1, dtype=torch.float32)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            if want_plogp and upto == 0 and scores.dtype == torch.float32:
                plogp = _sum_plogp_of_softmax(probs, scores, first - lo, stored.padding, first)
        probs = probs.to(stored.query.dtype)
        for stage in chain.pattern[:upto]:
            if stage.source is not None:
                self._replay(stage, start, stop)
                self.on_block(geometry)
            probs = _applied(stage.fn, probs)
        return probs, geometry, plogp

    def _replay(self, stage: Stage, start: int, stop: int) -> None:
        """Compute the source layer's block of the same rows again, up to and including its recorder."""
        layer, recorder = stage.reads()
        source = self._stored.get(layer)
        if source is None:
            raise InterventionNotAppliedError(f"layer {layer}'s queries and keys were not kept for this call")
        chain = self.chain(layer)
        upto = [s.fn for s in chain.pattern].index(recorder) + 1
        self._probs(layer, source, start, stop, chain, upto)


_EMPTY = LayerChain()


def _never() -> torch.Tensor:
    raise InterventionNotAppliedError("a record stage asked for a first pass over its layer")


def active_engine(model: Any) -> StreamingEngine | None:
    """The streaming engine running ``model`` now, if any (the innermost one)."""
    for engine in reversed(_ACTIVE):
        if engine.model is model:
            return engine
    return None


@contextlib.contextmanager
def streaming(
    model: Any,
    chains: dict[int, LayerChain] | None = None,
    on_block: Callable[[BlockGeometry | None], None] | None = None,
    *,
    budget: int = DEFAULT_BUDGET,
    block_rows: int | None = None,
) -> Iterator[StreamingEngine]:
    """Run ``model`` with the streaming engine for the block, with ``chains`` added to what runs on
    each layer. Inside another streaming block for the same model the chains join it (after the
    outer ones), so statistics collected inside an ``intervene`` block see the edited blocks."""
    engine = active_engine(model)
    if engine is not None:
        with engine.adding(chains, on_block):
            yield engine
        return
    engine = StreamingEngine(model, budget=budget, block_rows=block_rows)
    with engine.adding(chains, on_block), engine.active():
        yield engine


def _key_range(attention: LayerAttention, first: int, last: int, n_keys: int) -> tuple[int, int]:
    """The keys rows at positions ``first..last`` (of the key axis) can see: ``[lo, hi)``."""
    if attention.causal:
        lo = 0 if attention.window is None else max(0, first - attention.window + 1)
        return lo, min(n_keys, last + 1)
    if attention.window is None:
        return 0, n_keys
    return max(0, first - attention.window), min(n_keys, last + attention.window + 1)


def _seen_by_every_row(attention: LayerAttention, first: int, last: int, lo: int, hi: int) -> tuple[int, int]:
    """``[a, b)``: the keys of ``[lo, hi)`` that every row at positions ``first..last`` sees; only the
    columns outside it need a mask."""
    window = attention.window
    if attention.causal:
        a, b = (0 if window is None else last - window + 1), first + 1
    elif window is None:
        a, b = lo, hi
    else:
        a, b = last - window, first + window + 1
    a = min(max(a, lo), hi)
    return a, min(max(b, a), hi)


def _mask_block(
    scores: torch.Tensor,
    attention: LayerAttention,
    first: int,
    last: int,
    lo: int,
    hi: int,
    padding: torch.Tensor | None,
) -> None:
    """Set (in place) the scores of keys a row cannot see to the dtype's minimum: the layer's reach
    on the few columns some row of the block cannot see, then padded keys (``padding``: None when the
    call has none)."""
    low = torch.finfo(scores.dtype).min
    a, b = _seen_by_every_row(attention, first, last, lo, hi)
    for c0, c1 in ((lo, a), (b, hi)):
        if c1 > c0:
            hidden = _hidden(attention, last - first + 1, c0 - first, c1 - first, scores.device)
            scores[..., c0 - lo : c1 - lo].masked_fill_(hidden, low)
    if padding is not None:
        scores.masked_fill_(~padding[:, None, None, lo:hi], low)


@functools.lru_cache(maxsize=64)
def _hidden(attention: LayerAttention, n_rows: int, c0: int, c1: int, device: torch.device) -> torch.Tensor:
    """Bool [row, column]: row ``r`` (at offset ``r``) does not see the key at offset ``c`` (``c0 <= c <
    c1``); offsets from the block's first row, so every full block of a layer shares one mask.

    Made outside inference mode: the cache outlives the call, and a mask made under
    ``torch.inference_mode`` (as statistics run) could not be saved for backward by a later call
    that records gradients."""
    with torch.inference_mode(False):
        return ~sees(torch.arange(n_rows, device=device), torch.arange(c0, c1, device=device), attention)


_TINY = 1e-30  # below this a row's own probability is too small to give its log-sum-exp


def _sum_plogp_of_softmax(
    probs: torch.Tensor, scores: torch.Tensor, own_column: int, padding: torch.Tensor | None, first: int
) -> torch.Tensor:
    """``sum_k p log p`` [batch, head, row] of an unedited softmax, as ``sum_k p s - lse``.

    Each row sees its own key, so the log-sum-exp comes from one entry: ``lse = s_own - log p_own``
    (no pass over the row, no logarithm per entry); real rows whose own probability is below
    ``_TINY`` take the full log-sum-exp (a padded row's value is never used). ``own_column``: the
    column of row 0's own key; ``first``: row 0's position, to find padded rows in ``padding``."""
    batch, heads, n_rows, _ = probs.shape
    own = torch.arange(own_column, own_column + n_rows, device=probs.device).view(1, 1, n_rows, 1)
    own = own.expand(batch, heads, n_rows, 1)
    p_own = probs.gather(-1, own).squeeze(-1)
    lse = scores.gather(-1, own).squeeze(-1) - torch.log(p_own)
    low = p_own < _TINY
    if padding is not None:
        low &= padding[:, None, first : first + n_rows]  # a pad row's entropy is never used
    if bool(low.any()):
        lse = torch.where(low, torch.logsumexp(scores, -1), lse)
    return torch.linalg.vecdot(probs, scores) - lse


def _grouped(rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``rows @ other`` per query head, where ``other`` has one head per group of query heads (GQA):
    the rows of a group's heads are stacked, ``[batch, kv_head, groups x rows, n] @ [batch, kv_head,
    n, m]``, so keys and values are never copied per query head."""
    batch, heads, n_rows, inner = rows.shape
    kv_heads = other.shape[1]
    if kv_heads == heads:
        return rows @ other
    stacked = rows.reshape(batch, kv_heads, (heads // kv_heads) * n_rows, inner) @ other
    return stacked.view(batch, heads, n_rows, other.shape[-1])


def _applied(fn: Edit, tensor: torch.Tensor) -> torch.Tensor:
    out = fn(tensor)
    return tensor if out is None else out


def _calling(wrapped: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    return forward


def _norm_shortcut(module: Any) -> Callable[..., Any] | None:
    """A TransformerLens normalisation bridge's forward that calls the wrapped norm directly while
    none of its hook points has a hook; None where that would not be exact.

    Why: on its native path the bridge computes the norm twice, once in Python for ``hook_scale`` and
    ``hook_normalized`` and once as the wrapped module, and returns the wrapped module's result when
    no hook edits (``_hf_autograd_forward_with_hooks``). With no hooks at all the first computation is
    unused: about 5% of a SmolLM2 forward pass at 2,048 tokens (61 norms). Hooks are looked for on
    every call, so a hook added inside the block (``run_with_cache``) gets the bridge's own path.
    """
    try:
        from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    except ImportError:  # another TransformerLens layout: keep the bridge's own forward
        return None
    if not isinstance(module, NormalizationBridge):
        return None
    original = getattr(module, "original_component", None)
    config = getattr(module, "config", None)
    native = module.use_native_layernorm_autograd or bool(getattr(config, "layer_norm_folding", False))
    if original is None or isinstance(original, torch.nn.Identity) or not native:
        return None
    points = [getattr(module, name, None) for name in ("hook_in", "hook_out", "hook_scale", "hook_normalized")]
    own = type(module).forward

    def forward(hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs or any(p is None or p.fwd_hooks or p.bwd_hooks or p._forward_hooks for p in points):
            return own(module, hidden_states, **kwargs)
        result = original(hidden_states)
        return result if result.dtype == hidden_states.dtype else result.to(hidden_states.dtype)

    return forward


def _configs(model: Any) -> list[Any]:
    """The model's config and its sub-configs (a multimodal model keeps a text config)."""
    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: hands the call to the active engine."""
    if not _ACTIVE:
        raise RuntimeError(f"the {NAME!r} attention ran outside a tokext streaming engine")
    if dropout:
        raise InputError("the streaming engine runs models in eval mode (attention dropout > 0)")
    if softcap is None:
        softcap = getattr(module, "attn_logit_softcapping", None)
    return _ACTIVE[-1].attend(module, query, key, value, attention_mask, scaling, softcap), None


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    dtype: Any = None,
    device: Any = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function: the 2-D padding mask of the layer's keys as an additive
    ``[batch, 1, 1, key]`` tensor (``None`` without padding); causality and windows come from the
    layer's attention kind, positions from the key axis."""
    if attention_mask is None:
        return None
    pad = attention_mask[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
    if pad.shape[1] < kv_length:  # a static cache longer than the mask: the rest is not real
        pad = torch.nn.functional.pad(pad, (0, kv_length - pad.shape[1]))
    dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
    zero = torch.zeros((), dtype=dtype, device=pad.device)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=pad.device)
    return torch.where(pad, zero, lowest)[:, None, None, :]


def stages_from_hooks(hooks: Sequence[tuple[str, Callable]]) -> dict[int, LayerChain]:
    """Layer chains from TransformerLens-style ``(hook_name, fn)`` pairs on ``blocks.{l}.attn.hook_pattern``,
    ``hook_attn_scores`` and ``hook_z`` (the per-head output, which some adapters' attention code never
    routes through a hook); ``fn(tensor, hook)`` is called with ``hook=None``. Attributes of ``fn``
    describe its :class:`Stage`: ``stream_two_pass``, ``stream_replayable`` (default True),
    ``stream_source`` with ``stream_recorder`` (the function that records the source layer's
    block, itself marked with ``stream_id``) and ``stream_fused`` (:attr:`Stage.fused`)."""
    chains: dict[int, LayerChain] = {}
    made: dict[int, Stage] = {}
    pending: list[tuple[Stage, Callable | None]] = []  # (stage, the hook whose recording it reads)
    for name, fn in hooks:
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blocks" or parts[2] != "attn" or parts[3] not in STAGE_HOOKS:
            raise InputError(f"the streaming engine runs stages on {', '.join(STAGE_HOOKS)} only, not {name!r}")
        layer = int(parts[1])
        stage = Stage(
            fn=_no_hook(fn),
            two_pass=bool(getattr(fn, "stream_two_pass", False)),
            replayable=bool(getattr(fn, "stream_replayable", True)),
            source=getattr(fn, "stream_source", None),
            fused=getattr(fn, "stream_fused", None),
        )
        made[id(getattr(fn, "stream_id", fn))] = stage
        if stage.source is not None:
            pending.append((stage, getattr(fn, "stream_recorder", None)))
        chain = chains.setdefault(layer, LayerChain())
        {"hook_attn_scores": chain.scores, "hook_pattern": chain.pattern, "hook_z": chain.output}[parts[3]].append(
            stage
        )
    for stage, recorder in pending:
        stage.recorder = made[id(recorder)].fn
    return chains


def _no_hook(fn: Callable) -> Edit:
    def call(tensor: torch.Tensor) -> torch.Tensor | None:
        return fn(tensor, None)

    return call
