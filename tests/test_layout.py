"""The package's shape: rooms (subpackages) in layers, no import cycle, no import that goes upward.

Imports are read with :mod:`ast` from the source files (nothing is imported), including the ones
inside functions (lazy imports still make a dependency) and under ``TYPE_CHECKING``. A module
inside a room imports its siblings directly, never its own room's ``__init__`` (which imports
them: that would be a cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tokext"

# lowest first: a module may import its own room and the rooms below it, never one above
LAYERS = (
    "errors",
    "version",
    "models",
    "attention",
    "interventions",
    "evaluation",
    "viz",
    "studies",
    "cli",
    "__init__",
    "__main__",
)
RANK = {name: rank for rank, name in enumerate(LAYERS)}
RANK["__main__"] = RANK["__init__"]
RANK["version"] = RANK["errors"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package at ``root``."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, name: str, known: dict[str, Path], package: str) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module-less attribute
                target = target.rpartition(".")[0]
            if target and (target == package or target.startswith(package + ".")) and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports_of(path, name, known, root.name) for name, path in known.items()}


def room(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in graph.items():
        for target in sorted(targets):
            if RANK[room(target)] > RANK[room(source)]:
                bad.append(f"{source} -> {target} ({room(source)} imports {room(target)}, a higher room)")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# ---------------------------------------------------------------------- the checker can fail


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    pkg = _write(
        tmp_path / "tokext",
        {
            "__init__.py": "",
            "models/__init__.py": "",
            "models/a.py": "def f():\n    from tokext.models import b\n",  # lazy: still an edge
            "models/b.py": "from .a import f\n",
            "attention/__init__.py": "",
            "attention/stats.py": "import tokext.studies.sweep\n",
            "studies/__init__.py": "",
            "studies/sweep.py": "from tokext.attention.stats import x\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["tokext.models.b"] == {"tokext.models.a"}
    assert sorted(map(tuple, cycles(graph))) == [
        ("tokext.attention.stats", "tokext.studies.sweep"),
        ("tokext.models.a", "tokext.models.b"),
    ]
    assert upward_imports(graph) == [
        "tokext.attention.stats -> tokext.studies.sweep (attention imports studies, a higher room)"
    ]


# ---------------------------------------------------------------------- the real package


def test_every_room_is_known():
    rooms = {room(name) for name in modules(PACKAGE)}
    assert rooms <= set(RANK), f"rooms without a layer: {sorted(rooms - set(RANK))}"


def test_no_import_cycle():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_goes_upward():
    bad = upward_imports(import_graph(PACKAGE))
    assert not bad, "imports of a higher room:\n" + "\n".join(bad)


def test_at_most_six_modules_beside_the_rooms():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, f"top-level modules: {top}"


@pytest.mark.parametrize("name", sorted(n for n in LAYERS if (PACKAGE / n / "__init__.py").is_file()))
def test_each_room_says_what_it_holds_and_may_import(name):
    doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8")))
    assert doc, f"tokext/{name}/__init__.py has no docstring"
    assert "May import" in doc, f"tokext/{name}/__init__.py does not say what it may import"


def _heavy_modules_after(code: str) -> list[str]:
    probe = (
        f"import sys\n{code}\n"
        "print('HEAVY:', *(m for m in ('torch', 'transformers', 'transformer_lens', 'pandas', 'matplotlib')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1].split()[1:]


def test_import_tokext_loads_no_heavy_module():
    assert _heavy_modules_after("import tokext") == []


def test_cli_help_loads_no_heavy_module():
    code = "from tokext.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _heavy_modules_after(code) == []


LAYOUT_PAGE = PACKAGE.parent / "docs" / "concepts" / "layout.md"


def _documented_layout() -> str:
    text = LAYOUT_PAGE.read_text(encoding="utf-8")
    return text[text.index("## Layout") : text.index("## Architecture")]


def test_documented_layout_matches_the_tree():
    import re

    block = _documented_layout()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) > 1:
            continue
        if len(rel.parts) > 2:  # a module of a nested package (evaluation/tasks/...): the package is listed
            rel = Path(*rel.parts[:2])
            name = rel.parts[-1] + "/"
        else:
            name = rel.name
        if (len(rel.parts) == 2 and f"{rel.parts[0]}/" not in block) or name not in block:
            missing.append(str(rel))
    assert not missing, f"the Layout section of {LAYOUT_PAGE.name} does not list: {missing}"
    named = set(re.findall(r"\b([a-z_]+\.py)\b", block))
    existing = {p.name for p in PACKAGE.rglob("*.py")} | {"reference_interventions.py", "test_layout.py"}
    assert named <= existing, (
        f"{LAYOUT_PAGE.name}'s Layout section lists modules that do not exist: {sorted(named - existing)}"
    )
