"""Room 7, cli: the ``tokext`` command line, thin subcommands over the library.

:mod:`~tokext.cli.main` builds the parser from a fixed tuple of command groups, one module each
(:mod:`~tokext.cli.analyze`, :mod:`~tokext.cli.study`, :mod:`~tokext.cli.sweep`,
:mod:`~tokext.cli.eval`), every one with
a ``register(subparsers)`` function; a group never imports ``main``, so there is no cycle. Groups
import the library inside their handlers, so ``tokext --help`` stays fast.

May import: every room.
"""

from tokext.cli.main import main

__all__ = ["main"]
