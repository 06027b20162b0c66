"""The fine-tuning diagnostic of arXiv 2403.14932 v3: does fine-tuning on a structured dataset make
non-semantic tokens (punctuation, newlines, digits) draw outlier attention?

Fine-tunes the last ``--train-layers`` decoder layers (plus the final norm; embeddings and the tied
unembedding stay frozen) of SmolLM2-135M in fp32 with AdamW on the worked ``cot_solution`` texts of
one task (tokext.evaluation.tasks), then compares attention statistics before and after on (a) held-out task
records ("<question>\\n<cot_solution>" of problems not trained on) and (b) the built-in natural
prompts. Layers below the trained ones cannot change, by construction; full fine-tuning does not fit
in ~10 CPU minutes here. The frozen layers' output for the training texts is computed once, so a
step only runs the trained layers; the first step checks that this gives the full model's loss, and
the fine-tuned weights are copied into the TransformerLens bridge and checked against the trained
model's logits before the "after" statistics are collected.

Writes to ``--out`` (default ``results/finetune_sinks/``): ``stats_{before,after}_{task,natural}.npz``
(AttentionStats), ``profiles.csv`` (per phase, dataset and layer: first-token mass, entropy,
punctuation/whitespace(newline)/digit/other mass, sink rate, hidden sinks per sequence),
``changes.csv`` (after - before), ``hidden_sink_tokens.csv``, ``training_log.csv`` and
``provenance.json``. Weights are saved only with ``--save-dir`` (never inside the repository).

    python experiments/finetune_sinks.py                  # 200 steps: 8 CPU-min, 10-20 min here
    python experiments/finetune_sinks.py --quick --model /path/to/tiny/hf/dir --out /tmp/ft

The study's code is :mod:`tokext.studies.finetune`; this script only runs it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tokext.studies.finetune import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
