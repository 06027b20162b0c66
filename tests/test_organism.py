"""Tests of the model organism: tokenizer, task format, a short training run, save/load."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tokext.errors import DataFileError, InputError
from tokext.evaluation.organism import evaluate_organism, generate_greedy, organism_prompts, sink_mass
from tokext.models.organism import CharTokenizer, load_organism, organism_examples, save_organism
from tokext.studies.organism import train_organism

TINY = dict(d_model=32, n_heads=4, batch_size=32, lr=3e-3, warmup=10, progress=False, threads=1)


@pytest.fixture(scope="module")
def tiny_organism():
    return train_organism(steps=60, log_every=30, seed=0, **TINY)


def test_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    text = "Q:(3+4)*5-2=>7>35>33;A:33"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == text
    assert tok.encode(text, bos=False) == ids[1:]
    assert tok.encode("1", eos=True)[-1] == tok.eos_token_id
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert max(tok.encode(text)) < tok.vocab_size
    assert CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok
    with pytest.raises(InputError, match="not in the vocabulary"):
        tok.encode("Q:x")


def _left_to_right(expression: str) -> list[int]:
    """Running values of a left-to-right evaluation, computed independently of tokext."""
    terms = re.findall(r"([+\-*]?)(\d+)", expression.replace("(", "").replace(")", ""))
    value, out = int(terms[0][1]), []
    for op, num in terms[1:]:
        value = {"+": value + int(num), "-": value - int(num), "*": value * int(num)}[op]
        out.append(value)
    return out


@pytest.mark.parametrize("ops,n_terms,max_operand", [("+-", 3, 9), ("+-*", 4, 9), ("+-*", 3, 99)])
def test_example_format_and_answers(ops, n_terms, max_operand):
    for ex in organism_examples(300, seed=1, n_terms=n_terms, max_operand=max_operand, ops=ops, split="all"):
        assert eval(ex.expression) == ex.answer, ex  # Python precedence agrees with the chain
        steps = _left_to_right(ex.expression)
        assert ex.chain == "".join(f">{v}" for v in steps) and steps[-1] == ex.answer
        assert ex.question == f"{ex.expression}="
        assert ex.text(cot=True) == f"{ex.expression}={ex.chain};A:{ex.answer}"
        assert ex.prompt(cot=False) + ex.completion(cot=False) == f"{ex.expression}=;A:{ex.answer}"
    prefixed = organism_examples(3, seed=1, prefix="Q:", split="all")
    assert [ex.question for ex in prefixed] == ["Q:" + ex.question for ex in organism_examples(3, seed=1, split="all")]


def test_splits_are_disjoint_and_deterministic():
    test = {ex.question for ex in organism_examples(400, seed=0, split="test")}
    train = {ex.question for ex in organism_examples(2000, seed=0, split="train")}
    assert test and train and not test & train
    assert organism_examples(20, seed=5) == organism_examples(20, seed=5)
    with pytest.raises(InputError):
        organism_examples(1, seed=0, ops="/")


def test_short_training_lowers_loss(tiny_organism):
    log = tiny_organism.log
    assert [entry["step"] for entry in log] == [30, 60]
    first_loss = float(torch.log(torch.tensor(float(tiny_organism.tokenizer.vocab_size))))
    assert log[-1]["loss"] < 0.8 * first_loss, f"loss {log[-1]['loss']:.3f} vs chance {first_loss:.3f}"
    assert 0.0 <= evaluate_organism(tiny_organism, n=20) <= 1.0


def test_greedy_matches_one_at_a_time(tiny_organism):
    """Batched greedy decoding with mixed prompt lengths equals decoding each prompt alone."""
    prompts = [ex.prompt(cot) for ex, cot in zip(tiny_organism.examples(6, seed=3), [True, False] * 3)]
    batched = generate_greedy(tiny_organism, prompts, max_new_tokens=8)
    alone = [generate_greedy(tiny_organism, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone


def test_sink_mass_matches_full_pattern(tiny_organism):
    prompts = organism_prompts(tiny_organism, 5, seed=2)
    mass = sink_mass(tiny_organism, n=5, seed=2)
    expected = torch.zeros_like(mass)
    count = 0
    for seq in prompts:
        _, cache = tiny_organism.model.run_with_cache(seq[None])
        for layer in range(mass.shape[0]):
            expected[layer] += cache[f"blocks.{layer}.attn.hook_pattern"][0, :, 1:, 0].sum(-1)
        count += len(seq) - 1
    expected /= count
    assert torch.allclose(mass, expected, atol=1e-5), f"max_diff={(mass - expected).abs().max():.2e}"


def test_save_load_round_trip_gives_identical_logits(tiny_organism, tmp_path):
    save_organism(tiny_organism, tmp_path / "org")
    loaded = load_organism(tmp_path / "org")
    tokens = torch.stack([p[:8] for p in organism_prompts(tiny_organism, 4, seed=0)])
    with torch.no_grad():
        diff = (loaded.model(tokens) - tiny_organism.model(tokens)).abs().max()
    assert diff == 0, f"max_diff={diff:.2e}"
    assert loaded.tokenizer == tiny_organism.tokenizer
    assert loaded.config == tiny_organism.config and loaded.log == tiny_organism.log


def test_save_refuses_to_overwrite(tiny_organism, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=re.escape(str(target))):
        save_organism(tiny_organism, target)
    assert (target / "notes.txt").read_text() == "keep me"
    save_organism(tiny_organism, target, overwrite=True)
    assert (target / "model.pt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    save_organism(tiny_organism, empty)  # an empty directory is fine


def test_load_missing_directory_names_it(tmp_path):
    with pytest.raises(DataFileError, match="nowhere"):
        load_organism(tmp_path / "nowhere")


# ---------------------------------------------------------------------- the organism in sweeps


def _reference_losses(organism, examples, cot):
    """Mean NLL of completion + EOS, one unpadded sequence at a time."""
    tok, out = organism.tokenizer, []
    for ex in examples:
        seq = torch.tensor(tok.encode(ex.text(cot), eos=True))
        first = len(tok.encode(ex.prompt(cot)))
        with torch.no_grad():
            logits = organism.model(seq[None])[0]
        out.append(float(torch.nn.functional.cross_entropy(logits[first - 1 : -1], seq[first:])))
    return out


@pytest.mark.parametrize("cot", [True, False])
def test_evaluate_organism_items_scores_and_losses(tiny_organism, cot):
    from tokext.evaluation.organism import evaluate_organism_items

    examples = tiny_organism.examples(7, seed=5)
    df = evaluate_organism_items(tiny_organism, examples, cot=cot, batch_size=3, progress=False)
    outs = [generate_greedy(tiny_organism, [ex.prompt(cot)])[0] for ex in examples]
    assert list(df["raw"]) == outs
    assert list(df["completion_correct"]) == [o == ex.completion(cot) for o, ex in zip(outs, examples)]
    for row, ex, out in zip(df.itertuples(), examples, outs):
        answer = out.split("A:")[-1] if "A:" in out else (out if not cot else "")
        assert row.correct == (answer.strip() == str(ex.answer))
    want = _reference_losses(tiny_organism, examples, cot)
    assert df["loss"].to_numpy() == pytest.approx(want, abs=1e-5)


def test_organism_sweep_runs_and_interventions_move_it(tiny_organism, tmp_path):
    from tokext.interventions import AttentionTemperature, intervene
    from tokext.models.loading import load_model
    from tokext.models.organism import DEFAULT_TASK
    from tokext.studies.config import load_config, validate
    from tokext.studies.sweep import run_sweep

    save_organism(tiny_organism, tmp_path / "org")
    config = tmp_path / "org.toml"
    config.write_text(f'''version = 1
name = "org"
models = ["{tmp_path / "org"}"]
batch_size = 16
[[tasks]]
name = "organism"
cot = [true]
n = 12
[[interventions]]
type = "AttentionTemperature"
temperature = 3.0
''')
    assert validate(load_config(config))["models"] == {str(tmp_path / "org"): "organism"}
    model = load_model(str(tmp_path / "org"))
    assert model.organism.config["task"] == DEFAULT_TASK
    table = run_sweep(config, tmp_path / "out", progress=False, log=lambda msg: None)
    assert len(table) == 2 and set(table["n_items"]) == {12}
    base = table[table["intervention"] == "none"].iloc[0]
    hot = table[table["intervention"] != "none"].iloc[0]
    examples = tiny_organism.examples(12, seed=0)
    assert base["loss"] == pytest.approx(sum(_reference_losses(tiny_organism, examples, True)) / 12, abs=1e-5)
    with intervene(tiny_organism.model, AttentionTemperature(3.0)):
        hot_losses = _reference_losses(tiny_organism, examples, True)
    assert hot["loss"] == pytest.approx(sum(hot_losses) / 12, abs=1e-5)
    assert abs(hot["loss"] - base["loss"]) > 1e-3  # the intervention reached the logits


def test_organism_and_other_tasks_do_not_mix(tiny_organism, tmp_path):
    from tokext.evaluation.evaluate import evaluate
    from tokext.studies.config import load_config, validate

    save_organism(tiny_organism, tmp_path / "org")
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(
        f'version = 1\nname = "m"\nmodels = ["{tmp_path / "org"}"]\n[[tasks]]\nname = "arithmetic"\nn = 2\n'
    )
    with pytest.raises(DataFileError, match="answers only the task 'organism'"):
        validate(load_config(mixed))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('version = 1\nname = "w"\nmodels = ["smollm2-135m"]\n[[tasks]]\nname = "organism"\nn = 2\n')
    with pytest.raises(DataFileError, match="trained organism directory"):
        validate(load_config(wrong))
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text(
        f'version = 1\nname = "b"\nmodels = ["{tmp_path / "org"}"]\n[[tasks]]\nname = "organism"\nlevels = [1]\n'
    )
    with pytest.raises(DataFileError, match="levels"):
        load_config(bad_key)
    with pytest.raises(InputError, match="trained model organism"):
        evaluate(tiny_organism.model, {"task": "organism", "n": 2, "method": "generate"}, progress=False)
