"""The causal study (tokext.studies.causal) and figure 11 on a tiny random Llama: the tables it writes, the
no-op edit against a value edit made in plain transformers, and the figure from the saved tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests import conformance as C
from tokext.errors import InputError
from tokext.evaluation.perplexity import natural_chunks
from tokext.studies.causal import CausalSettings, headline, run_causal

SETTINGS = CausalSettings(n_chunks=4, length=12, calib_chunks=2, stats_chunks=4, shares=(0.25,), n_boot=200)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("causal")
    tables = run_causal(C.family_bridge("Llama"), "tiny-llama", out, SETTINGS, log=lambda s: None)
    return out, tables


def _value_edit_nll(chunks):
    """Summed NLL and count of the chunks in plain transformers with every layer's v_0 set to 0."""
    model = C.oracle_model("Llama")
    handles = []

    def zero_first(module, args, output):
        output = output.clone()
        output[:, 0] = 0.0
        return output

    for layer in C.decoder_layers(model):
        handles.append(layer.self_attn.v_proj.register_forward_hook(zero_first))
    sums = counts = 0.0
    try:
        for chunk in chunks:
            tokens = torch.tensor([chunk])
            logits, _, _ = C.oracle_forward("Llama", tokens, torch.ones_like(tokens))
            logp = logits[0, :-1].double().log_softmax(-1)
            sums += float(-logp.gather(-1, tokens[0, 1:, None]).sum())
            counts += len(chunk) - 1
    finally:
        for handle in handles:
            handle.remove()
    return sums, counts


def test_the_tables_and_the_no_op_edit_equal_a_value_edit(study):
    out, tables = study
    assert set(tables) == {"sun_table", "sink_by_layer", "noop", "inactive_heads", "head_scores"}
    assert all((out / "tiny-llama" / f"{name}.csv").is_file() for name in tables)
    sun = tables["sun_table"].iloc[0]
    assert "layer" not in tables["sun_table"] and sun["ppl_orig"] > 1  # a random model has no massive activations
    assert set(tables["sink_by_layer"]["condition"]) == {"original"} and len(tables["sink_by_layer"]) == 3
    chunks = natural_chunks(C.family_bridge("Llama"), 6, 12)[2:]
    sums, counts = _value_edit_nll(chunks)
    own_row_kept, value_zero, rebalanced = (tables["noop"].iloc[i] for i in range(3))
    assert "v_0 = 0" in value_zero["edit"] and "SinkValueRemoval" in own_row_kept["intervention"]
    assert value_zero["ppl"] == pytest.approx(math.exp(sums / counts), rel=1e-5)
    assert own_row_kept["ppl"] != pytest.approx(value_zero["ppl"], rel=1e-4)
    assert rebalanced["ppl"] != pytest.approx(value_zero["ppl"], rel=1e-4)
    inactive = tables["inactive_heads"]
    assert set(inactive["method"]) == {"head_output_norm", "first_token_mass", "random"}
    assert (inactive["n_heads"] == 3).all() and np.isfinite(inactive["rel_loss"]).all()
    assert "| tiny-llama (tokext) | none found |" in headline(out)


def test_figure_11_is_drawn_from_the_saved_tables(study, tmp_path):
    from tokext.viz.figures import causal_study

    out, _ = study
    results = tmp_path / "results"
    results.mkdir()
    (results / "causal").symlink_to(out, target_is_directory=True)
    figure = causal_study(results, tmp_path / "figures")
    assert figure is not None and figure.name == "fig11_causal"
    assert all(path.is_file() and path.stat().st_size > 1000 for path in figure.files)
    assert causal_study(tmp_path / "empty", tmp_path / "figures") is None


def test_bad_settings_are_refused_before_any_run(tmp_path):
    with pytest.raises(InputError, match="stats_chunks"):
        run_causal(C.family_bridge("Llama"), "x", tmp_path, CausalSettings(n_chunks=2, stats_chunks=4))
    with pytest.raises(InputError, match="shares"):
        run_causal(C.family_bridge("Llama"), "x", tmp_path, CausalSettings(shares=(1.5,)))
    assert not list(tmp_path.iterdir())


def test_more_shares_join_the_saved_run(study):
    from tokext.studies.causal import add_shares

    out, tables = study
    before = tables["inactive_heads"]
    table = add_shares(C.family_bridge("Llama"), "tiny-llama", out, [0.1], log=lambda s: None)
    assert len(table) == len(before) + 3 and sorted(set(table["share"])) == [0.1, 0.25]
    again = table[table["share"] == 0.25].set_index("method")["rel_loss"]
    first = before.set_index("method")["rel_loss"]
    assert np.allclose(again.sort_index(), first.sort_index(), atol=1e-9)  # same chunks, scores and ranking
