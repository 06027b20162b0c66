"""``tokext reproduce``, ``tokext figures`` and ``tokext train-organism``: thin wrappers over
:mod:`tokext.studies.reproduce`, :mod:`tokext.viz.figures` and :mod:`tokext.studies.organism`."""

from __future__ import annotations

import argparse

from tokext.cli.sweep import add_executor_flags

REPRODUCE_EPILOG = """examples:
  tokext reproduce              # the study on SmolLM2-135M + the organism, < 20 min on 2 CPU cores
                                # (the sink-anatomy step, fig10, also loads Gemma 3 270M)
  tokext reproduce --quick      # a smoke run in < 3 min (results/reproduce/quick, figures in --figures)
  tokext reproduce --full       # the complete grids of experiments/*.toml (hours on a CPU)
  tokext reproduce --force      # recompute every step instead of reusing cached results
  tokext reproduce --rerun-long-context   # rerun the long-context study (512-8k) instead of the committed one
  tokext reproduce --rerun-studies        # rerun the anatomy and causal studies instead of their committed runs
  tokext reproduce --full --executor ray --address 10.0.0.5:6379   # the sweeps' cells on a Ray cluster
"""


def _reproduce(args: argparse.Namespace) -> int:
    from tokext.cli.sweep import make_executor_from
    from tokext.studies.reproduce import Reproduction

    mode = "quick" if args.quick else "full" if args.full else "default"
    figures = args.figures or ("figures" if mode == "default" else f"results/reproduce/{mode}/figures")
    executor = make_executor_from(args)
    try:
        Reproduction(
            mode,
            results=args.results,
            model=args.model,
            force=args.force,
            executor=executor,
            rerun_long_context=args.rerun_long_context,
            rerun_studies=args.rerun_studies,
        ).run(figures)
    finally:
        executor.close()
    return 0


def _figures(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokext.studies.reproduce import report_tables
    from tokext.viz.figures import build_all

    figures = build_all(args.results, args.out, tables=report_tables(Path(args.results)))
    for fig in figures:
        print(f"{fig.files[0]}  {fig.title}")
    print(f"report: {Path(args.out) / 'REPORT.md'}")
    return 0


def _train_organism(args: argparse.Namespace) -> int:
    from tokext.studies.organism import train_organism_cli

    return train_organism_cli(args.out, steps=args.steps, seed=args.seed, force=args.force)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-organism",
        help="train the 2-layer model organism (CoT arithmetic; grows a BOS sink)",
        epilog="example:\n  tokext train-organism --out results/organism --steps 1500",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/organism", help="where to save the model (refused if not empty)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing organism in --out")
    p.set_defaults(run=_train_organism)

    p = sub.add_parser(
        "reproduce",
        help="run the whole study and rebuild every figure and REPORT.md",
        epilog=REPRODUCE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small smoke run (< 3 min)")
    size.add_argument("--full", action="store_true", help="the complete grids (hours on a CPU)")
    p.add_argument("--force", action="store_true", help="recompute steps whose results exist")
    p.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m)")
    p.add_argument("--results", default="results/reproduce", help="results root (a folder per mode)")
    p.add_argument("--figures", default=None, help="figure folder (default figures/ for the default mode)")
    p.add_argument(
        "--rerun-long-context",
        action="store_true",
        help="default mode: run the 512-8k long-context study instead of drawing figure 9 from the committed "
        "full study (experiments/results/long_context/)",
    )
    p.add_argument(
        "--rerun-studies",
        action="store_true",
        help="default mode, default model: run the sink-anatomy and causal studies at this mode's sizes instead of "
        "drawing figures 10 and 11 from their committed runs (experiments/results/anatomy/, causal/)",
    )
    add_executor_flags(p)
    p.set_defaults(run=_reproduce)

    p = sub.add_parser(
        "figures",
        help="build the figures and REPORT.md from saved results (no model)",
        epilog="example:\n  tokext figures --results results/reproduce/default --out figures/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results", required=True, help="a results folder written by `tokext reproduce`")
    p.add_argument("--out", default="figures", help="output folder (default figures/)")
    p.set_defaults(run=_figures)
