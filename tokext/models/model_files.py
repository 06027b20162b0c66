"""A local model directory's files, checked before anything loads.

transformers reports a ``config.json`` that is not JSON, a weights shard that the index names but
that is missing, or a safetensors file cut short with a traceback from deep inside its loader (or,
through the bridge, as a failed hub download). :func:`check_model_dir` finds these first and raises
a :class:`~tokext.errors.DataFileError` of one line naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from tokext.errors import DataFileError

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_json(path: Path) -> Any:
    """Parse a JSON file; a file that is unreadable or not JSON is a one-line :class:`DataFileError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path} is not JSON: not UTF-8 text (byte at offset {err.start})") from None
    except OSError as err:
        raise DataFileError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        what = "it is empty" if not text.strip() else f"{err.msg} at line {err.lineno}, column {err.colno}"
        raise DataFileError(f"{path} is not valid JSON: {what}") from None


def check_model_dir(directory: Path) -> None:
    """Check a Hugging Face model directory: ``config.json`` is a JSON object, every shard that a
    weights index names exists, and every safetensors file holds the bytes its header promises."""
    config = read_json(directory / "config.json")
    if not isinstance(config, dict):
        raise DataFileError(f"{directory / 'config.json'} is not a JSON object (got a {type(config).__name__})")
    for name in WEIGHT_INDEXES:
        index_path = directory / name
        if index_path.is_file():
            _check_index(index_path)
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors(path)


def _check_index(index_path: Path) -> None:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DataFileError(f"{index_path} has no 'weight_map' naming the weight shards")
    shards = sorted({str(shard) for shard in weight_map.values()})
    missing = [shard for shard in shards if not (index_path.parent / shard).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataFileError(
            f"{index_path} names {len(shards)} weight shards, {len(missing)} missing from {index_path.parent}: {shown}"
        )


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header giving each
    tensor's byte range, then the data: refuse a file whose header or data is cut short."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise DataFileError(f"safetensors file {path} is truncated: {size} bytes, shorter than its header")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise DataFileError(
                    f"safetensors file {path} is truncated or corrupt: its header claims {header_len} bytes, "
                    f"the file has {size}"
                )
            raw = handle.read(header_len)
    except OSError as err:
        raise DataFileError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataFileError(f"safetensors file {path} is corrupt: its header is not JSON") from None
    ends = [
        int(entry["data_offsets"][1])
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise DataFileError(
            f"safetensors file {path} is truncated: its tensors need {needed} bytes, the file has {size}"
        )
