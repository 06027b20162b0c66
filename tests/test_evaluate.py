"""tokext.evaluation.evaluate against independent computations with plain transformers, on a tiny random Llama.

The tiny model's word-level tokenizer knows the option letters A-H (the conftest tokenizer maps
them to <unk>), so letter scoring can be checked; unknown words become <unk>, which is harmless.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tokext.errors import InputError
from tokext.evaluation.mc import MCItem

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = sorted(
    set(
        list("ABCDEFGH")
        + list("0123456789")
        + list(".,:;?!'\"()*+-=")
        + (
            "Answer Question Analysis Response What is the result Start with Add Subtract Multiply by Compute "
            "Work it out step writing each intermediate on its own line then give final answer a last that starts "
            "sky blue green red water boils at degrees cat dog sat mat river stone apple capital of France Paris "
            "Berlin Rome Madrid which colour color grass how many legs does have four two three six eight "
            "under heading go through options one check reasoning and facts behind say why could be right or wrong "
            "only letter single best multiple choice question below in parts First"
        ).split()
    )
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@functools.cache
def tiny_eval_model_dir(root: str) -> Path:
    """A 3-layer random Llama (GQA) with peaked attention and this module's tokenizer, saved to ``root``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    directory = Path(root) / "tiny-eval-llama"
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls gain nothing from threads, and on a busy machine lose a lot to spinning."""


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory):
    return tiny_eval_model_dir(str(tmp_path_factory.mktemp("tiny_eval")))


@pytest.fixture(scope="session")
def model(eval_dir):
    from tokext.models.loading import load_model

    return load_model(str(eval_dir))


@pytest.fixture(scope="session")
def hf(eval_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(eval_dir, attn_implementation="eager", dtype=torch.float32).eval()


ITEMS = [
    MCItem("t/0", "What is the capital of France ?", ("Paris", "Berlin", "Rome", "Madrid"), 0, "geo", "Social", "t"),
    MCItem("t/1", "Which colour is the sky ?", ("green", "blue", "red", "four"), 1, "sci", "STEM", "t"),
    MCItem("t/2", "How many legs does a cat have ?", ("two", "four six eight", "three", "six"), 1, "bio", "STEM", "t"),
    MCItem("t/3", "Water boils at 100 degrees ?", ("yes it does", "no"), 0, "sci", "STEM", "t"),
    MCItem(
        "t/4",
        "A cat sat on the mat . Who sat ?",
        ("the cat", "the dog sat on the mat", "a river"),
        0,
        "x",
        "Other",
        "t",
    ),
]


def _reference_next_logprobs(hf, tok, text: str) -> torch.Tensor:
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        return hf(ids).logits[0, -1].double().log_softmax(-1)


def test_letter_scores_match_transformers(model, hf):
    from tokext.evaluation.evaluate import score_letters
    from tokext.evaluation.mc import letter_prompt

    tok = model.tokenizer
    df = score_letters(model, ITEMS, batch_size=3, progress=False)
    assert list(df["id"]) == [it.id for it in ITEMS]
    worst = 0.0
    for item, (_, row) in zip(ITEMS, df.iterrows()):
        ref = _reference_next_logprobs(hf, tok, letter_prompt(item))
        letters = "ABCD"[: len(item.choices)]
        want = np.array([float(ref[tok.convert_tokens_to_ids(x)]) for x in letters])
        got = np.array([row[f"logp_{x}"] for x in letters])
        worst = max(worst, float(np.abs(want - got).max()))
        assert row["pred"] == letters[int(np.argmax(want))]
        assert row["loss"] == pytest.approx(-want[item.label], abs=1e-4)
        assert row["correct"] == (row["pred"] == row["gold"])
    assert worst < 1e-4, f"max_diff={worst:.2e}"
    assert math.isnan(df.loc[3, "logp_C"])  # 2-option item


def test_letter_tokens_must_be_single_and_distinct(model):
    from tokext.evaluation.evaluate import letter_token_ids

    tok = model.tokenizer
    assert len(set(letter_token_ids(tok, "x\nAnswer:", "ABCD"))) == 4

    class Unk:  # every letter maps to the same id
        def __call__(self, text, add_special_tokens=True):
            return type("E", (), {"input_ids": [len(t) for t in text.split()]})()

        def decode(self, ids):
            return "?"

    with pytest.raises(InputError, match="distinct"):
        letter_token_ids(Unk(), "Answer:", "AB")


def test_continuation_scores_and_acc_norm(model, hf):
    from tokext.evaluation.evaluate import continuation_prompt, score_continuations

    tok = model.tokenizer
    df = score_continuations(model, ITEMS, batch_size=4, progress=False)
    worst = 0.0
    for item, (_, row) in zip(ITEMS, df.iterrows()):
        lls = []
        for choice in item.choices:
            ctx = tok(continuation_prompt(item)).input_ids
            full = tok(continuation_prompt(item) + " " + choice).input_ids
            with torch.no_grad():
                logp = hf(torch.tensor([full])).logits[0].double().log_softmax(-1)
            lls.append(sum(float(logp[p - 1, full[p]]) for p in range(len(ctx), len(full))))
        got = np.array(eval(row["lls"]))
        worst = max(worst, float(np.abs(got - np.array(lls)).max()))
        n_bytes = np.array([len(c.encode()) for c in item.choices])
        assert row["pred"] == "ABCD"[int(np.argmax(lls))]
        assert row["pred_norm"] == "ABCD"[int(np.argmax(np.array(lls) / n_bytes))]
        assert row["correct_norm"] == (row["pred_norm"] == row["gold"])
    assert worst < 1e-3, f"max_diff={worst:.2e}"


def test_acc_norm_math():
    from tokext.evaluation.evaluate import mc_predictions

    # summed log-likelihood prefers the short option; per byte the long one wins (lm-eval acc_norm)
    assert mc_predictions([-10.0, -12.0], ["ab", "abcdefgh"]) == (0, 1)
    assert mc_predictions([-3.0, -1.0], ["é", "x"]) == (1, 1)  # "é" is 2 bytes: -1.5 < -1
    assert mc_predictions([-2.0, -3.0], ["é", "x"]) == (0, 0)


def test_reasoning_loss_matches_teacher_forcing(model, hf):
    from tokext.evaluation.evaluate import evaluate_reasoning
    from tokext.evaluation.tasks import get_task, prompt, target

    examples = get_task("arithmetic").generate(3, seed=0, level=1)
    df = evaluate_reasoning(model, examples, cot=False, max_new_tokens=5, batch_size=2, shots=1, progress=False)
    assert list(df.columns[:8]) == ["id", "task", "level", "cot", "gold", "extracted", "correct", "loss"]
    assert (df["n_new_tokens"] <= 5).all() and df["raw"].map(lambda s: isinstance(s, str)).all()
    tok = model.tokenizer
    for ex, (_, row) in zip(examples, df.iterrows()):
        ctx = tok(prompt(ex, False, shots=1)).input_ids
        full = tok(prompt(ex, False, shots=1) + target(ex, False)).input_ids
        with torch.no_grad():
            logp = hf(torch.tensor([full])).logits[0].double().log_softmax(-1)
        nll = -np.mean([float(logp[p - 1, full[p]]) for p in range(len(ctx), len(full))])
        assert row["loss"] == pytest.approx(nll, abs=1e-4)
    again = evaluate_reasoning(model, examples, cot=False, max_new_tokens=5, batch_size=3, shots=1, progress=False)
    pd.testing.assert_frame_equal(df, again)  # deterministic, whatever the batch size


def test_reasoning_extraction_is_logged(model, monkeypatch):
    import tokext.evaluation.evaluate as ev
    from tokext.evaluation.tasks import get_task

    examples = get_task("arithmetic").generate(2, seed=0, level=1)
    canned = [f"2 + 6 = 8\nResponse: {examples[0].answer}\n\nStart", "I think 7"]
    monkeypatch.setattr(ev, "generate_texts", lambda m, prompts, n, **kw: (canned[: len(prompts)], [9, 3]))
    df = ev.evaluate_reasoning(model, examples, cot=True, max_new_tokens=9, shots=0, progress=False, loss=False)
    assert df.loc[0, "extracted"] == examples[0].answer and bool(df.loc[0, "correct"])
    assert df.loc[1, "extracted"] == "7" and df.loc[1, "raw"] == "I think 7"
    assert df["loss"].isna().all()


def test_mc_cot_logs_raw_and_method(model, monkeypatch):
    import tokext.evaluation.evaluate as ev

    canned = ["Analysis: A is wrong, B fits.\nResponse: B", "blue", "hmm", "A", "nothing"]
    monkeypatch.setattr(ev, "generate_texts", lambda m, prompts, n, **kw: (canned, [5] * 5))
    df = ev.evaluate_mc_cot(model, ITEMS, max_new_tokens=5, progress=False)
    assert df.loc[0, "pred"] == "B" and df.loc[0, "extraction"] == "response_section"
    assert not df.loc[0, "agrees_with_cascade"] and df.loc[0, "cascade_pred"] == "A"
    assert df.loc[1, "pred"] == "B" and bool(df.loc[1, "correct"])  # option text quoted verbatim
    assert list(df["raw"]) == canned


def test_mc_cot_generates(model):
    from tokext.evaluation.evaluate import evaluate_mc_cot

    df = evaluate_mc_cot(model, ITEMS[:2], max_new_tokens=4, batch_size=2, progress=False)
    assert len(df) == 2 and (df["n_new_tokens"] <= 4).all()
    assert set(df.columns) >= {"pred", "correct", "extraction", "agrees_with_cascade", "raw"}


def test_evaluate_applies_interventions(model):
    from tokext.evaluation.evaluate import evaluate
    from tokext.evaluation.spec import EvalSpec
    from tokext.interventions import AttentionTemperature

    spec = EvalSpec("arithmetic", level=1, n=3, shots=1, max_new_tokens=3)
    base = evaluate(model, spec, progress=False)
    hot = evaluate(model, spec, [AttentionTemperature(4.0)], progress=False)
    assert not np.allclose(base["loss"], hot["loss"]), "the intervention did not change the loss"
    pd.testing.assert_frame_equal(base, evaluate(model, spec, progress=False))
    assert not model.hook_dict["blocks.1.attn.hook_pattern"].fwd_hooks  # hooks removed afterwards


def test_no_tokenizer_is_a_clear_error(native):
    from tokext.evaluation.evaluate import score_letters

    with pytest.raises(InputError, match="tokenizer"):
        score_letters(native, ITEMS, progress=False)


def test_docstring_mentions_every_column():
    import tokext.evaluation.evaluate as ev

    for name in ("score_letters", "score_continuations", "evaluate_reasoning", "evaluate_mc_cot"):
        assert re.search(r"Columns:", getattr(ev, name).__doc__)


def test_scoring_too_long_an_item_is_a_clear_error(model):
    from tokext.evaluation.evaluate import score_letters

    n_ctx = model.cfg.n_ctx
    long_item = MCItem(
        id="long",
        question="word " * (2 * n_ctx),
        choices=["a", "b"],
        label=0,
        subject="s",
        category="Other",
        source="test",
    )
    with pytest.raises(InputError, match="context"):
        score_letters(model, [long_item], progress=False)


def _entropy(logp: torch.Tensor) -> float:
    return float(-(logp.exp() * logp).sum())


def test_calibration_objectives_on_multiple_choice(model, hf):
    """ZeroTuning's supervised and unsupervised objectives against plain transformers' next-token log-probabilities."""
    from tokext.evaluation.mc import letter_prompt
    from tokext.evaluation.objectives import answer_entropy, gold_answer_nll

    spec = {"task": "mmlu", "method": "letter", "n": len(ITEMS)}
    tok = model.tokenizer
    nll, over_letters, over_vocab = [], [], []
    for item in ITEMS:
        ref = _reference_next_logprobs(hf, tok, letter_prompt(item))
        letters = torch.stack([ref[tok.convert_tokens_to_ids(x)] for x in "ABCD"[: len(item.choices)]])
        nll.append(-float(letters[item.label]))
        over_letters.append(_entropy(letters.log_softmax(-1)))
        over_vocab.append(_entropy(ref))
    assert gold_answer_nll(spec, items=ITEMS, batch_size=2)(model) == pytest.approx(np.mean(nll), abs=1e-4)
    assert answer_entropy(spec, items=ITEMS)(model) == pytest.approx(np.mean(over_letters), abs=1e-4)
    assert answer_entropy(spec, items=ITEMS, over="vocab", batch_size=3)(model) == pytest.approx(
        np.mean(over_vocab), abs=1e-4
    )
    assert 0 < np.mean(over_letters) < math.log(4)


def test_calibration_objectives_on_a_reasoning_task(model, hf):
    from tokext.evaluation.objectives import answer_entropy, gold_answer_nll
    from tokext.evaluation.tasks import get_task, prompt, target

    spec = {"task": "arithmetic", "level": 1, "n": 3, "shots": 1, "seed": 2}
    examples = get_task("arithmetic").generate(3, seed=2, level=1)
    tok = model.tokenizer
    nll, entropy = [], []
    for ex in examples:
        text = prompt(ex, False, shots=1, demo_seed=2)
        ctx, full = tok(text).input_ids, tok(text + target(ex, False)).input_ids
        with torch.no_grad():
            logp = hf(torch.tensor([full])).logits[0].double().log_softmax(-1)
        nll.append(-np.mean([float(logp[p - 1, full[p]]) for p in range(len(ctx), len(full))]))
        entropy.append(_entropy(_reference_next_logprobs(hf, tok, text)))
    assert gold_answer_nll(spec, batch_size=2)(model) == pytest.approx(np.mean(nll), abs=1e-4)
    assert answer_entropy(spec)(model) == pytest.approx(np.mean(entropy), abs=1e-4)


def test_calibration_objectives_refuse_what_they_cannot_score():
    from tokext.evaluation.objectives import answer_entropy, gold_answer_nll

    with pytest.raises(InputError, match="over='vocab'"):
        answer_entropy({"task": "lookup", "level": 1, "n": 2}, over="choices")
    with pytest.raises(InputError, match="over must be one of"):
        answer_entropy({"task": "mmlu", "method": "letter", "n": 2}, over="bits", items=ITEMS)
    with pytest.raises(InputError, match="continuation"):
        gold_answer_nll({"task": "mmlu", "method": "continuation", "n": 2}, items=ITEMS)
    with pytest.raises(InputError, match="unknown task"):
        gold_answer_nll({"task": "lookups", "n": 2})
    with pytest.raises(InputError, match="EvalSpec"):
        gold_answer_nll("lookup")
