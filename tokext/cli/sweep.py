"""``tokext ablate`` and ``tokext validate``: thin wrappers over :mod:`tokext.studies.sweep` and
:mod:`tokext.studies.config`.
"""

from __future__ import annotations

import argparse
import json

ABLATE_EPILOG = """examples:
  tokext ablate --config experiments/a_method.toml                  # results/ablate/a_method/
  tokext ablate --config experiments/a_method.toml --limit 8        # smoke test, 8 items per cell
  tokext ablate --config experiments/d_mmlu.toml --model ./llama-2-7b-chat --out results/d_llama
  tokext ablate --config experiments/a_method.toml --validate       # check only, no model
  tokext ablate --summarize results/ablate/a_method                 # paired stats of finished cells

Rerunning the same command skips finished cells; Ctrl-C loses only the cell in flight.
"""


def _validate(args: argparse.Namespace) -> int:
    from tokext.studies.config import load_config, validate
    from tokext.studies.sweep import expand, with_limit

    config = load_config(args.config)
    if getattr(args, "model", None):
        config = config.replace(models=tuple(args.model))
    config = with_limit(config, getattr(args, "limit", None))
    report = validate(config)
    print(json.dumps(report, indent=2))
    print(f"OK: {args.config} is valid ({len(expand(config))} cells)")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from tokext.studies.sweep import format_summary, run_sweep, summarize

    if args.summarize:
        table = summarize(args.summarize)
        print(format_summary(table))
        print(f"\nwrote {args.summarize}/summary.csv")
        return 0
    if not args.config:
        raise SystemExit("tokext ablate: error: --config FILE is required (or --summarize DIR)")
    if args.validate:
        return _validate(args)
    table = run_sweep(args.config, args.out, force=args.force, limit=args.limit, models=args.model,
                      progress=not args.quiet)
    out = table.attrs["out"]
    print(format_summary(summarize(out)))
    print(f"\n{len(table)} cells; results in {out}/ (cells.csv, items/, summary.csv)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="run an ablation sweep from a TOML config (resumable)",
                       epilog=ABLATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="sweep config (experiments/*.toml)")
    p.add_argument("--out", default=None, help="results directory (default results/ablate/<name>[-limitN])")
    p.add_argument("--force", action="store_true",
                   help="add to a results directory written by a different config (nothing is deleted)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per cell")
    p.add_argument("--model", action="append", default=None,
                   help="run on this model instead of the config's (repeatable)")
    p.add_argument("--validate", action="store_true", help="check the config and data files; load no model")
    p.add_argument("--summarize", metavar="DIR", default=None, help="only print/write paired stats of DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_ablate)
    if "validate" not in sub.choices:
        v = sub.add_parser("validate", help="check a sweep config without loading a model",
                           epilog="example:\n  tokext validate experiments/a_method.toml",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        v.add_argument("config", help="sweep config (TOML)")
        v.set_defaults(run=_validate)

