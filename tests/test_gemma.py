"""Gemma 3 270M from its wheels (slow: the real model): loading, its real ``<bos>``, and statistics on a
sequence longer than its 512-token window against plain transformers' own attentions
(``output_attentions``, eager), with both engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokext.attention.collect import collect_attention_stats
from tokext.evaluation.probe_inputs import probe_inputs
from tokext.models.info import model_info
from tokext.models.inputs import encode

pytestmark = pytest.mark.slow
LENGTH = 640  # > the 512-token window of its sliding layers


@pytest.fixture(scope="module")
def gemma():
    from tokext.models.loading import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def hf_gemma(gemma):
    """The same converted files, loaded by transformers alone (eager attention)."""
    from transformers import AutoModelForCausalLM

    from tokext.models.gguf import converted_chunked_gguf
    from tokext.models.wheels import GEMMA3_270M

    directory = converted_chunked_gguf(GEMMA3_270M)  # cached: only locates the directory
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def test_loads_with_its_window_layout_and_real_bos(gemma, hf_gemma):
    info = model_info(gemma)
    config = hf_gemma.config
    assert (info.n_layers, info.n_heads) == (config.num_hidden_layers, config.num_attention_heads) == (18, 4)
    windowed = [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]
    assert config.sliding_window == 512 and len(windowed) == 15
    for layer in range(info.n_layers):
        assert info.attention[layer].window == (512 if layer in windowed else None), layer
    # Gemma's tokenizer puts <bos> first, once; tokext, TransformerLens and the probe rows agree with it
    text = "The capital of France is"
    own = hf_gemma.config.bos_token_id
    assert own == gemma.tokenizer.bos_token_id == 2
    assert info.prepend_bos and info.bos_token == "<bos>"
    ids = encode(gemma, [text])[0].tolist()
    assert ids[0] == own and ids[1] != own
    assert gemma.to_tokens(text)[0].tolist() == ids
    assert encode(gemma, [text], prepend_bos=False)[0].tolist() == ids[1:]
    natural = probe_inputs(gemma, "natural", n=4, length=64, seed=5)
    assert (natural[:, 0] == own).all() and (natural[:, 1:] != own).all()
    # each row: Gemma's own tokenizer on the MMLU questions the row starts at (drawn with the seed)
    from transformers import AutoTokenizer

    from tokext.evaluation.mc import load_mmlu

    tokenizer = AutoTokenizer.from_pretrained(hf_gemma.name_or_path)
    questions = [item.question for item in load_mmlu()]
    starts = torch.randperm(len(questions), generator=torch.Generator().manual_seed(5))[:4].tolist()
    for row, start in zip(natural.tolist(), starts):
        assert row == tokenizer("\n\n".join(questions[start : start + 8]) + "\n\n").input_ids[:64]
    assert (probe_inputs(gemma, "random", n=4, length=64) != own).all()


def _oracle(hf, tokens: list[int], window: list[int | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha_k [layer, head, key] (mean of A[i, k] over the queries that see k: i >= k, and i - k <
    window in a sliding layer), normalised entropy [layer, head] (rows with >= 2 visible keys,
    H / log(#visible keys)) from transformers' attentions, and alpha_k as if no window existed."""
    with torch.no_grad():
        attentions = hf(torch.tensor([tokens]), output_attentions=True).attentions
    n = len(tokens)
    i = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    received, entropy, windowless = [], [], []
    for layer, pattern in enumerate(attentions):
        p = pattern[0].double()  # [head, query, key]
        visible = k <= i
        if window[layer] is not None:
            visible &= i - k < window[layer]
        assert torch.all(p[:, ~visible] == 0), f"layer {layer}: attention outside the visible keys"
        received.append((p.sum(1) / visible.sum(0)).numpy())
        windowless.append((p.sum(1) / (n - torch.arange(n))).numpy())
        n_keys = visible.sum(1).double()
        rows = n_keys >= 2
        h = -torch.special.xlogy(p, p).sum(-1)  # [head, query]
        entropy.append((h[:, rows] / torch.log(n_keys[rows])).mean(1).numpy())
    return np.stack(received), np.stack(entropy), np.stack(windowless)


@pytest.mark.parametrize("engine", ["hooks", "streaming"])
def test_statistics_beyond_the_window_match_output_attentions(gemma, hf_gemma, engine):
    tokens = probe_inputs(gemma, "natural", n=1, length=LENGTH, seed=3)[0].tolist()
    window = [
        hf_gemma.config.sliding_window if kind == "sliding_attention" else None for kind in hf_gemma.config.layer_types
    ]
    want_received, want_entropy, windowless = _oracle(hf_gemma, tokens, window)
    stats = collect_attention_stats(gemma, [tokens], batch_size=1, progress=False, engine=engine)
    got = stats.received
    assert got.shape == want_received.shape == (18, 4, LENGTH)
    miss = np.abs(got - want_received)
    layer, head, key = np.unravel_index(miss.argmax(), miss.shape)
    assert miss.max() < 1e-5, f"{engine}: max_diff={miss.max():.2e} at layer {layer}, head {head}, key {key}"
    miss = np.abs(stats.entropy - want_entropy)
    assert miss.max() < 1e-5, (
        f"{engine}: entropy max_diff={miss.max():.2e} at {np.unravel_index(miss.argmax(), miss.shape)}"
    )
    # the window matters here: ignoring it (dividing by every later query) would miss by far more
    assert np.abs(got - windowless).max() > 1e-2
