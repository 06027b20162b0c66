"""MkDocs hooks: pages that are generated at build time, so they cannot drift from the code.

- ``reference/cli.md``: ``<!-- cli-reference -->`` becomes the ``--help`` of ``tokext`` and of every
  subcommand, read from the argparse parsers (:func:`tokext.cli.main.build_parser`).
- ``reference/api/index.md``: ``<!-- public-api -->`` becomes the table of ``tokext.__all__``, each
  name a cross-reference to its entry on its room's page (an undocumented name fails the strict build).
- ``figures/*.png`` of the repository are served under ``figures/`` (pages link ``../figures/x.png``).
- The "Open in Colab" badge of the tutorials is served from ``assets/`` instead of Colab's site, so
  no page loads anything from the network.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- cli-reference -->"
API_MARKER = "<!-- public-api -->"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def cli_reference() -> str:
    """Markdown: the help of ``tokext`` and of each subcommand, in the parser's order."""
    sys.path.insert(0, str(REPO))
    from tokext.cli.main import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix the width
    try:
        parser = build_parser()
        parts = ["## tokext", "", "```text", parser.format_help().rstrip(), "```", ""]
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {action.dest: action.help for action in sub._choices_actions}
        for name, subparser in sub.choices.items():
            parts += [f"## tokext {name}", "", helps.get(name) or "", "", "```text", subparser.format_help().rstrip()]
            parts += ["```", ""]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts)


def public_api() -> str:
    """Markdown table: every name in ``tokext.__all__``, linked to its entry on its room's page."""
    sys.path.insert(0, str(REPO))
    import tokext

    rows = ["| name | defined in | room page |", "|---|---|---|"]
    for name in tokext.__all__:
        if name == "__version__":
            continue
        obj = getattr(tokext, name)  # imports the module that defines it
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if not (module and qualname and module.startswith("tokext.")):  # a constant: where it is exported from
            module, qualname = tokext._EXPORTS[name], name
        room = module.split(".")[1]
        rows.append(f"| [`{name}`][{module}.{qualname}] | `{module}` | [{room}]({room}.md) |")
    return "\n".join(rows)


def on_files(files: Files, config) -> Files:
    for path in sorted((REPO / "figures").glob("*.png")):
        files.append(File(f"figures/{path.name}", str(REPO), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, public_api())
    return markdown


def on_post_page(output: str, page, config) -> str:
    if COLAB_BADGE in output:
        depth = page.url.count("/")
        output = output.replace(COLAB_BADGE, "../" * depth + "assets/colab-badge.svg")
    return output
