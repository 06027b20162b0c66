"""Where the norm statistics (``collect_attention_stats(..., norms=True)``) read a model, per engine.

Every source is resolved and checked by :func:`plan_norms` before anything is attached or run:

- **residual stream**: TransformerLens's ``blocks.{l}.hook_out`` (the block's output), both engines;
- **z**: the input of the wrapped output projection (``blocks.{l}.attn.o.original_component``: ``o_proj``,
  GPT-2's ``c_proj``, ...) through a forward pre-hook, both engines; ``W_O^h`` is the projection weight's
  slice of head h (``nn.Linear``: columns; GPT-2's ``Conv1D``: rows), bias left out;
- **keys and values as the attention uses them**:
  - streaming engine: what transformers hands the attention function (after RoPE and q/k norms);
  - hook engine: :data:`ROTATED_KEY_HOOKS` by TransformerLens bridge class (``hook_rot_k`` fires after the
    q/k norms and RoPE); elsewhere ``hook_k``, the key projection's output, when the wrapped attention
    has no key norm (:data:`KEY_NORMS`): RoPE rotates each key and leaves its norm unchanged, so
    ``‖k‖`` there is the norm the attention uses (GPT-2, BERT, OPT, Bloom, and the rotary Phi-3, GPT-NeoX,
    GPT-J). A model that normalises keys where no hook sees them is refused with ``engine="hooks"``: the
    streaming engine reads its keys from the attention function.
  values at ``hook_v`` (no family in the table transforms values between their projection and the attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokext.attention.engines.streaming import LayerChain
from tokext.attention.norms import output_factor
from tokext.errors import InputError
from tokext.models.hooks import attached, module_pre_hooks
from tokext.models.info import model_info

ROTATED_KEY_HOOKS = {"PositionEmbeddingsAttentionBridge": "hook_rot_k"}
"""TransformerLens bridge classes (or their bases) -> the hook with the keys after q/k norms and RoPE."""
KEY_NORMS = ("k_norm", "k_layernorm", "key_norm")
"""Attribute names under which Hugging Face attention modules keep a key norm."""


@dataclass(frozen=True)
class NormPlan:
    """The resolved sources of one collection: TL hook names per layer, output projections and their factors."""

    engine: str
    residual: dict[int, str]
    keys: dict[int, str]  # hook engine only
    values: dict[int, str]  # hook engine only
    projections: dict[int, torch.nn.Module]
    factors: list[torch.Tensor]  # per collected layer: L_h with L_h L_hᵀ = W_O^h W_O^hᵀ [head, d_head, d_head]


def _key_hook(model: Any, layer: int) -> str:
    attn = model.blocks[layer].attn
    for cls in type(attn).__mro__:
        if cls.__name__ in ROTATED_KEY_HOOKS:
            name = ROTATED_KEY_HOOKS[cls.__name__]
            if getattr(getattr(attn, "config", None), "qk_norm_after_rope", False):
                name = "hook_k_normed"  # HunYuan normalises after RoPE
            return f"blocks.{layer}.attn.{name}"
    wrapped = getattr(attn, "original_component", None)
    norm = next((name for name in KEY_NORMS if getattr(wrapped, name, None) is not None), None)
    if norm is None:
        return f"blocks.{layer}.attn.hook_k"
    raise InputError(
        f"{model_info(model).name}: norms=True needs the keys after the attention's key norm ({norm}), and "
        f"TransformerLens's {type(attn).__name__} (layer {layer}) applies it where no hook sees the keys: "
        "use engine='streaming'"
    )


def _output_weight(model: Any, layer: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The output projection module of ``layer`` and its weight as W_O [head, d_head, d_model]."""
    o = getattr(model.blocks[layer].attn, "o", None)
    module = getattr(o, "original_component", None)
    weight = getattr(module, "weight", None)
    name = model_info(model).name
    if not isinstance(module, torch.nn.Module) or not isinstance(weight, torch.Tensor):
        raise InputError(
            f"{name}: norms=True reads the input of each layer's output projection, and layer {layer}'s "
            "attention has none that TransformerLens maps (blocks.{l}.attn.o)"
        )
    if not weight.dtype.is_floating_point:
        raise InputError(f"{name}: layer {layer}'s output projection is quantised ({weight.dtype}); norms need W_O")
    heads, d_head = int(model.cfg.n_heads), int(model.cfg.d_head)
    transposed = type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out]
    w = weight.detach() if transposed else weight.detach().T  # [heads x d_head, d_model]
    if w.shape[0] != heads * d_head:
        raise InputError(
            f"{name}: layer {layer}'s output projection takes {w.shape[0]} inputs, not {heads} heads x {d_head}"
        )
    return module, w.reshape(heads, d_head, -1)


def plan_norms(model: Any, layers: Sequence[int], engine: str) -> NormPlan:
    """Resolve every source the norm statistics need for ``layers`` under ``engine``; an
    :class:`~tokext.errors.InputError` naming what is missing before anything is attached."""
    hook_dict = model.hook_dict
    residual = {layer: f"blocks.{layer}.hook_out" for layer in layers}
    keys = {layer: _key_hook(model, layer) for layer in layers} if engine == "hooks" else {}
    values = {layer: f"blocks.{layer}.attn.hook_v" for layer in layers} if engine == "hooks" else {}
    for name in [*residual.values(), *keys.values(), *values.values()]:
        if name not in hook_dict:
            raise InputError(
                f"{model_info(model).name}: norms=True needs the hook point {name!r}, which this model lacks"
            )
    projections, factors = {}, []
    for layer in layers:
        module, w = _output_weight(model, layer)
        projections[layer] = module
        factors.append(output_factor(w))
    return NormPlan(engine, residual, keys, values, projections, factors)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """TransformerLens's [batch, position, head, d_head] -> [batch, head, position, d_head]."""
    return x.transpose(1, 2)


@contextlib.contextmanager
def feeding_norms(model: Any, stats: Any, plan: NormPlan) -> Iterator[None]:
    """Attach what feeds ``stats.norms`` (a :class:`~tokext.attention.norms.NormStats`) for the block: the
    residual-stream and (hook engine) key and value hooks, and the output projections' pre-hooks."""
    norms = stats.norms

    def hook(
        add: Callable[[int, torch.Tensor], None],
        layer: int,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Callable[[torch.Tensor, Any], None]:
        def call(tensor: torch.Tensor, hook: Any) -> None:
            add(layer, tensor if prepare is None else prepare(tensor))

        return call

    hooks = []
    for layer, name in plan.residual.items():
        hooks.append((name, hook(norms.add_residual, layer)))
    for layer, name in plan.keys.items():
        hooks.append((name, hook(norms.add_keys, layer, _heads_first)))
    for layer, name in plan.values.items():
        hooks.append((name, hook(norms.add_values, layer, _heads_first)))
    pre = [
        (module, lambda z, layer=layer: norms.add_head_output(layer, z)) for layer, module in plan.projections.items()
    ]
    with attached(model, hooks), module_pre_hooks(pre):
        yield


def streaming_kv(stats: Any, layer: int) -> LayerChain:
    """A chain part handing ``layer``'s keys and values, as the streaming engine's attention receives them,
    to ``stats.norms``."""

    def see(key: torch.Tensor, value: torch.Tensor) -> None:
        stats.norms.add_keys(layer, key)
        stats.norms.add_values(layer, value)

    return LayerChain(kv=[see])
