"""``tokext analyze``: a thin wrapper over :func:`tokext.studies.analyze.analyze`."""

from __future__ import annotations

import argparse

from tokext.cli.flags import add_engine_flag

EPILOG = """examples:
  tokext analyze                                  # SmolLM2-135M on the built-in prompts
  tokext analyze --model ./my-hf-model --data prompts.jsonl --n 128 --out results/mine
  tokext analyze --data mmlu --protocol gu2024    # Gu et al.'s Sink_1^0.3 on 64-token texts
  tokext analyze --n 16 --html results/explorer.html   # also the interactive explorer (offline HTML)
  tokext analyze --data long.txt --engine streaming     # long prompts: no [T, T] pattern is held
  tokext analyze --inputs repeated --n 100 --protocol gu2024 --bos   # Gu et al.'s Table 1 probes, BOS forced
  tokext analyze --norms                          # also norms, norm-weighted attention, massive activations
"""


def _analyze(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from tokext.studies.analyze import analyze, format_table

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:  # also transformers' weight-loading bar
        hf_logging.disable_progress_bar()
    try:
        result = analyze(
            args.model,
            data=args.data,
            n=args.n,
            out=args.out,
            batch_size=args.batch_size,
            max_len=args.max_len,
            progress=not args.quiet,
            protocol=args.protocol,
            html=args.html,
            html_prompts=args.html_prompts,
            engine=args.engine,
            inputs=args.inputs,
            bos=args.bos,
            norms=args.norms,
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(format_table(result.stats))
    print(
        f"\n{result.stats.n_sequences} prompts in {result.seconds:.1f} s; wrote {len(result.files)} files to {result.out_dir}/"
    )
    if result.html is not None:
        print(f"wrote the attention explorer to {result.html} (open it in a browser; it works offline)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="measure where attention goes (sinks, entropy) over a prompt set",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (default), gemma3-270m, a local HF directory, a .gguf file or a hub id",
    )
    p.add_argument(
        "--data",
        default=None,
        help=".txt (one prompt a line), .jsonl (field 'text'), 'mmlu' (MMLU "
        "question texts, long) or the built-in prompts (default)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=64,
        help="number of prompts (default 64; all of them, with a warning, when the data holds fewer)",
    )
    p.add_argument("--out", default=None, help="output directory (default results/analyze/<model>/)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="keep each prompt's first MAX_LEN tokens")
    p.add_argument(
        "--protocol",
        default=None,
        help="a published protocol: gu2024 (Gu et al. 2024: first 64 "
        "tokens, the tokenizer's BOS default, sink rate per sequence); default: tokext's",
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        default=None,
        help="also write the interactive attention explorer (one offline HTML page) to FILE",
    )
    p.add_argument(
        "--html-prompts",
        type=int,
        default=16,
        metavar="N",
        help="prompts shown in the explorer: the first N analysed (default 16), each cut to its first 64 tokens (fewer with --max-len)",
    )
    p.add_argument(
        "--inputs",
        choices=["natural", "random", "repeated"],
        default=None,
        help="instead of --data: N probe rows of Gu et al.'s Table 1 (natural text, random tokens, one token "
        "repeated), 64 tokens long (or --max-len), seed 0",
    )
    p.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --inputs: start every row with BOS (--bos) or none (--no-bos); default: Gu et al.'s (natural "
        "text as the tokenizer encodes it, random and repeated rows without)",
    )
    add_engine_flag(p, "hooks", "hooks")
    p.add_argument(
        "--norms",
        action="store_true",
        help="also key, value, head-output and residual norms, norm-weighted attention and massive activations",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_analyze)
