"""What a query can see in each layer, read from the model's configuration: one declarative table.

Every statistic and intervention needs to know which keys each query row of a layer can see:
all earlier keys (causal), the last ``w`` of them (a sliding window), every key (an encoder), and
whether a learned sink logit joins the softmax (gpt-oss) or the scores are softcapped (Gemma 2).
transformers builds each layer's mask from the config, so tokext reads the same config fields,
family by family, in :data:`FAMILIES`; nothing is inferred from the scores.

Windows follow transformers' convention: with ``sliding_window = w`` query ``i`` of a causal layer
sees keys ``k`` with ``i - w < k <= i`` (itself included). Which layers are windowed:
``config.layer_types`` (``"sliding_attention"`` / ``"full_attention"``) wherever the config has it
(transformers fills it in for Qwen2, Gemma 2/3, gpt-oss, ...); otherwise the family's rule:

- ``"all"``: every layer when ``sliding_window`` is set (Mistral, Mixtral, Phi-3);
- ``"max_window_layers"``: layers ``>= max_window_layers`` when ``use_sliding_window`` (Qwen2, Qwen3);
- ``"even_layers"``: layers 0, 2, 4, ... (Gemma 2, gpt-oss);
- ``"pattern"``: all but every ``sliding_window_pattern``-th layer (Gemma 3);
- ``"none"``: no layer.

A model whose ``model_type`` is not in the table is read with the generic rule (``layer_types``,
else ``sliding_window`` on every layer, else causal) and marked ``known=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokext.errors import InputError

WINDOW_RULES = ("none", "all", "max_window_layers", "even_layers", "pattern")


@dataclass(frozen=True)
class Family:
    """One row of the architecture table: how a family's config describes its attention."""

    name: str
    model_types: tuple[str, ...]
    encoder: bool = False  # bidirectional self-attention (unless config.is_decoder)
    windows: str = "none"  # the fallback rule when the config has no layer_types (WINDOW_RULES)
    learned_sinks: bool = False  # a learned per-head logit joins the softmax and is dropped after it
    softcap: str | None = None  # config key of attention-logit softcapping
    positions: str = "rotary"  # rotary | learned | alibi (for the support table)


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",)),
    Family("Mistral", ("mistral", "mixtral"), windows="all"),
    Family("Qwen2", ("qwen2",), windows="max_window_layers"),
    Family("Qwen3", ("qwen3",), windows="max_window_layers"),
    Family("Gemma", ("gemma",)),
    Family("Gemma 2", ("gemma2",), windows="even_layers", softcap="attn_logit_softcapping"),
    Family("Gemma 3", ("gemma3_text", "gemma3"), windows="pattern", softcap="attn_logit_softcapping"),
    Family("Phi-3", ("phi3",), windows="all"),
    Family("OLMo 2", ("olmo2",)),
    Family("GPT-NeoX", ("gpt_neox",)),
    Family("GPT-2", ("gpt2",), positions="learned"),
    Family("gpt-oss", ("gpt_oss",), windows="even_layers", learned_sinks=True),
    Family("Bloom", ("bloom",), positions="alibi"),
    Family("MPT", ("mpt",), positions="alibi"),
    Family("BERT", ("bert", "roberta", "xlm-roberta", "distilbert", "electra"), encoder=True, positions="learned"),
    Family("OPT", ("opt",), positions="learned"),
    Family("GPT-J", ("gptj",)),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


@dataclass(frozen=True)
class LayerAttention:
    """What a query of one layer can see.

    ``causal``: query ``i`` sees no key after it. ``window``: the number of keys a query sees,
    itself included (causal: ``i - window < k <= i``; bidirectional: ``|i - k| <= window``, as in
    transformers); ``None`` is no window. ``learned_sink``: the softmax has one more column, a
    learned logit per head, dropped afterwards, so the pattern's rows sum to ``1 - s_i``.
    ``softcap``: scores are ``cap * tanh(s / cap)`` before the mask and softmax.
    """

    causal: bool = True
    window: int | None = None
    learned_sink: bool = False
    softcap: float | None = None

    def describe(self) -> str:
        """A short phrase for tables and error messages (``"causal, window 4, learned sink"``)."""
        parts = ["causal" if self.causal else "bidirectional"]
        if self.window is not None:
            parts.append(f"window {self.window}")
        if self.learned_sink:
            parts.append("learned sink")
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class AttentionLayout:
    """Per-layer attention of a model: its family (a row of :data:`FAMILIES`) and each layer's
    :class:`LayerAttention`. ``known`` is False when the family was not in the table."""

    family: str
    layers: tuple[LayerAttention, ...]
    known: bool = True

    def __getitem__(self, layer: int) -> LayerAttention:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def learned_sinks(self) -> bool:
        """Whether any layer has a learned sink logit."""
        return any(layer.learned_sink for layer in self.layers)

    @property
    def encoder(self) -> bool:
        """Whether every layer is bidirectional (an encoder)."""
        return bool(self.layers) and not any(layer.causal for layer in self.layers)

    def describe(self) -> str:
        """The distinct layer kinds with their layers, e.g. ``"causal, window 4 (0, 2); causal (1)"``."""
        groups: dict[LayerAttention, list[int]] = {}
        for index, layer in enumerate(self.layers):
            groups.setdefault(layer, []).append(index)
        if len(groups) == 1:
            return next(iter(groups)).describe()
        return "; ".join(f"{kind.describe()} (layers {', '.join(map(str, idx))})" for kind, idx in groups.items())


def family_of(model_type: str | None) -> Family | None:
    """The table row of a transformers ``model_type``, or ``None``."""
    return _BY_MODEL_TYPE.get(str(model_type)) if model_type else None


def causal_layout(n_layers: int, family: str = "causal") -> AttentionLayout:
    """Full causal attention in every layer (TransformerLens-native models and organisms)."""
    return AttentionLayout(family, tuple(LayerAttention() for _ in range(n_layers)))


def layout_from_config(config: Any, n_layers: int | None = None) -> AttentionLayout:
    """The :class:`AttentionLayout` that ``config`` (a transformers ``PretrainedConfig``) describes."""
    model_type = getattr(config, "model_type", None)
    family = family_of(model_type)
    n_layers = int(n_layers if n_layers is not None else _n_layers(config))
    encoder = bool(family and family.encoder and not getattr(config, "is_decoder", False))
    windows = _windows(config, family, n_layers)
    softcap = getattr(config, family.softcap, None) if family and family.softcap else None
    layer = [
        LayerAttention(
            causal=not encoder,
            window=w,
            learned_sink=bool(family and family.learned_sinks),
            softcap=float(softcap) if softcap else None,
        )
        for w in windows
    ]
    name = family.name if family else f"{model_type or type(config).__name__} (generic rule)"
    return AttentionLayout(name, tuple(layer), known=family is not None)


def _n_layers(config: Any) -> int:
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise InputError(f"cannot tell the number of layers of a {type(config).__name__}")


def _windows(config: Any, family: Family | None, n_layers: int) -> list[int | None]:
    """The window of every layer (``None``: full attention)."""
    raw = getattr(config, "sliding_window", None)
    size = int(raw) if raw else 0  # 0: no window configured
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise InputError(
                f"{type(config).__name__} has layer types {unknown}, which tokext cannot model "
                "(it knows sliding_attention and full_attention)"
            )
        if len(layer_types) != n_layers:
            raise InputError(f"config.layer_types lists {len(layer_types)} layers for a {n_layers}-layer model")
        if "sliding_attention" in layer_types and not size:
            raise InputError("config.layer_types has sliding_attention layers but sliding_window is not set")
        return [size if kind == "sliding_attention" else None for kind in layer_types]
    rule = family.windows if family else "all"
    if not size or rule == "none":
        return [None] * n_layers
    if rule == "all":
        return [size] * n_layers
    if rule == "max_window_layers":
        if not getattr(config, "use_sliding_window", False):
            return [None] * n_layers
        first = int(getattr(config, "max_window_layers", 0) or 0)
        return [size if i >= first else None for i in range(n_layers)]
    if rule == "even_layers":
        return [size if i % 2 == 0 else None for i in range(n_layers)]
    if rule == "pattern":
        pattern = int(
            getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None) or 6
        )
        return [size if (i + 1) % pattern else None for i in range(n_layers)]
    raise InputError(f"unknown window rule {rule!r} (choose from {WINDOW_RULES})")  # pragma: no cover
