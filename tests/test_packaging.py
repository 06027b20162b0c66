"""Packaging: one version, a wheel that installs into a fresh venv and answers ``tokext --version``,
and the lm-evaluation-harness entry point that resolves to the model class.

The wheel is built from a copy of the package's files (``python -m build --no-isolation``, with the
setuptools of this environment: no download, and nothing written into the checkout) and installed
with ``pip --no-deps`` into a new venv without this environment's packages; ``tokext --version``
needs none of the dependencies. About 15 s.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import tokext
from tokext.cli import main
from tokext.version import __version__

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_version_is_written_once():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tokext.version.__version__"}
    assert tokext.__version__ == __version__
    source = (REPO / "tokext" / "version.py").read_text(encoding="utf-8")
    assert source.count(__version__) == 1


def test_cli_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tokext {__version__}"


def test_the_changelog_has_this_version():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{__version__}]" in text


def test_lm_eval_entry_point_resolves_to_the_model_class():
    """The declared ``lm_eval.models`` entry point names the class that lm-eval registers as ``tokext``."""
    pytest.importorskip("lm_eval")
    target = PYPROJECT["project"]["entry-points"]["lm_eval.models"]["tokext"]
    module_name, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attribute)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    assert isinstance(cls, type) and issubclass(cls, LM)
    assert get_model("tokext") is cls


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "tokext", source / "tokext", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("tokext-*.whl")
    return path


def test_wheel_contents(wheel):
    assert wheel.name == f"tokext-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"tokext-{__version__}.dist-info"
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {"tokext/py.typed", "tokext/viz/explorer.js", "tokext/data/prompts.txt"} <= names
    assert not any(name.startswith(("tests/", "docs/", "experiments/")) for name in names)
    assert "[lm_eval.models]\ntokext = tokext.evaluation.lm_eval_adapter:TokextLM" in entry_points
    assert "[console_scripts]\ntokext = tokext.cli:main" in entry_points


def test_wheel_installs_in_a_fresh_venv_and_answers_version(wheel, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
        env=env,
    )
    out = subprocess.run(
        [str(bin_dir / "tokext"), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tokext {__version__}"
    probe = (
        "import sys, importlib.metadata as m, tokext; "
        "print(tokext.__file__); print(m.entry_points(group='lm_eval.models')['tokext'].value); "
        "print('torch' in sys.modules)"
    )
    found = subprocess.run(
        [str(bin_dir / "python"), "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert found.returncode == 0, found.stderr
    location, entry_point, torch_loaded = found.stdout.split()
    assert Path(location).is_relative_to(venv)  # the installed copy, not this checkout
    assert entry_point == "tokext.evaluation.lm_eval_adapter:TokextLM"
    assert torch_loaded == "False"
