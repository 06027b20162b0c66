"""Norm statistics (``norms=True``) beyond the conformance matrix: norm-weighted attention's row
normalisation on hand-computed patterns, merging and saving, old files, inactive heads, the tables, the
massive-activation cap and ``tokext analyze --norms``. The matrix (tests/test_conformance.py) checks every
field against transformers on every family and both engines."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tokext.attention.collect import collect_attention_stats
from tokext.attention.norms import NormStats
from tokext.attention.residual_stats import MASSIVE_CAP
from tokext.attention.stats import AttentionStats, BatchContext
from tokext.errors import InputError, TokextWarning
from tokext.models.native import native_model

# one head, d_head = d_model = 1, W_O = [[1]]: ‖v_j W_O‖ = |v_j|
VALUES = [2.0, 1.0, 0.5]
PATTERN = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.0],
    [0.2, 0.3, 0.5],
]


def _hand_stats(patterns: torch.Tensor, values: torch.Tensor, real: torch.Tensor) -> AttentionStats:
    """Feed one layer of hand-made patterns [batch, 1, T, T] and values [batch, 1, T, 1] through the
    statistics, as the hook engine does."""
    batch, _, length, _ = patterns.shape
    stats = AttentionStats(layers=[0], n_heads=1)
    stats.start(torch.device("cpu"))
    stats.norms = NormStats([0], 1)
    stats.norms.start(torch.device("cpu"), [torch.ones(1, 1, 1)])
    stats.begin_batch(
        BatchContext(
            real=real,
            categories=torch.zeros(batch, length, dtype=torch.long),
            tokens=torch.arange(length).repeat(batch, 1),
            sequence_ids=torch.arange(batch),
        )
    )
    stats.norms.add_values(0, values)
    stats.update(0, patterns)
    return stats.finish()


def test_norm_weighted_attention_row_normalised_by_hand():
    stats = _hand_stats(torch.tensor([[PATTERN]]), torch.tensor(VALUES).view(1, 1, 3, 1), torch.ones(1, 3, dtype=bool))
    # N_ij = A_ij |v_j|: row 0 [2], row 1 [1, 0.5], row 2 [0.4, 0.3, 0.25] (sum 0.95); each row / its sum
    alpha_0 = (1.0 + 1.0 / 1.5 + 0.4 / 0.95) / 3  # key 0 is seen by rows 0, 1, 2
    alpha_1 = (0.5 / 1.5 + 0.3 / 0.95) / 2  # rows 1, 2
    alpha_2 = 0.25 / 0.95  # row 2
    np.testing.assert_allclose(stats.norm_weighted_received[0, 0], [alpha_0, alpha_1, alpha_2], rtol=1e-6)
    np.testing.assert_allclose(stats.received[0, 0], [(1 + 0.5 + 0.2) / 3, (0.5 + 0.3) / 2, 0.5], rtol=1e-6)
    np.testing.assert_allclose(stats.value_norm[0, 0], VALUES, rtol=1e-7)


def test_norm_weighted_rows_ignore_their_scale_and_padding():
    """A row scaled down (a learned sink's share, an unnormalised edit) gives the same shares; a right-padded
    second sequence of two tokens counts only where it has positions and rows."""
    scaled = torch.tensor(PATTERN) * torch.tensor([[0.6], [0.3], [0.9]])
    short = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 0.0]])  # row 2 and key 2 are padding
    patterns = torch.stack([scaled, short])[:, None]
    values = torch.tensor([VALUES, [4.0, 1.0, 9.0]]).view(2, 1, 3, 1)
    real = torch.tensor([[True, True, True], [True, True, False]])
    stats = _hand_stats(patterns, values, real)
    first = [(1.0 + 1.0 / 1.5 + 0.4 / 0.95) / 3, (0.5 / 1.5 + 0.3 / 0.95) / 2, 0.25 / 0.95]
    # second sequence: row 0 [4] -> [1]; row 1 [1, 0.75] -> [1/1.75, 0.75/1.75]
    second = [(1.0 + 1.0 / 1.75) / 2, (0.75 / 1.75) / 1]
    expected = [(first[0] + second[0]) / 2, (first[1] + second[1]) / 2, first[2]]
    np.testing.assert_allclose(stats.norm_weighted_received[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(stats.value_norm[0, 0], [3.0, 1.0, 0.5], rtol=1e-7)  # (2+4)/2, (1+1)/2, 0.5


@pytest.fixture(scope="module")
def small_native():
    return native_model(n_layers=2, n_heads=4, d_model=32, d_head=8, d_vocab=48, seed=3)


def _tokens(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 48, (int(length),), generator=g).tolist() for length in torch.randint(5, 14, (n,), generator=g)
    ]


FIELDS = (
    "residual_norm",
    "key_norm",
    "value_norm",
    "norm_weighted_received",
    "head_output_norm",
    "top_activations",
    "median_activation",
)


def _same(a: AttentionStats, b: AttentionStats) -> None:
    for field in FIELDS:
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-12, err_msg=field)
    low = {"abs_threshold": 2.0, "ratio": 4.0}
    ma, mb = a.massive_activations(**low), b.massive_activations(**low)
    assert len(ma) > 0
    key = ["sequence", "layer", "position", "dim"]
    ma, mb = ma.sort_values(key).reset_index(drop=True), mb.sort_values(key).reset_index(drop=True)
    assert ma[key].equals(mb[key])
    np.testing.assert_allclose(ma["value"], mb["value"], rtol=1e-6)


def test_merge_and_save_round_trip(small_native, tmp_path):
    seqs = _tokens(6)
    whole = collect_attention_stats(small_native, seqs, batch_size=4, progress=False, norms=True)
    first = collect_attention_stats(small_native, seqs[:2], batch_size=2, progress=False, norms=True)
    second = collect_attention_stats(small_native, seqs[2:], batch_size=3, progress=False, norms=True)
    _same(first.merge(second), whole)
    loaded = AttentionStats.load(whole.save(tmp_path / "stats.npz"))
    _same(loaded, whole)
    assert loaded.has_norms and loaded.to_frame().equals(whole.to_frame())


def test_statistics_without_norms_still_load_and_say_so(small_native, tmp_path):
    stats = collect_attention_stats(small_native, _tokens(3), progress=False)
    loaded = AttentionStats.load(stats.save(tmp_path / "plain.npz"))
    assert not loaded.has_norms and "head_output_norm" not in loaded.to_frame()
    assert "residual_norm_ratio" not in loaded.layer_summary()
    with pytest.raises(InputError, match="collected without norms.*norms=True"):
        _ = loaded.key_norm
    with pytest.raises(InputError, match="norms=True"):
        loaded.massive_activations()
    merged = loaded.merge(collect_attention_stats(small_native, _tokens(2, seed=1), progress=False, norms=True))
    assert not merged.has_norms  # one side has none: the merge keeps none rather than half


def test_frames_gain_the_norm_columns(small_native):
    stats = collect_attention_stats(small_native, _tokens(4), progress=False, norms=True)
    frame, summary = stats.to_frame(), stats.layer_summary()
    for column in ("norm_weighted_received_first", "head_output_norm", "key_norm_first", "value_norm_rest"):
        assert column in frame and frame[column].notna().all()
    np.testing.assert_allclose(frame["head_output_norm"], stats.head_output_norm.ravel())
    residual = stats.residual_norm
    np.testing.assert_allclose(summary["residual_norm_ratio"], residual[:, 0] / np.nanmean(residual[:, 1:], axis=1))
    np.testing.assert_allclose(summary["top_median_ratio"], stats.top_activations[:, 0] / stats.median_activation)


def test_inactive_heads_find_a_head_that_writes_nothing():
    model = native_model(n_layers=2, n_heads=4, d_model=32, d_head=8, d_vocab=48, seed=5)
    o = model.blocks[1].attn.o.original_component
    with torch.no_grad():
        o.weight[:, 16:24] = 0.0  # head 2 of layer 1 writes nothing
    stats = collect_attention_stats(model, _tokens(4), progress=False, norms=True)
    table = stats.inactive_heads(threshold=0.05)
    assert list(zip(table["layer"], table["head"])) == [(1, 2)]
    assert table["relative_head_output_norm"].iloc[0] == 0.0
    assert stats.norm_weighted_received[1, 2, 0] == 0.0  # no value reaches the output: N_ij = 0
    relative = stats.relative_head_output_norm()
    np.testing.assert_allclose(relative.mean(1), 1.0)
    with pytest.raises(InputError, match="threshold"):
        stats.inactive_heads(threshold=-1)


def test_massive_table_warns_when_the_cap_may_hide_entries(small_native):
    stats = collect_attention_stats(small_native, _tokens(2), progress=False, norms=True)
    with pytest.warns(TokextWarning, match=f"all {MASSIVE_CAP} kept entries"):
        table = stats.massive_activations(abs_threshold=0.0, ratio=0.0)
    assert list(table.columns) == ["sequence", "layer", "position", "token", "dim", "value"]
    assert len(table) == 2 * 2 * MASSIVE_CAP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stats.massive_activations().empty  # Sun et al.'s thresholds: nothing in a tiny random model
    with pytest.raises(InputError, match="abs_threshold"):
        stats.massive_activations(abs_threshold=-1.0)


def test_analyze_prints_the_norm_columns(tmp_path, capsys, tiny_llama_dir):
    from tokext.cli import main
    from tokext.models.loading import load_model

    data = tmp_path / "p.txt"
    data.write_text("The capital of France is Paris .\nWhy is the sky blue ?\nx = 3 ; y = x + 2\n")
    out = tmp_path / "o"
    args = ["analyze", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--quiet", "--norms"]
    assert main(args) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.lstrip().startswith("layer"))
    assert "norm-wtd alpha_0" in header and "top/median" in header
    rows = [line.split() for line in text.splitlines() if line.split() and line.split()[0].isdigit()]
    rows = [row for row in rows if "prompts" not in row]
    stats = collect_attention_stats(
        load_model(str(tiny_llama_dir)),
        ["The capital of France is Paris .", "Why is the sky blue ?", "x = 3 ; y = x + 2"],
        progress=False,
        norms=True,
    )
    printed = np.array([[float(x) for x in row[-7:]] for row in rows])
    np.testing.assert_allclose(printed[:, 0], stats.norm_weighted_received[:, :, 0].mean(1), atol=5e-4)
    np.testing.assert_allclose(printed[:, 1], stats.head_output_norm.mean(1), atol=5e-4)
    assert (out / "massive_activations.csv").exists() and AttentionStats.load(out / "stats.npz").has_norms
