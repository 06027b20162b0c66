"""Output-level interventions (ResidualPatch, MassiveActivationAblation, HeadOutputAblation), their
calibrations, and perplexity, against computations on plain transformers (tests/conformance.py's oracle
models: the same weights run by transformers, edited by plain torch hooks).

The conformance matrix (tests/test_conformance.py) checks each intervention's log-probabilities on every
family, padded, on both engines, and in cached generation; this module checks what the matrix does not:
bad input, composition through ``fwd_hooks``, the zero/mean relation to the pattern-level HeadAblation,
the calibrations, perplexity and the sweep task.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests import conformance as C
from tests.test_bad_input import attached_hooks
from tokext.errors import InputError, InterventionSpecError, LayerIndexError
from tokext.evaluation.evaluate import evaluate
from tokext.evaluation.perplexity import natural_chunks
from tokext.interventions import (
    HeadAblation,
    HeadOutputAblation,
    MassiveActivationAblation,
    ResidualPatch,
    SinkRebalance,
    calibrate_head_means,
    calibrate_massive_ablation,
    fwd_hooks,
    intervene,
    parse_interventions,
)
from tokext.studies.perplexity import perplexity

TOL = 1e-5


def _forwards(model) -> list[int]:
    """A counter of forward passes of ``model`` (a pre-hook; remove it with the returned handle)."""
    count = [0]
    handle = model.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    return count, handle


# ---------------------------------------------------------------------- bad input


def test_parameters_are_checked_when_built():
    with pytest.raises(InputError, match="mode='mean' needs means"):
        MassiveActivationAblation(1, (3,), mode="mean")
    with pytest.raises(InputError, match="mode='mean' needs means"):
        HeadOutputAblation([(0, 1)], mode="mean")
    with pytest.raises(InputError, match="means has 1 entries for 2 dims"):
        MassiveActivationAblation(1, (3, 4), mode="mean", means=(1.0,))
    with pytest.raises(InputError, match="value has 3 entries for 2 dims"):
        ResidualPatch(0, 0, (1, 2), (1.0, 2.0, 3.0))
    with pytest.raises(InputError, match="positions must be >= 0"):
        ResidualPatch(0, -1, 0)
    with pytest.raises(InputError, match="unknown mode"):
        HeadOutputAblation([(0, 1)], mode="first")
    with pytest.raises(InterventionSpecError, match="needs means"):
        parse_interventions("HeadOutputAblation([(0, 1)], mode='mean')")


@pytest.mark.parametrize(
    "intervention, error, message",
    [
        (ResidualPatch(1, 0, (3, 32)), LayerIndexError, r"dims \[32\] outside the hidden size 32"),
        (ResidualPatch(7, 0, 3), LayerIndexError, "layer 7 out of range"),
        (MassiveActivationAblation(1, (40,)), LayerIndexError, r"dims \[40\] outside the hidden size"),
        (MassiveActivationAblation(-9, (1,)), LayerIndexError, "layer -9 out of range"),
        (HeadOutputAblation([(0, 4)]), LayerIndexError, "head 4 of layer 0 out of range"),
        (HeadOutputAblation([(5, 0)]), LayerIndexError, "layer 5 in heads out of range"),
        (HeadOutputAblation([(0, 1)], "mean", ((1.0, 2.0),)), LayerIndexError, "length.*d_head=8"),
    ],
)
def test_bad_input_fails_before_any_forward_and_leaves_no_hook(intervention, error, message):
    model = C.family_bridge("Llama")
    before = attached_hooks(model)
    count, handle = _forwards(model)
    try:
        with pytest.raises(error, match=message), intervene(model, intervention):
            model(torch.tensor([C.sequences()[0]]))
        with pytest.raises(error, match=message):
            perplexity(model, C.sequences(), intervention)
    finally:
        handle.remove()
    assert count[0] == 0, "a forward pass ran before the error"
    assert attached_hooks(model) == before


def test_positions_beyond_every_sequence_fail_before_any_forward():
    model = C.family_bridge("Llama")
    before = attached_hooks(model)
    count, handle = _forwards(model)
    try:
        with pytest.raises(InputError, match=r"positions \[30\] beyond the sequences \(the longest has 27 tokens\)"):
            perplexity(model, C.sequences(), ResidualPatch(0, (2, 30), 1))
    finally:
        handle.remove()
    assert count[0] == 0 and attached_hooks(model) == before


@pytest.mark.parametrize(
    "intervention",
    [
        ResidualPatch(1, (0, 3), (2, 5), (4.0, -2.0)),
        MassiveActivationAblation(2, (1, 447), "mean", (3.5, -2.0), abs_threshold=50.0, ratio=10.0),
        MassiveActivationAblation(1, tuple(range(8, 20))),  # written as range(8, 20)
        HeadOutputAblation([(0, 1), (2, 3)], "mean", ((1.0, 2.0), (3.0, 4.0))),
    ],
)
def test_text_form_round_trips(intervention):
    assert parse_interventions(repr(intervention)) == (intervention,)


# ---------------------------------------------------------------------- composition and relations


def test_fwd_hooks_compose_with_pattern_edits_like_the_oracle():
    from tests import reference_interventions as R
    from tests.test_conformance import _is_first, ref_resid_patch

    model = C.family_bridge("Llama")
    tokens = torch.tensor([C.sequences()[0]])
    mask = torch.ones_like(tokens)
    hooks = fwd_hooks(model, SinkRebalance(), ResidualPatch(1, (0, 4), (6,), 3.0), HeadOutputAblation([(2, 0)]))
    with torch.no_grad():
        ours = model.run_with_hooks(tokens, fwd_hooks=hooks).double().log_softmax(-1)
        base = model(tokens).double().log_softmax(-1)
    reference = C.oracle_output_forward(
        "Llama",
        tokens,
        mask,
        resid={1: ref_resid_patch((0, 4), (6,), (3.0,))},
        heads={(2, 0): torch.zeros_like},
        edit=R.ref_rebalance(_is_first),
    )
    error = float((ours - reference.double().log_softmax(-1)).abs().max())
    assert error < TOL, f"max_diff={error:.3g}"
    assert float((ours - base).abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["Llama", "gpt-oss", "GPT-2"])
def test_head_output_ablation_agrees_with_pattern_ablation_for_zero_only(name):
    model = C.family_bridge(name)
    tokens, mask = C.padded(C.sequences(), "left")
    real = mask.bool()
    heads = [(0, 1), (2, 3)]
    means = calibrate_head_means(model, C.sequences(), heads)

    def run(*ivs):
        with torch.no_grad(), intervene(model, *ivs):
            return model(tokens, attention_mask=mask).double().log_softmax(-1)

    zero_gap = float((run(HeadOutputAblation(heads)) - run(HeadAblation(heads, "zero"))).abs()[real].max())
    mean_gap = float((run(means) - run(HeadAblation(heads, "mean"))).abs()[real].max())
    assert zero_gap < TOL, f"{name}: zero ablations differ by {zero_gap:.3g}"
    assert mean_gap > 1e-3, f"{name}: a mean output and a mean pattern gave the same log-probs ({mean_gap:.3g})"


# ---------------------------------------------------------------------- calibrations


def test_calibrate_head_means_is_the_mean_o_proj_input_over_real_tokens():
    model = C.family_bridge("Llama")
    oracle = C.oracle_model("Llama")
    heads = [(0, 1), (2, 3)]
    got = calibrate_head_means(model, C.sequences(), heads, batch_size=2)
    assert got.mode == "mean" and got.heads == tuple(heads)
    layers = C.decoder_layers(oracle)
    sums = {pair: torch.zeros(8, dtype=torch.float64) for pair in heads}
    n = 0
    for seq in C.sequences():  # one sequence at a time: no padding in the oracle
        tokens = torch.tensor([seq])
        captured = {}
        handles = [
            C.output_projection(layers[layer]).register_forward_pre_hook(
                lambda module, args, layer=layer, captured=captured: captured.__setitem__(
                    layer, args[0].detach().clone()
                )
            )
            for layer in (0, 2)
        ]
        try:
            C.oracle_forward("Llama", tokens, torch.ones_like(tokens))
        finally:
            for handle in handles:
                handle.remove()
        for layer, head in heads:
            sums[(layer, head)] += captured[layer][0, :, head * 8 : (head + 1) * 8].double().sum(0)
        n += len(seq)
    for i, pair in enumerate(heads):
        expected = (sums[pair] / n).numpy()
        np.testing.assert_allclose(got.means[i], expected, atol=1e-5, err_msg=f"head {pair}")


def test_calibrate_massive_ablation_finds_a_planted_massive_activation():
    model = C.family_bridge("Llama")
    texts = C.sequences()
    with pytest.raises(InputError, match="no massive activations"):
        calibrate_massive_ablation(model, texts)  # a random model has none
    with intervene(model, ResidualPatch(1, 0, 3, -4000.0)):  # what a trained model's BOS carries
        found = calibrate_massive_ablation(model, texts, "mean")
    assert (found.layer, found.dims, found.mode) == (1, (3,), "mean")
    assert found.means == pytest.approx((-4000.0,))
    with intervene(model, ResidualPatch(0, 0, 5, 3000.0)):  # from layer 0 on, carried by the residual stream
        found = calibrate_massive_ablation(model, texts, "zero")
    assert found.layer == 0 and found.dims == (5,) and found.means == pytest.approx((3000.0,))


# ---------------------------------------------------------------------- perplexity


def _hand_chunk_nll(name, chunks, resid=None):
    """Per chunk (one at a time, no padding) summed NLL and count from the oracle model's logits."""
    sums, counts = [], []
    for chunk in chunks:
        tokens = torch.tensor([chunk])
        logits = C.oracle_output_forward(name, tokens, torch.ones_like(tokens), resid=resid)
        logp = logits[0, :-1].double().log_softmax(-1)
        nll = -logp.gather(-1, tokens[0, 1:, None]).squeeze(-1)
        sums.append(float(nll.sum()))
        counts.append(len(chunk) - 1)
    return np.array(sums), np.array(counts)


@pytest.mark.parametrize("name", ["Llama", "Gemma 3"])
def test_perplexity_matches_a_hand_computation(name):
    from tests.test_conformance import ref_resid_patch

    model = C.family_bridge(name)
    seqs = C.sequences()
    chunks = [piece for seq in seqs for piece in (seq[i : i + 10] for i in range(0, len(seq), 10)) if len(piece) >= 2]
    patch = ResidualPatch(1, (0, 2), (4, 9), 5.0)
    result = perplexity(model, seqs, patch, max_len=10, batch_size=3)
    sums, counts = _hand_chunk_nll(name, chunks, resid={1: ref_resid_patch((0, 2), (4, 9), (5.0, 5.0))})
    b_sums, b_counts = _hand_chunk_nll(name, chunks)
    np.testing.assert_allclose(result.chunk_nll, sums / counts, atol=TOL)
    np.testing.assert_allclose(result.baseline.chunk_nll, b_sums / b_counts, atol=TOL)
    assert result.perplexity == pytest.approx(math.exp(sums.sum() / counts.sum()), rel=TOL)
    paired = result.paired(n_boot=2000)
    delta = (sums.sum() - b_sums.sum()) / counts.sum()
    assert paired["delta_nll"] == pytest.approx(delta, abs=TOL)
    assert paired["ci_lo"] <= delta <= paired["ci_hi"] and paired["n_chunks"] == len(chunks)
    assert abs(delta) > 1e-3, "the patch did not move the loss"
    streamed = perplexity(model, seqs, patch, max_len=10, batch_size=3, engine="streaming")
    np.testing.assert_allclose(streamed.chunk_nll, result.chunk_nll, atol=TOL)


def test_perplexity_task_in_sweeps_scores_the_shipped_text():
    import tomllib

    from tokext.studies.config import parse_config

    model = C.family_bridge("Llama")
    frame = evaluate(model, {"task": "perplexity", "n": 3, "length": 12}, progress=False)
    chunks = natural_chunks(model, 3, 12)
    from tokext.evaluation.mc import load_mmlu

    text = "\n\n".join(item.question for item in load_mmlu()[:64]) + "\n\n"
    stream = model.tokenizer(text, add_special_tokens=False)["input_ids"]  # this tokenizer adds no BOS
    assert chunks == [stream[i * 12 : (i + 1) * 12] for i in range(3)]
    sums, counts = _hand_chunk_nll("Llama", chunks)
    np.testing.assert_allclose(frame["loss"].to_numpy(), sums / counts, atol=TOL)
    assert frame["correct"].isna().all() and list(frame["id"]) == ["chunk0", "chunk1", "chunk2"]
    config = parse_config(
        tomllib.loads(
            'version = 1\nname = "p"\nmodels = ["m"]\n[[tasks]]\nname = "perplexity"\nn = 4\nlength = 64\n'
            '[[interventions]]\ntype = "HeadOutputAblation"\nheads = [[0, 1]]\n'
        )
    )
    (spec,) = config.eval_specs()
    assert (spec.task, spec.n, spec.length) == ("perplexity", 4, 64)
    with pytest.raises(Exception, match="length"):
        parse_config(
            tomllib.loads('version = 1\nname = "p"\nmodels = ["m"]\n[[tasks]]\nname = "perplexity"\nlevels = [1]\n')
        )
