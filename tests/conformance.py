"""The conformance matrix: one tiny random model per architecture family, and an oracle written on
plain transformers.

- :data:`FAMILIES`: a builder per family (a transformers config and model class), saved with a
  character tokenizer to a temporary directory and loaded through ``tokext.load_model``, like a
  user's local model. Attention is sharpened (``initializer_range``) so patterns are peaked and
  interventions move the logits by measurable amounts. Windows are 4 keys, inputs up to 26 tokens.
- :func:`oracle_forward`: the same weights run by transformers itself, with an attention function
  registered through ``AttentionInterface`` (Bloom, whose attention calls ``F.softmax`` directly,
  through a stand-in for that call). It computes the softmax from the scores and the mask that
  transformers built for the layer, hands the probabilities and the layer's own visibility
  (from that mask) to an ``edit(layer, probs, info)`` written from the published formula
  (``tests/reference_interventions.py``), and multiplies by the values. Nothing in it comes from
  tokext.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.models_fixtures import CHARS, SPECIALS, VOCAB, _tokenizer, encode_text
from tests.reference_interventions import Info

WINDOW = 4
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.2,
    **COMMON,
)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig(num_key_value_heads=2, **DECODER), LlamaForCausalLM


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **DECODER), MistralForCausalLM


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config(
        num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **DECODER
    ), Qwen2ForCausalLM


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3Config(num_key_value_heads=2, head_dim=8, **DECODER), Qwen3ForCausalLM


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaConfig(num_key_value_heads=2, head_dim=8, **DECODER), GemmaForCausalLM


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2Config(
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=WINDOW,
        attn_logit_softcapping=5.0,
        query_pre_attn_scalar=8,
        **DECODER,
    ), Gemma2ForCausalLM


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3TextConfig(
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=WINDOW,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        **DECODER,
    ), Gemma3ForCausalLM


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3Config(num_key_value_heads=2, **DECODER), Phi3ForCausalLM


def _olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2Config(num_key_value_heads=2, **DECODER), Olmo2ForCausalLM


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXConfig(**DECODER), GPTNeoXForCausalLM


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, initializer_range=0.2, **COMMON), GPT2LMHeadModel


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    # two experts, both used for every token: no discrete routing that float noise could flip
    return GptOssConfig(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=WINDOW,
        num_local_experts=2,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        **COMMON,
    ), GptOssForCausalLM


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomConfig(hidden_size=32, n_layer=3, n_head=4, initializer_range=0.2, **COMMON), BloomForCausalLM


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,
        vocab_size=VOCAB,
        pad_token_id=0,
    ), BertForMaskedLM


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        init_std=0.2,
        **COMMON,
    ), OPTForCausalLM


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJConfig(
        n_embd=32, n_layer=3, n_head=4, n_positions=128, rotary_dim=4, initializer_range=0.2, **COMMON
    ), GPTJForCausalLM


@dataclass(frozen=True)
class FamilySpec:
    """A family of the matrix: its builder and what tokext must do with it."""

    name: str
    build: Callable[[], tuple[Any, type]]
    editable: bool = True  # TransformerLens rebuilds attention, so pattern edits land
    generates: bool = True  # a decoder: cached greedy generation is checked
    notes: str = ""


FAMILIES = {
    spec.name: spec
    for spec in (
        FamilySpec("Llama", _llama, notes="grouped-query attention, RoPE"),
        FamilySpec("Mistral", _mistral, notes="sliding window on every layer"),
        FamilySpec("Qwen2", _qwen2, notes="sliding window from max_window_layers"),
        FamilySpec("Qwen3", _qwen3, notes="q/k norms"),
        FamilySpec("Gemma", _gemma),
        FamilySpec("Gemma 2", _gemma2, notes="alternating sliding window, attention softcap"),
        FamilySpec("Gemma 3", _gemma3, notes="sliding window by layer_types"),
        FamilySpec("Phi-3", _phi3, notes="fused QKV"),
        FamilySpec("OLMo 2", _olmo2, notes="post-norm, q/k norms"),
        FamilySpec("GPT-NeoX", _gpt_neox, notes="fused QKV, partial RoPE"),
        FamilySpec("GPT-2", _gpt2, notes="learned positions"),
        FamilySpec("gpt-oss", _gpt_oss, notes="alternating sliding window, learned sinks, MoE"),
        FamilySpec("Bloom", _bloom, notes="ALiBi"),
        FamilySpec(
            "BERT",
            _bert,
            editable=False,
            generates=False,
            notes="encoder (bidirectional); delegating adapter: edits refused",
        ),
        FamilySpec("OPT", _opt, editable=False, notes="delegating adapter: edits refused"),
        FamilySpec("GPT-J", _gptj, editable=False, notes="delegating adapter: edits refused"),
    )
}


@functools.cache
def family_dir(name: str) -> Path:
    """The family's tiny model saved with the character tokenizer (once per session)."""
    config, cls = FAMILIES[name].build()
    torch.manual_seed(0)
    model = cls(config).eval()
    root = Path(tempfile.mkdtemp(prefix="tokext-conformance-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = root / name.replace(" ", "_")
    model.save_pretrained(target)
    _tokenizer().save_pretrained(target)
    return target


DEVICE = os.environ.get("TOKEXT_TEST_DEVICE", "cpu")
"""Where tokext's models run (``TOKEXT_TEST_DEVICE=cuda``: the GPU check); the oracle stays on the CPU."""


@functools.cache
def family_bridge(name: str) -> Any:
    """The family's model loaded through ``tokext.load_model`` on :data:`DEVICE` (once per session)."""
    from tokext.models.loading import load_model

    return load_model(str(family_dir(name)), device=DEVICE)


TEXTS = ["the cat sat. on a mat, ok!", "hi! yes\nno, so", "q? 7 ab."]


def sequences() -> list[list[int]]:
    """Token ids of :data:`TEXTS`, BOS first: 26, 15 and 9 tokens (the longest spans six windows)."""
    return [[1] + ids for ids in encode_text(TEXTS)]


def padded(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        tokens[row, span] = torch.tensor(seq)
        mask[row, span] = 1
    return tokens, mask


def char_of(token: int) -> str:
    return CHARS[token - len(SPECIALS)] if token >= len(SPECIALS) else ""


# ---------------------------------------------------------------------- the oracle


class _State:
    edit: Callable | None = None
    score_edit: Callable | None = None  # (layer, scores incl. a sink column or not) -> scores
    info: Info | None = None
    probs: dict[int, torch.Tensor] = {}
    layer: int | None = None
    bloom_mask: torch.Tensor | None = None
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (keys, values) as the attention got them


_STATE = _State()


def _visible_from_mask(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    batch, _, q, k = shape
    if mask is None:
        return torch.ones(batch, q, k, dtype=torch.bool)
    if mask.dtype == torch.bool:
        visible = mask
    else:
        visible = mask > torch.finfo(mask.dtype).min / 2
    return visible.expand(batch, visible.shape[1], q, k)[:, 0]


def _apply(layer: int, probs: torch.Tensor, visible: torch.Tensor, learned_sink: bool) -> torch.Tensor:
    info = _STATE.info
    info.masks[layer] = visible
    info.sinks[layer] = learned_sink
    if _STATE.edit is not None:
        probs = _STATE.edit(layer, probs, info)
    _STATE.probs[layer] = probs.detach().clone()
    return probs


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Eager attention from the published formula, with the edit between softmax and ``@ V``."""
    _STATE.kv[int(module.layer_idx)] = (key.detach().clone(), value.detach().clone())
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = _visible_from_mask(attention_mask, scores.shape)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.float()
    sinks = getattr(module, "sinks", None)
    if sinks is not None:  # a learned logit per head joins the softmax and is dropped after it
        column = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        scores = torch.cat([scores, column], dim=-1)
    if _STATE.score_edit is not None:
        scores = _STATE.score_edit(int(module.layer_idx), scores)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = _apply(int(module.layer_idx), probs, visible, sinks is not None)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, probs


class _BloomSoftmax:
    """Stands in for ``torch.nn.functional`` inside Bloom's attention: its ``softmax`` is followed by
    the edit; everything else is the real module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)

    @staticmethod
    def softmax(scores, dim=-1, dtype=None):
        scores = scores.float()
        if _STATE.score_edit is not None:
            scores = _STATE.score_edit(_STATE.layer, scores)
        probs = torch.softmax(scores, dim=dim)
        visible = _STATE.bloom_mask
        visible = _visible_from_mask(visible, probs.shape)
        return _apply(_STATE.layer, probs, visible, False).to(dtype or probs.dtype)


@functools.cache
def register_oracle() -> None:
    """Register the oracle attention (and transformers' eager mask) as ``attn_implementation="tokext_oracle"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("tokext_oracle", oracle_attention)
    AttentionMaskInterface.register("tokext_oracle", eager_mask)


@functools.cache
def oracle_model(name: str) -> Any:
    """The family's model loaded by transformers with the oracle attention (once per session)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    register_oracle()
    cls = AutoModelForMaskedLM if name == "BERT" else AutoModelForCausalLM
    implementation = "eager" if name == "Bloom" else "tokext_oracle"
    return cls.from_pretrained(family_dir(name), attn_implementation=implementation, dtype=torch.float32).eval()


@contextlib.contextmanager
def _bloom_hooks(model: Any):
    import transformers.models.bloom.modeling_bloom as bloom

    def before(module, args, kwargs):
        _STATE.layer = int(module.layer_idx)
        _STATE.bloom_mask = kwargs.get("attention_mask", args[3] if len(args) > 3 else None)

    handles = [
        m.register_forward_pre_hook(before, with_kwargs=True)
        for m in model.modules()
        if type(m).__name__ == "BloomAttention"
    ]
    original, bloom.F = bloom.F, _BloomSoftmax()
    try:
        yield
    finally:
        bloom.F = original
        for handle in handles:
            handle.remove()


def oracle_forward(
    name: str,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    edit: Callable | None = None,
    score_edit: Callable | None = None,
    model: Any = None,
) -> tuple[torch.Tensor, Info, dict[int, torch.Tensor]]:
    """Logits of the family's model run by transformers with ``edit`` applied to every layer's
    probabilities (``score_edit`` to its masked, softcapped scores, a sink logit included), the
    :class:`~tests.reference_interventions.Info` it saw (with each layer's visibility from
    transformers' own mask), and each layer's (edited) probabilities. ``model``: another transformers model
    loaded with ``attn_implementation="tokext_oracle"`` (after :func:`register_oracle`) instead of the family's."""
    model = model if model is not None else oracle_model(name)
    _STATE.edit, _STATE.score_edit = edit, score_edit
    _STATE.info, _STATE.probs, _STATE.kv = Info(real=attention_mask.bool(), tokens=tokens), {}, {}
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    # positions of a left-padded row count from its first real token (Bloom's ALiBi and BERT's
    # absolute positions come from the model itself)
    kwargs = {} if name in ("BERT", "Bloom") else {"position_ids": positions}
    context = _bloom_hooks(model) if name == "Bloom" else contextlib.nullcontext()
    try:
        with torch.no_grad(), context:
            logits = model(input_ids=tokens, attention_mask=attention_mask, **kwargs).logits
    finally:
        _STATE.edit = _STATE.score_edit = None
    return logits, _STATE.info, dict(_STATE.probs)


# ---------------------------------------------------------------------- the oracle for output-level edits


def decoder_layers(model: Any, name: str | None = None) -> Any:
    """The list of decoder (or encoder) layers of a plain transformers model: the family's path in
    :data:`_LAYERS_AND_OUTPUT` when ``name`` is given, else ``layers`` or GPT-2's ``h`` of the base model."""
    if name is not None:
        return _path(model, _LAYERS_AND_OUTPUT.get(name, _DEFAULT_LAYERS_AND_OUTPUT)[0])
    base = model.base_model
    for attr in ("layers", "h"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise AssertionError(f"no decoder layers found on {type(base).__name__}")


def output_projection(layer: Any) -> Any:
    """A decoder layer's attention output projection (the module whose input is the heads' outputs)."""
    for attn_name in ("self_attn", "attn", "attention", "self_attention"):
        attn = getattr(layer, attn_name, None)
        if attn is None:
            continue
        for proj in ("o_proj", "c_proj", "dense", "out_proj"):
            if hasattr(attn, proj):
                return getattr(attn, proj)
    raise AssertionError(f"no output projection found on {type(layer).__name__}")


def oracle_output_forward(
    name: str,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    resid: dict[int, Callable] | None = None,
    heads: dict[tuple[int, int], Callable] | None = None,
    edit: Callable | None = None,
) -> torch.Tensor:
    """Logits of the family's model run by transformers with output-level edits made by plain torch hooks:
    ``resid[layer](h, real)`` replaces decoder layer ``layer``'s output [batch, position, d_model]
    (a forward hook on the layer; ``real`` is the Bool [batch, position] mask), and
    ``heads[(layer, head)](x)`` replaces head ``head``'s slice [batch, position, d_head] of the input of
    the layer's output projection (a forward pre-hook on ``o_proj`` / ``c_proj``). ``edit`` as in
    :func:`oracle_forward` (a pattern edit, to check composition)."""
    model = oracle_model(name)
    layers = decoder_layers(model, name)
    real = attention_mask.bool()
    config = model.config
    n_heads = config.num_attention_heads
    handles = []

    def layer_hook(fn: Callable) -> Callable:
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (fn(output[0], real),) + tuple(output[1:])
            return fn(output, real)

        return hook

    def proj_hook(layer: int) -> Callable:
        def hook(module, args):
            x = args[0].clone()
            d_head = x.shape[-1] // n_heads
            for (head_layer, h), fn in (heads or {}).items():
                if head_layer == layer:
                    x[..., h * d_head : (h + 1) * d_head] = fn(x[..., h * d_head : (h + 1) * d_head])
            return (x,) + tuple(args[1:])

        return hook

    try:
        for layer, fn in (resid or {}).items():
            handles.append(layers[layer].register_forward_hook(layer_hook(fn)))
        for layer in sorted({head_layer for head_layer, _ in (heads or {})}):
            handles.append(oracle_output_projection(name, layer, model).register_forward_pre_hook(proj_hook(layer)))
        logits, _, _ = oracle_forward(name, tokens, attention_mask, edit=edit)
    finally:
        for handle in handles:
            handle.remove()
    return logits


# ---------------------------------------------------------------------- the oracle's norm sources

_LAYERS_AND_OUTPUT = {  # family -> (path of the decoder layers, path of the output projection inside one)
    "GPT-NeoX": ("gpt_neox.layers", "attention.dense"),
    "GPT-2": ("transformer.h", "attn.c_proj"),
    "Bloom": ("transformer.h", "self_attention.dense"),
    "BERT": ("bert.encoder.layer", "attention.output.dense"),
    "OPT": ("model.decoder.layers", "self_attn.out_proj"),
    "GPT-J": ("transformer.h", "attn.out_proj"),
}
_DEFAULT_LAYERS_AND_OUTPUT = ("model.layers", "self_attn.o_proj")


def _path(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def oracle_output_projection(name: str, layer: int, model: Any = None) -> torch.nn.Module:
    """The family's output projection of ``layer`` in the oracle model (a transformers module)."""
    layers, output = _LAYERS_AND_OUTPUT.get(name, _DEFAULT_LAYERS_AND_OUTPUT)
    return _path(_path(model if model is not None else oracle_model(name), layers)[layer], output)


def head_outputs(module: torch.nn.Module, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """x_h W_O^h [..., head, d_model] for x [..., head x d_head]: head h's slice of the projection's
    weight applied to head h's slice of x (``nn.Linear``: columns of W; GPT-2's ``Conv1D``: rows)."""
    weight = module.weight.detach().double()
    d_head = x.shape[-1] // n_heads
    outs = []
    for h in range(n_heads):
        part = x[..., h * d_head : (h + 1) * d_head].double()
        if type(module).__name__ == "Conv1D":
            outs.append(part @ weight[h * d_head : (h + 1) * d_head])
        else:
            outs.append(part @ weight[:, h * d_head : (h + 1) * d_head].T)
    return torch.stack(outs, dim=-2)


def oracle_norm_forward(name: str, tokens: torch.Tensor, model: Any = None, edit: Callable | None = None) -> dict:
    """One sequence through the oracle (``model``: another transformers model loaded with the oracle
    attention, e.g. SmolLM2) with forward hooks: each decoder layer's output ``h`` [T, d_model], each output
    projection's input ``z`` [T, heads x d_head], the keys and values the attention function got [kv heads,
    T, d_head], the probabilities [heads, T, T] with each layer's visibility, and the projections.
    ``edit(layer, probs, info)`` changes the probabilities between the softmax and ``@ V``, as in
    :func:`oracle_forward`."""
    model = model if model is not None else oracle_model(name)
    layers_path, _ = _LAYERS_AND_OUTPUT.get(name, _DEFAULT_LAYERS_AND_OUTPUT)
    decoder = _path(model, layers_path)
    h, z, handles = {}, {}, []
    projections = [oracle_output_projection(name, index, model) for index in range(len(decoder))]
    for index, layer in enumerate(decoder):
        handles.append(
            layer.register_forward_hook(
                lambda m, a, out, i=index: h.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0].detach())
            )
        )
        handles.append(
            projections[index].register_forward_pre_hook(lambda m, a, i=index: z.__setitem__(i, a[0][0].detach()))
        )
    try:
        _, info, probs = oracle_forward(name, tokens, torch.ones_like(tokens), edit=edit, model=model)
    finally:
        for handle in handles:
            handle.remove()
    kv = {layer: (k[0], v[0]) for layer, (k, v) in _STATE.kv.items()}
    return {
        "h": h,
        "z": z,
        "kv": kv,
        "probs": {k: p[0] for k, p in probs.items()},
        "visible": info.masks,
        "projections": projections,
    }


def _lower_median(x: Any) -> float:
    import numpy as np

    flat = np.sort(np.abs(x).ravel())
    return float(flat[(flat.size - 1) // 2])


def pool_oracle_norms(runs: list[dict], n_heads: int, massive: dict) -> dict:
    """Every norm statistic from the runs of :func:`oracle_norm_forward` (one per sequence), pooled as
    tokext documents it: per-position arrays over the sequences that have the position, head-output norm
    over real rows, top-3 and median |h| over sequences, massive entries by Sun et al.'s criterion with
    ``massive`` thresholds ({(sequence, layer, position, dim): value})."""
    import numpy as np

    n_layers = len(runs[0]["h"])
    length = max(run["h"][0].shape[0] for run in runs)
    seen = np.zeros(length)
    residual = np.zeros((n_layers, length))
    key, value, weighted = (np.zeros((n_layers, n_heads, length)) for _ in range(3))
    head_output, rows = np.zeros((n_layers, n_heads)), 0
    top, median = np.zeros((n_layers, 3)), np.zeros(n_layers)
    found = {}
    for s, run in enumerate(runs):
        t = run["h"][0].shape[0]
        seen[:t] += 1
        rows += t
        for layer in range(n_layers):
            h = run["h"][layer].double().numpy()  # [T, d_model]
            residual[layer, :t] += np.linalg.norm(h, axis=-1)
            top[layer] += np.sort(np.abs(h).ravel())[::-1][:3]
            med = _lower_median(h)
            median[layer] += med
            hit = (np.abs(h) > massive["abs_threshold"]) & (np.abs(h) >= massive["ratio"] * med)
            for position, dim in zip(*np.nonzero(hit)):
                found[(s, layer, int(position), int(dim))] = float(h[position, dim])
            k, v = run["kv"][layer]
            groups = n_heads // k.shape[0]
            k = k.double().repeat_interleave(groups, 0)  # [head, T, d_head]
            v = v.double().repeat_interleave(groups, 0)
            key[layer, :, :t] += k.norm(dim=-1).numpy()
            value[layer, :, :t] += v.norm(dim=-1).numpy()
            # ‖v_j W_O^h‖ straight from the projection's weight, head by head
            projection = run["projections"][layer]
            flat = v.permute(1, 0, 2).reshape(t, -1)  # [T, heads x d_head], head h in its slice
            u = head_outputs(projection, flat, n_heads).norm(dim=-1).T  # [head, T]
            p = run["probs"][layer].double() * run["visible"][layer][0]  # [head, query, key]
            n = p * u[:, None, :]
            n = n / n.sum(-1, keepdim=True)
            seers = run["visible"][layer][0].double().sum(0)  # [key]
            weighted[layer, :, :t] += (n.sum(1) / seers).numpy()
            head_output[layer] += head_outputs(projection, run["z"][layer], n_heads).norm(dim=-1).sum(0).numpy()
    n_seq = len(runs)
    return {
        "residual_norm": residual / seen,
        "key_norm": key / seen,
        "value_norm": value / seen,
        "norm_weighted_received": weighted / seen,
        "head_output_norm": head_output / rows,
        "top_activations": top / n_seq,
        "median_activation": median / n_seq,
        "massive": found,
    }
