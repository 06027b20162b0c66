"""The model organism: a 2-layer TransformerLens-native model trained from scratch on chain-of-thought
arithmetic. It reaches near-perfect held-out accuracy in a few CPU minutes and grows a first-token
(BOS) attention sink, so sink statistics and interventions can be studied on a model whose every
training choice is known.

Task format (one character per token, after BOS)::

    CoT:     3+4-5=>7>2;A:2      (running results, then the answer)
    direct:  3+4-5=;A:2          (answer straight away; the prompt for evaluation ends at "A:")

Problems whose question hashes to the test split (20%) are never trained on. The default recipe
was chosen by measurement (4 seeds each): a constant prefix such as "Q:" splits the sink over the
first constant tokens, and weight decay 0.1-1.0 weakened the BOS sink instead of strengthening it.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tokext.errors import DataFileError, InputError
from tokext.inputs import pad

FORMAT_VERSION = 1
_CHARS = "0123456789+-*=()>;:QA "
_SPECIALS = ("<pad>", "<bos>", "<eos>")
_TEST_EVERY = 5  # crc32(question) % 5 == 0 -> held-out test problem


class CharTokenizer:
    """Character-level tokenizer; ids 0, 1, 2 are PAD, BOS, EOS.

    >>> tok = CharTokenizer()
    >>> tok.decode(tok.encode("Q:1+2=>3;A:3"))
    'Q:1+2=>3;A:3'
    """

    def __init__(self, chars: str = _CHARS) -> None:
        if len(set(chars)) != len(chars):
            raise InputError(f"tokenizer characters must be unique, got {chars!r}")
        self.chars = chars
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._ids = {c: i + len(_SPECIALS) for i, c in enumerate(chars)}
        self.vocab_size = len(_SPECIALS) + len(chars)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise InputError(f"characters {unknown} of {text!r} are not in the vocabulary {self.chars!r}")
        ids = [self._ids[c] for c in text]
        return ([self.bos_token_id] if bos else []) + ids + ([self.eos_token_id] if eos else [])

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Characters of ``ids``; special tokens are dropped."""
        n = len(_SPECIALS)
        return "".join(self.chars[i - n] for i in (int(i) for i in ids) if i >= n)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "CharTokenizer", "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CharTokenizer":
        return cls(data["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars


@dataclass(frozen=True)
class OrganismExample:
    """One problem: ``question`` ("3+4-5="), ``expression`` (valid Python), ``chain`` (">7>2")."""

    question: str
    expression: str
    chain: str
    answer: int

    def prompt(self, cot: bool = True) -> str:
        return self.question if cot else self.question + ";A:"

    def completion(self, cot: bool = True) -> str:
        return f"{self.chain};A:{self.answer}" if cot else str(self.answer)

    def text(self, cot: bool = True) -> str:
        return self.prompt(cot) + self.completion(cot)


def organism_examples(
    n: int, seed: int, n_terms: int = 3, max_operand: int = 9, *, ops: str = "+-", split: str = "test",
    prefix: str = "",
) -> list[OrganismExample]:
    """``n`` random problems of ``split`` ("train", "test" or "all"), evaluated left to right.

    With ``"*"`` in ``ops`` the question is parenthesised where needed, so that Python's
    ``eval(expression)`` always equals ``answer``.

    >>> organism_examples(1, seed=0)[0].text()
    '9+4+1=>13>14;A:14'
    """
    if n_terms < 2 or max_operand < 1 or not ops or set(ops) - set("+-*"):
        raise InputError(f"need n_terms >= 2, max_operand >= 1, ops from '+-*'; got {n_terms}, {max_operand}, {ops!r}")
    if split not in ("train", "test", "all"):
        raise InputError(f"split must be 'train', 'test' or 'all', got {split!r}")
    rng = random.Random(seed)
    out: list[OrganismExample] = []
    while len(out) < n:
        ex = _one_example(rng, n_terms, max_operand, ops, prefix)
        is_test = zlib.crc32(ex.question.encode()) % _TEST_EVERY == 0
        if split == "all" or is_test == (split == "test"):
            out.append(ex)
    return out


def _one_example(rng: random.Random, n_terms: int, max_operand: int, ops: str, prefix: str) -> OrganismExample:
    value = rng.randint(0, max_operand)
    expr, additive, steps = str(value), False, []
    for _ in range(n_terms - 1):
        op, b = rng.choice(ops), rng.randint(0, max_operand)
        if op == "*" and additive:
            expr, additive = f"({expr})", False
        expr += f"{op}{b}"
        additive = additive or op != "*"
        value = value + b if op == "+" else value - b if op == "-" else value * b
        steps.append(value)
    return OrganismExample(f"{prefix}{expr}=", expr, "".join(f">{v}" for v in steps), value)


@dataclass
class Organism:
    """A trained organism: the bridge ``model``, its ``tokenizer``, the ``config`` that made it and
    the training ``log`` (dicts: step, loss, accuracy, bos_attention = max over heads, seconds)."""

    model: Any
    tokenizer: CharTokenizer
    config: dict[str, Any]
    log: list[dict[str, float]] = field(default_factory=list)

    def examples(self, n: int, seed: int, split: str = "test") -> list[OrganismExample]:
        task = self.config["task"]
        return organism_examples(n, seed, task["n_terms"], task["max_operand"], ops=task["ops"], split=split,
                                 prefix=task["prefix"])

    def attach(self) -> Any:
        """The bridge, carrying this organism as ``model.organism`` (how sweeps and
        :func:`tokext.evaluate.evaluate` find its tokenizer and task)."""
        self.model.organism = self
        return self.model


def _max_len(n_terms: int, max_operand: int, ops: str, prefix: str) -> int:
    bound = max_operand**n_terms if "*" in ops else n_terms * max_operand
    num, operand = len(str(bound)) + 1, len(str(max_operand))
    question = len(prefix) + n_terms * (operand + 1) + 2 * (n_terms - 1)  # operands, ops, "=", parentheses
    return 1 + question + (n_terms - 1) * (num + 1) + 3 + num + 1  # BOS, chain, ";A:", answer, EOS


def _encode_batch(
    tok: CharTokenizer, examples: Sequence[OrganismExample], cot: Sequence[bool], loss_on: str = "completion"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [batch, pos] and a mask of the positions whose next token is scored."""
    seqs, n_prompt = [], []
    for ex, c in zip(examples, cot):
        seqs.append(torch.tensor(tok.encode(ex.text(c), eos=True)))
        n_prompt.append(1 + len(ex.question) if loss_on == "completion" else 1)  # loss starts after "="
    tokens, real = pad(seqs, tok.pad_token_id)
    pos = torch.arange(tokens.shape[1])
    scored = (pos[None, :] >= torch.tensor(n_prompt)[:, None] - 1) & real.bool()
    scored[torch.arange(len(seqs)), real.sum(1) - 1] = False  # nothing follows EOS
    return tokens, scored


def train_organism(
    *, steps: int = 1500, seed: int = 0, n_layers: int = 2, d_model: int = 128, n_heads: int = 4,
    d_mlp: int | None = None, positional: str = "rotary", batch_size: int = 64, lr: float = 4e-3,
    weight_decay: float = 0.0, warmup: int = 100, n_terms: int = 3, max_operand: int = 9, ops: str = "+-",
    prefix: str = "", direct_fraction: float = 0.25, loss_on: str = "completion", log_every: int = 250,
    progress: bool = True, device: str = "cpu", threads: int = 2,
) -> Organism:
    """Train an organism from scratch with AdamW (linear warm-up, cosine decay) on fresh training
    problems each step; a ``direct_fraction`` of them use the direct (no-CoT) form. The loss covers
    the tokens after "=" (``loss_on="all"``: every token). The defaults (rotary, lr 4e-3, no weight
    decay, no prefix) gave >= 0.96 CoT accuracy and a BOS sink >= 0.35 for seeds 0-3.

    >>> org = train_organism(steps=2, d_model=32, log_every=0, progress=False)
    >>> org.model.cfg.n_layers, org.log[-1]["step"]
    (2, 2)
    """
    from tokext.models import native_model

    if steps < 1 or d_model % n_heads or not 0 <= direct_fraction <= 1 or loss_on not in ("completion", "all"):
        raise InputError(f"need steps >= 1, d_model % n_heads == 0, 0 <= direct_fraction <= 1, loss_on 'completion' "
                         f"or 'all'; got {steps=}, {d_model=}, {n_heads=}, {direct_fraction=}, {loss_on=}")
    tok = CharTokenizer()
    model_cfg = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
                     d_mlp=d_mlp or 4 * d_model, n_ctx=_max_len(n_terms, max_operand, ops, prefix),
                     d_vocab=tok.vocab_size, seed=seed, positional_embedding_type=positional)
    config = {"format_version": FORMAT_VERSION, "model": model_cfg,
              "task": dict(n_terms=n_terms, max_operand=max_operand, ops=ops, prefix=prefix),
              "train": dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            warmup=warmup, direct_fraction=direct_fraction, loss_on=loss_on)}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = native_model(name="organism", **model_cfg)
        model = model.to(device) if device != "cpu" else model
        org = Organism(model, tok, config)
        _fit(org, steps, seed, log_every, progress)
    finally:
        torch.set_num_threads(previous)
    return org


def _fit(org: Organism, steps: int, seed: int, log_every: int, progress: bool) -> None:
    train, model = org.config["train"], org.model
    device = _device(model)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": train["weight_decay"]},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]  # no decay on biases, LN
    opt = torch.optim.AdamW(groups, lr=train["lr"], betas=(0.9, 0.98))
    warm = max(1, train["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(seed + 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        examples = org.examples(train["batch_size"], rng.randrange(2**31), split="train")
        cot = [rng.random() >= train["direct_fraction"] for _ in examples]
        tokens, scored = _encode_batch(org.tokenizer, examples, cot, train["loss_on"])
        logits = model(tokens.to(device))
        scored, tokens = scored.to(device), tokens.to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][scored[:, :-1]], tokens[:, 1:][scored[:, :-1]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == steps or (log_every and step % log_every == 0):
            loss = loss.detach()
            acc = evaluate_organism(org, n=100, seed=1000 + step)
            org.log.append({"step": step, "loss": float(loss), "accuracy": acc,
                            "bos_attention": float(sink_mass(org, n=50).max()),
                            "seconds": round(time.perf_counter() - start, 1)})
            if progress:
                print(f"step {step:5d}  loss {float(loss):.4f}  cot accuracy {acc:.3f}  "
                      f"max BOS attention {org.log[-1]['bos_attention']:.3f}  "
                      f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    model.eval()


@torch.no_grad()
def generate_greedy(organism: Organism, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (text after the prompt, up to EOS), batched; the whole
    right-padded sequence is recomputed at each step."""
    tok, model = organism.tokenizer, organism.model
    n_ctx = int(model.cfg.n_ctx)
    seqs = [tok.encode(p) for p in prompts]
    length = torch.tensor([len(s) for s in seqs])
    budget = int(max_new_tokens if max_new_tokens is not None else n_ctx - int(length.min()))
    tokens = torch.full((len(seqs), min(n_ctx, int(length.max()) + budget)), tok.pad_token_id)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.tensor(s)
    done = length >= tokens.shape[1]
    was_training = model.training
    model.eval()
    rows = torch.arange(len(seqs))
    for _ in range(budget):
        if bool(done.all()):
            break
        width = int(length[~done].max())
        logits = model(tokens[:, :width].to(_device(model))).cpu()
        nxt = logits[rows, (length - 1).clamp(max=width - 1)].argmax(-1)
        live = ~done
        tokens[rows[live], length[live]] = nxt[live]
        length = length + live.long()
        done = done | (nxt == tok.eos_token_id) | (length >= tokens.shape[1])
    model.train(was_training)
    return [tok.decode(tokens[r, len(s): int(length[r])]) for r, s in enumerate(seqs)]


def evaluate_organism(organism: Organism, n: int = 200, seed: int = 123, cot: bool = True) -> float:
    """Exact-match accuracy of greedy completions on ``n`` held-out (test split) problems: with
    ``cot`` the whole chain and answer must match, without it the answer after "A:"."""
    examples = organism.examples(n, seed, split="test")
    outs = generate_greedy(organism, [ex.prompt(cot) for ex in examples])
    return sum(out == ex.completion(cot) for out, ex in zip(outs, examples)) / max(1, n)


DEFAULT_TASK = {"n_terms": 3, "max_operand": 9, "ops": "+-", "prefix": ""}  # train_organism's defaults


def evaluate_organism_items(organism: Organism, examples: Sequence[OrganismExample], *, cot: bool,
                            batch_size: int = 64, progress: bool = True) -> "pd.DataFrame":
    """Greedy completions of ``examples`` and their scores, one row per problem (the columns of
    :func:`tokext.evaluate.evaluate_reasoning`): id, task, level, cot, gold, extracted (the text
    after the last "A:"), correct (answer exact match), completion_correct (chain and answer
    exact), loss (teacher-forced mean NLL of the gold completion and EOS), n_new_tokens, raw.
    Run it inside :func:`tokext.interventions.intervene` to score an intervention.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    examples = list(examples)
    if not examples:
        raise InputError("no organism problems to evaluate")
    tok, model = organism.tokenizer, organism.model
    rows = []
    with tqdm(total=len(examples), desc="organism", disable=not progress, leave=False) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start: start + batch_size]
            outs = generate_greedy(organism, [ex.prompt(cot) for ex in chunk])
            losses = _completion_losses(organism, chunk, cot)
            for i, (ex, out, loss) in enumerate(zip(chunk, outs, losses), start=start):
                extracted = out.rsplit("A:", 1)[1].strip() if "A:" in out else (out.strip() if not cot else "")
                rows.append({"id": f"{i}:{ex.question}", "task": "organism", "level": None, "cot": cot,
                             "gold": str(ex.answer), "extracted": extracted, "correct": extracted == str(ex.answer),
                             "completion_correct": out == ex.completion(cot), "loss": loss,
                             "n_new_tokens": len(tok.encode(out, bos=False)), "raw": out})
            bar.update(len(chunk))
    return pd.DataFrame(rows)


@torch.no_grad()
def _completion_losses(organism: Organism, examples: Sequence[OrganismExample], cot: bool) -> list[float]:
    """Mean NLL of each gold completion (and EOS) after its prompt, in one padded forward pass."""
    tok, model = organism.tokenizer, organism.model
    seqs = [tok.encode(ex.text(cot), eos=True) for ex in examples]
    starts = [len(tok.encode(ex.prompt(cot))) for ex in examples]
    tokens, real = pad([torch.tensor(s) for s in seqs], tok.pad_token_id)
    logprobs = model(tokens.to(_device(model))).float().log_softmax(-1).cpu()
    out = []
    for row, (seq, first) in enumerate(zip(seqs, starts)):
        targets = torch.tensor(seq[first:])
        picked = logprobs[row, first - 1: len(seq) - 1].gather(-1, targets[:, None])
        out.append(-float(picked.mean()))
    return out


def organism_prompts(organism: Organism, n: int, seed: int = 0, *, cot: bool = True) -> list[torch.Tensor]:
    """Token tensors (1-D, BOS first) of ``n`` complete held-out problems, for attention statistics."""
    return [torch.tensor(organism.tokenizer.encode(ex.text(cot))) for ex in organism.examples(n, seed)]


@torch.no_grad()
def sink_mass(organism: Organism, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Mean attention to position 0 (BOS) from real queries at positions >= 1: [layer, head]."""
    from tokext.hooks import attached, pattern_hook_name

    model = organism.model
    tokens, real = pad(organism_prompts(organism, n, seed), organism.tokenizer.pad_token_id)
    queries = real.bool().clone()
    queries[:, 0] = False
    tokens, queries = tokens.to(_device(model)), queries.to(_device(model))
    sums = torch.zeros(int(model.cfg.n_layers), int(model.cfg.n_heads), device=queries.device)

    def reducer(layer: int):
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            sums[layer] += (pattern[..., 0] * queries[:, None, :]).sum((0, 2))
        return hook

    hooks = [(pattern_hook_name(layer), reducer(layer)) for layer in range(sums.shape[0])]
    with attached(model, hooks):
        model(tokens)
    return (sums / queries.sum()).cpu()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise InputError(f"refusing to overwrite {str(directory)!r}: it exists and is not empty "
                         "(pass overwrite=True, or --force on the command line)")


def save_organism(organism: Organism, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model.pt`` (state_dict) and ``organism.json`` (config, tokenizer, log) to ``directory``."""
    directory = Path(directory)
    _check_target(directory, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(organism.model.state_dict(), directory / "model.pt")
    meta = {"config": organism.config, "tokenizer": organism.tokenizer.to_dict(), "log": organism.log}
    (directory / "organism.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_organism(directory: str | Path) -> Organism:
    """Rebuild a saved organism with :func:`tokext.models.native_model` and load its weights."""
    from tokext.models import native_model

    directory = Path(directory)
    try:
        meta = json.loads((directory / "organism.json").read_text())
        state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        model_cfg = meta["config"]["model"]
    except (OSError, ValueError, KeyError) as err:
        raise DataFileError(f"cannot load an organism from {str(directory)!r}: {type(err).__name__}: {err}") from None
    model = native_model(name="organism", **model_cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    return Organism(model, CharTokenizer.from_dict(meta["tokenizer"]), meta["config"], meta.get("log", []))


def train_organism_cli(out_dir: str | Path, steps: int = 1500, seed: int = 0, force: bool = False) -> int:
    """Train, report held-out accuracy (CoT and direct), BOS sink mass and wall time, then save."""
    _check_target(Path(out_dir), force)
    start = time.perf_counter()
    org = train_organism(steps=steps, seed=seed)
    seconds = time.perf_counter() - start
    cot, direct = evaluate_organism(org, cot=True), evaluate_organism(org, cot=False)
    sink = sink_mass(org)
    print(f"trained {steps} steps in {seconds:.0f} s; held-out exact match: CoT {cot:.3f}, direct {direct:.3f}")
    for layer, row in enumerate(sink.tolist()):
        print(f"layer {layer} attention to BOS per head: " + " ".join(f"{x:.3f}" for x in row))
    print(f"saved to {save_organism(org, out_dir, overwrite=force)}")
    return 0
