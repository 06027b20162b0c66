"""The long-context study: first-token mass, entropy and hidden sinks by layer, against query position
and context length, on natural text, up to SmolLM2's 8,192 tokens and beyond it (16k, 32k, marked).

    python experiments/long_context.py                                   # the full study (about an hour here)
    python experiments/long_context.py --lengths 512,2048 --windows 1 --out /tmp/lc   # a quick look

Writes experiments/results/long_context/ (layers.csv, positions.csv, hidden_sinks.csv, runs/, provenance.json);
`tokext figures --results experiments/results --out figures` draws fig9_long_context from it. The study's
code is :mod:`tokext.studies.long_context`; this script only runs it.
"""

import sys

from tokext.studies.long_context import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
