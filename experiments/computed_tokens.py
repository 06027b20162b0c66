"""Extra computed tokens: filler tokens before the answer (count and position) and CoT length, on a task.

For each condition (see ``tokext.studies.computed_tokens.run_computed_tokens_study``) it measures greedy
accuracy, the teacher-forced answer loss and the attention on the filler span (mass from later
queries, received attention alpha_k of filler vs. other keys, share of heads where a filler is a
sink). Writes under ``--out/<model spec name>/<task>-L<level>/``:

- ``summary.csv``: one row per condition (appended as each finishes);
- ``items.csv``: one row per (condition, item): extracted answer, correctness, loss, raw text;
- ``span_by_head.csv``: one row per (condition, layer, head): the filler-span statistics;
- ``provenance.json``: model, task, level, n, seed, counts, positions, git rev, date, timings.

An interrupted run resumes: finished conditions (rows of ``summary.csv``) are kept and skipped when
the settings other than the conditions (counts, positions, CoT lengths) are the same, so a study can
also be extended; other settings need ``--force``. Every setting is checked before the model loads.

    python experiments/computed_tokens.py --quick                 # smoke test, about 1 min here
    python experiments/computed_tokens.py --n 16 --counts 0,1,4,16,64 --accuracy greedy-match  # ~7 min here

The study's code is :mod:`tokext.studies.computed_tokens_run`; this script only runs it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tokext.studies.computed_tokens_run import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
