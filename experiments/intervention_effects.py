"""What each intervention does to SmolLM2-135M on real prompts: loss, logits and first-token mass.

For every intervention at its default settings (those without defaults get the value listed in
``INTERVENTIONS``), on the first ``--n-prompts`` built-in prompts (``tokext/data/prompts.txt``):

- mean next-token loss without and with the intervention, and max |delta logit| (real positions);
- first-token attention mass per layer (mean over heads), from ``collect_attention_stats`` run
  inside ``intervene`` (the statistics hooks attach after the intervention's, so they see the
  edited pattern; rows are renormalised first, and the raw mean row sum is reported too).

Writes ``summary.csv``, ``first_token_mass_by_layer.csv`` (the mass itself, baseline column
first), ``delta_first_token_mass_by_layer.csv`` (with minus without), ``entropy_by_layer.csv`` and
``provenance.json`` under ``--out`` (default ``experiments/results/interventions``).

    python experiments/intervention_effects.py                 # 64 prompts, ~8 min on 2 CPUs
    python experiments/intervention_effects.py --n-prompts 8   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import pandas as pd
import torch

import tokext
from tokext.evaluation.prompts import load_prompts
from tokext.models.info import model_info
from tokext.models.loading import load_model
from tokext.studies.profiles import default_interventions, intervention_profiles
from tokext.studies.sweep import git_revision

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "interventions"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = load_model(args.model)
    info = model_info(model)
    prompts = load_prompts(None, n=args.n_prompts)
    summary, by_layer = intervention_profiles(
        model, prompts, default_interventions(info.n_layers, info.n_heads), batch_size=args.batch_size, progress=True
    )
    order = ["baseline", *summary["intervention"]]
    mass = by_layer.pivot(index="layer", columns="intervention", values="first_token_mass")[order]
    entropy = by_layer.pivot(index="layer", columns="intervention", values="entropy")[order]
    delta = mass[order[1:]].sub(mass["baseline"], axis=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "summary.csv", index=False, float_format="%.5g")
    mass.reset_index().to_csv(out / "first_token_mass_by_layer.csv", index=False, float_format="%.5g")
    delta.reset_index().to_csv(out / "delta_first_token_mass_by_layer.csv", index=False, float_format="%.5g")
    entropy.reset_index().to_csv(out / "entropy_by_layer.csv", index=False, float_format="%.5g")
    (out / "provenance.json").write_text(
        json.dumps(
            {
                "model": info.name,
                "source": info.source,
                "prompts": "tokext/data/prompts.txt (built-in)",
                "n_prompts": len(prompts),
                "batch_size": args.batch_size,
                "padding": "right",
                "tokext": tokext.__version__,
                "torch": torch.__version__,
                "git": git_revision(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "notes": "first-token mass = mean over heads of the share of each real row's (renormalised) "
                "attention on its first token; PatternPatch/HeadAblation/AttentionTemperature have "
                "no defaults: values as listed in the summary",
            },
            indent=1,
        )
    )
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(summary.drop(columns=["n_tokens"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
