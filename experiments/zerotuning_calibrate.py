"""Calibrate ZeroTuning's per-head factors on SmolLM2-135M for study (b), on items the study never scores.

ZeroTuning (arXiv 2505.11739) tunes a factor per head on data, supervised (labelled items) or
unsupervised (the model's output entropy). This runs :func:`tokext.interventions.calibrate_zerotuning`
with both objectives of :mod:`tokext.evaluation.objectives` on the study's task (``lookup``, the
levels of ``experiments/b_neighbours.toml``, direct 3-shot prompts) but with another seed, so the
calibration items (and their few-shot demos) differ from the 40 scored ones; the overlap of
questions is checked and recorded. The objective is the mean over the levels.

- ``supervised``: mean NLL of the gold answer after the prompt (the sweep's ``loss``);
- ``unsupervised``: mean entropy of the next-token distribution at the answer position (full
  vocabulary; no answer is read).

Candidates are every head of ``--layers`` (default 0-1, 18 heads: the paper finds early layers react most).
Writes ``<objective>.json`` (chosen factors, baseline and best score, up- and down-effective heads,
every trial's score, settings, provenance) under ``--out`` and prints the ``head_gammas`` line for
the config. A finished objective is skipped unless ``--force``.

    python experiments/zerotuning_calibrate.py                  # both objectives, 8 items per level
    python experiments/zerotuning_calibrate.py --objectives supervised --n 4 --layers 0-1 --out /tmp/zt
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

import tokext
from tokext.errors import InputError
from tokext.evaluation.objectives import answer_entropy, gold_answer_nll
from tokext.evaluation.spec import EvalSpec
from tokext.interventions import calibrate_zerotuning
from tokext.models.info import model_info
from tokext.models.loading import load_model
from tokext.studies.sweep import git_revision

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {"supervised": gold_answer_nll, "unsupervised": answer_entropy}


def _layers(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-", 1)
        return list(range(int(first), int(last) + 1))
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="lookup")
    parser.add_argument("--levels", default="1,2")
    parser.add_argument("--n", type=int, default=8, help="calibration items per level")
    parser.add_argument("--seed", type=int, default=1, help="calibration items' seed (the study scores seed 0)")
    parser.add_argument("--study-n", type=int, default=40, help="items the study scores per level (overlap check)")
    parser.add_argument("--shots", type=int, default=3, help="few-shot demos per prompt (the study's 3)")
    parser.add_argument("--layers", default="0-1", help="candidate layers: every head of each ('0-1' or '0,3,7')")
    parser.add_argument("--objectives", default="supervised,unsupervised")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "zerotuning"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise InputError(f"unknown objectives {unknown}: choose from {', '.join(OBJECTIVES)}")
    levels = [int(x) for x in args.levels.split(",")]
    specs = [EvalSpec(args.task, level=level, n=args.n, seed=args.seed, shots=args.shots) for level in levels]
    items = {spec.level: spec.load() for spec in specs}  # bad task or level: an error before the model loads
    overlap = {
        level: len(
            {ex.question for ex in items[level]}
            & {ex.question for ex in EvalSpec(args.task, level=level, n=args.study_n, seed=0).load()}
        )
        for level in levels
    }
    if any(overlap.values()):
        raise InputError(f"calibration items overlap the study's scored items {overlap}: choose another --seed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = load_model(args.model)
    info = model_info(model)
    candidates = [(layer, head) for layer in _layers(args.layers) for head in range(info.n_heads)]
    for name in objectives:
        path = out / f"{name}.json"
        if path.is_file() and not args.force:
            print(f"[{name}] done already: {path} (--force recomputes)")
            continue
        parts = [OBJECTIVES[name](spec, items=items[spec.level], batch_size=args.batch_size) for spec in specs]

        def score(m, parts=parts) -> float:
            return float(np.mean([part(m) for part in parts]))

        start = time.perf_counter()
        result = calibrate_zerotuning(model, score, candidates=candidates, progress=True)
        seconds = time.perf_counter() - start
        record = {
            "objective": name,
            "head_gammas": [list(t) for t in result.head_gammas],
            "baseline": result.baseline,
            "best": result.best,
            "up": [list(p) for p in result.up],
            "down": [list(p) for p in result.down],
            "profile": [[*pair, value] for pair, value in result.profile.items()],
            "grid": [[*pair, value] for pair, value in result.grid.items()],
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in result.settings.items()},
            "model": info.name,
            "task": args.task,
            "levels": levels,
            "n_per_level": args.n,
            "seed": args.seed,
            "study_overlap": overlap,
            "shots": specs[0].shots,
            "batch_size": args.batch_size,
            "seconds": round(seconds, 1),
            "tokext": tokext.__version__,
            "torch": torch.__version__,
            "git": git_revision(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        path.write_text(json.dumps(record, indent=1))
        print(
            f"[{name}] baseline {result.baseline:.4f} -> best {result.best:.4f} with {len(result.up)} up-effective, "
            f"{len(result.down)} down-effective heads; {seconds:.0f} s -> {path}"
        )
        print("head_gammas = " + json.dumps(record["head_gammas"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
