"""The notebooks in ``notebooks/`` run top to bottom in a fresh kernel and are stored without outputs.

Each notebook is executed in memory (the file on disk is never written) by a ``python3`` kernel whose
working directory is a temporary directory. jupyter_client resolves ``python3`` to the kernelspec of
the interpreter running pytest (``sys.prefix/share/jupyter/kernels/python3``, installed with
ipykernel) and replaces its ``python`` argv with ``sys.executable``; ``test_kernel_is_this_python``
checks that, so nothing needs ``ipykernel install --user``. Notebooks that load SmolLM2-135M are
marked slow (``pytest -m "not slow"`` skips them); ``TOKEXT_NOTEBOOK_MODEL`` picks another model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
LOADS_SMOLLM2 = {"01_probe_attention", "02_ablation_study"}
EXPECTED = {"01_probe_attention", "02_ablation_study", "03_model_organism"}


def _kernel_env() -> dict[str, str]:
    """The test's environment, with the checkout first on the kernel's import path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _execute(nb, cwd: Path):
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=_kernel_env())


def test_all_notebooks_present():
    assert {p.stem for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"


def test_kernel_is_this_python(tmp_path):
    """The ``python3`` kernel runs this interpreter (the venv) and imports this checkout's tokext."""
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "import os, sys, tokext\nprint(sys.prefix)\nprint(os.path.dirname(os.path.dirname(tokext.__file__)))"
            )
        ]
    )
    _execute(nb, tmp_path)
    prefix, root = nb.cells[0].outputs[0]["text"].split()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()
    assert Path(root).resolve() == REPO


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in LOADS_SMOLLM2 else []) for p in NOTEBOOKS]
)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    _execute(nb, tmp_path)  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert not any(tmp_path.iterdir()), "a notebook left files in its working directory: use a temp dir"
