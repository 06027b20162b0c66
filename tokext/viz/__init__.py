"""Room 5, viz: figures drawn from saved results, never from a model.

Holds the plotting style and plot primitives (:mod:`~tokext.viz.plots`) and the paper figures with
``REPORT.md`` (:mod:`~tokext.viz.figures`, behind ``tokext figures``).

May import: :mod:`tokext.attention` (to read saved :class:`~tokext.attention.stats.AttentionStats`),
:mod:`tokext.evaluation`, :mod:`tokext.interventions`, :mod:`tokext.models` and :mod:`tokext.errors`;
never :mod:`tokext.studies`, which calls this room to draw what it ran.
"""
