"""``tokext analyze``: where does attention go in a model, over a prompt set?

Collects streaming statistics, prints a per-layer table, and writes the tidy CSV, the saved
statistics and three figures (first-token mass and entropy by layer and head, received
attention by key position); with ``html``, also the interactive explorer page for the first
``html_prompts`` analysed prompts (:func:`tokext.viz.explorer.explore`).
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokext.attention.collect import collect_attention_stats
from tokext.attention.protocols import resolve_protocol
from tokext.attention.stats import AttentionStats
from tokext.errors import InputError, TokextWarning
from tokext.evaluation.probe_inputs import check_kind, probe_bos, probe_inputs
from tokext.evaluation.prompts import load_prompts
from tokext.models.info import model_info
from tokext.models.inputs import encode
from tokext.models.loading import DEFAULT_MODEL, load_model

PROBE_LENGTH = 64
"""Probe rows' length without a protocol or max_len (Gu et al.'s T)."""


@dataclass
class AnalyzeResult:
    stats: AttentionStats
    out_dir: Path
    files: list[Path]
    seconds: float
    html: Path | None = None


def default_out_dir(model_name: str) -> Path:
    """``results/analyze/<model>/`` with the model name made filesystem-safe."""
    return Path("results") / "analyze" / re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)


def analyze(
    model: Any = DEFAULT_MODEL,
    *,
    data: str | Path | None = None,
    n: int | None = 64,
    out: str | Path | None = None,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = True,
    protocol: str | None = None,
    html: str | Path | None = None,
    html_prompts: int = 16,
    engine: str = "hooks",
    inputs: str | None = None,
    bos: bool | None = None,
    norms: bool = False,
) -> AnalyzeResult:
    """Run the attention analysis; ``model`` is a spec for :func:`load_model` or a loaded bridge.

    The prompts and the protocol are read and checked before the model is loaded, so a bad
    ``data`` file fails at once with a :class:`tokext.errors.DataFileError` instead of after a full
    model load. ``protocol="gu2024"`` measures as Gu et al. 2024 did; prompts shorter than its 64
    tokens are left out with a :class:`~tokext.errors.TokextWarning` saying how many (so use long
    texts, e.g. ``data="mmlu"``). Returns the statistics, the output directory (``out``, default
    ``results/analyze/<model name>/``), the files written and the collection time in seconds.

    ``html``: also write the explorer page there, for the first ``html_prompts`` prompts, each cut
    to its first ``max_len`` tokens and at most :data:`~tokext.viz.explorer.DEFAULT_MAX_TOKENS`
    (the page holds every head's pattern). A file there that is not an explorer page is an error,
    raised before the model is loaded.

    ``engine``: how attention runs while the statistics are collected (``"hooks"``, ``"streaming"``
    or ``"auto"``, see :func:`~tokext.attention.collect.collect_attention_stats`); the numbers are
    the same, the streaming engine needs no [T, T] pattern, for long prompts.

    ``inputs``: instead of prompts, ``n`` probe rows of Gu et al.'s Table 1
    (:func:`~tokext.evaluation.probe_inputs.probe_inputs`: ``"natural"``, ``"random"`` or
    ``"repeated"``), ``max_len`` tokens long (default 64; the protocol's length under one), seed 0;
    ``bos`` forces a BOS on (True) or off (False) in every row, ``None`` keeps Gu et al.'s default.
    Not combinable with ``data``; ``bos`` needs ``inputs``.
    ``norms``: also collect the norm statistics (``collect_attention_stats(..., norms=True)``); the
    printed table then shows norm-weighted first-token alpha, head-output norm, Gu et al.'s
    residual, key and value norm ratios and Sun et al.'s top |h| / median |h| per layer.
    """
    from tokext.attention.engines.choose import check_engine
    from tokext.viz.explorer import DEFAULT_MAX_TOKENS, check_page_target, explore

    check_engine(engine)
    rules = resolve_protocol(protocol)
    if inputs is not None:
        _check_probe_request(inputs, data, bos, max_len, rules)
    elif bos is not None:
        raise InputError("bos (--bos / --no-bos) applies to probe inputs: pass inputs (--inputs) too")
    prompts: Any = load_prompts(data, None if rules else n) if inputs is None else None
    if html is not None:
        check_page_target(html)
        if isinstance(html_prompts, bool) or not isinstance(html_prompts, int) or html_prompts < 1:
            raise InputError(f"html_prompts must be a positive integer, got {html_prompts!r}")
    bridge = load_model(model) if isinstance(model, str) else model
    if inputs is not None:
        length = rules.length if rules is not None else (max_len or PROBE_LENGTH)
        prompts = probe_inputs(bridge, inputs, n=64 if n is None else n, length=length, bos=bos)
        max_len = None if rules is not None else max_len
    elif rules is not None:
        prompts = _long_enough(bridge, prompts, rules.length, n)
    started = time.perf_counter()
    stats = collect_attention_stats(
        bridge,
        prompts,
        batch_size=batch_size,
        max_len=max_len,
        progress=progress,
        dataset=f"probe:{inputs}" if inputs is not None else str(data or "builtin"),
        protocol=protocol,
        engine=engine,
        norms=norms,
    )
    seconds = time.perf_counter() - started
    if inputs is not None:  # token rows carry their BOS choice: record it, not the tokenizer's default
        with_bos = probe_bos(bridge, inputs, bos)
        stats.metadata["prepend_bos"] = with_bos
        stats.metadata["bos"] = _probe_bos_words(bridge, inputs, bos, with_bos)
    info = model_info(bridge)
    out_dir = Path(out) if out is not None else default_out_dir(info.name)
    files = write_outputs(stats, out_dir)
    page = None
    if html is not None:
        tokens = min(max_len, DEFAULT_MAX_TOKENS) if max_len else DEFAULT_MAX_TOKENS
        page = explore(bridge, prompts[:html_prompts], max_tokens=tokens, norms=norms).save(html)
    return AnalyzeResult(stats=stats, out_dir=out_dir, files=files, seconds=seconds, html=page)


def _check_probe_request(inputs: str, data: Any, bos: Any, max_len: int | None, rules: Any) -> None:
    """Refuse probe settings that contradict each other, before any model loads."""
    check_kind(inputs)
    if data is not None:
        raise InputError(f"pass either data ({data!r}) or probe inputs ({inputs!r}), not both")
    if bos is not None and not isinstance(bos, bool):
        raise InputError(f"bos must be None, True or False, got {bos!r}")
    if rules is not None and max_len not in (None, rules.length):
        raise InputError(f"protocol {rules.name!r} fixes the length at {rules.length} tokens: drop max_len={max_len}")


def _probe_bos_words(model: Any, kind: str, bos: bool | None, with_bos: bool) -> str:
    token = getattr(getattr(model, "tokenizer", None), "bos_token", None) or "BOS"
    if bos is None:
        return f"{token} first (as the tokenizer encodes text)" if with_bos else "no BOS (Gu et al.'s default)"
    return f"{token} first (bos=True)" if with_bos else "no BOS (bos=False)"


def _long_enough(model: Any, prompts: list[str], length: int, n: int | None) -> list[str]:
    """The first ``n`` prompts that encode to at least ``length`` tokens; warns when some are left out."""
    kept = [p for p, ids in zip(prompts, encode(model, prompts)) if ids.numel() >= length]
    if not kept:
        raise InputError(
            f"none of the {len(prompts)} prompts has the {length} tokens the protocol needs: "
            "pass longer texts (e.g. --data mmlu)"
        )
    kept = kept[:n] if n is not None else kept
    if len(kept) < (n if n is not None else len(prompts)):
        warnings.warn(
            f"the protocol needs {length} tokens: using {len(kept)} of {len(prompts)} prompts (the others are shorter)",
            TokextWarning,
            stacklevel=3,
        )
    return kept


def write_outputs(stats: AttentionStats, out_dir: Path) -> list[Path]:
    """Write ``attention_stats.csv``, ``layer_summary.csv``, ``stats.npz``, the three figures and, with
    norms, ``massive_activations.csv`` (Sun et al.'s default thresholds)."""
    from tokext.viz import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "attention_stats.csv", out_dir / "layer_summary.csv", out_dir / "stats.npz"]
    stats.to_frame().to_csv(files[0], index=False)
    stats.layer_summary().to_csv(files[1], index=False)
    stats.save(files[2])
    if stats.has_norms:
        files.append(out_dir / "massive_activations.csv")
        stats.massive_activations().to_csv(files[-1], index=False)
    plots.style()
    note = plots.stats_provenance(stats)
    model = stats.metadata.get("model")
    fig = plots.layer_head_heatmap(
        stats.first_token_mass,
        stats.layers,
        label="share of row mass",
        title=f"{model}: attention mass on the first token",
    )
    files += plots.save(fig, out_dir, "first_token_mass", note)
    fig = plots.layer_head_heatmap(
        stats.entropy,
        stats.layers,
        label="H / log(#visible keys)",
        cmap="mako",
        title=f"{model}: normalised attention entropy",
    )
    files += plots.save(fig, out_dir, "entropy", note)
    fig = plots.received_by_position(
        stats.received,
        stats.layers,
        plots.pick_layers(stats.layers),
        title=f"{model}: received attention by key position",
    )
    files += plots.save(fig, out_dir, "received_by_position", note)
    return files


def format_table(stats: AttentionStats) -> str:
    """The per-layer table printed by ``tokext analyze``.

    Every table says how text was encoded (BOS) and under which protocol. An encoder's first and
    last real tokens are its [CLS] and [SEP] (named from the tokenizer), so both get a column; a
    model with learned sink logits gets the sink's share.
    """
    meta = stats.metadata
    summary = stats.layer_summary()
    encoder = bool(meta.get("encoder"))
    columns = [
        ("first_token_mass", f"{meta.get('cls_token') or 'first-token'} mass" if encoder else "first-token mass")
    ]
    if encoder:
        columns.append(("last_token_mass", f"{meta.get('sep_token') or 'last-token'} mass"))
    if stats.has_learned_sinks:
        columns.append(("learned_sink_mass", "learned-sink mass"))
    columns += [("entropy", "entropy"), ("sink_rate", "sink rate %")]
    if stats.has_norms:
        columns += [
            ("norm_weighted_received_first", "norm-wtd alpha_0"),
            ("head_output_norm", "head-out norm"),
            ("residual_norm_ratio", "|h_0|/|h_t|"),
            ("key_norm_ratio", "|k_0|/|k_t|"),
            ("value_norm_ratio", "|v_0|/|v_t|"),
            ("top_activation", "top |h|"),
            ("top_median_ratio", "top/median"),
        ]
    per_sequence = stats._per_sequence_default(None)
    lines = [
        f"{meta.get('model')} ({meta.get('family', 'unknown family')}): {meta.get('bos')}, "
        f"protocol {meta.get('protocol', 'default')}, {stats.n_sequences} sequences",
        "  ".join([f"{'layer':>5}"] + [f"{label:>{max(len(label), 7)}}" for _, label in columns]),
    ]
    for row in summary.itertuples(index=False):
        cells = [
            f"{getattr(row, key):>{max(len(label), 7)}.{1 if key == 'sink_rate' else 3}f}" for key, label in columns
        ]
        lines.append("  ".join([f"{row.layer:>5}"] + cells))
    if stats.has_norms:
        lines.append(
            "norm ratios: position 0 over the mean of positions t > 0; top |h|: the largest entry of a sequence"
        )
    how = "each sequence's alpha thresholded, then averaged" if per_sequence else "sequence-averaged alpha thresholded"
    lines.append(f"overall sink rate (eps=0.3, position 0, {how}): {stats.sink_rate():.1f}% of (layer, head) pairs")
    return "\n".join(lines)
