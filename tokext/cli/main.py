"""The ``tokext`` command line: thin subcommands over the library.

Every subcommand turns a :class:`tokext.errors.TokextError` into one line on stderr and exit
status 2, never a traceback from inside the library.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from tokext.cli import analyze, eval, study, sweep
from tokext.errors import TokextError, TokextWarning
from tokext.version import __version__

COMMAND_GROUPS = (analyze, study, sweep, eval)
"""The modules of the subcommands; each has ``register(subparsers)``."""

EPILOG = """examples:
  tokext analyze                                  # SmolLM2-135M on the built-in prompts
  tokext analyze --model ./my-hf-model --data prompts.jsonl --n 128 --out results/mine
  tokext eval --tasks tokext_mmlu --limit 40 --intervention 'EarlyLayerEmulation()'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokext",
        description="Attention sinks, entropy and attention interventions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tokext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


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
