"""Bad input: one clear error naming the problem, and no hook left attached afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from tokext import errors
from tokext.attention.collect import collect_attention_stats
from tokext.attention.stats import AttentionStats
from tokext.cli import main
from tokext.evaluation.prompts import load_prompts
from tokext.models.loading import load_model
from tokext.studies.analyze import analyze


def attached_hooks(model) -> int:
    """Forward hooks on ``model``'s hook points plus forward pre-hooks on the model itself, leaving
    out the permanent hooks TransformerLens wires in on load (OPT's MLP hook aliases)."""
    on_points = sum(1 for point in model.hook_dict.values() for handle in point.fwd_hooks if not handle.is_permanent)
    return on_points + len(model._forward_pre_hooks)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def test_unknown_model_spec_is_clear(tmp_path, model):
    with pytest.raises(errors.UnknownModelError, match="not found"):
        load_model(str(tmp_path / "missing-dir") + "/")
    with pytest.raises(errors.UnknownModelError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(errors.UnknownModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(errors.UnknownModelError, match="non-empty string"):
        load_model("  ")
    assert attached_hooks(model) == 0  # the loaded model is untouched by failed loads


def test_unreachable_hub_id_explains_local_directory(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import; transformers and the hub client ask
    # huggingface_hub.constants.is_offline_mode(), which returns this module attribute
    import socket
    import time

    import huggingface_hub.constants
    from transformer_lens import TransformerBridge  # noqa: F401  (imported up front: only the load is timed)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    started = time.perf_counter()
    with pytest.raises(errors.UnknownModelError, match="local directory") as info:
        load_model("smollm2-135")
    assert attempts == []
    assert time.perf_counter() - started < 2.0  # offline: no timeouts or retries
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
    assert attached_hooks(model) == 0
    with pytest.raises(errors.InputError, match="single string"):
        collect_attention_stats(model, "one two", progress=False)
    assert attached_hooks(model) == 0


def test_sequence_longer_than_context(model):
    tokens = torch.ones(1, model.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(errors.SequenceTooLongError, match="context of 64"):
        collect_attention_stats(model, tokens, progress=False)
    assert attached_hooks(model) == 0
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
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(errors.DataFileError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_prompts(latin1)
    folder = tmp_path / "prompts.txt"
    folder.mkdir()
    with pytest.raises(errors.DataFileError, match="is a directory"):
        load_prompts(folder)
    with pytest.warns(errors.TokextWarning, match="holds 80: using all 80"):
        assert len(load_prompts(None, 100)) == 80  # all built-in prompts, none repeated


@pytest.fixture
def forbid_model_load(monkeypatch):
    """``analyze`` must check its data file before it loads any model."""

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr("tokext.studies.analyze.load_model", no_load)


@pytest.mark.parametrize("kind", ["missing", "not utf-8", "directory", "malformed jsonl"])
def test_bad_data_file_fails_before_loading_and_leaves_no_hook(model, tmp_path, forbid_model_load, kind):
    path = _bad_data_file(tmp_path, kind)
    with pytest.raises(errors.DataFileError):
        analyze(model, data=path, out=tmp_path / "out", progress=False)
    assert attached_hooks(model) == 0
    with pytest.raises(errors.DataFileError):  # a spec: fails before any model load
        analyze("smollm2-135m", data=path, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "not utf-8", "directory", "malformed jsonl"])
def test_cli_bad_data_file_is_one_line_without_traceback(tmp_path, capsys, forbid_model_load, kind):
    path = _bad_data_file(tmp_path, kind)
    code = main(["analyze", "--data", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("tokext analyze: error: ") and str(path) in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def _bad_data_file(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "missing.txt"
    if kind == "not utf-8":
        path = tmp_path / "latin1.jsonl"
        path.write_bytes(b'{"text": "caf\xe9"}\n')
        return path
    if kind == "directory":
        path = tmp_path / "a_folder.txt"
        path.mkdir()
        return path
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    return path


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
    for name in (
        "attention_stats.csv",
        "layer_summary.csv",
        "stats.npz",
        "first_token_mass.png",
        "entropy.pdf",
        "received_by_position.png",
    ):
        assert (out / name).is_file(), name
    assert AttentionStats.load(out / "stats.npz").n_sequences == 2
