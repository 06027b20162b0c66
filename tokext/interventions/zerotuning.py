"""ZeroTuning: head-specific scaling of the initial token's attention (Han et al., arXiv 2505.11739, ICLR 2026).

**The edit.** In each tuned head, with ``a_0`` the attention a query row gives the initial token,
the paper rescales it by a factor ``gamma > 0`` and renormalises the row::

    a_0' = gamma * a_0 / D,    a_j' = a_j / D  (j >= 1),    D = (gamma - 1) * a_0 + 1

which is the softmax with ``log gamma`` added to the initial token's attention logit (the
paper's "adding lightweight biases to this token's attention logits"); the other keys keep their
relative proportions. ``gamma > 1`` raises the initial token's share and flattens the rest,
``gamma < 1`` lowers it and sharpens the rest. The authors' released code (``ZeroTuning_Attention``
in ``modelling_llama.py`` of github.com/FeijiangHan/ZeroTuning) does the same post-softmax:
column 0 of the chosen heads times ``rate``, then each row divided by its sum, in the layers
``target_layers`` (default all) and heads ``target_heads`` (default all); ``rate = 1`` is off.

**What tokext implements.**

- The factor is per head: ``gamma`` for every head of the ``layers`` x ``heads`` selection (default
  every head), and ``head_gammas = ((layer, head, gamma), ...)``, which overrides it for the
  listed heads (``gamma = 1`` there leaves a head alone). Heads with factor 1 are not touched.
- "The initial token" is each row's first real token: BOS where the tokenizer adds one, else the
  prompt's first token (SmolLM2 adds none), under left padding too. (The released code scales
  column 0, which under left padding is a pad.)
- The row is rescaled to its *incoming* sum ``S`` rather than to 1: ``D = S + (gamma - 1) a_0``
  and ``a' = a S / D``. For softmax rows (``S = 1``) this is the formula above. In a model with a
  learned sink logit (gpt-oss: rows sum to ``1 - s_i``, the rest going to the sink) the sink's
  share is one more entry of the row, so the edit stays "``log gamma`` added to the initial
  token's logit" in the softmax that includes the sink logit: ``D = 1 + (gamma - 1) a_0`` and the
  sink's share becomes ``s_i / D`` (as :class:`SinkRebalance` with ``targets="first"`` does).
- The edit is :func:`tokext.interventions.rebalance.rebalance_rows`, the one
  :class:`~tokext.interventions.rebalance.SinkRebalance` uses, with a per-head factor:
  ``ZeroTuning(gamma=g)`` on every head is ``SinkRebalance(targets="first", scale=g)`` (tested).
  The targets are fixed per row, so KV-cached generation gives the tokens of recomputation.

**Calibration** (:func:`calibrate_zerotuning`). The paper tunes the factors on data, in a
supervised mode (validation examples with labels) and an unsupervised mode that "directly
minimizes the model's output entropy"; both are an objective ``score(model) -> float`` here
(:mod:`tokext.evaluation.objectives`: ``gold_answer_nll`` and ``answer_entropy``). The procedure
follows the paper's three steps as far as they could be read (head behaviour profiling, then
selective rescaling, then the search for the factor): every candidate head is scaled alone by
``probe`` and typed "up-effective" (the score improves) or "down-effective" (it gets worse, so the
head should get less initial-token attention); then one factor for the up-effective heads
(``> 1``) and one for the down-effective heads (``< 1``) are searched on a grid, and the best pair
is kept if it beats the baseline.

Could not be confirmed from the sources available here (the paper's method section was not
readable in full): the exact profiling criterion and how many heads are kept, the paper's
factor grids and whether it tunes up- and down-effective heads jointly, the exact entropy it
minimises (over labels or the vocabulary), and whether its supervised objective is accuracy. The
defaults below (``probe = 2``, up factors 1.5/2/4, down factors 0.75/0.5/0.25) are tokext's,
taken from the values the authors' demo notebook uses (rate 2 to profile heads; 4, 0.5 and 0.3
elsewhere). The paper reports that classification tasks prefer ``gamma > 1``, multiple-choice QA
``gamma < 1``, that early layers react most, and that heads differ in the direction they prefer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokext.errors import InputError, LayerIndexError
from tokext.interventions.base import (
    Hooks,
    Intervention,
    RunContext,
    as_head_pairs,
    as_int_tuple,
    check_number,
    head_index,
    head_selection,
    in_float64,
    is_int,
    on_heads,
)
from tokext.interventions.rebalance import rebalance_rows
from tokext.interventions.search import Score, all_heads, distinct, score_each, score_with
from tokext.models.hooks import pattern_hook_name, resolve_heads

HeadGammas = tuple[tuple[int, int, float], ...]


@dataclass(frozen=True, repr=False)
class ZeroTuning(Intervention):
    """Scale each tuned head's attention to the initial token by its factor and renormalise the row.

    ``gamma`` applies to the heads selected by ``layers`` and ``heads`` (default: every head);
    ``head_gammas`` gives listed heads their own factor. See :func:`calibrate_zerotuning`.

    >>> ZeroTuning(gamma=0.5, layers=(0, 1))
    ZeroTuning(gamma=0.5, layers=(0, 1))
    >>> ZeroTuning(head_gammas=[(0, 1, 2.0), (3, 0, 0.5)])
    ZeroTuning(head_gammas=((0, 1, 2.0), (3, 0, 0.5)))
    """

    gamma: float = 1.0
    head_gammas: tuple[tuple[int, int, float], ...] | None = None  # spelled out: sweep configs read the annotation
    layers: tuple[int, ...] | None = None
    heads: tuple[tuple[int, int], ...] | None = None

    def _check(self) -> None:
        check_number("gamma", self.gamma, low=0.0, low_open=True)
        object.__setattr__(self, "head_gammas", as_head_gammas("head_gammas", self.head_gammas))
        object.__setattr__(self, "layers", as_int_tuple("layers", self.layers))
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads))
        if self.gamma == 1 and (self.layers is not None or self.heads is not None):
            raise InputError(
                "layers and heads choose the heads that gamma scales, and gamma is 1: give gamma, or "
                "per-head factors in head_gammas"
            )
        if self.gamma == 1 and all(g == 1 for *_, g in self.head_gammas or ()):
            raise InputError(
                "ZeroTuning with every factor 1 is the identity: give gamma != 1 or head_gammas "
                "(e.g. ZeroTuning(gamma=0.5), ZeroTuning(head_gammas=[(0, 1, 2.0)]))"
            )

    def factors(self, model: Any) -> dict[int, list[float]]:
        """Layer -> the factor of each of its heads, for the layers with a factor other than 1."""
        n_heads = int(model.cfg.n_heads)
        table: dict[int, list[float]] = {}
        if self.gamma != 1:
            for layer, chosen in head_selection(model, self.layers, self.heads).items():
                row = table.setdefault(layer, [1.0] * n_heads)
                for head in chosen if chosen is not None else range(n_heads):
                    row[head] = float(self.gamma)
        if self.head_gammas:
            try:
                resolve_heads(model, [(layer, head) for layer, head, _ in self.head_gammas])
            except (InputError, LayerIndexError) as e:
                raise type(e)(f"head_gammas: {e}") from None
            for layer, head, gamma in self.head_gammas:
                table.setdefault(layer, [1.0] * n_heads)[head] = gamma
        table = {layer: row for layer, row in sorted(table.items()) if any(g != 1 for g in row)}
        if not table:
            raise InputError(f"{self!r}: every head it selects has factor 1 on this model: nothing to edit")
        return table

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        return list(self.factors(model))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        return [(pattern_hook_name(layer), self._hook(layer, row, ctx)) for layer, row in self.factors(model).items()]

    @staticmethod
    def _hook(layer: int, row: list[float], ctx: RunContext) -> Callable:
        name = pattern_hook_name(layer)
        tuned = [head for head, gamma in enumerate(row) if gamma != 1]
        heads = None if len(tuned) == len(row) else tuned
        gains = torch.tensor([row[head] for head in tuned], dtype=torch.float64)

        def zerotune(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            first = ctx.first_key_mask(pattern)[:, None, None, :]  # [batch, 1, 1, key]
            learned = ctx.attention(layer).learned_sink

            def edit(sub: torch.Tensor, inplace: bool) -> torch.Tensor:
                scale = gains.to(device=sub.device, dtype=sub.dtype)[None, :, None, None]
                return rebalance_rows(sub, first, scale, inplace=inplace, learned_sink=learned)

            return on_heads(
                pattern,
                head_index(heads, pattern.device),
                ctx.inplace_ok(name, pattern),
                in_float64(edit) if learned else edit,
            )

        return zerotune


def as_head_gammas(name: str, value: Any) -> HeadGammas | None:
    """``(layer, head, gamma)`` triples as a tuple (hashable, readable), each head once, ``gamma > 0``."""
    if value is None:
        return None
    try:
        raw = [tuple(item) for item in value]
    except TypeError:
        raise InputError(f"{name} must be a sequence of (layer, head, gamma) triples, got {value!r}") from None
    if not raw:
        raise InputError(f"{name} is empty: give (layer, head, gamma) triples, or leave it out")
    out, seen = [], set()
    for item in raw:
        if len(item) != 3 or not (is_int(item[0]) and is_int(item[1])):
            raise InputError(
                f"{name} entries must be (layer, head, gamma) triples of two ints and a number, got {item!r}"
            )
        check_number(f"{name}: gamma of head {item[:2]}", item[2], low=0.0, low_open=True)
        pair = (int(item[0]), int(item[1]))
        if pair in seen:
            raise InputError(f"{name} gives head {pair} twice")
        seen.add(pair)
        out.append((*pair, float(item[2])))
    return tuple(out)


# ---------------------------------------------------------------------- calibration


@dataclass
class ZeroTuningCalibration:
    """Result of :func:`calibrate_zerotuning`: the chosen factors and the score of every trial.

    ``profile``: score with each candidate head alone at ``probe``; ``up`` / ``down``: the heads it
    typed up- and down-effective; ``grid``: score per (up factor, down factor); ``best``: the score
    of ``head_gammas`` (the baseline when nothing beat it, and then ``head_gammas`` is empty).
    """

    head_gammas: HeadGammas
    baseline: float
    best: float
    up: tuple[tuple[int, int], ...]
    down: tuple[tuple[int, int], ...]
    profile: dict[tuple[int, int], float] = field(default_factory=dict)
    grid: dict[tuple[float, float], float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def intervention(self) -> ZeroTuning:
        """The :class:`ZeroTuning` of the chosen factors."""
        if not self.head_gammas:
            raise InputError("no factor improved the calibration score: nothing to tune")
        return ZeroTuning(head_gammas=self.head_gammas)


def calibrate_zerotuning(
    model: Any,
    score: Score,
    *,
    candidates: Sequence[tuple[int, int]] | None = None,
    probe: float = 2.0,
    up_gammas: Sequence[float] = (1.5, 2.0, 4.0),
    down_gammas: Sequence[float] = (0.75, 0.5, 0.25),
    min_gain: float = 0.0,
    progress: bool = False,
) -> ZeroTuningCalibration:
    """Tune ZeroTuning's per-head factors on a calibration objective (the module docstring has the steps).

    ``score(model) -> float``, lower is better, is called inside the intervention block: the
    supervised or unsupervised objectives of :mod:`tokext.evaluation.objectives`, or any other
    (``lambda m: tokext.mean_loss(m, texts)``). ``candidates``: the (layer, head) pairs to profile
    (default every head; the paper finds early layers react most). A head is up-effective when
    ``probe`` (> 1) alone lowers the score by more than ``min_gain``, down-effective when it raises
    it by more than ``min_gain``. Then every pair from ``(1, *up_gammas) x (1, *down_gammas)`` is
    tried on the two groups. Cost: one score per candidate plus at most
    ``(len(up_gammas) + 1) * (len(down_gammas) + 1) - 1``.
    """
    if not callable(score):
        raise InputError(f"score must be a callable score(model) -> float, got {score!r}")
    check_number("probe", probe, low=1.0, low_open=True)
    check_number("min_gain", min_gain, low=0.0)
    ups = _factors("up_gammas", up_gammas, above_one=True)
    downs = _factors("down_gammas", down_gammas, above_one=False)
    candidates = distinct(
        "candidates",
        as_head_pairs("candidates", candidates if candidates is not None else all_heads(model), allow_none=False),
    )
    resolve_heads(model, candidates)  # validates indices before any forward pass

    def tuned(up: Sequence[tuple[int, int]], g_up: float, down: Sequence[tuple[int, int]], g_down: float) -> ZeroTuning:
        triples = [(layer, h, g_up) for layer, h in up if g_up != 1]
        triples += [(layer, h, g_down) for layer, h in down if g_down != 1]
        return ZeroTuning(head_gammas=tuple(triples))

    baseline = score_with(model, score)
    profile = score_each(
        model,
        score,
        candidates,
        lambda pair: tuned([pair], probe, [], 1.0),
        progress=progress,
        desc="ZeroTuning head profiling",
    )
    up = tuple(p for p in candidates if profile[p] < baseline - min_gain)
    down = tuple(p for p in candidates if profile[p] > baseline + min_gain)
    pairs = [
        (gu, gd)
        for gu in (1.0, *ups)
        if up or gu == 1
        for gd in (1.0, *downs)
        if down or gd == 1
        if (gu, gd) != (1.0, 1.0)
    ]
    grid = score_each(
        model, score, pairs, lambda g: tuned(up, g[0], down, g[1]), progress=progress, desc="ZeroTuning factor search"
    )
    best_pair = min(grid, key=lambda g: grid[g]) if grid else None
    chosen: HeadGammas = ()
    best = baseline
    if best_pair is not None and grid[best_pair] < baseline - min_gain:
        chosen = tuned(up, best_pair[0], down, best_pair[1]).head_gammas or ()
        best = grid[best_pair]
    settings = {
        "probe": probe,
        "up_gammas": ups,
        "down_gammas": downs,
        "min_gain": min_gain,
        "candidates": tuple(candidates),
    }
    return ZeroTuningCalibration(
        head_gammas=chosen,
        baseline=baseline,
        best=best,
        up=up,
        down=down,
        profile=profile,
        grid=grid,
        settings=settings,
    )


def _factors(name: str, values: Sequence[float], *, above_one: bool) -> tuple[float, ...]:
    try:
        values = tuple(values)
    except TypeError:
        raise InputError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not values:
        raise InputError(f"{name} is empty")
    for value in values:
        if above_one:
            check_number(f"{name} entry", value, low=1.0, low_open=True)
        else:
            check_number(f"{name} entry", value, low=0.0, high=1.0, low_open=True, high_open=True)
    return tuple(float(v) for v in distinct(name, values))
