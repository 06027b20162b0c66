"""Figures are written the same way every time: a rerun leaves committed PNG and PDF files unchanged."""

from __future__ import annotations

import hashlib

import numpy as np

from tokext.viz import plots


def _draw(out):
    import matplotlib.pyplot as plt

    plots.style()
    fig, ax = plt.subplots()
    ax.plot(np.arange(5), np.arange(5) ** 2)
    return plots.save(fig, out, "curve", "model test | data none")


def test_saved_figures_carry_no_date_and_repeat_byte_for_byte(tmp_path):
    first, second = _draw(tmp_path / "a"), _draw(tmp_path / "b")
    assert [p.suffix for p in first] == [".png", ".pdf"]
    pdf = first[1].read_bytes()
    assert b"CreationDate" not in pdf and b"ModDate" not in pdf
    assert b"matplotlib" not in first[0].read_bytes()  # no library version stamped into the PNG
    digest = lambda paths: [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]  # noqa: E731
    assert digest(first) == digest(second)
