"""Room 5, viz: figures drawn from saved results (never from a model), and the interactive explorer.

Holds the plotting style and plot primitives (:mod:`~tokext.viz.plots`), the paper figures with
``REPORT.md`` (:mod:`~tokext.viz.figures`, behind ``tokext figures``) and the attention explorer
(:mod:`~tokext.viz.explorer`, ``tokext.explore``), the one part of this room that runs a model: it
captures every head's pattern on a few prompts and writes them into one offline HTML page.

May import: :mod:`tokext.attention` (to read saved :class:`~tokext.attention.stats.AttentionStats`),
:mod:`tokext.evaluation`, :mod:`tokext.interventions`, :mod:`tokext.models` and :mod:`tokext.errors`;
never :mod:`tokext.studies`, which calls this room to draw what it ran.
"""
