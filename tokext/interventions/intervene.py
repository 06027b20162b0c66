"""Apply interventions for the duration of a ``with`` block, and measure what they do.

:func:`intervene` validates every intervention against the model, refuses models whose
``hook_pattern`` edits never reach the logits, attaches all hooks through
:func:`tokext.models.hooks.attached` (so they are removed on exit, also when the block raises) and, on a
normal exit, raises :class:`InterventionNotAppliedError` if a forward pass ran but one of the
interventions never fired. :func:`intervention_effect` reports max |delta logit| and the change
in next-token loss.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tokext.attention.engines.choose import DEFAULT_BUDGET, choose_engine
from tokext.attention.engines.streaming import STAGE_HOOKS, active_engine, stages_from_hooks, streaming
from tokext.errors import InputError, InterventionNotAppliedError
from tokext.interventions.base import (
    FORWARD_HOOK,
    Intervention,
    RunContext,
    bind,
    check_inputs,
    model_device,
    model_layout,
    validate,
)
from tokext.models.hooks import HookFn, HookRun, attached, capture_inputs
from tokext.models.inputs import Inputs, batches, encode, pad_id


@dataclass
class InterventionRun:
    """Handle of an :func:`intervene` block: what fired, and how often."""

    interventions: tuple[Intervention, ...]
    fired: Counter = field(default_factory=Counter)  # intervention index -> hook calls (blocks, when streaming)
    forwards: int = 0
    hooks: HookRun | None = None
    engine: str = "hooks"

    def summary(self) -> dict[str, int]:
        """Hook calls per intervention (by repr)."""
        return {repr(iv): self.fired[i] for i, iv in enumerate(self.interventions)}


@contextmanager
def intervene(
    model: Any,
    *interventions: Intervention,
    engine: str = "hooks",
    length: int | None = None,
    budget: int = DEFAULT_BUDGET,
) -> Iterator[InterventionRun]:
    """Apply ``interventions`` (in order) to every forward pass inside the block.

    Works for plain forward passes, ``run_with_cache`` and ``model.generate`` (prefill and every
    KV-cached decode step), at any batch size; a 2-D ``attention_mask`` passed to the model marks
    padding. Nested blocks compose: the outer block's interventions act first.

    ``engine``: ``"hooks"`` (TransformerLens's eager attention; a user's own ``hook_pattern``
    hooks keep working), ``"streaming"`` (the model's own attention, one block of queries at a
    time: no [T, T] pattern is held; :mod:`tokext.attention.engines.streaming`) or ``"auto"``
    (streaming when one layer's eager patterns for inputs of ``length`` tokens, default the model's
    context, would exceed ``budget`` bytes). Plain ``model(tokens)`` calls inside the block use it.

    >>> from tokext.models import native_model
    >>> from tokext.interventions import AttentionTemperature
    >>> model = native_model()
    >>> tokens = torch.randint(0, 64, (2, 8))
    >>> with intervene(model, AttentionTemperature(2.0)) as run:
    ...     logits = model(tokens)
    >>> run.fired[0]  # one call per layer
    2
    """
    validate(model, interventions, "intervene")
    chosen = choose_engine(model, engine, length=length if length is not None else int(model.cfg.n_ctx), budget=budget)
    run = InterventionRun(interventions=tuple(interventions))
    with capture_inputs(model) as inputs:
        outer = active_engine(model)
        ctx = RunContext(
            inputs,
            shared_points=set(),
            strict=True,
            layout=model_layout(model),
            enclosing_points=set() if outer is None else _engine_points(outer),
        )
        if outer is not None:
            chosen = "streaming"  # an enclosing streaming block runs every forward pass
        hooks = bind(model, interventions, ctx, run.fired)
        if chosen == "hooks":
            ctx.shared_points = {
                name for name, _ in hooks if name in model.hook_dict and model.hook_dict[name].fwd_hooks
            }
            attention, others = hooks, []
        else:
            attention = [(n, f) for n, f in hooks if n.endswith(tuple(f"attn.{h}" for h in STAGE_HOOKS))]
            others = [(n, f) for n, f in hooks if (n, f) not in attention]
        if interventions and FORWARD_HOOK in model.hook_dict:
            others.append((FORWARD_HOOK, _forward_counter(run)))
        with contextlib.ExitStack() as stack:
            if chosen == "hooks":
                run.hooks = stack.enter_context(attached(model, attention + others))
            else:
                run.hooks = stack.enter_context(attached(model, others))
                stack.enter_context(streaming(model, stages_from_hooks(attention), _block_setter(ctx), budget=budget))
            run.engine = chosen
            yield run
            silent = [repr(iv) for i, iv in enumerate(interventions) if run.fired[i] == 0]
            if run.forwards and silent:
                raise InterventionNotAppliedError(
                    f"{run.forwards} forward pass(es) ran inside `intervene` but the hooks of {silent} never "
                    "fired (stop_at_layer before the edited layers, or a model whose attention never "
                    "calls hook_pattern?)"
                )


def _block_setter(ctx: RunContext) -> Any:
    """Tell the run's context where the streaming engine's block lies."""

    def on_block(geometry: Any) -> None:
        ctx.block = geometry

    return on_block


def _engine_points(engine: Any) -> set[str]:
    """Hook names of the layers whose pattern an enclosing streaming block already edits."""
    return {f"blocks.{layer}.attn.hook_pattern" for layer in range(engine.info.n_layers) if engine.chain(layer).pattern}


def _forward_counter(run: InterventionRun) -> HookFn:
    def count_forward(tokens: torch.Tensor, hook: Any) -> None:
        run.forwards += 1

    return count_forward


# ---------------------------------------------------------------------- measuring effects


@dataclass
class InterventionEffect:
    """What an intervention did to a batch of sequences (real positions only)."""

    intervention: str
    max_abs_delta_logit: float
    loss_before: float
    loss_after: float
    n_tokens: int

    @property
    def delta_loss(self) -> float:
        """``loss_after - loss_before`` (positive: the intervention made the loss worse)."""
        return self.loss_after - self.loss_before


def _as_list(intervention: Intervention | Sequence[Intervention]) -> list[Intervention]:
    return [intervention] if isinstance(intervention, Intervention) else list(intervention)


def _loss_terms(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over real targets, and their count."""
    tokens, mask = tokens.to(logits.device), mask.to(logits.device)  # logits: the last layer's device
    targets = tokens[:, 1:]
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return float((losses * valid).sum()), int(valid.sum())


def _engine_for(model: Any, engine: str, seqs: Sequence[torch.Tensor], batch_size: int) -> str:
    """``engine`` resolved for these sequences (``"auto"``: by one layer's eager patterns)."""
    return choose_engine(model, engine, batch=min(batch_size, len(seqs)), length=max(int(s.numel()) for s in seqs))


def mean_loss(
    model: Any,
    inputs: Inputs,
    *interventions: Intervention,
    batch_size: int = 8,
    max_len: int | None = None,
    engine: str = "hooks",
) -> float:
    """Mean next-token loss over every real target token of ``inputs`` (right-padded batches).

    ``engine`` as in :func:`intervene` (``"auto"`` decides by these inputs)."""
    seqs = encode(model, inputs, max_len=max_len)
    check_inputs(model, interventions, [int(s.numel()) for s in seqs])
    device = model_device(model)
    total, count = 0.0, 0
    with torch.inference_mode(), intervene(model, *interventions, engine=_engine_for(model, engine, seqs, batch_size)):
        for batch in batches(seqs, batch_size, pad_id(model)):
            tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            s, n = _loss_terms(model(tokens, attention_mask=mask), tokens, mask)
            total, count = total + s, count + n
    if count == 0:
        raise InputError("no target tokens: every sequence needs at least two tokens")
    return total / count


def intervention_effect(
    model: Any,
    tokens: Inputs,
    intervention: Intervention | Sequence[Intervention],
    *,
    batch_size: int = 8,
    max_len: int | None = None,
    engine: str = "hooks",
) -> InterventionEffect:
    """Max |delta logit| over real positions and the change in mean next-token loss.

    ``tokens``: strings, a [batch, pos] token tensor or lists of token ids. ``intervention``: one
    intervention or a sequence (applied in order). ``engine`` as in :func:`intervene` (both forward
    passes use it; ``"auto"`` decides by these inputs). Raises like :func:`intervene`.

    >>> from tokext.models import native_model
    >>> from tokext.interventions import AttentionTemperature
    >>> effect = intervention_effect(native_model(), torch.randint(0, 64, (2, 8)), AttentionTemperature(2.0))
    >>> effect.max_abs_delta_logit > 0
    True
    """
    chosen = _as_list(intervention)
    seqs = encode(model, tokens, max_len=max_len)
    check_inputs(model, chosen, [int(s.numel()) for s in seqs])
    which = _engine_for(model, engine, seqs, batch_size)
    device = model_device(model)
    max_delta, before, after, count = 0.0, 0.0, 0.0, 0
    with torch.inference_mode():
        for batch in batches(seqs, batch_size, pad_id(model)):
            toks, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            with intervene(model, engine=which):  # the baseline, through the same engine
                base = model(toks, attention_mask=mask)
            with intervene(model, *chosen, engine=which):
                edited = model(toks, attention_mask=mask)
            real = mask.bool()[..., None].to(edited.device)
            max_delta = max(max_delta, float(((edited - base).abs() * real).max()))
            s0, n = _loss_terms(base, toks, mask)
            s1, _ = _loss_terms(edited, toks, mask)
            before, after, count = before + s0, after + s1, count + n
    if count == 0:
        raise InputError("no target tokens: every sequence needs at least two tokens")
    name = " + ".join(repr(iv) for iv in chosen) or "none"
    return InterventionEffect(
        intervention=name,
        max_abs_delta_logit=max_delta,
        loss_before=before / count,
        loss_after=after / count,
        n_tokens=count,
    )
