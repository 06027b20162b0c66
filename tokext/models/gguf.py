"""GGUF files converted once into plain safetensors directories, cached under ``$TOKEXT_CACHE``.

transformers dequantises a GGUF file (~30 s for SmolLM2-135M); the result is saved as a Hugging
Face directory under ``$TOKEXT_CACHE`` (default ``~/.cache/tokext``), keyed on the file's name and
content, so later loads (also after a reinstall) take about a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tokext.errors import ModelConversionError
from tokext.models.wheels import ChunkedGGUF

SOURCE_DIR = ".source"
"""Where, inside a conversion's temporary directory, a GGUF file joined from chunks is written."""


def cache_dir() -> Path:
    """Where converted models are cached: ``$TOKEXT_CACHE`` or ``~/.cache/tokext``."""
    return Path(os.environ.get("TOKEXT_CACHE", Path.home() / ".cache" / "tokext"))


def _gguf_cache_key(gguf_path: Path) -> str:
    """Cache key of a GGUF file: a SHA-256 of its name and whole content (about 0.1-0.2 s per 100 MB).

    Independent of where the file lies and of its mtime, so reinstalling the same wheel (or
    copying the file) finds the conversion already made, and two files that differ anywhere
    never share one.
    """
    digest = hashlib.sha256(f"{gguf_path.name}\0".encode())
    with open(gguf_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _missing_model_files(directory: Path) -> list[str]:
    """What a converted model directory lacks: config, safetensors weights, tokenizer files."""
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not any(directory.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not (directory / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not ((directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file()):
        missing.append("tokenizer.json or tokenizer.model")
    return missing


def converted_gguf_dir(directory: Path, filename: str) -> Path:
    """Dequantise a GGUF file once into a cached safetensors directory and return that directory.

    The directory is ``cache_dir()/<stem>-<key>`` with the key of :func:`_gguf_cache_key`. The
    file is checked first (:func:`check_gguf_file`): a file cut short or not GGUF at all is a
    :class:`ModelConversionError` of one line naming it, and nothing is written to the cache.
    See :func:`_cached_conversion` for how the cache is written.
    """
    gguf_path = Path(directory) / filename
    check_gguf_file(gguf_path)
    target = cache_dir() / f"{Path(filename).stem}-{_gguf_cache_key(gguf_path)}"
    return _cached_conversion(target, lambda work: gguf_path)


def converted_chunked_gguf(source: ChunkedGGUF) -> Path:
    """Like :func:`converted_gguf_dir` for a GGUF file split over wheels (Gemma 3 270M).

    The cache key is the SHA-256 the wheel declares, so a cached conversion is found without
    reading the 250 MB of chunks. When there is none, the chunks are joined into the conversion's
    temporary directory, checked against that SHA-256, converted, and the joined file deleted with
    the temporary directory: the cache holds only the converted model.
    """
    target = cache_dir() / f"{Path(source.filename).stem}-sha256-{source.expected_sha256()[:16]}"

    def produce(work: Path) -> Path:
        (work / SOURCE_DIR).mkdir()
        path = source.assemble(work / SOURCE_DIR / source.filename)
        check_gguf_file(path)
        return path

    return _cached_conversion(target, produce)


def _cached_conversion(target: Path, produce: Callable[[Path], Path]) -> Path:
    """Return ``target`` when it holds a complete conversion; else make it from ``produce(work)``.

    ``produce`` returns the GGUF file to convert, given a scratch directory it may write to.
    Everything is written to a fresh temporary directory beside ``target`` and renamed into place
    in one step once complete, so a failed or interrupted conversion leaves no entry; when another
    process finished the same conversion meanwhile, its result is kept. A directory missing any of
    config, weights or tokenizer files is never returned (an incomplete one, e.g. copied in part,
    is replaced). Temporary directories of conversions killed more than a day ago are removed.
    """
    if not _missing_model_files(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        gguf_path = produce(work)
        _convert_gguf(gguf_path, work)
        shutil.rmtree(work / SOURCE_DIR, ignore_errors=True)  # a GGUF file joined from chunks
        missing = _missing_model_files(work)
        if missing:
            raise ModelConversionError(
                f"converting {gguf_path} to safetensors did not write {', '.join(missing)}; "
                "the file may not hold a complete model and tokenizer"
            )
        _make_shareable(work)
        _publish(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone after a successful rename
    missing = _missing_model_files(target)
    if missing:
        raise ModelConversionError(f"cached conversion {target} lacks {', '.join(missing)}; delete it and retry")
    return target


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is not a complete GGUF file, with one line naming it and what is wrong.

    Reads the header, the metadata and the tensor table with the ``gguf`` package (memory-mapped,
    nothing dequantised), then checks that every tensor's data lies inside the file: a download or
    copy cut short fails here instead of deep inside transformers.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise ModelConversionError(f"cannot read GGUF file {path}: {err.strerror or err}") from None
    if magic != b"GGUF":
        what = "it is empty" if size == 0 else f"it starts with {magic!r}, not b'GGUF'"
        raise ModelConversionError(f"{path} is not a GGUF file: {what}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001  (the reader fails in many ways on a cut file: ValueError, IndexError...)
        detail = " ".join(str(err).split())[:200]
        raise ModelConversionError(
            f"GGUF file {path} ({size} bytes) is truncated or corrupt: the gguf reader fails on it "
            f"({type(err).__name__}: {detail})"
        ) from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelConversionError(
                f"GGUF file {path} is truncated: tensor {tensor.name} needs bytes up to {end}, the file has {size}"
            )


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a complete ``target`` that another process published first wins."""
    for _ in range(3):
        try:
            os.rename(tmp, target)  # atomic; fails when a non-empty target exists
            return
        except OSError:
            if not _missing_model_files(target):
                return  # finished elsewhere: keep it
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover
    if _missing_model_files(target):
        raise ModelConversionError(f"could not move the conversion into {target}: delete it and retry")


def _make_shareable(directory: Path) -> None:
    """Give a ``mkdtemp`` directory (mode 0700) the permissions the umask gives new directories."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)


def _remove_stale_partials(target: Path, max_age_s: float = 86400.0) -> None:
    """Delete temporary conversion directories for ``target`` left by processes killed long ago."""
    import time

    for leftover in target.parent.glob(f".{target.name}.*.partial"):
        try:
            if time.time() - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load ``gguf_path`` with transformers (dequantising to float32) and save model and tokenizer
    to ``out_dir`` as a plain Hugging Face directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, filename = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001  (transformers fails in many ways on a bad GGUF file)
        detail = " ".join(str(err).split())[:200]
        raise ModelConversionError(
            f"transformers cannot load GGUF file {gguf_path} ({type(err).__name__}: {detail})"
        ) from None
    # save_pretrained refuses GGUF-loaded models: rebuild the class from a clean config.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict(), strict=True)
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
