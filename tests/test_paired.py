"""Paired statistics against hand computations: exact McNemar from binomial sums, the bootstrap interval
against the normal approximation of a paired difference, a plain index-resampling bootstrap, and
identity cases."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokext.errors import InputError
from tokext.studies.paired import (
    discordant_counts,
    mcnemar_exact,
    paired_bootstrap_ci,
    paired_mean_ci,
    paired_summary,
)


def table(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-item (baseline, method) arrays with the given 2x2 counts (n10: baseline right, method wrong)."""
    base = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    meth = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    return np.array(base, bool), np.array(meth, bool)


def exact_two_sided(b: int, c: int) -> float:
    """Two-sided exact McNemar by hand: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2), capped at 1."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize("n10, n01", [(10, 2), (2, 10), (5, 5), (0, 7), (1, 0), (30, 18), (100, 70)])
def test_mcnemar_matches_hand_computation(n10, n01):
    base, meth = table(40, n10, n01, 25)
    assert mcnemar_exact(base, meth) == pytest.approx(exact_two_sided(n10, n01), rel=1e-9)


def test_mcnemar_known_value():
    base, meth = table(0, 10, 2, 0)
    assert mcnemar_exact(base, meth) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.03857


def test_no_discordant_pairs():
    base, meth = table(5, 0, 0, 3)
    assert mcnemar_exact(base, meth) == 1.0
    assert paired_bootstrap_ci(base, meth) == (0.0, 0.0, 0.0)


def test_identity_and_sign():
    rng = np.random.default_rng(0)
    x = rng.random(500) < 0.6
    diff, lo, hi = paired_bootstrap_ci(x, x)
    assert (diff, lo, hi) == (0.0, 0.0, 0.0)
    y = rng.random(500) < 0.6
    d1, lo1, hi1 = paired_bootstrap_ci(x, y, seed=3)
    d2, lo2, hi2 = paired_bootstrap_ci(y, x, seed=3)
    assert d1 == pytest.approx(-d2)
    assert d1 == pytest.approx(y.mean() - x.mean())
    assert lo1 <= d1 <= hi1
    assert mcnemar_exact(x, y) == pytest.approx(mcnemar_exact(y, x))


def test_bootstrap_matches_normal_approximation():
    """Large sample: the percentile interval is close to diff +- z * sd(d) / sqrt(n)."""
    rng = np.random.default_rng(1)
    n = 20000
    base = rng.random(n) < 0.55
    flip = rng.random(n) < 0.15
    meth = np.where(flip, ~base, base)
    meth[rng.random(n) < 0.03] = True  # a small real improvement
    d = meth.astype(float) - base.astype(float)
    se = d.std(ddof=1) / np.sqrt(n)
    diff, lo, hi = paired_bootstrap_ci(base, meth, n_boot=20000, seed=0)
    assert diff == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - 1.959964 * se, abs=0.1 * se)
    assert hi == pytest.approx(d.mean() + 1.959964 * se, abs=0.1 * se)
    _, lo90, hi90 = paired_bootstrap_ci(base, meth, n_boot=20000, seed=0, level=0.90)
    assert lo < lo90 < hi90 < hi


def test_bootstrap_matches_index_resampling():
    """The multinomial shortcut gives the same interval as resampling item indices (up to MC error)."""
    rng = np.random.default_rng(2)
    base, meth = rng.random(300) < 0.5, rng.random(300) < 0.6
    idx = rng.integers(0, 300, size=(20000, 300))
    boot = meth[idx].mean(1) - base[idx].mean(1)
    want_lo, want_hi = np.percentile(boot, [2.5, 97.5])
    _, lo, hi = paired_bootstrap_ci(base, meth, n_boot=20000, seed=5)
    assert lo == pytest.approx(want_lo, abs=0.006) and hi == pytest.approx(want_hi, abs=0.006)


def test_mean_difference_interval_matches_normal_approximation():
    """Per-item losses: the percentile interval of the mean change is close to mean +- z * sd / sqrt(n)."""
    rng = np.random.default_rng(4)
    n = 5000
    base = rng.gamma(2.0, 0.5, n)
    meth = base + rng.normal(0.05, 0.4, n)
    d = meth - base
    se = d.std(ddof=1) / np.sqrt(n)
    diff, lo, hi = paired_mean_ci(base, meth, n_boot=20000, seed=0)
    assert diff == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - 1.959964 * se, abs=0.1 * se)
    assert hi == pytest.approx(d.mean() + 1.959964 * se, abs=0.1 * se)
    with_nan = np.append(meth, np.nan)
    assert paired_mean_ci(np.append(base, 1.0), with_nan, n_boot=20000, seed=0) == (diff, lo, hi)
    assert all(np.isnan(paired_mean_ci([np.nan], [1.0])))
    with pytest.raises(InputError, match="1-D"):
        paired_mean_ci([1.0, 2.0], [1.0])


def test_bootstrap_seeded():
    rng = np.random.default_rng(3)
    base, meth = rng.random(200) < 0.5, rng.random(200) < 0.5
    assert paired_bootstrap_ci(base, meth, seed=7) == paired_bootstrap_ci(base, meth, seed=7)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_summary_counts(pairs):
    base = np.array([p[0] for p in pairs])
    meth = np.array([p[1] for p in pairs])
    s = paired_summary(base, meth, n_boot=200)
    n01 = sum(1 for b, m in pairs if not b and m)
    n10 = sum(1 for b, m in pairs if b and not m)
    assert (s["n"], s["n01"], s["n10"]) == (len(pairs), n01, n10)
    assert s["acc_baseline"] == pytest.approx(sum(b for b, _ in pairs) / len(pairs))
    assert s["acc_method"] == pytest.approx(sum(m for _, m in pairs) / len(pairs))
    assert s["diff"] == pytest.approx((n01 - n10) / len(pairs))
    assert -1 <= s["ci_lo"] <= s["ci_hi"] <= 1
    assert s["p_mcnemar"] == pytest.approx(exact_two_sided(n10, n01) if n01 + n10 else 1.0)
    assert discordant_counts(base.astype(int), meth.astype(int)) == (n01, n10)


def test_bad_inputs():
    with pytest.raises(InputError, match="same items"):
        paired_summary([True, False], [True])
    with pytest.raises(InputError, match="empty"):
        paired_bootstrap_ci([], [])
    with pytest.raises(InputError, match="1-D"):
        mcnemar_exact(np.ones((2, 2), bool), np.ones((2, 2), bool))
    with pytest.raises(InputError, match="0/1"):
        mcnemar_exact([0, 2], [1, 1])
    with pytest.raises(InputError, match="level"):
        paired_bootstrap_ci([1, 0], [1, 1], level=95)
    with pytest.raises(InputError, match="n_boot"):
        paired_bootstrap_ci([1, 0], [1, 1], n_boot=0)
