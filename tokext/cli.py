"""The ``tokext`` command line: thin subcommands over the library.

Every subcommand turns a :class:`tokext.errors.TokextError` into one line on stderr and exit
status 2, never a traceback from inside the library.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable

from tokext.errors import TokextError, TokextWarning

EPILOG = """examples:
  tokext analyze                                  # SmolLM2-135M on the built-in prompts
  tokext analyze --model ./my-hf-model --data prompts.jsonl --n 128 --out results/mine
"""


def _analyze(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from tokext.analyze import analyze, format_table

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:  # also transformers' weight-loading bar
        hf_logging.disable_progress_bar()
    try:
        result = analyze(args.model, data=args.data, n=args.n, out=args.out, batch_size=args.batch_size,
                         max_len=args.max_len, progress=not args.quiet)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(format_table(result.stats))
    print(f"\n{result.stats.n_sequences} prompts in {result.seconds:.1f} s; wrote {len(result.files)} files to {result.out_dir}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokext", description="Attention sinks, entropy and attention interventions.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="measure where attention goes (sinks, entropy) over a prompt set",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF directory, a .gguf file or a hub id")
    p.add_argument("--data", default=None, help=".txt (one prompt a line) or .jsonl (field 'text'); default: built-in prompts")
    p.add_argument("--n", type=int, default=64, help="number of prompts (default 64; all of them, with a warning, when the data holds fewer)")
    p.add_argument("--out", default=None, help="output directory (default results/analyze/<model>/)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="keep each prompt's first MAX_LEN tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_analyze)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
"""Registrars of further subcommands (kept in their own modules)."""

import tokext.study_cli  # noqa: E402,F401  (registers `reproduce` and `figures`)
import tokext.sweep_cli  # noqa: E402,F401  (registers `ablate` and `validate`)


def _one_line_warnings(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints tokext's own warnings as one line on stderr."""
    fallback = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, TokextWarning):
            print(f"tokext {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run ``tokext`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success, 2 with one ``tokext <command>: error: ...`` line on stderr for a
    :class:`TokextError`, 130 when interrupted. tokext's own warnings are printed as one line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command)
            return int(args.run(args) or 0)
    except TokextError as err:
        print(f"tokext {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokext {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
