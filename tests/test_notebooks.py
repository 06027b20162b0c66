"""The notebooks in ``notebooks/`` run top to bottom in a fresh kernel and are stored without outputs;
their executed copies in ``docs/tutorials/`` (what the documentation site shows) ran the same code.

Each notebook is executed in memory (the file on disk is never written) by a ``python3`` kernel whose
working directory is a temporary directory. jupyter_client resolves ``python3`` to the kernelspec of
the interpreter running pytest (``sys.prefix/share/jupyter/kernels/python3``, installed with
ipykernel) and replaces its ``python`` argv with ``sys.executable``; ``test_kernel_is_this_python``
checks that, so nothing needs ``ipykernel install --user``. The notebooks that load a model run here
on a tiny random Llama (``TOKEXT_NOTEBOOK_MODEL``), so they cost seconds, not SmolLM2's minutes;
``docs/scripts/notebooks.py execute`` runs them on SmolLM2-135M for the site.
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
TUTORIALS = REPO / "docs" / "tutorials"
EXPECTED = {"01_probe_attention", "02_ablation_study", "03_model_organism"}
sys.path.insert(0, str(REPO / "docs" / "scripts"))
import notebooks as site_notebooks  # noqa: E402  (docs/scripts/notebooks.py: the header and the hash)


def _kernel_env(**extra: str) -> dict[str, str]:
    """The test's environment, with the checkout first on the kernel's import path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _execute(nb, cwd: Path, **env: str):
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=_kernel_env(**env))


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    from tests.models_fixtures import long_llama_dir

    nb = nbformat.read(path, as_version=4)
    _execute(nb, tmp_path, TOKEXT_NOTEBOOK_MODEL=str(long_llama_dir()))  # raises CellExecutionError naming the cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert not any(tmp_path.iterdir()), "a notebook left files in its working directory: use a temp dir"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_opens_in_colab(path):
    """A badge to this very notebook, then an install cell that does something only on Colab."""
    nb = nbformat.read(path, as_version=4)
    header = [c for c in nb.cells if site_notebooks.HEADER_TAG in c.metadata.get("tags", [])]
    assert [c.cell_type for c in header] == ["markdown", "code"] and nb.cells[1:3] == header
    assert header[0].source == site_notebooks.badge(path.name)
    assert f"/notebooks/{path.name})" in header[0].source
    install = header[1].source
    assert "import google.colab" in install and "except ImportError:" in install
    assert all(line.startswith("    %pip") for line in install.splitlines() if "%pip" in line)  # only in the else


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_site_copy_ran_this_notebook(path):
    """docs/tutorials/<name> is this notebook run top to bottom (same code, in order, no error)."""
    copy = TUTORIALS / path.name
    assert copy.is_file(), f"no executed copy: run `python docs/scripts/notebooks.py execute {path.name}`"
    source, executed = nbformat.read(path, as_version=4), nbformat.read(copy, as_version=4)
    stale = f"{copy.relative_to(REPO)} is older than {path.name}: rerun `python docs/scripts/notebooks.py execute`"
    assert site_notebooks.code_hash(executed) == site_notebooks.code_hash(source), stale
    assert executed.metadata["tokext"]["code_sha256"] == site_notebooks.code_hash(source), stale
    assert [c.source for c in executed.cells] == [c.source for c in source.cells], stale
    counts = [c.execution_count for c in executed.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{copy.name}: not one run top to bottom: {counts}"
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{copy.name} holds an error"
    assert len(outputs) >= 5, f"{copy.name} shows almost no outputs"
    assert all("TOKEXT_NOTEBOOK_MODEL" not in str(o) for o in outputs)
