"""Extra computed tokens before the answer: filler/pause insertion, attention on the filler span, a study.

:func:`insert_filler` puts ``n`` fillers (``" ."``: Pfau et al.'s "dot by dot") into the final question
block of a prompt, never into the few-shot demos. :func:`filler_span_attention` reduces, inside the
``hook_pattern`` hooks, how much later queries attend to the span, Gu et al.'s received attention
alpha_k of filler vs. other keys, and how often a filler is a sink (alpha_k > 0.3).
:func:`run_computed_tokens_study` varies the filler count and position (direct answers) and the CoT
length shown in demos, and measures accuracy, the teacher-forced answer loss and the span statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from tokext.errors import InputError

POSITIONS = ("before_answer", "after_question", "before_question", "end")
DEFAULT_COUNTS = (0, 1, 2, 4, 8, 16, 32, 64)
FULL_COT = -1
"""``cot_steps`` value meaning: demos show their whole worked chain."""
SINK_EPS = 0.3


# ------------------------------------------------------------------------------------------- insertion


def _insertion_point(text: str, position: str, label: str | None) -> int:
    if position not in POSITIONS:
        raise InputError(f"unknown filler position {position!r}: choose from {', '.join(POSITIONS)}")
    if label is None:
        label_start = text.rfind("\n") + 1
        if label_start == 0 or not text.endswith(":"):
            raise InputError(
                "the prompt must end with an answer label line such as '\\nAnswer:' "
                f"(got ...{text[-30:]!r}); pass label= for other prompt forms"
            )
    else:
        if not label or not text.endswith(label):
            raise InputError(f"the prompt does not end with the label {label!r} (got ...{text[-30:]!r})")
        label_start = len(text) - len(label)
    if position == "end":
        return len(text)
    block = text.rfind("\n\n", 0, label_start)
    block_start = 0 if block < 0 else block + 2
    if position == "before_question":
        return block_start
    if position == "before_answer":
        return label_start - 1 if text[label_start - 1 : label_start] == "\n" else label_start
    line_end = text.find("\n", block_start, label_start)
    return label_start if line_end < 0 else line_end  # after_question


def _check_count(n: Any, filler: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"filler count must be a non-negative integer, got {n!r}")
    if not isinstance(filler, str) or not filler:
        raise InputError(f"filler must be a non-empty string, got {filler!r}")


def insert_filler(
    prompt_text: str, n: int, filler: str = " .", position: str = "before_answer", *, label: str | None = None
) -> str:
    r"""``prompt_text`` with ``filler`` repeated ``n`` times at ``position`` of the final question block.

    The final block follows the last blank line; its last line (or ``label``, e.g. the model
    organism's ``"A:"``) is the answer label. Positions (:data:`POSITIONS`): ``before_answer`` ends
    the line before the label (Jang et al.: best right before "Answer:"); ``after_question`` ends the
    block's first line (the same place for direct prompts, before the instruction for CoT ones);
    ``before_question`` starts the block; ``end`` follows the label (Goyal et al.'s pauses).

    >>> insert_filler("Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer:", 3)
    'Q: 1+1?\nAnswer: 2\n\nQ: 2+2? . . .\nAnswer:'
    >>> insert_filler("2+2=;A:", 2, " ", "before_answer", label="A:")
    '2+2=;  A:'
    """
    _check_count(n, filler)
    at = _insertion_point(prompt_text, position, label)
    return prompt_text[:at] + filler * n + prompt_text[at:]


def filler_tokens(
    tokenizer: Any,
    prompt_text: str,
    n: int,
    filler: str = " .",
    position: str = "before_answer",
    *,
    label: str | None = None,
) -> tuple[str, list[int], tuple[int, int]]:
    """``(text, token ids, (start, end))``: the filled prompt, its tokens and the fillers' token span.

    The span is found by tokenizing the text up to the fillers and up to their end; an
    :class:`InputError` is raised when the filler merges with its neighbours into other tokens.
    """
    text = insert_filler(prompt_text, n, filler, position, label=label)
    at = _insertion_point(prompt_text, position, label)
    # Hugging Face tokenizers are called (default special tokens); others, e.g. CharTokenizer, encode
    encode = (lambda t: list(tokenizer(t).input_ids)) if callable(tokenizer) else (lambda t: list(tokenizer.encode(t)))
    ids, before, through = encode(text), encode(text[:at]), encode(text[: at + len(filler) * n])
    if ids[: len(before)] != before or ids[: len(through)] != through:
        raise InputError(
            f"filler {filler!r} at {position!r} merges with the neighbouring text into other "
            "tokens, so its token span is not defined; try another filler (e.g. ' .')"
        )
    return text, ids, (len(before), len(through))


# ------------------------------------------------------------------------------------- span statistics

_COLUMNS = {
    "span_mass": "after",
    "alpha_filler": "filler",
    "alpha_content": "content",
    "alpha_first": "first",
    "filler_sink_frac": "filler",
    "content_sink_frac": "content",
    "any_filler_sink": "spans",
}
"""Per-(layer, head) column -> the count it is averaged over."""


class _SpanAccumulator:
    """Running sums for :func:`filler_span_attention`, fed one layer's pattern at a time."""

    def __init__(self, n_layers: int, n_heads: int, eps: float) -> None:
        self.eps = eps
        self.sums = {k: torch.zeros(n_layers, n_heads, dtype=torch.float64) for k in _COLUMNS}
        self.counts = dict.fromkeys(("after", "filler", "content", "first", "spans", "u_filler", "u_content"), 0.0)

    def begin_batch(self, real: torch.Tensor, spans: torch.Tensor) -> None:
        """``real`` Bool [batch, pos]: rows and keys that count; ``spans`` Long [batch, 2]."""
        pos = torch.arange(real.shape[1], device=real.device)[None]
        start, end = spans[:, :1], spans[:, 1:]
        first = real & (pos == real.float().argmax(1, keepdim=True))
        filler = real & (pos >= start) & (pos < end)
        self.masks = {
            "filler": filler,
            "first": first,
            "content": real & ~filler & ~first,
            "after": real & (pos >= end) & (end > start),
        }
        real_f = real.double()
        self.n_queries = real_f.flip(1).cumsum(1).flip(1) * real_f  # real queries that see each key
        # alpha_k under uniform causal rows: mean over the queries that see k of 1 / (their visible keys)
        uniform = (real_f / real_f.cumsum(1).clamp_min(1)).flip(1).cumsum(1).flip(1) / self.n_queries.clamp_min(1)
        self.real = real
        self._on = {real.device: (real, self.masks, self.n_queries)}  # per device the model's layers run on
        for k in ("after", "filler", "content", "first"):
            self.counts[k] += float(self.masks[k].sum())
        self.counts["spans"] += float((end > start).sum())
        for k in ("filler", "content"):
            self.counts[f"u_{k}"] += float((uniform * self.masks[k]).sum())

    def update(self, slot: int, pattern: torch.Tensor) -> None:
        p = pattern.detach().to(torch.float32)
        if p.device not in self._on:
            self._on[p.device] = (
                self.real.to(p.device),
                {k: v.to(p.device) for k, v in self.masks.items()},
                self.n_queries.to(p.device),
            )
        real, masks, n_queries = self._on[p.device]
        row_sum = p.sum(-1)
        # renormalise each counted row over its visible keys; rows that do not count weigh 0
        weight = real[:, None].to(p.dtype) / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
        alpha = torch.einsum("bhqk,bhq->bhk", p, weight) / n_queries.clamp_min(1).to(p.dtype)[:, None]
        m = {k: v[:, None] for k, v in masks.items()}
        span_mass = torch.einsum("bhqk,bk->bhq", p, masks["filler"].to(p.dtype)) * weight
        sink = alpha > self.eps

        def add(name: str, value: torch.Tensor) -> None:
            self.sums[name][slot] += value.double().cpu()

        add("span_mass", (span_mass * m["after"]).sum((0, 2)))
        for k in ("filler", "content", "first"):
            add(f"alpha_{k}", (alpha * m[k]).sum((0, 2)))
        add("filler_sink_frac", (sink & m["filler"]).sum((0, 2)))
        add("content_sink_frac", (sink & m["content"]).sum((0, 2)))
        add("any_filler_sink", (sink & m["filler"]).any(-1).sum(0))

    def frame(self, layers: Sequence[int]) -> pd.DataFrame:
        n_heads, c = self.sums["span_mass"].shape[1], self.counts
        frame = pd.DataFrame(
            {"layer": [lay for lay in layers for _ in range(n_heads)], "head": list(range(n_heads)) * len(layers)}
        )
        for name, count in _COLUMNS.items():
            frame[name] = (self.sums[name] / c[count]).reshape(-1).numpy() if c[count] else math.nan
        for k in ("filler", "content"):
            frame[f"alpha_{k}_uniform"] = c[f"u_{k}"] / c[k] if c[k] else math.nan
        for k, name in (("spans", "n_spans"), ("filler", "n_filler_keys"), ("after", "n_after_rows")):
            frame[name] = int(c[k])
        return frame


def _span_forward(
    model: Any,
    seqs: Sequence[Sequence[int]] | Sequence[torch.Tensor],
    spans: Sequence[tuple[int, int]],
    stat_lengths: Sequence[int],
    *,
    batch_size: int,
    layers: Any,
    eps: float,
    take: Callable[[torch.Tensor, int], None] | None = None,
) -> pd.DataFrame:
    """Right-padded forward passes with the span statistics reduced in ``hook_pattern`` hooks.

    Only the first ``stat_lengths[i]`` tokens of sequence i count as queries and keys (the rest, e.g.
    a scored continuation, feed ``take(logits_row, index)`` only).
    """
    from tokext.models.devices import input_device
    from tokext.models.hooks import attached, pattern_hook_name, resolve_layers
    from tokext.models.info import model_info
    from tokext.models.inputs import batches, pad_id

    chosen = resolve_layers(model, layers)
    if len(spans) != len(seqs) or len(stat_lengths) != len(seqs):
        raise InputError(f"got {len(seqs)} prompts but {len(spans)} spans: pass one (start, end) per prompt")
    for i, ((start, end), length) in enumerate(zip(spans, stat_lengths)):
        if not 0 <= start <= end <= length:
            raise InputError(f"span {i} ({start}, {end}) is not inside its prompt of {length} tokens")
    acc = _SpanAccumulator(len(chosen), model_info(model).n_heads, eps)

    def hook_for(slot: int) -> Callable:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            acc.update(slot, pattern)

        return hook

    device = input_device(model)
    tensors = [torch.as_tensor(list(s), dtype=torch.long) for s in seqs]
    hooks = [(pattern_hook_name(layer), hook_for(slot)) for slot, layer in enumerate(chosen)]
    with attached(model, hooks), torch.inference_mode():
        for batch in batches(tensors, batch_size, pad_id(model), side="right"):
            tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            limit = torch.tensor([stat_lengths[i] for i in batch.indices], device=device)
            real = mask.bool() & (torch.arange(tokens.shape[1], device=device)[None] < limit[:, None])
            acc.begin_batch(real, torch.tensor([spans[i] for i in batch.indices], device=device))
            logits = model(tokens, attention_mask=mask, return_type="logits" if take else None)
            if take is not None:
                for row, index in enumerate(batch.indices):
                    take(logits[row], index)
    return acc.frame(chosen)


def filler_span_attention(
    model: Any,
    prompts: Any,
    spans: Sequence[tuple[int, int]],
    *,
    batch_size: int = 8,
    layers: int | Sequence[int] | None = None,
    eps: float = SINK_EPS,
) -> pd.DataFrame:
    """Attention on the filler span of each prompt: one row per (layer, head).

    ``prompts``: strings (tokenized with the tokenizer's defaults, as :func:`filler_tokens` does), a
    token tensor or lists of ids; ``spans[i] = (start, end)`` are token positions of prompt i's fillers.
    Rows are renormalised over visible keys; pad rows and keys never count. Columns:

    * ``span_mass``: mean attention mass that a query after the span puts on the span (pooled rows);
    * ``alpha_filler`` / ``alpha_content`` / ``alpha_first``: mean alpha_k (Gu et al.: mean attention
      key k gets from the queries that see it) over filler keys / other keys except the first / the
      first token; ``alpha_*_uniform``: the same under uniform causal attention (the chance level);
    * ``filler_sink_frac`` / ``content_sink_frac``: share of those keys with alpha_k > ``eps``;
    * ``any_filler_sink``: share of prompts whose span holds at least one sink in this head
      (its mean over rows is the share of (prompt, layer, head) where a filler is a sink).

    Prompts with an empty span count only towards ``alpha_content`` and ``alpha_first``.
    """
    from tokext.models.inputs import encode

    seqs = encode(model, prompts)
    return _span_forward(model, seqs, spans, [len(s) for s in seqs], batch_size=batch_size, layers=layers, eps=eps)


def summarize_span(frame: pd.DataFrame) -> dict[str, float]:
    """Means over (layer, head) of :func:`filler_span_attention`'s columns (sink shares in percent)."""
    out = {
        k: float(frame[k].mean())
        for k in (
            "span_mass",
            "alpha_filler",
            "alpha_content",
            "alpha_first",
            "alpha_filler_uniform",
            "alpha_content_uniform",
        )
    }
    out["filler_sink_share"] = 100.0 * float(frame["any_filler_sink"].mean())
    out["filler_sink_key_share"] = 100.0 * float(frame["filler_sink_frac"].mean())
    out["content_sink_key_share"] = 100.0 * float(frame["content_sink_frac"].mean())
    return out


# ------------------------------------------------------------------------------------------------ study


@dataclass(frozen=True)
class Cell:
    """One condition: ``kind`` "filler" (direct prompt + ``count`` fillers at ``position``) or "cot"
    (CoT prompt whose demos show their first ``cot_steps`` worked lines, :data:`FULL_COT` for all)."""

    kind: str
    position: str = "none"
    count: int = 0
    cot_steps: int = 0

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.position}/{self.count}/{self.cot_steps}"


def study_cells(
    counts: Iterable[int] = DEFAULT_COUNTS,
    positions: Iterable[str] = ("before_answer",),
    cot_lengths: Iterable[int] = (),
) -> list[Cell]:
    """The conditions of a study, validated; count 0 is one shared no-filler cell."""
    counts, positions, cot_lengths = list(counts), list(positions), list(cot_lengths)
    for n in counts:
        _check_count(n, " .")
    for position in positions:
        _insertion_point("x\nAnswer:", position, None)  # raises on an unknown position
    for k in cot_lengths:
        if isinstance(k, bool) or not isinstance(k, int) or k < FULL_COT:
            raise InputError(f"cot_lengths must be integers >= 0 (or {FULL_COT} for the full chain), got {k!r}")
    if not counts and not cot_lengths:
        raise InputError("nothing to run: give at least one filler count or CoT length")
    cells = [Cell("filler", "none", 0)] if 0 in counts else []
    cells += [Cell("filler", p, n) for p in positions for n in sorted(set(counts)) if n > 0]
    return cells + [Cell("cot", cot_steps=k) for k in dict.fromkeys(cot_lengths)]


def truncate_cot(example: Any, steps: int) -> Any:
    """``example`` with its worked chain cut to the first ``steps`` lines (the "Response:" line stays)."""
    *chain, final = example.cot_solution.split("\n")
    kept = chain if steps == FULL_COT else chain[:steps]
    return replace(example, cot_solution="\n".join([*kept, final]))


def _cell_inputs(tok: Any, ex: Any, cell: Cell, shots: int, demo_seed: int, filler: str) -> tuple[str, str, tuple]:
    """(prompt, scoring context, filler span) of one item in one condition."""
    from tokext.evaluation.tasks import get_task, prompt

    if cell.kind == "cot":
        demos = get_task(ex.task).demos(shots, ex.level, seed=demo_seed, exclude=ex.question)
        text = prompt(ex, True, demos=[truncate_cot(d, cell.cot_steps) for d in demos])
        chain = truncate_cot(ex, cell.cot_steps).cot_solution
        return text, f"{text} {chain[: chain.rindex('Response:') + len('Response:')]}", (0, 0)
    base = prompt(ex, False, shots=shots, demo_seed=demo_seed)
    text, _, span = filler_tokens(tok, base, cell.count, filler, cell.position if cell.count else "end")
    return text, text, span


def run_cell(
    model: Any,
    examples: Sequence[Any],
    cell: Cell,
    *,
    shots: int = 3,
    demo_seed: int = 0,
    filler: str = " .",
    batch_size: int = 8,
    layers: Any = None,
    generate: bool = True,
    progress: bool = False,
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """``(summary row, per-item rows, per-(layer, head) span rows)`` of one condition.

    ``correct`` comes from greedy generation (:func:`tokext.evaluation.evaluate.generate_texts`, answer
    extraction, exact match) when ``generate``; ``greedy_match`` always comes from the scoring pass:
    every gold answer token is the argmax under teacher forcing and the next argmax does not extend
    the answer (what greedy decoding emits first, at no decoding cost; for CoT cells it is read after
    the gold chain). Without ``generate``, direct answers' ``correct`` is ``greedy_match``.
    """
    from tokext.evaluation.evaluate import encode_pair, generate_texts
    from tokext.evaluation.extract import extract_free_answer
    from tokext.evaluation.tasks import score_exact
    from tokext.evaluation.tasks.scoring import as_int

    tok, cot = model.tokenizer, cell.kind == "cot"
    prompts, contexts, spans = zip(*(_cell_inputs(tok, ex, cell, shots, demo_seed, filler) for ex in examples))
    pairs = [encode_pair(tok, c, f" {ex.answer}") for c, ex in zip(contexts, examples)]
    nll, match = [math.nan] * len(pairs), [False] * len(pairs)

    def take(logits: torch.Tensor, index: int) -> None:
        ctx, cont = pairs[index]
        rows = logits[len(ctx) - 1 : len(ctx) + len(cont)].float().log_softmax(-1)
        target = torch.tensor(cont, device=rows.device)
        nll[index] = -float(rows[:-1].gather(-1, target[:, None]).mean())
        after = tok.decode([int(rows[-1].argmax())])
        match[index] = bool((rows[:-1].argmax(-1) == target).all()) and not after[:1].isalnum()

    n_prompt = [len(tok(p).input_ids) for p in prompts]
    span_frame = _span_forward(
        model, [c + t for c, t in pairs], spans, n_prompt, batch_size=batch_size, layers=layers, eps=SINK_EPS, take=take
    )
    texts, n_new, decoded = [""] * len(pairs), [0] * len(pairs), generate or cot
    if decoded:
        gold = [" " + (truncate_cot(ex, cell.cot_steps).cot_solution if cot else ex.answer) for ex in examples]
        longest = max(len(tok(g, add_special_tokens=False).input_ids) for g in gold)
        cap = int(math.ceil(longest * 1.25)) + 4 if cot else longest + 1  # direct: the answer and one more
        texts, n_new = generate_texts(
            model, list(prompts), cap, batch_size=batch_size, progress=progress, desc=cell.key
        )
    items = []
    for i, ex in enumerate(examples):
        extracted = extract_free_answer(texts[i], numeric=as_int(ex.answer) is not None) if decoded else None
        reasoning = texts[i].split("Response:")[0] if cot else ""
        items.append(
            {
                "id": ex.id,
                "gold": ex.answer,
                "extracted": extracted,
                "correct": score_exact(extracted, ex.answer) if decoded else match[i],
                "greedy_match": match[i],
                "answer_loss": nll[i],
                "prompt_tokens": n_prompt[i],
                "filler_tokens": spans[i][1] - spans[i][0],
                "n_new_tokens": n_new[i],
                "cot_tokens": len(tok(reasoning, add_special_tokens=False).input_ids) if reasoning else 0,
                "raw": texts[i],
            }
        )
    items = pd.DataFrame(items)
    means = {
        k: float(items[k].mean())
        for k in ("answer_loss", "greedy_match", "prompt_tokens", "filler_tokens", "cot_tokens")
    }
    summary = {
        "kind": cell.kind,
        "position": cell.position,
        "count": cell.count,
        "cot_steps": cell.cot_steps,
        "n": len(items),
        "accuracy": float(items["correct"].mean()),
        "n_correct": int(items["correct"].sum()),
        "accuracy_from": "generation" if decoded else "greedy_match",
        **means,
        **summarize_span(span_frame),
    }
    return summary, items, span_frame


def run_computed_tokens_study(
    model: Any,
    task: str,
    level: int = 1,
    *,
    counts: Iterable[int] = DEFAULT_COUNTS,
    positions: Iterable[str] = ("before_answer",),
    n: int = 32,
    seed: int = 0,
    cot_lengths: Iterable[int] = (),
    shots: int = 3,
    filler: str = " .",
    batch_size: int = 8,
    layers: Any = None,
    generate: bool = True,
    progress: bool = False,
    skip: Iterable[str] = (),
    on_cell: Callable[[Cell, dict, pd.DataFrame, pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Accuracy, answer loss and filler-span attention vs. extra computed tokens, one row per :class:`Cell`.

    Filler cells: ``shots``-shot direct prompts with ``count`` fillers at each ``position``. CoT cells:
    CoT prompts whose demos show only the first ``cot_steps`` lines of their worked chain (the model
    imitates the demos' detail; ``cot_tokens`` is the generated reasoning length). ``answer_loss``:
    teacher-forced mean NLL of ``" <answer>"`` after the prompt (CoT: after the gold chain cut the same
    way and ``"Response:"``). ``generate=False`` scores direct answers by ``greedy_match`` instead of
    decoding (see :func:`run_cell`). Cells whose :attr:`Cell.key` is in ``skip`` are not run;
    ``on_cell(cell, summary, items, span rows)`` is called as each cell finishes.
    """
    from tokext.evaluation.tasks import LEVELS, get_task

    runner = get_task(task)
    if level not in LEVELS:
        raise InputError(f"level must be one of {LEVELS}, got {level!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    cells = study_cells(counts, positions, cot_lengths)
    if getattr(model, "tokenizer", None) is None:
        raise InputError(
            "the study needs a model with a tokenizer (for the model organism, use token ids "
            "with filler_span_attention)"
        )
    examples = runner.generate(n, seed, level)
    done, rows = set(skip), []
    for cell in cells:
        if cell.key in done:
            continue
        summary, items, span_frame = run_cell(
            model,
            examples,
            cell,
            shots=shots,
            demo_seed=seed,
            filler=filler,
            batch_size=batch_size,
            layers=layers,
            generate=generate,
            progress=progress,
        )
        summary = {"task": task, "level": level, "seed": seed, "shots": shots, **summary}
        rows.append(summary)
        if on_cell is not None:
            on_cell(cell, summary, items, span_frame)
    return pd.DataFrame(rows)
