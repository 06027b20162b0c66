"""``tokext ablate`` and ``tokext validate``: thin wrappers over :mod:`tokext.studies.sweep` and
:mod:`tokext.studies.config`.
"""

from __future__ import annotations

import argparse
import json

from tokext.cli.flags import add_engine_flag

ABLATE_EPILOG = """examples:
  tokext ablate --config experiments/a_method.toml                  # results/ablate/a_method/
  tokext ablate --config experiments/a_method.toml --limit 8        # smoke test, 8 items per cell
  tokext ablate --config experiments/d_mmlu.toml --model ./llama-2-7b-chat --out results/d_llama
  tokext ablate --config experiments/a_method.toml --validate       # check only, no model
  tokext ablate --summarize results/ablate/a_method                 # paired stats of finished cells
  tokext ablate --config experiments/a_method.toml --executor ray   # cells on a local Ray cluster
  tokext ablate --config experiments/a_method.toml --executor ray --address 10.0.0.5:6379 --workers 16
  tokext ablate --config experiments/d_mmlu.toml --model ./llama-2-70b --device-map auto --dtype bfloat16

Rerunning the same command skips finished cells; Ctrl-C loses only the cells in flight.
"""


def _json_or_name(text: str | None, flag: str) -> object:
    """A flag value that is a name (``auto``) or a JSON object (``{"model.layers.0": 0}``)."""
    from tokext.errors import InputError

    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"{flag}: not a JSON object ({e})") from None


def _configured(args: argparse.Namespace):
    """The config of ``args.config`` with the command line's --model, --dtype and placement flags."""
    from tokext.studies.config import load_config, with_overrides

    config = load_config(args.config)
    if getattr(args, "model", None):
        config = config.replace(models=tuple(args.model))
    return with_overrides(
        config,
        dtype=getattr(args, "dtype", None),
        engine=getattr(args, "engine", None),
        device=getattr(args, "device", None),
        n_devices=getattr(args, "n_devices", None),
        device_map=_json_or_name(getattr(args, "device_map", None), "--device-map"),
        max_memory=_json_or_name(getattr(args, "max_memory", None), "--max-memory"),
    )


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    """--executor, --address, --workers (shared with `tokext reproduce`)."""
    p.add_argument(
        "--executor",
        choices=("serial", "ray"),
        default="serial",
        help="where cells run: this process (default) or a Ray cluster (needs tokext[ray])",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (host:port of `ray start --head`, ray://host:10001 or auto); "
        "default: start a local one",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray model workers (default: [resources] workers, else as many as the cluster fits)",
    )


def make_executor_from(args: argparse.Namespace):
    """The executor the flags ask for (closed by the caller)."""
    from tokext.studies.executors import make_executor

    return make_executor(args.executor, address=args.address, workers=args.workers)


def _validate(args: argparse.Namespace) -> int:
    from tokext.studies.config import validate
    from tokext.studies.sweep import expand, with_limit

    config = with_limit(_configured(args), getattr(args, "limit", None))
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
    config = _configured(args)
    executor = make_executor_from(args)
    try:
        table = run_sweep(
            config, args.out, force=args.force, limit=args.limit, progress=not args.quiet, executor=executor
        )
    finally:
        executor.close()
    out = table.attrs["out"]
    print(format_summary(summarize(out)))
    print(f"\n{len(table)} cells; results in {out}/ (cells.csv, items/, summary.csv)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="run an ablation sweep from a TOML config (resumable)",
        epilog=ABLATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="sweep config (experiments/*.toml)")
    p.add_argument("--out", default=None, help="results directory (default results/ablate/<name>[-limitN])")
    p.add_argument(
        "--force",
        action="store_true",
        help="add to a results directory written by a different config (nothing is deleted)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N items per cell")
    p.add_argument(
        "--model", action="append", default=None, help="run on this model instead of the config's (repeatable)"
    )
    p.add_argument("--validate", action="store_true", help="check the config and data files; load no model")
    p.add_argument("--summarize", metavar="DIR", default=None, help="only print/write paired stats of DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_executor_flags(p)
    place = p.add_argument_group("model placement (override the config's dtype, engine and [resources])")
    place.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16 or float64")
    add_engine_flag(place, None, "the config's engine (default hooks)")
    place.add_argument("--device", default=None, help="one device for each model: cpu, cuda, cuda:N, mps")
    place.add_argument(
        "--device-map",
        default=None,
        help='a model across devices: auto, balanced, sequential or JSON {"model.layers.0": 0, ...}',
    )
    place.add_argument("--n-devices", type=int, default=None, help="split each model over this many GPUs")
    place.add_argument("--max-memory", default=None, help='per-device budget, JSON: {"0": "20GiB", "cpu": "64GiB"}')
    p.set_defaults(run=_ablate)
    if "validate" not in sub.choices:
        v = sub.add_parser(
            "validate",
            help="check a sweep config without loading a model",
            epilog="example:\n  tokext validate experiments/a_method.toml",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        v.add_argument("config", help="sweep config (TOML)")
        v.set_defaults(run=_validate)
