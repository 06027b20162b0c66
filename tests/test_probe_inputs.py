"""Probe inputs (Gu et al. 2024, Table 1): kinds, shapes, BOS placement, the vocabulary random rows
draw from, determinism, bad arguments, and ``tokext analyze --inputs`` on a tiny model against
plain transformers' own attentions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokext.cli.main import main
from tokext.errors import InputError, SequenceTooLongError
from tokext.evaluation.mc import load_mmlu
from tokext.evaluation.probe_inputs import KINDS, probe_inputs
from tokext.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    """Its tokenizer adds BOS (``<s>``)."""
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    """Its tokenizer has a BOS token but adds none."""
    return load_model(str(tiny_gpt2_dir))


def _specials(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bos", [None, True, False])
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_shapes_and_bos_placement(request, which, kind, bos):
    model = request.getfixturevalue(which)
    tok = model.tokenizer
    rows = probe_inputs(model, kind, n=5, length=12, seed=0, bos=bos)
    assert rows.dtype == torch.long and rows.shape == (5, 12)
    adds_bos = tok("one two").input_ids[0] == tok.bos_token_id
    assert adds_bos == (which == "llama")
    want_bos = bos if bos is not None else (kind == "natural" and adds_bos)
    assert bool((rows[:, 0] == tok.bos_token_id).all()) is want_bos
    assert not (rows[:, 1:] == tok.bos_token_id).any()  # BOS only ever first, and counted in length


def test_natural_rows_are_the_tokenizers_encoding_of_mmlu_questions(llama, gpt2):
    questions = [item.question for item in load_mmlu()]
    starts = torch.randperm(len(questions), generator=torch.Generator().manual_seed(7))[:3].tolist()
    for model in (llama, gpt2):
        tok = model.tokenizer
        for bos in (None, False):
            rows = probe_inputs(model, "natural", n=3, length=20, seed=7, bos=bos)
            for row, start in zip(rows.tolist(), starts):
                text = "\n\n".join(questions[start : start + 8]) + "\n\n"
                ids = tok(text).input_ids
                if bos is False and ids[0] == tok.bos_token_id:
                    ids = ids[1:]
                assert row == ids[:20]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_random_rows_cover_the_non_special_vocabulary_only(request, which):
    model = request.getfixturevalue(which)
    tok = model.tokenizer
    rows = probe_inputs(model, "random", n=200, length=32, seed=1)
    allowed = set(range(len(tok))) - _specials(tok)
    assert set(rows.flatten().tolist()) == allowed  # every one of them drawn (6,400 draws), nothing else
    counts = np.bincount(rows.flatten().numpy(), minlength=len(tok))[sorted(allowed)]
    expected = rows.numel() / len(allowed)
    assert ((counts - expected) ** 2 / expected).sum() < 2 * len(allowed)  # chi-square: uniform, loosely


def test_repeated_rows_repeat_one_non_special_token(llama):
    tok = llama.tokenizer
    rows = probe_inputs(llama, "repeated", n=50, length=16, seed=2)
    assert (rows == rows[:, :1]).all()
    assert not set(rows[:, 0].tolist()) & _specials(tok)
    assert len(set(rows[:, 0].tolist())) > 10  # different rows draw different tokens
    with_bos = probe_inputs(llama, "repeated", n=50, length=16, seed=2, bos=True)
    assert (with_bos[:, 0] == tok.bos_token_id).all() and (with_bos[:, 1:] == with_bos[:, 1:2]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_rows_other_seed_other_rows(llama, kind):
    a = probe_inputs(llama, kind, n=8, length=16, seed=0)
    assert torch.equal(a, probe_inputs(llama, kind, n=8, length=16, seed=0))
    assert not torch.equal(a, probe_inputs(llama, kind, n=8, length=16, seed=1))


def test_native_model_without_tokenizer(native):
    rows = probe_inputs(native, "random", n=4, length=8)
    assert rows.shape == (4, 8) and int(rows.max()) < native.cfg.d_vocab
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        probe_inputs(native, "natural", n=2, length=8)
    with pytest.raises(InputError, match="needs a BOS token"):
        probe_inputs(native, "random", n=2, length=8, bos=True)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"kind": "natrual"}, InputError, "Did you mean 'natural'"),
        ({"kind": "noise"}, InputError, "Available: natural, random, repeated"),
        ({"kind": "random", "n": 0}, InputError, "n must be between 1 and 100,000"),
        ({"kind": "random", "n": True}, InputError, "n must be an integer"),
        ({"kind": "random", "n": 100_001}, InputError, "between 1 and"),
        ({"kind": "random", "length": 0}, InputError, "length must be at least 1"),
        ({"kind": "random", "length": 2.5}, InputError, "length must be an integer"),
        ({"kind": "random", "length": 65}, SequenceTooLongError, "context of 64"),
        ({"kind": "random", "seed": "0"}, InputError, "seed must be an integer"),
        ({"kind": "random", "bos": "yes"}, InputError, "bos must be None, True or False"),
        ({"kind": "repeated", "length": 1, "bos": True}, InputError, "at least 2 when rows start with BOS"),
        ({"kind": "natural", "n": 20_000}, InputError, "MMLU test set has 14042"),
    ],
)
def test_bad_arguments(llama, kwargs, error, message):
    with pytest.raises(error, match=message):
        probe_inputs(llama, **kwargs)


def _oracle_first_token_alpha(directory, rows: torch.Tensor) -> np.ndarray:
    """alpha_0 [layer, head] per row (mean of A[i, 0] over all queries), from transformers' attentions."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = hf(rows, output_attentions=True).attentions
    return np.stack([a[:, :, :, 0].double().mean(-1).numpy() for a in attentions], axis=1)  # [row, layer, head]


@pytest.mark.parametrize("kind, bos", [("repeated", None), ("random", True), ("natural", False)])
def test_analyze_cli_with_probe_inputs(tiny_llama_dir, llama, tmp_path, capsys, kind, bos):
    flag = [] if bos is None else ["--bos" if bos else "--no-bos"]
    out = tmp_path / "o"
    argv = ["analyze", "--model", str(tiny_llama_dir), "--inputs", kind, *flag, "--n", "6", "--max-len", "16"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert ("<s> first" in first) is bool(bos) and "6 sequences" in first
    rows = probe_inputs(llama, kind, n=6, length=16, bos=bos)
    alpha = _oracle_first_token_alpha(tiny_llama_dir, rows)
    summary = __import__("pandas").read_csv(out / "layer_summary.csv")
    assert np.allclose(summary["first_token_mass"], alpha.mean((0, 2)), atol=1e-6)


def test_analyze_gu2024_protocol_with_probe_inputs(tiny_eval, tmp_path, capsys):
    directory, model = tiny_eval
    argv = ["analyze", "--model", directory, "--inputs", "random", "--n", "5", "--protocol", "gu2024"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = probe_inputs(model, "random", n=5, length=64)
    alpha = _oracle_first_token_alpha(directory, rows)  # queries see key 0 all: alpha_0 is their mean
    want = 100 * (alpha > 0.3).mean()  # Gu et al.: each sample's alpha thresholded, then averaged
    assert f"{want:.1f}% of (layer, head) pairs" in printed and "protocol gu2024" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--inputs", "random", "--data", "mmlu"], "not both"),
        (["--bos"], "applies to probe inputs"),
        (["--inputs", "random", "--protocol", "gu2024", "--max-len", "32"], "fixes the length at 64"),
    ],
)
def test_analyze_refuses_contradicting_probe_flags(argv, message, capsys):
    assert main(["analyze", "--model", "/nonexistent/never-loaded", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
