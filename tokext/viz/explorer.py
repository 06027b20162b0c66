"""The interactive attention explorer: every head's pattern on a few prompts, as one offline page.

:func:`explore` runs the model on each prompt (cut to its first ``max_tokens`` tokens), captures
every layer's ``hook_pattern`` and returns an :class:`Explorer`. In a notebook it renders itself;
``.save("x.html")`` writes the same page. The page shows:

- a layer x head grid coloured by first-token mass, normalised entropy or learned-sink mass (a
  selector), one ``<div class="cell" data-layer=L data-head=H>`` per head; with ``norms=True`` also by
  norm-weighted first-token mass (Kobayashi et al.'s alpha_0) and head-output norm (the mean
  ‖z_i^h W_O^h‖ over the prompt's rows, coloured from 0 to the grid's largest), from
  :func:`tokext.collect_attention_stats` with ``norms=True`` run on the same tokens (one more forward
  pass per prompt and run);
- the clicked head's pattern on the prompt (Plotly heatmap, tokens as labels, weights on hover),
  with its sink columns (keys whose received attention alpha_k exceeds ``sink_eps``) outlined;
- with an intervention: the baseline, edited and edited - baseline patterns side by side, and the
  grid for any of the three.

The page is self-contained: Plotly's JavaScript (from the ``plotly`` package) and the data are
inlined, nothing is fetched, and it works offline from ``file://``. Weights are stored rounded to
``decimals`` decimals, only the causal (lower) triangle: about ``layers x heads x T^2 / 2``
integers per prompt and run: 1.3 MB for SmolLM2-135M (30 x 9 heads) at T = 64, next to the 4.8 MB
of Plotly's JavaScript.

The head scores come from :func:`head_scores`, which applies the attention room's metrics to the
captured patterns, so the grid shows exactly what :func:`tokext.collect_attention_stats` would
measure on the same tokens.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokext.attention.collect import collect_attention_stats
from tokext.attention.masks import visible_keys
from tokext.attention.metrics import received_attention, row_entropy
from tokext.attention.norm_sources import plan_norms
from tokext.errors import InputError
from tokext.interventions.base import Intervention, model_device, validate
from tokext.interventions.intervene import intervene
from tokext.models.hooks import attached, pattern_hook_name
from tokext.models.info import model_info
from tokext.models.inputs import Inputs, encode
from tokext.version import __version__

DEFAULT_MAX_TOKENS = 64
"""Tokens kept per prompt: the page embeds every head's T x T pattern, so T is bounded."""

SINK_EPS = 0.3
"""A key is a sink column when its received attention alpha_k exceeds this (Gu et al.'s epsilon)."""

METRICS = {
    "first_token_mass": "first-token mass",
    "entropy": "normalised entropy",
    "learned_sink_mass": "learned-sink mass",
}
"""The grid's colourings: key -> label. All three are in [0, 1] for a softmax pattern."""

NORM_METRICS = {
    "norm_weighted_first": "norm-weighted first-token mass",
    "head_output_norm": "head-output norm",
}
"""The colourings added with ``norms=True``; the head-output norm is coloured from 0 to its largest value."""
UNBOUNDED = ("head_output_norm",)

CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:"
"""The page's Content-Security-Policy: inline code and data only, so the browser itself blocks any request."""

GENERATOR = "tokext attention explorer"
"""Marks a page as the explorer's own: :meth:`Explorer.save` replaces only such a file."""


def head_scores(pattern: torch.Tensor, visible: torch.Tensor, sink_eps: float = SINK_EPS) -> dict[str, np.ndarray]:
    """What the grid shows for one sequence: [layer, head] scores and the [layer, head, key] sinks.

    ``pattern`` is [layer, head, query, key] (each layer's ``hook_pattern`` of one sequence, the
    layers standing where :mod:`tokext.attention.metrics` has its batch), ``visible`` Bool
    [1, query, key]. Returns

    - ``first_token_mass``: mean share of a row's (renormalised) mass on key 0, alpha_0;
    - ``entropy``: mean normalised row entropy over rows with >= 2 visible keys (NaN if none);
    - ``learned_sink_mass``: mean over rows of 1 - the raw row sum, the share a learned sink logit
      (gpt-oss) takes; 0 for softmax attention, negative where an intervention boosts rows above 1;
    - ``sinks``: Bool [layer, head, key], alpha_k > ``sink_eps``.

    The one place the explorer turns patterns into numbers: a version reading saved
    :class:`~tokext.attention.stats.AttentionStats` would replace only this function.

    >>> p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])[None, None]   # one layer, one head, T = 2
    >>> scores = head_scores(p, visible_keys(torch.ones(1, 2)))
    >>> float(scores["first_token_mass"][0, 0]), float(scores["entropy"][0, 0])
    (0.75, 1.0)
    """
    pattern = pattern.double()
    received = received_attention(pattern, visible)  # [layer, head, key]
    entropy = row_entropy(pattern, visible)  # [layer, head, query], NaN on one-key rows
    rows = visible.any(-1)[:, None]  # [1, 1, query]: the real rows
    kept = ~torch.isnan(entropy)
    entropy_mean = torch.where(kept, entropy, torch.zeros_like(entropy)).sum(-1) / kept.sum(-1)
    row_sum = (pattern * visible[:, None]).sum(-1)  # [layer, head, query]
    sink_mass = ((1.0 - row_sum) * rows).sum(-1) / rows.sum(-1)
    return {
        "first_token_mass": received[..., 0].numpy(),
        "entropy": entropy_mean.numpy(),
        "learned_sink_mass": sink_mass.numpy(),
        "sinks": (received > sink_eps).numpy(),
    }


def capture_patterns(model: Any, tokens: torch.Tensor, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
    """Float [layer, head, query, key]: every layer's ``hook_pattern`` for one unpadded sequence.

    With ``interventions`` the forward runs inside :func:`tokext.intervene`; the capturing hooks
    are attached after the intervention's, so they record the edited pattern. All hooks are gone
    when this returns or raises.
    """
    n_layers = int(model.cfg.n_layers)
    captured: list[torch.Tensor | None] = [None] * n_layers

    def keep(layer: int) -> Callable:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            captured[layer] = pattern[0].detach().float().cpu()

        return hook

    hooks = [(pattern_hook_name(layer), keep(layer)) for layer in range(n_layers)]
    with ExitStack() as stack:
        if interventions:
            stack.enter_context(intervene(model, *interventions))
        stack.enter_context(attached(model, hooks))
        stack.enter_context(torch.inference_mode())
        model(tokens[None].to(model_device(model)), return_type=None)
    missing = [layer for layer, p in enumerate(captured) if p is None]
    if missing:
        raise InputError(f"the model never called hook_pattern in layers {missing}: nothing to show there")
    return torch.stack(captured)  # type: ignore[arg-type]


def token_labels(model: Any, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own, newlines and tabs escaped; token ids when there is no tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    texts = [tokenizer.decode([int(i)]) for i in ids]
    return [t.replace("\n", "\\n").replace("\t", "\\t") or f"[{int(i)}]" for t, i in zip(texts, ids)]


def norm_scores(model: Any, tokens: torch.Tensor, interventions: Sequence[Intervention] = ()) -> dict[str, np.ndarray]:
    """[layer, head] norm-weighted first-token mass (``norm_weighted_received[..., 0]``) and head-output norm
    of one unpadded sequence, from :func:`~tokext.attention.collect.collect_attention_stats` with
    ``norms=True`` (inside :func:`tokext.intervene` when ``interventions`` are given)."""
    with ExitStack() as stack:
        if interventions:
            stack.enter_context(intervene(model, *interventions))
        stats = collect_attention_stats(model, [tokens.tolist()], batch_size=1, progress=False, norms=True)
    return {"norm_weighted_first": stats.norm_weighted_received[:, :, 0], "head_output_norm": stats.head_output_norm}


def _run_payload(
    pattern: torch.Tensor,
    visible: torch.Tensor,
    decimals: int,
    sink_eps: float,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One run of one prompt as JSON-ready lists: scores (with ``extra`` ones), sink keys and the rounded
    lower triangles."""
    scores = {**head_scores(pattern, visible, sink_eps), **(extra or {})}
    n_layers, n_heads, length, _ = pattern.shape
    rows, cols = np.tril_indices(length)
    weights = np.rint(pattern.numpy()[:, :, rows, cols] * 10**decimals).astype(np.int64)
    return {
        "scores": {key: [[_finite(v) for v in row] for row in scores[key]] for key in [*METRICS, *(extra or {})]},
        "sinks": [
            [np.flatnonzero(scores["sinks"][layer, head]).tolist() for head in range(n_heads)]
            for layer in range(n_layers)
        ],
        "patterns": weights.tolist(),
    }


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


@dataclass
class Explorer:
    """The explorer page (``html``) and the data embedded in it (``data``, as the page reads it).

    Renders itself in a notebook (an iframe holding the page); :meth:`save` writes the page.
    """

    html: str
    data: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (a new file, or an explorer page written before) and return it."""
        target = check_page_target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.html, encoding="utf-8")
        return target

    def _repr_html_(self) -> str:
        height = max(620, 18 * self.data["n_layers"] + 260)
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" title="{GENERATOR}" '
            f'style="width: 100%; height: {height}px; border: 0" sandbox="allow-scripts"></iframe>'
        )


def check_page_target(path: str | Path) -> Path:
    """``path`` as a Path, if writing the page there overwrites nothing but an earlier explorer page.

    Raises :class:`InputError` for a folder or a file that is not an explorer page (checked
    before any work, e.g. by ``tokext analyze --html``).
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{str(target)!r} is a folder: give the explorer page a file name such as explorer.html")
    if target.exists():
        with open(target, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
        if f'content="{GENERATOR}' not in head:
            raise InputError(
                f"refusing to overwrite {str(target)!r}: it exists and is not a tokext explorer page "
                "(choose another file name)"
            )
    return target


def explore(
    model: Any,
    prompts: Inputs,
    intervention: Intervention | Sequence[Intervention] | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    decimals: int = 3,
    sink_eps: float = SINK_EPS,
    prepend_bos: bool | None = None,
    norms: bool = False,
) -> Explorer:
    """Capture every head's attention on ``prompts`` and build the interactive explorer page.

    ``prompts``: strings, a [n, pos] token tensor or lists of token ids (a model without a
    tokenizer takes ids and shows them as labels). Each prompt keeps its first ``max_tokens``
    tokens (the page says so) and weights are rounded to ``decimals`` decimals. ``intervention``:
    one or several interventions (applied in order, as in :func:`tokext.intervene`); the page then
    shows the baseline, the edited run and their difference. ``norms=True`` also colours the grid by
    norm-weighted first-token mass and head-output norm (:func:`norm_scores`). Everything is
    validated before the first forward pass.

    >>> from tokext.models import native_model
    >>> page = explore(native_model(), torch.randint(0, 64, (2, 6)))
    >>> page.html.count('class="cell"'), page.data["n_layers"], page.data["n_heads"]
    (8, 2, 4)
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 1 <= decimals <= 6:
        raise InputError(f"decimals must be an integer from 1 to 6, got {decimals!r}")
    interventions = (
        []
        if intervention is None
        else ([intervention] if isinstance(intervention, Intervention) else list(intervention))
    )
    validate(model, interventions, "explore")
    info = model_info(model)
    if norms:
        plan_norms(model, list(range(info.n_layers)), "hooks")  # every source the norms read, checked now
    longer = encode(model, prompts, max_len=max_tokens + 1, prepend_bos=prepend_bos)  # one more: was it cut?
    runs = ["baseline", "edited"] if interventions else ["baseline"]
    entries = []
    for seq in longer:
        cut, seq = seq.numel() > max_tokens, seq[:max_tokens]
        visible = visible_keys(torch.ones(1, seq.numel(), dtype=torch.long))
        patterns = {"baseline": capture_patterns(model, seq)}
        if interventions:
            patterns["edited"] = capture_patterns(model, seq, interventions)
        labels = token_labels(model, seq.tolist())
        tokenizer = getattr(model, "tokenizer", None)
        text = tokenizer.decode(seq.tolist()).replace("\n", "\\n") if tokenizer is not None else " ".join(labels)
        entries.append(
            {
                "label": text[:60],
                "tokens": labels,
                "cut": bool(cut),
                "runs": {
                    run: _run_payload(
                        patterns[run],
                        visible,
                        decimals,
                        sink_eps,
                        norm_scores(model, seq, interventions if run == "edited" else ()) if norms else None,
                    )
                    for run in runs
                },
            }
        )
    data = {
        "model": info.name,
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "intervention": " + ".join(repr(iv) for iv in interventions) or None,
        "runs": runs,
        "metrics": [
            {"key": key, "label": label, "unbounded": key in UNBOUNDED}
            for key, label in {**METRICS, **(NORM_METRICS if norms else {})}.items()
        ],
        "max_tokens": max_tokens,
        "decimals": decimals,
        "sink_eps": sink_eps,
        "version": __version__,
        "prompts": entries,
    }
    return Explorer(html=render_page(data), data=data)


def render_page(data: dict[str, Any]) -> str:
    """The self-contained HTML page for ``data`` (as built by :func:`explore`)."""
    from plotly.offline import get_plotlyjs

    assets = resources.files("tokext.viz")
    style = assets.joinpath("explorer.css").read_text(encoding="utf-8")
    script = assets.joinpath("explorer.js").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    esc = html.escape
    cut = sum(p["cut"] for p in data["prompts"])
    notes = [
        f"{len(data['prompts'])} prompt(s), each cut to its first {data['max_tokens']} tokens"
        + (f" ({cut} of them longer)" if cut else ""),
        f"weights rounded to {data['decimals']} decimals",
        f"sink columns: keys whose received attention &alpha;<sub>k</sub> &gt; {data['sink_eps']:g}",
        "learned-sink mass: 1 &minus; row sum (0 for softmax attention)",
        *(
            [
                "norm-weighted mass: A<sub>ij</sub>&Vert;v<sub>j</sub>W<sub>O</sub>&Vert; row-normalised "
                "(Kobayashi et al.); "
                "head-output norm coloured from 0 to the grid's largest"
            ]
            if any(m["key"] in NORM_METRICS for m in data["metrics"])
            else []
        ),
        f"tokext {esc(data['version'])}",
    ]
    title = f"{data['model']}: attention explorer"
    n_layers, n_heads = data["n_layers"], data["n_heads"]
    heads_row = "".join(f'<div class="hlabel">{h}</div>' for h in range(n_heads))
    grid_rows = "".join(
        f'<div class="llabel">{layer}</div>'
        + "".join(f'<div class="cell" data-layer="{layer}" data-head="{h}"></div>' for h in range(n_heads))
        for layer in range(n_layers)
    )
    views = [*data["runs"], "difference"] if len(data["runs"]) > 1 else data["runs"]
    run_select = "".join(f'<option value="{r}">{r}</option>' for r in views)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR} {esc(data["version"])}">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{esc(title)}</title>
<style>{style}</style>
</head>
<body>
<header>
  <h1>{esc(title)}</h1>
  <p class="meta">{esc(data["model"])}, {n_layers} layers &times; {n_heads} heads{
        " &middot; intervention: <code>" + esc(data["intervention"]) + "</code>" if data["intervention"] else ""
    }</p>
  <p class="meta">{" &middot; ".join(notes)}</p>
</header>
<div class="controls">
  <label>prompt <select id="prompt"></select></label>
  <label>colour by <select id="metric"></select></label>
  <label{" hidden" if len(data["runs"]) == 1 else ""}>grid shows <select id="run">{run_select}</select></label>
</div>
<main>
  <section id="grid-panel">
    <div id="grid" style="grid-template-columns: 2.2em repeat({n_heads}, 1.6em)">
      <div class="corner">L\\H</div>{heads_row}{grid_rows}
    </div>
    <div id="legend"><span id="legend-lo"></span><span id="legend-bar"></span><span id="legend-hi"></span></div>
    <p id="cell-info" class="meta">click a head to see its pattern</p>
  </section>
  <section id="head" data-layer="" data-head="">
    <h2 id="head-title">no head selected</h2>
    <div class="plots">{"".join(f'<div class="plot" id="plot-{r}" data-run="{r}"></div>' for r in views)}</div>
    <p id="sinks" class="meta"></p>
  </section>
</main>
<script type="application/json" id="tokext-data">{payload}</script>
<script>{get_plotlyjs()}</script>
<script>{script}</script>
</body>
</html>
"""
