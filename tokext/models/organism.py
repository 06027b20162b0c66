"""The model organism as a loadable model: its character tokenizer, its arithmetic problem format,
and its on-disk format (``model.pt`` + ``organism.json``).

The organism is a 2-layer TransformerLens-native model trained from scratch on chain-of-thought
arithmetic (:mod:`tokext.studies.organism` trains it). Task format (one character per token, after
BOS)::

    CoT:     3+4-5=>7>2;A:2      (running results, then the answer)
    direct:  3+4-5=;A:2          (answer straight away; the prompt for evaluation ends at "A:")

Problems whose question hashes to the test split (20%) are never trained on. The problem
generator lives here because it defines the organism's vocabulary, context and held-out split.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokext.errors import DataFileError, InputError

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
        """Character ids of ``text``, with BOS and EOS if asked; unknown characters are an error."""
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
        """The tokenizer as a JSON-serialisable dict (saved next to the weights)."""
        return {"type": "CharTokenizer", "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        """The tokenizer saved by :meth:`to_dict`."""
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
        """The model's prompt: the question, plus ``;A:`` without CoT."""
        return self.question if cot else self.question + ";A:"

    def completion(self, cot: bool = True) -> str:
        """The target after the prompt: the chain and the answer, or the answer alone without CoT."""
        return f"{self.chain};A:{self.answer}" if cot else str(self.answer)

    def text(self, cot: bool = True) -> str:
        """Prompt and completion, the training text."""
        return self.prompt(cot) + self.completion(cot)


def organism_examples(
    n: int,
    seed: int,
    n_terms: int = 3,
    max_operand: int = 9,
    *,
    ops: str = "+-",
    split: str = "test",
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
        """``n`` examples of this organism's task (the ``split`` it was or was not trained on)."""
        task = self.config["task"]
        return organism_examples(
            n, seed, task["n_terms"], task["max_operand"], ops=task["ops"], split=split, prefix=task["prefix"]
        )

    def attach(self) -> Any:
        """The bridge, carrying this organism as ``model.organism`` (how sweeps and
        :func:`tokext.evaluation.evaluate.evaluate` find its tokenizer and task)."""
        self.model.organism = self
        return self.model


DEFAULT_TASK: dict[str, Any] = {"n_terms": 3, "max_operand": 9, "ops": "+-", "prefix": ""}  # train_organism's defaults


def check_target(directory: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty ``directory`` unless ``overwrite``."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise InputError(
            f"refusing to overwrite {str(directory)!r}: it exists and is not empty "
            "(pass overwrite=True, or --force on the command line)"
        )


def save_organism(organism: Organism, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model.pt`` (state_dict) and ``organism.json`` (config, tokenizer, log) to ``directory``."""
    directory = Path(directory)
    check_target(directory, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(organism.model.state_dict(), directory / "model.pt")
    meta = {"config": organism.config, "tokenizer": organism.tokenizer.to_dict(), "log": organism.log}
    (directory / "organism.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_organism(directory: str | Path) -> Organism:
    """Rebuild a saved organism with :func:`tokext.models.native_model` and load its weights."""
    from tokext.models.native import native_model

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
