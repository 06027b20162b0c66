"""The sink-anatomy study on SmolLM2-135M and Gemma 3 270M: per layer first-token mass, norm-weighted
first-token mass, Gu et al.'s norm ratios of h, k and v at position 0, Sun et al.'s top/median |h| and
massive activations, and inactive heads by head-output norm against first-token mass, on natural text at
Gu et al.'s T = 64.

    python experiments/anatomy.py                  # both models, n = 100
    python experiments/anatomy.py --models smollm2-135m --n 8 --out /tmp/anatomy  # a quick look

Writes experiments/results/anatomy/ (layers.csv, heads.csv, inactive.csv, massive.csv, massive_summary.csv,
probe_inputs.csv copied from experiments/results/probe_inputs/, runs/, provenance.json);
`tokext figures --results experiments/results --out figures` draws fig10_sink_anatomy from it. The study's
code is :mod:`tokext.studies.anatomy`; this script only runs it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tokext.studies.anatomy import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
