"""The golden side of the intervention tests, written without tokext or TransformerLens.

- :func:`reference_logits`: a plain eager forward of a saved Llama or GPT-2 directory, read
  straight from ``config.json`` and ``model.safetensors``, with an ``edit(layer, pattern, info)``
  callback between softmax and ``pattern @ V``.
- ``ref_*``: each intervention written from its formula, row by row, on plain tensors.

``info`` carries ``real`` (Bool [batch, key]) and ``tokens`` [batch, key]; the conformance oracle
(``tests/conformance.py``) adds, per layer, the Bool [batch, query, key] visibility that
transformers' own mask gives (sliding windows, encoders) and whether a learned sink logit joins the
softmax. A learned-sink row's distribution is its keys plus the sink, whose share is ``1 - sum_j p``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class Info:
    real: torch.Tensor  # Bool [batch, key]
    tokens: torch.Tensor  # Long [batch, key]
    masks: dict = field(default_factory=dict)  # layer -> Bool [batch, query, key] from the model's mask
    sinks: dict = field(default_factory=dict)  # layer -> whether a learned sink logit joins the softmax

    def first(self, b: int) -> int:
        return int(self.real[b].nonzero()[0])

    def visible(self, b: int, i: int, layer: int | None = None) -> torch.Tensor:
        """Bool [key]: keys that query i of row b sees (the model's mask when known, else causal; real)."""
        if layer in self.masks:
            return self.masks[layer][b, i] & self.real[b]
        keys = torch.arange(self.real.shape[1])
        return (keys <= i) & self.real[b]

    def sink(self, layer: int) -> bool:
        return bool(self.sinks.get(layer, False))


# ---------------------------------------------------------------------- plain forwards


def reference_logits(
    model_dir: str | Path, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, edit=None
) -> torch.Tensor:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    info = Info(real=real, tokens=tokens)
    positions = (real.long().cumsum(-1) - 1).clamp_min(0)
    forward = {"llama": _llama, "gpt2": _gpt2}[config["model_type"]]
    with torch.no_grad():
        return forward(config, weights, tokens, positions, info, edit or (lambda layer, p, info: p))


def _attend(q, k, v, info: Info, layer: int, edit) -> torch.Tensor:
    """q [b, h, t, d], k/v [b, h, t, d] (already expanded): eager attention with the edit."""
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = torch.ones(t, t, dtype=torch.bool).tril()[None] & info.real[:, None, :]
    scores = scores.masked_fill(~visible[:, None], torch.finfo(scores.dtype).min)
    pattern = torch.softmax(scores.float(), dim=-1)
    pattern = edit(layer, pattern, info)
    return pattern @ v


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _llama(config, w, tokens, positions, info, edit):
    d, n_h, n_kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // n_h
    eps = config["rms_norm_eps"]
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = positions[..., None].float() * inv_freq  # [b, t, hd/2]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    b, t = tokens.shape
    x = w["model.embed_tokens.weight"][tokens]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(b, t, n_h, hd).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(b, t, n_kv, hd).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(b, t, n_kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        group = n_h // n_kv  # query head i reads KV head i // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        z = _attend(q, k, v, info, layer, edit).transpose(1, 2).reshape(b, t, n_h * hd)
        x = x + z @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def _gpt2(config, w, tokens, positions, info, edit):
    d, n_h, eps = config["n_embd"], config["n_head"], config["layer_norm_epsilon"]
    hd = d // n_h
    b, t = tokens.shape

    def ln(x, name):
        return torch.nn.functional.layer_norm(x, (d,), w[name + ".weight"], w[name + ".bias"], eps)

    def gelu_new(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    x = w["transformer.wte.weight"][tokens] + w["transformer.wpe.weight"][positions]
    for layer in range(config["n_layer"]):
        p = f"transformer.h.{layer}."
        h = ln(x, p + "ln_1")
        qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]  # Conv1D: [in, out]
        q, k, v = (part.view(b, t, n_h, hd).transpose(1, 2) for part in qkv.split(d, dim=-1))
        z = _attend(q, k, v, info, layer, edit).transpose(1, 2).reshape(b, t, d)
        x = x + z @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = ln(x, p + "ln_2")
        x = (
            x
            + gelu_new(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]) @ w[p + "mlp.c_proj.weight"]
            + w[p + "mlp.c_proj.bias"]
        )
    return ln(x, "transformer.ln_f") @ w["transformer.wte.weight"].T


# ---------------------------------------------------------------------- formulas, row by row


def _rows(pattern):
    b, h, t, _ = pattern.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                yield bi, hi, i


def ref_emulation(
    alpha=0.2,
    threshold=0.01,
    source=0,
    horizon=None,
    n_layers=3,
    exclude_self=True,
    renormalize=False,
    uniform=False,
    layers=None,
):
    """A_l(i,j) * (1 + alpha (1 - l/h)) where the source layer's A(i,j) > threshold, j != i."""
    h = horizon if horizon is not None else n_layers - 1
    edited = set(layers) if layers is not None else set(range(source + 1, n_layers))
    saved = {}

    def edit(layer, p, info):
        if layer == source:
            saved["p"] = p.clone()
        if layer not in edited:
            return p
        out = p.clone()
        factor = 1 + alpha * (1 - layer / h)
        for b, hi, i in _rows(p):
            mask = torch.ones(p.shape[-1], dtype=torch.bool) if uniform else saved["p"][b, hi, i] > threshold
            if exclude_self and not uniform:
                mask[i] = False
            out[b, hi, i] = torch.where(mask, p[b, hi, i] * factor, p[b, hi, i])
            if renormalize and out[b, hi, i].sum() > 0:
                out[b, hi, i] *= p[b, hi, i].sum() / out[b, hi, i].sum()
        return out

    return edit


def ref_act(tau=0.1, beta=0.4, heads=None, exclude_first=True):
    """ACT: sinks = real keys with mean received attention over the real queries that see them > tau,
    less the first of them (``indices[1:]`` in ACT's code) with ``exclude_first``."""

    def edit(layer, p, info):
        out = p.clone()
        b_n, h_n, t, _ = p.shape
        for b in range(b_n):
            real_q = info.real[b]
            for hi in range(h_n):
                if heads is not None and (layer, hi) not in heads:
                    continue
                sinks = []
                for k in range(t):
                    seers = [i for i in range(t) if real_q[i] and info.visible(b, i, layer)[k]]
                    if not info.real[b, k] or not seers:
                        continue
                    if sum(float(p[b, hi, i, k]) for i in seers) / len(seers) > tau:
                        sinks.append(k)
                if exclude_first:
                    sinks = sinks[1:]
                in_s = torch.zeros(t, dtype=torch.bool)
                in_s[sinks] = True
                for i in range(t):
                    row = p[b, hi, i].double()
                    rest = row[~in_s].sum()
                    if rest <= 0:
                        continue
                    freed = (1 - beta) * row[in_s].sum()
                    out[b, hi, i] = torch.where(in_s, beta * row, row + freed * row / rest).to(out.dtype)
        return out

    return edit


def ref_rebalance(target_fn, scale=0.0, renormalize=True, layers=None, heads=None, scale_sink=False):
    """A'(i,j) = w_j A(i,j), w_j = scale on targets; rows rescaled to their old sum (kept if 0).

    In a learned-sink layer the row is its keys plus the sink s = 1 - sum_j A(i,j), weighted by
    ``scale`` when ``scale_sink``; the whole row keeps its total (1)."""

    def edit(layer, p, info):
        if layers is not None and layer not in layers:
            return p
        out = p.clone()
        for b, hi, i in _rows(p):
            if heads is not None and (layer, hi) not in heads:
                continue
            w = torch.tensor([scale if target_fn(info, b, j) else 1.0 for j in range(p.shape[-1])], dtype=torch.float64)
            original = p[b, hi, i].double()
            row = original * w
            sink = max(0.0, 1.0 - float(original.sum())) if info.sink(layer) else 0.0
            kept = sink * (scale if scale_sink else 1.0)
            if renormalize:
                total = float(row.sum()) + kept
                row = row * (float(original.sum()) + sink) / total if total > 0 else original
            out[b, hi, i] = row.to(out.dtype)
        return out

    return edit


def ref_sink_value_removal():
    """A'(i, first) = 0 for every real query row i after the row's first real token; nothing else moves."""

    def edit(layer, p, info):
        out = p.clone()
        for b, hi, i in _rows(p):
            first = info.first(b)
            if i != first:
                out[b, hi, i, first] = 0.0
        return out

    return edit


def ref_zerotuning(gamma_of):
    """ZeroTuning (arXiv 2505.11739): with a_0 the row's mass on its first real key and gamma the
    head's factor, a_0' = gamma a_0 / D and a_j' = a_j / D, D = (gamma - 1) a_0 + 1, on the row
    normalised to sum 1; the result is scaled back to the row's incoming sum. In a learned-sink
    layer the sink's share s = 1 - sum_j A(i,j) is one more entry of the row (divided by D too).

    ``gamma_of(layer, head)`` gives each head's factor (1: the head is left alone)."""

    def edit(layer, p, info):
        out = p.clone()
        for b, hi, i in _rows(p):
            gamma = gamma_of(layer, hi)
            total = float(p[b, hi, i].sum())
            if gamma == 1 or total <= 0:
                continue
            # the sink's share is a difference of numbers near 1: that row in float64
            original = p[b, hi, i].double() if info.sink(layer) else p[b, hi, i]
            sink = max(0.0, 1.0 - float(original.sum())) if info.sink(layer) else 0.0
            whole = float(original.sum()) + sink  # the row's distribution: its keys and the sink
            row = original / whole
            first = info.first(b)
            d = (gamma - 1) * float(row[first]) + 1
            new = row / d
            new[first] = gamma * row[first] / d
            out[b, hi, i] = (new * whole).to(out.dtype)
        return out

    return edit


def ref_temperature(temperature, layers=None, heads=None):
    """p^(1/T) / sum over visible keys of p^(1/T).

    Rows come out summing to 1 (the library keeps each row's incoming sum, which is the same for
    softmax rows; composed cases feed it rows that sum to 1)."""

    def edit(layer, p, info):
        if layers is not None and layer not in layers:
            return p
        out = p.clone()
        for b, hi, i in _rows(p):
            if heads is not None and (layer, hi) not in heads:
                continue
            powered = p[b, hi, i].double() ** (1.0 / temperature)
            total = float(powered.sum())
            if info.sink(layer):  # the sink logit is divided by T too: its share is one more entry
                total += max(0.0, 1.0 - float(p[b, hi, i].sum())) ** (1.0 / temperature)
            if total > 0:  # (all-zero pad rows stay zero)
                out[b, hi, i] = (powered / total).float()
        return out

    return edit


def ref_patch(source, targets, heads=None):
    saved = {}

    def edit(layer, p, info):
        if layer == source:
            saved["p"] = p.clone()
        if layer not in targets:
            return p
        out = p.clone()
        for hi in range(p.shape[1]):
            if heads is None or (layer, hi) in heads:
                out[:, hi] = saved["p"][:, hi]
        return out

    return edit


def ref_ablation(heads, mode):
    def edit(layer, p, info):
        out = p.clone()
        for b, hi, i in _rows(p):
            if (layer, hi) not in heads:
                continue
            visible = info.visible(b, i, layer).float()
            if mode == "zero":
                out[b, hi, i] = 0.0
            elif mode == "mean":
                out[b, hi, i] = visible / visible.sum().clamp_min(1.0)
            else:
                onehot = torch.zeros(p.shape[-1])
                onehot[info.first(b)] = 1.0
                out[b, hi, i] = onehot * visible
        return out

    return edit


def compose(*edits):
    """The reference edits applied one after another at each layer (the order of ``intervene``)."""

    def edit(layer, p, info):
        for one in edits:
            p = one(layer, p, info)
        return p

    return edit
