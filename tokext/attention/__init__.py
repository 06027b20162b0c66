"""Room 2, attention: what attention does, measured.

Holds visibility masks built from positions and the attention mask (:mod:`~tokext.attention.masks`),
the pure metric formulas on a pattern (:mod:`~tokext.attention.metrics`: received attention,
entropy, category mass, sink rate, hidden sinks, token categories), the streaming, mergeable
statistics (:mod:`~tokext.attention.stats`: :class:`AttentionStats`) and the collector that runs a
model with them attached (:mod:`~tokext.attention.collect`).

May import: :mod:`tokext.models` and :mod:`tokext.errors`. Never interventions, evaluation or
anything above: interventions build on this room, not the reverse.
"""
