"""Published measurement protocols, so that tokext's numbers can be set beside the papers' tables.

A protocol fixes what the paper fixed: how long each input is, how the tokenizer treats BOS, and
how the sink rate is thresholded. :func:`tokext.collect_attention_stats` takes one by name
(``protocol="gu2024"``) and records it in the statistics' metadata.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from tokext.errors import InputError


@dataclass(frozen=True)
class Protocol:
    """How a paper measured sinks: inputs cut to their first ``length`` tokens (shorter ones refused),
    the tokenizer's own BOS default, and the sink rate thresholded per sequence or not."""

    name: str
    length: int
    per_sequence: bool
    eps: float
    citation: str
    published: dict[str, float] = field(default_factory=dict)  # model -> Sink_1^eps (%)


PROTOCOLS: dict[str, Protocol] = {
    "gu2024": Protocol(
        name="gu2024",
        length=64,
        per_sequence=True,
        eps=0.3,
        citation=(
            "Gu et al., When Attention Sink Emerges in Language Models: An Empirical View (ICLR 2025), "
            "arXiv 2410.10781, Table 1: Sink_1^0.3 on natural text, first 64 tokens, "
            "alpha per sample = (attn / arange(T, 0, -1)).sum(-2), thresholded with > per sample"
        ),
        published={"GPT2-XL": 77.00, "Mistral-7B": 97.49, "LLaMA2-7B": 92.47, "LLaMA3-8B": 99.02},
    ),
}


def resolve_protocol(name: str | None) -> Protocol | None:
    """The :class:`Protocol` called ``name``; ``None`` or ``"default"`` is tokext's own convention."""
    if name is None or name == "default":
        return None
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(str(name), list(PROTOCOLS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown protocol {name!r}.{hint} Available: default, {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
