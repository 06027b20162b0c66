"""Paired comparison of a method against the baseline on the same items (per-item correctness, per-item loss).

Both arrays hold one boolean per item, in the same item order. The accuracy difference is
``mean(method) - mean(baseline)``; its uncertainty comes from a percentile bootstrap over items, and
its significance from the exact McNemar test on the discordant items (``n01``: the method fixes a
baseline error; ``n10``: the method breaks a baseline success).

The bootstrap draws, per replicate, how many of the ``n`` resampled items are of each kind (+1, -1 or
0 difference) from a multinomial: the same distribution as resampling item indices, in O(n_boot)
memory, so 10,000 replicates of all 14,042 MMLU items take milliseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest

from tokext.errors import InputError


def _as_pair(baseline: Any, method: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to two 1-D boolean arrays of equal, non-zero length."""
    arrays = []
    for name, x in (("baseline", baseline), ("method", method)):
        a = np.asarray(x)
        if a.ndim != 1:
            raise InputError(f"{name} must be 1-D (one entry per item), got shape {a.shape}")
        if a.dtype != bool:
            bad = ~np.isin(a, (0, 1))
            if bad.any():
                examples = a[bad][:3].tolist()
                raise InputError(f"{name} must hold booleans or 0/1, got values such as {examples}")
            a = a.astype(bool)
        arrays.append(a)
    b, m = arrays
    if len(b) != len(m):
        raise InputError(f"baseline and method must score the same items, got {len(b)} and {len(m)} entries")
    if len(b) == 0:
        raise InputError("no items: baseline and method are empty")
    return b, m


def discordant_counts(baseline: Any, method: Any) -> tuple[int, int]:
    """``(n01, n10)``: items the method gets right and the baseline wrong, and the reverse."""
    b, m = _as_pair(baseline, method)
    return int((~b & m).sum()), int((b & ~m).sum())


def paired_bootstrap_ci(
    baseline: Any, method: Any, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(diff, lo, hi)``: the accuracy difference and its percentile-bootstrap interval at ``level``.

    >>> paired_bootstrap_ci([True, False, True], [True, False, True])
    (0.0, 0.0, 0.0)
    """
    b, m = _as_pair(baseline, method)
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise InputError(f"level must be strictly between 0 and 1, got {level!r}")
    n = len(b)
    n01, n10 = int((~b & m).sum()), int((b & ~m).sum())
    diff = (n01 - n10) / n
    probs = np.array([n01, n10, n - n01 - n10], dtype=float) / n
    counts = np.random.default_rng(seed).multinomial(n, probs, size=int(n_boot))
    boot = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(diff), float(lo), float(hi)


def mcnemar_exact(baseline: Any, method: Any) -> float:
    """Two-sided exact McNemar p-value: a binomial test of ``n01`` out of ``n01 + n10`` against 1/2.

    >>> round(mcnemar_exact([1] * 10 + [0] * 2, [0] * 10 + [1] * 2), 4)
    0.0386
    """
    n01, n10 = discordant_counts(baseline, method)
    if n01 + n10 == 0:
        return 1.0
    return float(binomtest(n01, n01 + n10, 0.5, alternative="two-sided").pvalue)


def paired_mean_ci(
    baseline: Any, method: Any, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(diff, lo, hi)``: the mean of ``method - baseline`` over items (a per-item value such as the
    answer loss) and its percentile-bootstrap interval at ``level``, resampling items.

    Items where either value is NaN are left out; with none left the result is NaN.

    >>> paired_mean_ci([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    (0.5, 0.5, 0.5)
    """
    b, m = (np.asarray(x, dtype=float) for x in (baseline, method))
    if b.ndim != 1 or b.shape != m.shape:
        raise InputError(f"baseline and method must be 1-D with one value per item, got shapes {b.shape} and {m.shape}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise InputError(f"level must be strictly between 0 and 1, got {level!r}")
    d = (m - b)[~(np.isnan(b) | np.isnan(m))]
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(d))  # replicates per batch of index draws: bounded memory
    boot = np.concatenate(
        [
            d[rng.integers(0, len(d), size=(min(chunk, n_boot - start), len(d)))].mean(1)
            for start in range(0, int(n_boot), chunk)
        ]
    )
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(d.mean()), float(lo), float(hi)


def paired_summary(
    baseline: Any, method: Any, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> dict[str, float | int]:
    """Accuracies, their difference with its bootstrap interval, the McNemar p-value, discordant counts."""
    b, m = _as_pair(baseline, method)
    diff, lo, hi = paired_bootstrap_ci(b, m, n_boot=n_boot, seed=seed, level=level)
    n01, n10 = discordant_counts(b, m)
    return {
        "n": len(b),
        "acc_baseline": float(b.mean()),
        "acc_method": float(m.mean()),
        "diff": diff,
        "ci_lo": lo,
        "ci_hi": hi,
        "p_mcnemar": mcnemar_exact(b, m),
        "n01": n01,
        "n10": n10,
    }
