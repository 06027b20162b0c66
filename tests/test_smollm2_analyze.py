"""The real pretrained model: SmolLM2-135M-Instruct, offline, shows the known first-token sink."""

from __future__ import annotations

import numpy as np
import pytest

from tokext.studies.analyze import analyze

pytestmark = pytest.mark.slow


def test_smollm2_first_token_sink(smollm2, tmp_path):
    result = analyze(smollm2, n=16, out=tmp_path, progress=False)
    mass = result.stats.first_token_mass.mean(1)  # per layer, head-averaged
    upper = mass[3:]
    assert np.mean(upper > 0.4) > 0.8, f"first-token mass by layer: {np.round(mass, 2)}"
    assert result.stats.sink_rate(0.3) > 50
    assert (tmp_path / "first_token_mass.png").is_file()


def test_smollm2_pattern_edits_land_and_generation_is_sane(smollm2):
    from tokext.models.probes import check_pattern_edits

    assert all(check_pattern_edits(smollm2).values())
    tokens = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False, prepend_bos=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, tokens.shape[1] :])
