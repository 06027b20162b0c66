"""Greedy generation: the KV cache, left-padded batches and interventions give exactly the tokens of
recomputing the full sequence one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from tests.models_fixtures import encode_text, tiny_llama, tiny_native  # noqa: F401  (fixtures)
from tokext.errors import InputError
from tokext.evaluation.generation import greedy_generate
from tokext.interventions.ablation import HeadAblation
from tokext.interventions.calibration import SinkCalibration
from tokext.interventions.emulation import EarlyLayerEmulation
from tokext.interventions.intervene import intervene
from tokext.interventions.patching import PatternPatch
from tokext.interventions.rebalance import SinkRebalance
from tokext.interventions.temperature import AttentionTemperature
from tokext.interventions.zerotuning import ZeroTuning
from tokext.models.hooks import attached, pattern_hook_name

ROW_LOCAL = [
    (),
    (EarlyLayerEmulation(),),
    (EarlyLayerEmulation(alpha=1.0),),
    (SinkRebalance("categories", 0.1),),
    (AttentionTemperature(0.7),),
    (PatternPatch(0, (2,)),),
    (HeadAblation([(1, 0)], "first"),),
    (EarlyLayerEmulation(alpha=1.0), SinkRebalance(scale=0.5)),
    (SinkRebalance((0, 2), scale=0.1),),
    (HeadAblation([(1, 0), (2, 1)], "zero"),),
    (HeadAblation([(1, 0), (2, 3)], "mean"),),
    (ZeroTuning(gamma=0.5, head_gammas=[(2, 1, 3.0)]),),
    # ACT's sinks depend on every row's received attention. A decode step uses the column
    # means of all rows so far, which is what recomputing gives for the last row; earlier
    # rows are re-calibrated by a recompute, though, and change the keys and values of later
    # layers. Calibrating only the last layer leaves those untouched, so there it is exact.
    (SinkCalibration(beta=0.0, heads=[(2, 0), (2, 1), (2, 2), (2, 3)]),),
]


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Recompute the whole unpadded sequence at every step and take the argmax (the ground truth)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def _prompts():
    return [[1] + ids for ids in encode_text(["the cat, sat", "no", "a b c d e.", "x\ny"])]


N_NEW = 8


@pytest.fixture(scope="module")
def plain_tokens(tiny_llama):
    return [naive_greedy(tiny_llama, p, N_NEW) for p in _prompts()]


@pytest.mark.parametrize("ivs", ROW_LOCAL, ids=lambda ivs: " + ".join(map(repr, ivs)) or "none")
def test_kv_cache_and_batching_match_recompute_tiny_llama(tiny_llama, plain_tokens, ivs):
    model, prompts, n = tiny_llama, _prompts(), N_NEW
    with intervene(model, *ivs):
        cached = greedy_generate(model, prompts, n, batch_size=3, stop_at_eos=False)
        recomputed = greedy_generate(model, prompts, n, batch_size=3, use_kv_cache=False, stop_at_eos=False)
        truth = [naive_greedy(model, p, n) for p in prompts]
    assert cached == truth
    assert recomputed == truth
    if ivs:
        assert plain_tokens != truth, "the intervention did not change any generated token"
    else:
        assert plain_tokens == truth


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_bridge_generate_under_intervene_uses_cached_rows(tiny_llama):
    model, prompt, n = tiny_llama, _prompts()[0], 8
    shapes = []
    iv = EarlyLayerEmulation(alpha=1.0)
    with intervene(model, iv) as run, attached(model, [(pattern_hook_name(2), lambda p, h: shapes.append(p.shape))]):
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            use_past_kv_cache=True,
            stop_at_eos=False,
            verbose=False,
            prepend_bos=False,
        )
        forwards, decode_shape = run.forwards, shapes[1]
        truth = naive_greedy(model, prompt, n)
    assert out[0, len(prompt) :].tolist() == truth
    assert forwards == n and decode_shape == (1, 4, 1, len(prompt) + 1)  # one prefill, then one row per step


def test_stop_at_eos_and_validation(tiny_llama, tiny_native):
    model, prompts = tiny_llama, _prompts()[:2]
    free = greedy_generate(model, prompts, 6, stop_at_eos=False)
    stopped = greedy_generate(model, prompts, 6, eos_token_id=free[0][2])
    assert stopped[0] == free[0][:3]
    assert stopped[1] == free[1][: free[1].index(free[0][2]) + 1] if free[0][2] in free[1] else stopped[1] == free[1]
    assert greedy_generate(model, prompts, 0) == [[], []]
    with pytest.raises(InputError, match="eos"):
        greedy_generate(tiny_native, [[1, 2, 3]], 3)
    with pytest.raises(InputError):
        greedy_generate(model, prompts, -1)
    native = greedy_generate(tiny_native, [[5, 6, 7], [8]], 5, stop_at_eos=False)
    assert native == [naive_greedy(tiny_native, p, 5) for p in ([5, 6, 7], [8])]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_smollm2_kv_cache_matches_recompute(smollm2):
    model, n = smollm2, 8
    prompts = ["The capital of France is", "Write a short poem about the ocean at night."]
    ids = [model.tokenizer(p).input_ids for p in prompts]
    for ivs in [(), (EarlyLayerEmulation(),)]:
        with intervene(model, *ivs):
            cached = greedy_generate(model, prompts, n, batch_size=2, stop_at_eos=False)
            truth = [naive_greedy(model, p, n) for p in ids]
            bridge = model.generate(
                torch.tensor([ids[0]]),
                max_new_tokens=n,
                do_sample=False,
                use_past_kv_cache=True,
                verbose=False,
                prepend_bos=False,
                stop_at_eos=False,
            )
        assert cached == truth, f"{ivs}: cached {cached} != recomputed {truth}"
        assert bridge[0, len(ids[0]) :].tolist() == truth[0]
