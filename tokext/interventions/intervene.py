"""Apply interventions for the duration of a ``with`` block, and measure what they do.

:func:`intervene` validates every intervention against the model, refuses models whose
``hook_pattern`` edits never reach the logits, attaches all hooks through
:func:`tokext.models.hooks.attached` (so they are removed on exit, also when the block raises) and, on a
normal exit, raises :class:`InterventionNotAppliedError` if a forward pass ran but one of the
interventions never fired. :func:`intervention_effect` reports max |delta logit| and the change
in next-token loss.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from tokext.errors import InputError, InterventionNotAppliedError
from tokext.models.hooks import HookFn, HookRun, attached, capture_inputs
from tokext.models.inputs import Inputs, batches, encode, pad_id
from tokext.interventions.base import FORWARD_HOOK, Intervention, RunContext, bind, model_device, validate

@dataclass
class InterventionRun:
    """Handle of an :func:`intervene` block: what fired, and how often."""

    interventions: tuple[Intervention, ...]
    fired: Counter = field(default_factory=Counter)  # intervention index -> hook calls
    forwards: int = 0
    hooks: HookRun | None = None

    def summary(self) -> dict[str, int]:
        """Hook calls per intervention (by repr)."""
        return {repr(iv): self.fired[i] for i, iv in enumerate(self.interventions)}


@contextmanager
def intervene(model: Any, *interventions: Intervention) -> Iterator[InterventionRun]:
    """Apply ``interventions`` (in order) to every forward pass inside the block.

    Works for plain forward passes, ``run_with_cache`` and ``model.generate`` (prefill and every
    KV-cached decode step), at any batch size; a 2-D ``attention_mask`` passed to the model marks
    padding. Nested blocks compose: the outer block's interventions act first.

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
    run = InterventionRun(interventions=tuple(interventions))
    with capture_inputs(model) as inputs:
        ctx = RunContext(inputs, shared_points=set(), strict=True)
        hooks = bind(model, interventions, ctx, run.fired)
        ctx.shared_points = {name for name, _ in hooks if name in model.hook_dict and model.hook_dict[name].fwd_hooks}
        if interventions and FORWARD_HOOK in model.hook_dict:
            hooks.append((FORWARD_HOOK, _forward_counter(run)))
        with attached(model, hooks) as hook_run:
            run.hooks = hook_run
            yield run
            silent = [repr(iv) for i, iv in enumerate(interventions) if run.fired[i] == 0]
            if run.forwards and silent:
                raise InterventionNotAppliedError(
                    f"{run.forwards} forward pass(es) ran inside `intervene` but the hooks of {silent} never "
                    "fired (stop_at_layer before the edited layers, or a model whose attention never "
                    "calls hook_pattern?)"
                )


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


def mean_loss(model: Any, inputs: Inputs, *interventions: Intervention, batch_size: int = 8,
              max_len: int | None = None) -> float:
    """Mean next-token loss over every real target token of ``inputs`` (right-padded batches)."""
    seqs = encode(model, inputs, max_len=max_len)
    device = model_device(model)
    total, count = 0.0, 0
    with torch.inference_mode(), intervene(model, *interventions):
        for batch in batches(seqs, batch_size, pad_id(model)):
            tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            s, n = _loss_terms(model(tokens, attention_mask=mask), tokens, mask)
            total, count = total + s, count + n
    if count == 0:
        raise InputError("no target tokens: every sequence needs at least two tokens")
    return total / count


def intervention_effect(model: Any, tokens: Inputs, intervention: Intervention | Sequence[Intervention],
                        *, batch_size: int = 8, max_len: int | None = None) -> InterventionEffect:
    """Max |delta logit| over real positions and the change in mean next-token loss.

    ``tokens``: strings, a [batch, pos] token tensor or lists of token ids. ``intervention``: one
    intervention or a sequence (applied in order). Raises like :func:`intervene`.

    >>> from tokext.models import native_model
    >>> from tokext.interventions import AttentionTemperature
    >>> effect = intervention_effect(native_model(), torch.randint(0, 64, (2, 8)), AttentionTemperature(2.0))
    >>> effect.max_abs_delta_logit > 0
    True
    """
    chosen = _as_list(intervention)
    seqs = encode(model, tokens, max_len=max_len)
    device = model_device(model)
    max_delta, before, after, count = 0.0, 0.0, 0.0, 0
    with torch.inference_mode():
        for batch in batches(seqs, batch_size, pad_id(model)):
            toks, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            base = model(toks, attention_mask=mask)
            with intervene(model, *chosen):
                edited = model(toks, attention_mask=mask)
            real = mask.bool()[..., None].to(edited.device)
            max_delta = max(max_delta, float(((edited - base).abs() * real).max()))
            s0, n = _loss_terms(base, toks, mask)
            s1, _ = _loss_terms(edited, toks, mask)
            before, after, count = before + s0, after + s1, count + n
    if count == 0:
        raise InputError("no target tokens: every sequence needs at least two tokens")
    name = " + ".join(repr(iv) for iv in chosen) or "none"
    return InterventionEffect(intervention=name, max_abs_delta_logit=max_delta, loss_before=before / count,
                              loss_after=after / count, n_tokens=count)

