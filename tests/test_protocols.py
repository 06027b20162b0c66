"""Published protocols and ACT's conventions, against the papers' own code written out here.

- ``protocol="gu2024"``: Sink_k^eps as Gu et al.'s ``eval_sink_open_source.py`` computes it, from a
  plain transformers forward (``output_attentions``) of the first 64 tokens:
  ``importance = (attn / arange(T, 0, -1)).sum(-2)``, thresholded per sample, averaged over samples,
  layers and heads;
- hidden sinks: ACT keeps the first position above tau (``indices = nonzero(a > tau)[1:]``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import conformance as C
from tokext.attention.collect import collect_attention_stats
from tokext.errors import InputError

LENGTH = 64


def _long_sequences(n: int = 4, length: int = 70) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [[1] + torch.randint(3, C.VOCAB, (length - 1,), generator=gen).tolist() for _ in range(n)]


def _gu_reference(name: str, seqs: list[list[int]], eps: float) -> float:
    """Gu et al.'s code on transformers' own attentions of each sample's first 64 tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(C.family_dir(name), attn_implementation="eager").eval()
    hits = []
    with torch.no_grad():
        for seq in seqs:
            attentions = model(torch.tensor([seq[:LENGTH]]), output_attentions=True).attentions
            for attn in attentions:  # [1, head, query, key]
                importance = (attn / torch.arange(LENGTH, 0, -1)).sum(-2)  # [1, head, key]
                hits.append((importance[0, :, 0] > eps).float())
    return float(100.0 * torch.cat(hits).mean())


def test_gu2024_sink_rate_is_gu_et_al_code():
    seqs = _long_sequences()
    stats = collect_attention_stats(C.family_bridge("Llama"), seqs, protocol="gu2024", progress=False)
    assert stats.metadata["protocol"] == "gu2024" and stats.metadata["max_len"] == LENGTH
    values = stats.per_sequence[..., 0]
    for eps in np.quantile(values, [0.25, 0.5, 0.75]):  # thresholds that split the heads
        ours = stats.sink_rate(eps)
        assert ours == pytest.approx(_gu_reference("Llama", seqs, float(eps)), abs=1e-9)
        assert 0 < ours < 100
    # thresholding the sequence-averaged alpha is another number, and not the protocol's
    median = float(np.median(values))
    assert stats.sink_rate(median, per_sequence=False) != stats.sink_rate(median)


def test_gu2024_refuses_short_inputs_and_settings_it_fixes():
    model = C.family_bridge("Llama")
    seqs = _long_sequences(2) + [[1, 5, 6, 7]]
    with pytest.raises(InputError, match="at least 64 tokens; 1 of 3 are shorter: input 2 \\(4 tokens\\)"):
        collect_attention_stats(model, seqs, protocol="gu2024", progress=False)
    with pytest.raises(InputError, match="drop max_len=32"):
        collect_attention_stats(model, _long_sequences(2), protocol="gu2024", max_len=32, progress=False)
    with pytest.raises(InputError, match="tokenizer's own BOS default"):
        collect_attention_stats(model, _long_sequences(2), protocol="gu2024", prepend_bos=True, progress=False)
    with pytest.raises(InputError, match="unknown protocol 'gu2025'. Did you mean 'gu2024'"):
        collect_attention_stats(model, _long_sequences(2), protocol="gu2025", progress=False)


def test_hidden_sinks_keep_the_first_position_above_tau():
    """Two sequences by hand: ACT drops the first position above tau (position 0 in the first, a later
    one in the second, where position 0 is below tau)."""
    from tokext.attention.stats import AttentionStats

    stats = AttentionStats(layers=[0], n_heads=1, sink_floor=0.05)
    stats.received_sum = np.zeros((1, 1, 4))
    stats.received_count = np.ones(4)
    stats.per_sequence = np.array([[[[0.5, 0.2, 0.15, 0.04]]], [[[0.05, 0.3, 0.2, 0.12]]]])
    stats.events = {
        "sequence": np.array([0, 0, 1, 1, 1]),
        "layer": np.zeros(5, int),
        "head": np.zeros(5, int),
        "position": np.array([1, 2, 1, 2, 3]),
        "token_id": np.arange(5),
        "alpha": np.array([0.2, 0.15, 0.3, 0.2, 0.12]),
    }
    frame = stats.hidden_sinks(tau=0.1)
    assert sorted(zip(frame["sequence"], frame["position"])) == [(0, 1), (0, 2), (1, 2), (1, 3)]


def test_hidden_sinks_on_a_model_follow_act():
    model = C.family_bridge("Llama")
    stats = collect_attention_stats(model, C.sequences(), progress=False)
    tau = 0.1
    frame = stats.hidden_sinks(tau)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(C.family_dir("Llama"), attn_implementation="eager").eval()
    expected = set()
    with torch.no_grad():
        for index, seq in enumerate(C.sequences()):
            attentions = hf(torch.tensor([seq]), output_attentions=True).attentions
            for layer, attn in enumerate(attentions):
                t = len(seq)
                a = (attn[0] / torch.arange(t, 0, -1)).sum(-2)  # ACT's a_k, [head, key]
                for head in range(a.shape[0]):
                    indices = torch.nonzero(a[head] > tau).flatten().tolist()[1:]
                    expected |= {(index, layer, head, k) for k in indices}
    ours = set(zip(frame["sequence"], frame["layer"], frame["head"], frame["position"]))
    assert ours == expected and expected
