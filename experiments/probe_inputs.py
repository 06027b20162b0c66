"""Gu et al.'s Table 1 on tokext's offline models: Sink_1^0.3 on natural text, random tokens and one token
repeated, each with and without a BOS token.

For each model and probe kind (:func:`tokext.probe_inputs`, n rows of T tokens, seed 0) and each BOS
choice, the statistics are collected under Gu et al.'s protocol (``protocol="gu2024"``: T = 64, each
row's alpha thresholded at 0.3, then averaged) and the script records:

- ``sink_1``: Sink_1^0.3 (%), the share of (layer, head) pairs whose first position (the BOS when there is
  one) receives alpha > 0.3;
- ``sink_2``: the same for the second position (with a BOS: the first content token);
- ``first_token_mass``: attention on position 0, averaged over layers, heads and query rows;
- ``gu_default``: whether this BOS choice is Gu et al.'s (natural text as the tokenizer encodes it,
  random and repeated rows without BOS).

Writes ``probe_inputs.csv``, ``probe_inputs.md`` (the table, with Gu et al.'s published rows) and
``provenance.json`` under ``--out`` (default ``experiments/results/probe_inputs/``).

    python experiments/probe_inputs.py            # both models, ~5 min here
    python experiments/probe_inputs.py --models smollm2-135m --n 8             # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pandas as pd

import tokext
from tokext.evaluation.probe_inputs import KINDS, probe_bos

GU_TABLE_1 = {  # Gu et al. 2024, Table 1: Sink_1^0.3 (%), natural / random / repeated, their BOS defaults
    "GPT2-XL": (77.00, 70.29, 62.28),
    "LLaMA2-7B": (92.47, 90.13, 0.00),
    "Mistral-7B": (97.49, 75.21, 0.00),
}
OUT = Path(__file__).resolve().parent / "results" / "probe_inputs"


def measure(spec: str, n: int, seed: int, batch_size: int) -> list[dict]:
    model = tokext.load_model(spec)
    info = tokext.model_info(model)
    rows = []
    for kind in KINDS:
        for bos in (True, False):
            tokens = tokext.probe_inputs(model, kind, n=n, length=64, seed=seed, bos=bos)
            started = time.perf_counter()
            stats = tokext.collect_attention_stats(
                model, tokens, batch_size=batch_size, progress=False, protocol="gu2024", dataset=f"probe:{kind}"
            )
            rows.append(
                {
                    "model": info.name,
                    "kind": kind,
                    "bos": bos,
                    "bos_token": info.bos_token,
                    "gu_default": bos == probe_bos(model, kind),
                    "sink_1": stats.sink_rate(),
                    "sink_2": stats.sink_rate(position=1),
                    "first_token_mass": float(stats.first_token_mass.mean()),
                    "n": n,
                    "T": int(tokens.shape[1]),
                    "seed": seed,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(f"{info.name:>22} {kind:>9} bos={bos!s:>5}: Sink_1 {rows[-1]['sink_1']:6.2f}%", flush=True)
    return rows


def markdown(table: pd.DataFrame) -> str:
    lines = [
        (
            "Sink_1^0.3 (%), Gu et al.'s protocol (T = 64, per-row threshold), n = "
            f"{int(table['n'].iloc[0])} rows per cell, seed {int(table['seed'].iloc[0])}. "
            "Bold: the row's BOS choice is Gu et al.'s default."
        ),
        "",
        "| model | BOS | natural | random | repeated |",
        "|---|---|---|---|---|",
    ]
    for model, part in table.groupby("model", sort=False):
        for bos in (True, False):
            cells = []
            for kind in KINDS:
                row = part[(part["kind"] == kind) & (part["bos"] == bos)].iloc[0]
                value = f"{row['sink_1']:.2f}"
                cells.append(f"**{value}**" if row["gu_default"] else value)
            token = str(part["bos_token"].iloc[0]).replace("|", "\\|")  # a pipe would end the cell
            label = f"`{token}` first" if bos else "none"
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    for model, values in GU_TABLE_1.items():
        lines.append(f"| {model} (Gu et al.) | their default | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table-only", action="store_true", help="rewrite probe_inputs.md from the saved CSV")
    args = parser.parse_args(argv)
    if args.table_only:
        table = pd.read_csv(args.out / "probe_inputs.csv")
        (args.out / "probe_inputs.md").write_text(markdown(table))
        print(markdown(table))
        return 0
    rows = []
    for spec in args.models.split(","):
        rows += measure(spec.strip(), args.n, args.seed, args.batch_size)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "probe_inputs.csv", index=False, float_format="%.4f")
    (args.out / "probe_inputs.md").write_text(markdown(table))
    git = ["git", "rev-parse", "HEAD"]
    rev = subprocess.run(git, check=False, capture_output=True, text=True, cwd=Path(__file__).parent)
    provenance = {
        "script": "experiments/probe_inputs.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "models": args.models.split(","),
        "protocol": "gu2024",
        "tokext": tokext.__version__,
        "git": rev.stdout.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
