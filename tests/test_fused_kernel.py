"""The streaming engine's fused C++ kernel and its pure-torch fallback.

- the kernel against a softmax written here in float64 (reach, windows, bidirectional layers,
  softcap, learned sinks, padding, a KV cache, GQA, several work items): output, column sums,
  row sums, sum p log p and the probed column, to 1e-5;
- the kernel's edits (a score affine per head, key-set gains by the rebalance, plain-scale and ACT
  rules, sparse boosts with and without renormalisation, the record of keys above a threshold)
  against the same edits written here in float64 from the interventions' formulas;
- the kernel's parallel region runs on torch's threads (it is compiled with OpenMP);
- without a compiler (``CXX`` naming none) the engine falls back to pure torch with one
  ``TokextWarning``, gives the hook engine's statistics, and ``TOKEXT_STREAMING_KERNEL=fused`` is an
  error naming the reason; ``torch`` never runs the kernel.

The kernel tests skip where it cannot be built (that machine runs the fallback, tested below).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests import conformance as C
from tokext.attention.collect import collect_attention_stats
from tokext.attention.engines import fused
from tokext.errors import InputError, TokextWarning


def reference(q, k, v, scale, softcap, sinks, causal, window, real_keys, weight, probe):
    """Attention and its statistics in float64, from the formulas."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, n_q, _ = q.shape
    n_k, groups = k.shape[2], heads // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q * scale) @ k.transpose(-1, -2)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    distance = torch.arange(n_k - n_q, n_k)[:, None] - torch.arange(n_k)[None]
    if causal:
        sees = (distance >= 0) & (distance < (window or n_k + 1))
    else:
        sees = distance.abs() <= window if window else torch.ones_like(distance, dtype=torch.bool)
    sees = sees[None, None] & real_keys[:, None, None, :]
    s = s.masked_fill(~sees, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(batch, heads, n_q, 1)], -1)
    full = torch.nan_to_num(torch.softmax(s, -1))
    p = full[..., :n_k]
    plogp = torch.special.xlogy(full, full).sum(-1)
    column = (weight.double()[:, None, :, None] * p).sum(2)
    probed = p.gather(3, probe.view(-1, 1, 1, 1).expand(batch, heads, n_q, 1)).squeeze(-1)
    return p @ v, column, p.sum(-1), plogp, probed


CASES = {
    "causal GQA": {"heads": 9, "kv": 3, "n_q": 70, "n_k": 70, "dim": 64},
    "padding": {"batch": 2, "pad": 3},
    "window, softcap, sinks, padding": {"batch": 2, "pad": 2, "window": 5, "softcap": 30.0, "sinks": True},
    "bidirectional": {"causal": False},
    "bidirectional window, sinks": {"batch": 2, "causal": False, "window": 3, "sinks": True, "pad": 2},
    "KV cache": {"n_q": 3, "n_k": 25},
    "KV cache, window, softcap": {"n_q": 5, "n_k": 25, "window": 7, "softcap": 50.0},
}


@pytest.fixture(scope="module")
def module():
    built, why = fused._build()
    if built is None:
        pytest.skip(f"the fused kernel cannot be built here ({why}); the fallback is tested below")
    return built


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block_entries", [1 << 18, 16])
def test_kernel_matches_the_formulas(module, case, block_entries):
    spec = {
        "batch": 1,
        "heads": 4,
        "kv": 2,
        "n_q": 20,
        "n_k": 20,
        "dim": 8,
        "window": None,
        "softcap": None,
        "sinks": False,
    }
    spec.update({"causal": True, "pad": 0}, **CASES[case])
    gen = torch.Generator().manual_seed(0)
    b, h, kv, n_q, n_k, d = (spec[x] for x in ("batch", "heads", "kv", "n_q", "n_k", "dim"))
    q, k, v = (torch.randn(b, n, t, d, generator=gen) for n, t in ((h, n_q), (kv, n_k), (kv, n_k)))
    sinks = torch.randn(h, generator=gen) if spec["sinks"] else None
    real = torch.ones(b, n_k, dtype=torch.bool)
    real[-1, : spec["pad"]] = False  # the last sequence is left-padded
    weight = real[:, n_k - n_q :].float()
    probe = torch.tensor([spec["pad"]] * b)
    got = module.fused_attention(
        q, k, v, d**-0.5, spec["softcap"] or 0.0, sinks, spec["causal"], spec["window"] or -1,
        real if spec["pad"] else None, weight, probe, True, block_entries,
    )  # fmt: skip
    want = reference(q, k, v, d**-0.5, spec["softcap"], sinks, spec["causal"], spec["window"], real, weight, probe)
    rows = weight.bool()[:, None, :]  # a padded query row's values are never used
    for name, ours, theirs, mask in zip(
        ["output", "column sums", "row sums", "sum p log p", "probe"],
        got,
        want,
        [rows[..., None], None, rows, rows, rows],
    ):
        diff = (ours.double() - theirs).abs()
        diff = diff if mask is None else diff * mask
        assert float(diff.max()) < 1e-5, f"{case}: {name} max_diff={float(diff.max()):.3g}"


def edited_reference(q, k, v, scale, sinks, causal, window, real_keys, edits):
    """The probabilities and output of an edited layer in float64, from the interventions' formulas."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, n_q, _ = q.shape
    n_k, groups = k.shape[2], heads // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q * scale) @ k.transpose(-1, -2)
    if "score_scale" in edits:  # softmax(s * a + b): a temperature (and a learned sink's shift)
        s = s * edits["score_scale"].double().view(1, -1, 1, 1) + edits["score_shift"].double().view(1, -1, 1, 1)
    distance = torch.arange(n_k - n_q, n_k)[:, None] - torch.arange(n_k)[None]
    sees = (distance >= 0) & (distance < (window or n_k + 1)) if causal else torch.ones_like(distance, dtype=torch.bool)
    sees = sees[None, None] & real_keys[:, None, None, :]
    s = s.masked_fill(~sees, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(batch, heads, n_q, 1)], -1)
    full = torch.nan_to_num(torch.softmax(s, -1))
    p, share = full[..., :n_k], full[..., n_k:].sum(-1, keepdim=True)
    if "key_mode" in edits:
        mask, mode, c = edits["key_mask"].double()[:, :, None, :], edits["key_mode"], edits["key_param"]
        on, off = (p * mask).sum(-1, keepdim=True), (p * (1 - mask)).sum(-1, keepdim=True)
        if mode == "rebalance":  # A' = w A renormalised to the row's sum, the sink's share weighted too
            kept, scaled = on + off + share, off + c * on + edits["sink_scale"] * share
            gain_on = torch.where(scaled > 0, c * kept / scaled, 1.0)
            gain_off = torch.where(scaled > 0, kept / scaled, 1.0)
        elif mode == "scale":
            gain_on, gain_off = torch.full_like(on, c), torch.ones_like(off)
        else:  # ACT: sinks times beta, the freed mass to the other keys by weight
            beta = torch.where(off > 0, c, 1.0)
            gain_on, gain_off = beta, 1 + (1 - beta) * on / torch.where(off > 0, off, 1.0)
        p = p * torch.where(mask.bool(), gain_on, gain_off)
    if "boost" in edits:  # the listed keys times the head's gain, optionally back to the row's sum
        before = p.sum(-1, keepdim=True)
        p = p * (1 + (edits["boost_gain"].double().view(1, -1, 1, 1) - 1) * edits["boost"].double())
        if edits["renormalize"]:
            after = p.sum(-1, keepdim=True)
            p = p * torch.where(after > 0, before / torch.where(after > 0, after, 1.0), 0.0)
    return p @ v, p


EDITS = ["temperature", "temperature, sink shift", "rebalance", "scale", "calibrate", "boost", "boost renormalised"]


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("layer", ["causal GQA, padding", "window, sinks, padding"])
@pytest.mark.parametrize("block_entries", [1 << 18, 16])
def test_kernel_edits_match_the_formulas(module, edit, layer, block_entries):
    gen = torch.Generator().manual_seed(1)
    b, h, kv, n, d = 2, 6, 2, 24, 8
    window, sinks = (6, torch.randn(h, generator=gen)) if "window" in layer else (None, None)
    q, k, v = (torch.randn(b, heads, n, d, generator=gen) * 2 for heads in (h, kv, kv))
    real = torch.ones(b, n, dtype=torch.bool)
    real[1, :3] = False
    keys = torch.rand(b, h, n, generator=gen) < 0.2
    keys[:, :, 3] = True  # a heavy column: the first real token of both sequences
    keys[:, 1] = False  # a head whose rows have nothing on the keys
    gains = torch.linspace(0.5, 2.0, h)
    boost = (torch.rand(b, h, n, n, generator=gen) < 0.3) & torch.ones(n, n, dtype=torch.bool).tril()
    counts = boost.sum(-1).int()
    idx = torch.zeros(b, h, n, n, dtype=torch.int32)  # each row's boosted key positions, then unused slots
    for index in np.ndindex(b, h, n):
        columns = boost[index].nonzero().flatten()
        idx[index][: len(columns)] = columns.int()
    kwargs: dict = {}
    edits: dict = {}
    if edit.startswith("temperature"):
        scale = torch.linspace(0.4, 1.5, h)
        shift = torch.randn(h, generator=gen) if "shift" in edit else torch.zeros(h)
        kwargs = {"score_scale": scale, "score_shift": shift}
        edits = {"score_scale": scale, "score_shift": shift}
    elif edit in ("rebalance", "scale", "calibrate"):
        param = {"rebalance": 0.3, "scale": 1.7, "calibrate": 0.4}[edit]
        kwargs = {"key_mask": keys.float(), "key_mode": fused.KEY_MODES[edit], "key_param": param, "sink_scale": 0.5}
        sink_scale = 0.5 if sinks is not None else 1.0
        edits = {"key_mask": keys, "key_mode": edit, "key_param": param, "sink_scale": sink_scale}
    else:
        renormalize = "renormalised" in edit
        kwargs = {"boost_idx": idx, "boost_n": counts, "boost_gain": gains, "boost_renormalize": renormalize}
        edits = {"boost": boost, "boost_gain": gains, "renormalize": renormalize}
    if sinks is None:
        kwargs.pop("sink_scale", None)
    got = module.fused_attention(
        q, k, v, d**-0.5, 0.0, sinks, True, window or -1, real, None, None, False, block_entries, **kwargs
    )[0]
    want, _ = edited_reference(q, k, v, d**-0.5, sinks, True, window, real, edits)
    rows = real[:, None, :, None]  # a padded query row's values are never used
    diff = float(((got.double() - want).abs() * rows).max())
    assert diff < 1e-5, f"{edit} on {layer}: max_diff={diff:.3g}"
    unedited = module.fused_attention(q, k, v, d**-0.5, 0.0, sinks, True, window or -1, real, None, None, False, 64)
    assert float(((unedited[0] - got).abs() * rows).max()) > 1e-3, f"{edit}: the edit changed nothing"


@pytest.mark.parametrize("layer", ["causal GQA, padding", "window, sinks, padding, temperature"])
def test_one_pass_calibration_equals_the_formula(module, layer, monkeypatch):
    """ACT from one kernel pass and the sink columns, ``off * out + (on - off) * y``, against ACT's
    formula in float64, with rows whose gain off the sinks is large (recomputed whole) among them."""
    from types import SimpleNamespace

    from tokext.attention.engines import one_pass_calibration as one_pass
    from tokext.models.architectures import LayerAttention

    gen = torch.Generator().manual_seed(3)
    b, h, kv, n, d, beta = 2, 6, 2, 40, 8, 0.4
    windowed = "window" in layer
    window, sinks = (9, torch.randn(h, generator=gen)) if windowed else (None, None)
    q, k, v = (torch.randn(b, heads, n, d, generator=gen) for heads in (h, kv, kv))
    k[:, :, 5] *= 6  # a key most rows attend to: rows with almost nothing off it
    real = torch.ones(b, n, dtype=torch.bool)
    real[1, :3] = False
    scale, shift = (torch.linspace(0.6, 1.4, h), torch.randn(h, generator=gen)) if windowed else (None, None)
    kwargs = {"score_scale": scale, "score_shift": shift} if windowed else {}
    weight = real.float()
    first = module.fused_attention(
        q, k, v, d**-0.5, 0.0, sinks, True, window or -1, real, weight, None, True, 16, **kwargs
    )  # fmt: skip
    keys = torch.rand(b, h, n, generator=gen) < 0.1
    keys[:, :, 5] = True
    keys &= real[:, None, :]
    stored = SimpleNamespace(query=q, key=k, scaling=d**-0.5, softcap=None, padding=real)
    attention = LayerAttention(causal=True, window=window)
    edits = {"key_mask": keys, "key_mode": "calibrate", "key_param": beta}
    if windowed:
        edits.update(score_scale=scale, score_shift=shift)
    want, _ = edited_reference(q, k, v, d**-0.5, sinks, True, window, real, edits)
    exact_rows = []
    monkeypatch.setattr(one_pass, "MAX_EXACT_SHARE", 1.0)  # (the caller would run two passes for this many)
    own = one_pass._rows_exactly
    monkeypatch.setattr(one_pass, "_rows_exactly", lambda *a, **kw: exact_rows.append(1) or own(*a, **kw))
    got = one_pass.calibrated_output(attention, stored, v, first[0], first[2], first[7], keys, beta, scale, shift)
    assert got is not None
    rows = real[:, None, :, None]
    diff = float(((got.double() - want).abs() * rows).max())
    assert diff < 1e-5, f"{layer}: max_diff={diff:.3g}"
    assert exact_rows, "no row had a gain large enough to be recomputed whole: the test misses that path"
    assert float(((first[0] - got).abs() * rows).max()) > 1e-3, "the calibration changed nothing"
    monkeypatch.setattr(one_pass, "MAX_SINK_KEYS", 1)  # many sinks: the caller runs the two passes
    again = one_pass.calibrated_output(attention, stored, v, first[0], first[2], first[7], keys, beta, scale, shift)
    assert again is None


@pytest.mark.parametrize("exclude_self", [True, False])
def test_kernel_records_the_keys_above_a_threshold(module, exclude_self):
    gen = torch.Generator().manual_seed(2)
    b, h, kv, n, d, threshold = 2, 4, 2, 30, 8, 0.05
    q, k, v = (torch.randn(b, heads, n, d, generator=gen) * 2 for heads in (h, kv, kv))
    real = torch.ones(b, n, dtype=torch.bool)
    real[0, :4] = False
    got = module.fused_attention(
        q, k, v, d**-0.5, 0.0, None, True, -1, real, None, None, False, 16,
        record_threshold=threshold, record_exclude_self=exclude_self, record_cap=int(1 / threshold) + 1,
    )  # fmt: skip
    _, p = edited_reference(q, k, v, d**-0.5, None, True, None, real, {})
    want = p > threshold
    if exclude_self:
        want &= ~torch.eye(n, dtype=torch.bool)
    recorded = torch.zeros_like(want)
    for index in np.ndindex(*got[6].shape):
        recorded[index][got[5][index][: int(got[6][index])].long()] = True
    rows = real[:, None, :, None]  # padded query rows record nothing
    assert torch.equal(recorded & rows, want & rows)
    assert int(got[6].max()) >= 2, "too few keys above the threshold for the test to mean anything"


def test_the_kernel_runs_on_torchs_threads(module):
    """Compiled without OpenMP, at::parallel_for silently runs the kernel on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert module.parallel_threads() == 2
    finally:
        torch.set_num_threads(threads)


def _stats_arrays(stats):
    return {"received": stats.received, "entropy": stats.entropy, "mass": stats.category_mass}


@pytest.fixture
def no_compiler(monkeypatch):
    """A machine without a C++ compiler: ``CXX`` names none, nothing built in this process."""
    monkeypatch.setenv("CXX", "no-such-compiler-tokext")
    monkeypatch.delenv(fused.KERNEL_ENV, raising=False)
    fused._build.cache_clear()
    monkeypatch.setattr(fused, "_NOTICED", [])
    yield
    fused._build.cache_clear()


def test_without_a_compiler_the_engine_falls_back_with_one_notice(no_compiler):
    model, seqs = C.family_bridge("Llama"), C.sequences()
    hooks = collect_attention_stats(model, seqs, batch_size=3, progress=False)
    calls = fused.CALLS["kernel"]
    with pytest.warns(TokextWarning, match=r"pure-torch path.*no C\+\+ compiler"):
        streamed = collect_attention_stats(model, seqs, batch_size=3, progress=False, engine="streaming")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokextWarning)  # said once per process, not per layer or run
        collect_attention_stats(model, seqs[:1], progress=False, engine="streaming")
    assert fused.CALLS["kernel"] == calls, "the kernel ran without a compiler"
    for key, ours in _stats_arrays(streamed).items():
        theirs = _stats_arrays(hooks)[key]
        diff = float(np.nanmax(np.abs(ours - theirs)))
        assert diff < 1e-5, f"fallback {key}: max_diff={diff:.3g} from the hook engine"


def test_forcing_the_kernel_without_a_compiler_is_an_error(no_compiler, monkeypatch):
    monkeypatch.setenv(fused.KERNEL_ENV, "fused")
    with pytest.raises(fused.KernelUnavailableError, match=r"TOKEXT_STREAMING_KERNEL=fused.*no C\+\+ compiler"):
        collect_attention_stats(C.family_bridge("Llama"), C.sequences(), progress=False, engine="streaming")


def test_forcing_torch_never_runs_the_kernel(monkeypatch):
    monkeypatch.setenv(fused.KERNEL_ENV, "torch")
    before = dict(fused.CALLS)
    collect_attention_stats(C.family_bridge("Llama"), C.sequences(), progress=False, engine="streaming")
    assert dict(fused.CALLS) == before


def test_an_unknown_kernel_choice_is_an_error(monkeypatch):
    monkeypatch.setenv(fused.KERNEL_ENV, "fast")
    with pytest.raises(InputError, match="TOKEXT_STREAMING_KERNEL='fast'.*auto, fused, torch"):
        fused.kernel_choice()


def test_capability_flags_follow_the_cpu():
    assert "-DCPU_CAPABILITY_AVX512" in fused.capability_flags({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"})
    assert "-DCPU_CAPABILITY_AVX2" in fused.capability_flags({"avx2", "fma", "f16c"})
    assert fused.capability_flags({"neon"}) == []
