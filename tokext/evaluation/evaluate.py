r"""Score a model on multiple-choice data and the reasoning tasks, with or without interventions.

Every function takes the model as it is: apply interventions around the call with
``with tokext.interventions.intervene(model, *ivs):`` (or use :func:`evaluate`, which does it).
All return one row per item, in input order, and are deterministic (greedy decoding; batches
sorted by length; no sampling).

* :func:`score_letters`: the paper's direct prompt (question, options A-D, ``"Answer:"``); the
  prediction is the option letter with the highest next-token log-probability.
* :func:`score_continuations`: log-likelihood of each option text after ``"Question: ...\nAnswer:"``;
  ``acc`` by summed log-likelihood, ``acc_norm`` by log-likelihood per UTF-8 byte of the option
  (lm-evaluation-harness's ``acc_norm``; for ASCII options bytes = characters).
* :func:`evaluate_reasoning`: few-shot direct or CoT prompt, greedy generation, answer extraction,
  exact match; plus ``loss``, the teacher-forced mean NLL of the gold continuation.
* :func:`evaluate_mc_cot`: the paper's "Analysis: ... Response:" prompt, greedy generation and
  :func:`tokext.evaluation.extract.extract_choice`, with the raw text and how the letter was found.

Scoring pads on the right; generation is :func:`tokext.evaluation.generation.greedy_generate`'s job (left).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from tokext.errors import InputError
from tokext.models.devices import input_device

MC_METHODS = ("letter", "continuation", "cot")


# ---------------------------------------------------------------------- tokenization helpers


def model_tokenizer(model: Any) -> Any:
    """``model``'s tokenizer; an :class:`InputError` for the organism and for models without one."""
    tok = getattr(model, "tokenizer", None)
    if getattr(model, "organism", None) is not None:
        raise InputError("the model organism has a character vocabulary and answers only the task 'organism'")
    if tok is None:
        raise InputError("evaluation needs a model with a tokenizer (tokext.native_model() has none)")
    return tok


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as the continuation is tokenized after the context.

    As lm-evaluation-harness does: trailing spaces of ``context`` move to the continuation, the
    whole string is encoded once, and the continuation is what follows the context's tokens. If
    the two tokenizations disagree at the boundary, the continuation is encoded on its own.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    ctx = list(tokenizer(stripped).input_ids)
    whole = list(tokenizer(stripped + continuation).input_ids)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, list(tokenizer(continuation, add_special_tokens=False).input_ids)


def letter_token_ids(tokenizer: Any, context: str, letters: str) -> list[int]:
    """The single token id of each ``" X"`` (X in ``letters``) as it follows ``context``.

    Raises :class:`InputError` when a letter is not one token there, or two letters share an id
    (an unknown-word tokenizer).
    """
    ids = []
    for letter in letters:
        _, cont = encode_pair(tokenizer, context, f" {letter}")
        if len(cont) != 1:
            pieces = [tokenizer.decode([t]) for t in cont]
            raise InputError(
                f"answer letter {letter!r} is {len(cont)} tokens {pieces} after the prompt, "
                "not one: letter scoring needs single-token letters (use method='continuation')"
            )
        ids.append(cont[0])
    if len(set(ids)) != len(ids):
        raise InputError(f"the tokenizer maps the letters {letters!r} to the ids {ids}: they must be distinct")
    return ids


def continuation_prompt(item: Any) -> str:
    r"""The context of per-option scoring: ``"Question: <question>\nAnswer:"`` (lm-eval's PIQA form)."""
    return f"Question: {item.question}\nAnswer:"


# ---------------------------------------------------------------------- batched forward passes


def forward_batches(
    model: Any, seqs: Sequence[Sequence[int]], batch_size: int, take: Callable, progress: bool, desc: str
) -> list[Any]:
    """Run right-padded batches (longest first) and call ``take(logits_row, length, index)`` per sequence.

    The attention mask goes with every batch, so active interventions and statistics see which
    positions are padding. ``logits_row`` is the sequence's [pos, vocab] logits (pad positions
    included), ``length`` its real length; the values ``take`` returns come back in input order.
    Nothing else is kept, so a ``take`` that reduces the row (one position's log-probabilities)
    keeps memory small.
    """
    from tqdm.auto import tqdm

    from tokext.models.inputs import batches, encode, pad_id

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    tensors = encode(model, [list(s) for s in seqs])  # checks vocabulary and context length
    device = input_device(model)
    out: list[Any] = [None] * len(seqs)
    with torch.inference_mode(), tqdm(total=len(seqs), desc=desc, disable=not progress, leave=False) as bar:
        for batch in batches(tensors, batch_size, pad_id(model), side="right"):
            tokens, mask = batch.tokens.to(device), batch.attention_mask.to(device)
            logits = model(tokens, attention_mask=mask)
            for row, index in enumerate(batch.indices):
                out[index] = take(logits[row], int(mask[row].sum()), index)
            bar.update(len(batch.indices))
    return out


def continuation_logprobs(
    model: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Per pair ``(context ids, continuation ids)``: the log-probability of each continuation token."""
    seqs = [ctx + cont for ctx, cont in pairs]
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise InputError(f"pair {i}: context and continuation must both be non-empty")

    def take(logits: torch.Tensor, length: int, index: int) -> np.ndarray:
        ctx, cont = pairs[index]
        rows = logits[len(ctx) - 1 : len(ctx) + len(cont) - 1].float().log_softmax(-1)
        target = torch.tensor(cont, device=rows.device)
        return rows.gather(-1, target[:, None])[:, 0].cpu().numpy().astype(np.float64)

    return forward_batches(model, seqs, batch_size, take, progress, desc)


# ---------------------------------------------------------------------- multiple choice


def _mc_row(item: Any) -> dict[str, Any]:
    from tokext.evaluation.mc import LETTERS

    return {"id": item.id, "subject": item.subject, "category": item.category, "gold": LETTERS[item.label]}


def score_letters(
    model: Any,
    items: Sequence[Any],
    *,
    batch_size: int = 8,
    progress: bool = True,
    prompt_fn: Callable[[Any], str] | None = None,
) -> pd.DataFrame:
    """Answer-letter scoring of :class:`tokext.evaluation.mc.MCItem` records (arXiv 2403.14932's direct prompt).

    Columns: id, subject, category, gold, pred (the letter with the highest log-probability at
    the last prompt position), correct, loss (NLL of the gold letter over the full vocabulary),
    and ``logp_A``.. one per letter (full-vocabulary log-probabilities; NaN past an item's options).
    """
    from tokext.evaluation.mc import LETTERS, letter_prompt

    prompt_fn = prompt_fn or letter_prompt
    tok = model_tokenizer(model)
    items = list(items)
    prompts = [prompt_fn(it) for it in items]
    seqs = [list(tok(p).input_ids) for p in prompts]
    letter_ids = [letter_token_ids(tok, p, LETTERS[: len(it.choices)]) for p, it in zip(prompts, items)]
    width = max((len(it.choices) for it in items), default=0)

    def take(logits: torch.Tensor, length: int, index: int) -> np.ndarray:
        row = logits[length - 1].float().log_softmax(-1)
        return row[torch.tensor(letter_ids[index], device=row.device)].cpu().numpy().astype(np.float64)

    scores = forward_batches(model, seqs, batch_size, take, progress, "letters")
    rows = []
    for item, lp in zip(items, scores):
        pred = int(np.argmax(lp))
        row = _mc_row(item) | {"pred": LETTERS[pred], "correct": pred == item.label, "loss": -float(lp[item.label])}
        row |= {f"logp_{LETTERS[j]}": (float(lp[j]) if j < len(lp) else math.nan) for j in range(width)}
        rows.append(row)
    return pd.DataFrame(rows, columns=_columns(rows, ["id", "subject", "category", "gold", "pred", "correct", "loss"]))


def score_continuations(
    model: Any,
    items: Sequence[Any],
    *,
    batch_size: int = 8,
    progress: bool = True,
    prompt_fn: Callable[[Any], str] | None = None,
) -> pd.DataFrame:
    """Per-option log-likelihood scoring: ``acc`` (summed) and ``acc_norm`` (per byte), as lm-eval.

    Columns: id, subject, category, gold, pred, correct, pred_norm, correct_norm, loss (mean
    per-token NLL of the gold option), lls (JSON list of summed log-likelihoods per option) and
    n_bytes (JSON list of the options' UTF-8 lengths, the acc_norm denominators).
    """
    from tokext.evaluation.mc import LETTERS

    prompt_fn = prompt_fn or continuation_prompt
    tok = model_tokenizer(model)
    items = list(items)
    pairs, owner = [], []
    for i, item in enumerate(items):
        context = prompt_fn(item)
        for choice in item.choices:
            pairs.append(encode_pair(tok, context, f" {choice}"))
            owner.append(i)
    logprobs = continuation_logprobs(model, pairs, batch_size=batch_size, progress=progress, desc="options")
    rows, k = [], 0
    for item in items:
        per_option = logprobs[k : k + len(item.choices)]
        k += len(item.choices)
        lls = np.array([float(lp.sum()) for lp in per_option])
        pred, pred_norm = mc_predictions(lls, item.choices)
        n_bytes = [_n_bytes(c) for c in item.choices]
        gold = per_option[item.label]
        rows.append(
            _mc_row(item)
            | {
                "pred": LETTERS[pred],
                "correct": pred == item.label,
                "pred_norm": LETTERS[pred_norm],
                "correct_norm": pred_norm == item.label,
                "loss": -float(gold.mean()),
                "lls": json.dumps([round(x, 6) for x in lls.tolist()]),
                "n_bytes": json.dumps(n_bytes),
            }
        )
    return pd.DataFrame(rows, columns=_columns(rows, ["id", "subject", "category", "gold", "pred", "correct"]))


def _n_bytes(choice: str) -> int:
    return max(1, len(choice.encode("utf-8")))


def mc_predictions(lls: Sequence[float] | np.ndarray, choices: Sequence[str]) -> tuple[int, int]:
    """``(acc prediction, acc_norm prediction)``: argmax of the summed log-likelihoods, and of the
    log-likelihoods divided by the options' UTF-8 byte lengths (ties: the first option).

    >>> mc_predictions([-10.0, -12.0], ["ab", "abcdefgh"])
    (0, 1)
    """
    lls = np.asarray(lls, dtype=float)
    n_bytes = np.array([_n_bytes(c) for c in choices], dtype=float)
    return int(np.argmax(lls)), int(np.argmax(lls / n_bytes))


def _columns(rows: list[dict], first: list[str]) -> list[str]:
    rest = [c for c in (rows[0] if rows else {}) if c not in first]
    return first + rest


# ---------------------------------------------------------------------- generation


def generate_texts(
    model: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generating",
) -> tuple[list[str], list[int]]:
    """Greedy continuations (decoded text, number of new tokens) in input order, with a progress bar.

    Prompts are sorted by length and handed to :func:`tokext.evaluation.generation.greedy_generate` one batch
    at a time (so the bar moves), which keeps the batches exactly as greedy_generate would form them.
    """
    from tqdm.auto import tqdm

    from tokext.evaluation.generation import greedy_generate

    tok = model_tokenizer(model)
    lengths = [len(tok(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts, counts = [""] * len(prompts), [0] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            new = greedy_generate(model, [prompts[i] for i in chunk], max_new_tokens, batch_size=batch_size)
            for i, ids in zip(chunk, new):
                texts[i] = tok.decode(ids, skip_special_tokens=True)
                counts[i] = len(ids)
            bar.update(len(chunk))
    return texts, counts


def auto_max_new_tokens(model: Any, examples: Sequence[Any], cot: bool) -> int:
    """A generation cap that fits every gold answer: longest gold target in tokens, x1.25, + 4."""
    from tokext.evaluation.tasks import target

    tok = model_tokenizer(model)
    longest = max(len(tok(target(ex, cot), add_special_tokens=False).input_ids) for ex in examples)
    return int(math.ceil(longest * 1.25)) + 4


def evaluate_reasoning(
    model: Any,
    examples: Sequence[Any],
    *,
    cot: bool,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    shots: int = 3,
    demo_seed: int = 0,
    progress: bool = True,
    loss: bool = True,
) -> pd.DataFrame:
    """Greedy generation on the reasoning tasks, answer extraction and exact match.

    Columns: id, task, level, cot, gold, extracted, correct, loss (teacher-forced mean NLL of
    ``tokext.evaluation.tasks.target(example, cot)`` after the prompt; NaN with ``loss=False``),
    n_new_tokens and raw (the generated text, without the prompt). ``max_new_tokens=None`` picks
    :func:`auto_max_new_tokens`.
    """
    from tokext.evaluation.extract import extract_free_answer
    from tokext.evaluation.tasks import prompt, score_exact, target
    from tokext.evaluation.tasks.scoring import as_int

    examples = list(examples)
    if not examples:
        raise InputError("no examples to evaluate")
    if max_new_tokens is None:
        max_new_tokens = auto_max_new_tokens(model, examples, cot)
    prompts = [prompt(ex, cot, shots=shots, demo_seed=demo_seed) for ex in examples]
    texts, counts = generate_texts(
        model, prompts, max_new_tokens, batch_size=batch_size, progress=progress, desc="cot" if cot else "direct"
    )
    losses = [math.nan] * len(examples)
    if loss:
        tok = model_tokenizer(model)
        pairs = [encode_pair(tok, p, target(ex, cot)) for p, ex in zip(prompts, examples)]
        losses = [
            -float(lp.mean())
            for lp in continuation_logprobs(model, pairs, batch_size=batch_size, progress=progress, desc="loss")
        ]
    rows = []
    for ex, text, n_new, nll in zip(examples, texts, counts, losses):
        extracted = extract_free_answer(text, numeric=as_int(ex.answer) is not None)
        rows.append(
            {
                "id": ex.id,
                "task": ex.task,
                "level": ex.level,
                "cot": cot,
                "gold": ex.answer,
                "extracted": extracted,
                "correct": score_exact(extracted, ex.answer),
                "loss": nll,
                "n_new_tokens": n_new,
                "raw": text,
            }
        )
    return pd.DataFrame(rows)


def evaluate_mc_cot(
    model: Any, items: Sequence[Any], *, max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True
) -> pd.DataFrame:
    """The paper's CoT protocol: :func:`tokext.evaluation.mc.cot_prompt`, greedy generation, :func:`extract_choice`.

    Columns: id, subject, category, gold, pred (None when nothing was found), correct,
    extraction (how the letter was found), cascade_pred (the whole-text cascade's letter),
    agrees_with_cascade, loss (NaN: there is no gold analysis), n_new_tokens and raw.
    """
    from tokext.evaluation.extract import extract_choice
    from tokext.evaluation.mc import LETTERS, cot_prompt

    items = list(items)
    texts, counts = generate_texts(
        model, [cot_prompt(it) for it in items], max_new_tokens, batch_size=batch_size, progress=progress, desc="mc-cot"
    )
    rows = []
    for item, text, n_new in zip(items, texts, counts):
        got = extract_choice(text, item.choices)
        rows.append(
            _mc_row(item)
            | {
                "pred": got.letter,
                "correct": got.letter == LETTERS[item.label],
                "extraction": got.method,
                "cascade_pred": got.cascade_letter,
                "agrees_with_cascade": got.agrees_with_cascade,
                "loss": math.nan,
                "n_new_tokens": n_new,
                "raw": text,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- one entry point


def evaluate(
    model: Any,
    spec: Any,
    interventions: Sequence[Any] = (),
    *,
    batch_size: int = 8,
    progress: bool = True,
    items: Sequence[Any] | None = None,
    engine: str = "hooks",
) -> pd.DataFrame:
    """Evaluate ``model`` on ``spec`` (a :class:`tokext.studies.config.EvalSpec`) with ``interventions`` active.

    ``spec`` may also be a dict of :class:`~tokext.studies.config.EvalSpec` fields, e.g.
    ``{"task": "verbal", "level": 1, "n": 40}``. ``items``: the spec's items when already loaded
    (``spec.load()`` otherwise). ``engine``: how attention runs in every forward pass (``"hooks"``,
    ``"streaming"`` or ``"auto"``, as in :func:`tokext.interventions.intervene`).
    """
    from tokext.evaluation.spec import EvalSpec
    from tokext.interventions import intervene

    if isinstance(spec, dict):
        spec = EvalSpec(**spec)

    items = list(items) if items is not None else spec.load()
    if spec.task == "perplexity":
        return _evaluate_perplexity(model, spec, interventions, items, batch_size, engine)
    if spec.task == "organism":
        return _evaluate_organism(model, spec, interventions, items, batch_size, progress, engine)
    with intervene(model, *interventions, engine=engine):
        if spec.method == "generate":
            return evaluate_reasoning(
                model,
                items,
                cot=spec.cot,
                max_new_tokens=spec.max_new_tokens,
                batch_size=batch_size,
                shots=spec.shots,
                demo_seed=spec.seed,
                progress=progress,
            )
        if spec.method == "letter":
            return score_letters(model, items, batch_size=batch_size, progress=progress)
        if spec.method == "continuation":
            return score_continuations(model, items, batch_size=batch_size, progress=progress)
        if spec.method == "cot":
            return evaluate_mc_cot(
                model, items, max_new_tokens=spec.max_new_tokens or 256, batch_size=batch_size, progress=progress
            )
    raise InputError(f"unknown evaluation method {spec.method!r}: choose from generate, {', '.join(MC_METHODS)}")


def _evaluate_organism(
    model: Any,
    spec: Any,
    interventions: Sequence[Any],
    items: Sequence[Any],
    batch_size: int,
    progress: bool,
    engine: str = "hooks",
) -> pd.DataFrame:
    """Task ``organism``: the organism's own problems (test split), greedy, with ``interventions``."""
    from tokext.evaluation.organism import evaluate_organism_items
    from tokext.interventions import intervene
    from tokext.models.organism import DEFAULT_TASK

    organism = getattr(model, "organism", None)
    if organism is None:
        raise InputError(
            "task 'organism' needs a trained model organism: load its directory "
            "(`tokext train-organism --out DIR`, then tokext.load_model(DIR))"
        )
    if organism.config["task"] != DEFAULT_TASK:
        raise InputError(
            f"this organism was trained on {organism.config['task']}; task 'organism' evaluates the "
            f"default problems {DEFAULT_TASK}: use tokext.evaluation.organism.evaluate_organism_items directly"
        )
    with intervene(model, *interventions, engine=engine):
        return evaluate_organism_items(organism, items, cot=spec.cot, batch_size=max(batch_size, 1), progress=progress)


def _evaluate_perplexity(
    model: Any, spec: Any, interventions: Sequence[Any], items: Sequence[Any], batch_size: int, engine: str
) -> pd.DataFrame:
    """Task ``perplexity``: one row per chunk of the shipped natural text (``items``: chunk indices), its
    mean next-token loss in ``loss`` (perplexity = exp of the mean over chunks, all of ``spec.length``
    tokens) and ``correct`` NaN (no accuracy)."""
    from tokext.evaluation.perplexity import chunk_losses, natural_chunks

    chunks = natural_chunks(model, max(int(i) for i in items) + 1, int(spec.length))
    picked = [torch.tensor(chunks[int(i)]) for i in items]
    sums, counts = chunk_losses(model, picked, interventions, batch_size=batch_size, engine=engine)
    return pd.DataFrame(
        {
            "id": [f"chunk{int(i)}" for i in items],
            "correct": np.nan,
            "loss": sums / counts,
            "n_tokens": counts,
        }
    )
