"""Bad input: one clear error naming the problem, and no hook left attached afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from tokext import errors
from tokext.cli import main
from tokext.collect import collect_attention_stats
from tokext.models import load_model
from tokext.prompts import load_prompts
from tokext.stats import AttentionStats


def attached_hooks(model) -> int:
    return sum(len(point.fwd_hooks) for point in model.hook_dict.values()) + len(model._forward_pre_hooks)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def test_unknown_model_spec_is_clear(tmp_path):
    with pytest.raises(errors.UnknownModelError, match="not found"):
        load_model(str(tmp_path / "missing-dir") + "/")
    with pytest.raises(errors.UnknownModelError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(errors.UnknownModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))


def test_unreachable_hub_id_explains_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.UnknownModelError, match="local directory") as info:
        load_model("smollm2-135")
    assert "Did you mean 'smollm2-135m'" in str(info.value)


@pytest.mark.parametrize("layers, message", [([5], "out of range"), ([-9], "out of range"), (["a"], "integers")])
def test_bad_layer_index(model, layers, message):
    with pytest.raises(errors.LayerIndexError, match=message):
        collect_attention_stats(model, ["one two"], layers=layers, progress=False)
    assert attached_hooks(model) == 0


def test_empty_inputs(model):
    with pytest.raises(errors.EmptyInputError):
        collect_attention_stats(model, [], progress=False)
    with pytest.raises(errors.EmptyInputError, match="input 1"):
        collect_attention_stats(model, ["one", "   "], progress=False)
    with pytest.raises(errors.InputError, match="single string"):
        collect_attention_stats(model, "one two", progress=False)


def test_sequence_longer_than_context(model):
    tokens = torch.ones(1, model.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(errors.SequenceTooLongError, match="context of 64"):
        collect_attention_stats(model, tokens, progress=False)
    stats = collect_attention_stats(model, tokens, max_len=8, progress=False)  # truncation is the way out
    assert stats.received.shape[-1] == 8


def test_out_of_vocabulary_ids(model):
    with pytest.raises(errors.InputError, match="outside the vocabulary"):
        collect_attention_stats(model, torch.tensor([[1, 10_000]]), progress=False)


def test_no_hook_left_after_error_inside_forward(model, monkeypatch):
    def boom(self, layer, pattern):
        raise RuntimeError("boom")

    monkeypatch.setattr(AttentionStats, "update", boom)
    with pytest.raises(RuntimeError, match="boom"):
        collect_attention_stats(model, ["one two three"], progress=False)
    assert attached_hooks(model) == 0


def test_user_hooks_survive(model):
    calls = []
    model.blocks[0].attn.hook_pattern.add_hook(lambda t, hook: calls.append(1))
    try:
        collect_attention_stats(model, ["one two three"], progress=False)
        model(torch.tensor([[4, 5, 6]]))
        assert len(calls) == 2  # fired in the collection and in the plain forward afterwards
    finally:
        model.blocks[0].attn.hook_pattern.remove_hooks()


def test_data_files(tmp_path):
    with pytest.raises(errors.DataFileError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(errors.DataFileError, match="line 2"):
        load_prompts(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(errors.DataFileError, match="'text'"):
        load_prompts(wrong)
    with pytest.raises(errors.DataFileError, match="unsupported"):
        (tmp_path / "p.csv").write_text("a\n")
        load_prompts(tmp_path / "p.csv")
    good = tmp_path / "good.txt"
    good.write_text("first line\n\nsecond\\nwith newline\n")
    assert load_prompts(good) == ["first line", "second\nwith newline"]
    assert len(load_prompts(None, 100)) == 100


def test_cli_reports_errors_without_traceback(tmp_path, capsys, tiny_llama_dir):
    code = main(["analyze", "--model", str(tiny_llama_dir), "--data", str(tmp_path / "missing.txt"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "data file not found" in err and "Traceback" not in err
    code = main(["analyze", "--model", str(tmp_path / "nowhere") + "/", "--quiet"])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_cli_analyze_writes_outputs(tmp_path, capsys, tiny_llama_dir):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["one two three", "Why is the sky blue ?"]))
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "first-token mass" in printed and "sink rate" in printed
    for name in ("attention_stats.csv", "layer_summary.csv", "stats.npz", "first_token_mass.png",
                 "entropy.pdf", "received_by_position.png"):
        assert (out / name).is_file(), name
    assert AttentionStats.load(out / "stats.npz").n_sequences == 2
