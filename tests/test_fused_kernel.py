"""The streaming engine's fused C++ kernel and its pure-torch fallback.

- the kernel against a softmax written here in float64 (reach, windows, bidirectional layers,
  softcap, learned sinks, padding, a KV cache, GQA, several work items): output, column sums,
  row sums, sum p log p and the probed column, to 1e-5;
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
