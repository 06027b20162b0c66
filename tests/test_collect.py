"""Streaming statistics against an independent computation from transformers' own attentions.

The reference side loops over sequences, layers, heads and rows in plain numpy, written straight
from the definitions (Gu et al. alpha_k, normalised row entropy, category mass), on attentions that
a separately loaded transformers model returns with ``output_attentions=True``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.tiny_hf import reference_attentions
from tokext.attention.collect import category_table, collect_attention_stats
from tokext.models.hooks import attached, pattern_hook_name
from tokext.models.loading import load_model

TEXTS = [
    "The capital of France is Paris , and the capital of Germany is Berlin .",
    "Why is the sky blue ?",
    "x = 3 ; y = x + 2",
    "a cat sat on the mat !\nShe said : hello world .",
    "one two three",
]


def reference_stats(attentions_per_seq, categories_per_seq, n_layers, n_heads):
    """Definitions, one sequence at a time (each list entry: [layer][head, T, T] for one sequence)."""
    max_t = max(c.shape[0] for c in categories_per_seq)
    received = np.zeros((n_layers, n_heads, max_t))
    count = np.zeros(max_t)
    entropy = np.zeros((n_layers, n_heads))
    mass = np.zeros((n_layers, n_heads, 5))
    n_entropy_rows = n_rows = 0
    for attn, cats in zip(attentions_per_seq, categories_per_seq):
        t = cats.shape[0]
        count[:t] += 1
        n_rows += t
        n_entropy_rows += t - 1
        for layer in range(n_layers):
            for head in range(n_heads):
                a = attn[layer][head]
                for k in range(t):
                    received[layer, head, k] += sum(a[i, k] for i in range(k, t)) / (t - k)
                for i in range(t):
                    row = a[i, : i + 1] / a[i, : i + 1].sum()
                    if i >= 1:
                        h = -sum(p * math.log(p) for p in row if p > 0)
                        entropy[layer, head] += h / math.log(i + 1)
                    for k in range(i + 1):
                        mass[layer, head, cats[k]] += row[k]
    return received / count, entropy / n_entropy_rows, mass / n_rows


@pytest.fixture(scope="module")
def llama_bridge(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def test_hook_pattern_matches_transformers(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir))
    tokens = torch.tensor([model.tokenizer(TEXTS[0]).input_ids])
    seen = {}

    def keep(pattern, hook):
        seen[hook.name] = pattern.detach().double()

    hooks = [(pattern_hook_name(layer), keep) for layer in range(model.cfg.n_layers)]
    with attached(model, hooks), torch.no_grad():
        logits = model(tokens)
    ref, ref_logits = reference_attentions(tiny_hf_dir, tokens)
    for layer, expected in enumerate(ref):
        diff = (seen[pattern_hook_name(layer)] - expected).abs().max().item()
        assert diff < 1e-5, f"layer {layer}: max_diff={diff}"
    assert (logits.double() - ref_logits.double()).abs().max().item() < 1e-4


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stats_match_reference_definitions(tiny_hf_dir, batch_size):
    model = load_model(str(tiny_hf_dir))
    stats = collect_attention_stats(model, TEXTS, batch_size=batch_size, progress=False)
    table = category_table(model)
    attn_per_seq, cats_per_seq = [], []
    for text in TEXTS:
        tokens = torch.tensor([model.tokenizer(text).input_ids])
        ref, _ = reference_attentions(tiny_hf_dir, tokens)
        attn_per_seq.append([a[0].numpy() for a in ref])
        cats = table[tokens[0]].numpy().copy()
        cats[0] = 0  # the first token is its own category
        cats_per_seq.append(cats)
    received, entropy, mass = reference_stats(attn_per_seq, cats_per_seq, model.cfg.n_layers, model.cfg.n_heads)
    assert np.nanmax(np.abs(stats.received - received)) < 1e-5
    assert np.max(np.abs(stats.entropy - entropy)) < 1e-5
    assert np.max(np.abs(stats.category_mass - mass)) < 1e-5
    assert np.allclose(stats.category_mass.sum(-1), 1.0, atol=1e-6)
    expected_rate = 100 * np.mean(received[:, :, 0] > 0.3)
    assert stats.sink_rate(0.3) == pytest.approx(expected_rate)
    for position, eps in [(1, 0.1), (2, 0.05)]:  # Sink_k^eps at later keys
        assert stats.sink_rate(eps, position=position) == pytest.approx(100 * np.mean(received[:, :, position] > eps))


def test_padding_gives_one_by_one_statistics(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir))
    one = collect_attention_stats(model, TEXTS, batch_size=1, progress=False)
    many = collect_attention_stats(model, TEXTS, batch_size=len(TEXTS), progress=False)
    for name in ("received", "entropy", "category_mass", "row_sum"):
        a, b = getattr(one, name), getattr(many, name)
        assert np.allclose(a, b, atol=1e-6, equal_nan=True), name
    key = ["sequence", "layer", "head", "position"]
    alone = one.hidden_sinks(0.1).sort_values(key).reset_index(drop=True)
    padded = many.hidden_sinks(0.1).sort_values(key).reset_index(drop=True)
    assert len(alone) > 0
    assert alone[key + ["token_id", "token"]].equals(padded[key + ["token_id", "token"]])
    assert np.allclose(alone["alpha"], padded["alpha"], atol=1e-6)


def test_hidden_sinks_match_definition(llama_bridge, tiny_llama_dir):
    stats = collect_attention_stats(llama_bridge, TEXTS, batch_size=2, progress=False)
    found = stats.hidden_sinks(tau=0.1)
    expected = set()
    for seq, text in enumerate(TEXTS):
        tokens = torch.tensor([llama_bridge.tokenizer(text).input_ids])
        ref, _ = reference_attentions(tiny_llama_dir, tokens)
        t = tokens.shape[1]
        for layer, a in enumerate(ref):
            for head in range(a.shape[1]):
                for k in range(1, t):
                    alpha = a[0, head, k:, k].sum().item() / (t - k)
                    if alpha > 0.1:
                        expected.add((seq, layer, head, k))
    got = {(r.sequence, r.layer, r.head, r.position) for r in found.itertuples()}
    assert got == expected
    assert len(expected) > 0


def test_layers_subset_and_save_load_merge(llama_bridge, tmp_path):
    stats = collect_attention_stats(llama_bridge, TEXTS[:3], layers=[0, 2], progress=False)
    assert stats.layers == [0, 2] and stats.entropy.shape == (2, llama_bridge.cfg.n_heads)
    path = stats.save(tmp_path / "s.npz")
    loaded = type(stats).load(path)
    assert np.allclose(loaded.received, stats.received, equal_nan=True)
    assert loaded.metadata["model"] == stats.metadata["model"]
    rest = collect_attention_stats(llama_bridge, TEXTS[3:], layers=[0, 2], progress=False)
    together = collect_attention_stats(llama_bridge, TEXTS, layers=[0, 2], progress=False)
    merged = stats.merge(rest)
    assert np.allclose(merged.entropy, together.entropy, atol=1e-9)
    assert np.allclose(merged.received, together.received, atol=1e-9, equal_nan=True)
    assert len(merged.hidden_sinks(0.1)) == len(together.hidden_sinks(0.1))
    frame = stats.to_frame()
    assert list(frame.columns[:4]) == ["layer", "head", "first_token_mass", "entropy"]
    assert len(frame) == 2 * llama_bridge.cfg.n_heads


def test_max_len_truncates(llama_bridge):
    stats = collect_attention_stats(llama_bridge, TEXTS, max_len=4, progress=False)
    assert stats.received.shape[-1] == 4
    assert max(stats.metadata["lengths"]) == 4


def test_native_model_token_input(native):
    tokens = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    stats = collect_attention_stats(native, tokens, batch_size=3, progress=False)
    assert stats.n_sequences == 4
    assert np.all((stats.entropy > 0) & (stats.entropy <= 1 + 1e-6))


@pytest.mark.parametrize("queries,keys,chunk_elements", [(200, 200, 1 << 22), (77, 77, 3000), (50, 70, 1 << 22)])
def test_blocked_plogp_matches_full_rows(monkeypatch, queries, keys, chunk_elements):
    """The causal, blocked sum_k p log p equals the full-row sum on causal patterns (prefix keys too)."""
    import tokext.attention.stats as stats_module

    monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    scores = torch.randn(2, 3, queries, keys)
    offset = keys - queries
    future = torch.ones(queries, keys, dtype=torch.bool).triu(offset + 1)
    pattern = scores.masked_fill(future, float("-inf")).softmax(-1)
    expected = (pattern.double() * torch.log(pattern.double().clamp_min(1e-300))).sum(-1)
    assert torch.allclose(stats_module._sum_plogp(pattern).double(), expected, atol=1e-5)
