"""The causal study: Sun et al.'s massive-activation ablation, whether the sink survives it, the no-op test
of the sink's value, and inactive heads, on SmolLM2-135M and Gemma 3 270M (natural text, paired 95% CIs).

    python experiments/causal.py                                  # both models, the committed settings
    python experiments/causal.py --models smollm2-135m --n-chunks 8 --out /tmp/causal   # a quick look

Writes experiments/results/causal/<model>/ (sun_table.csv, sink_by_layer.csv, noop.csv, inactive_heads.csv,
head_scores.csv, settings.json) and prints the headline tables; `tokext figures --results experiments/results
--out figures` draws fig11_causal from it. The study's code is :mod:`tokext.studies.causal`; this script only
runs it.
"""

import sys

from tokext.studies.causal import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
