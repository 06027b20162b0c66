"""Room 6, studies: experiments built on everything below, and the runs that reproduce the paper.

Holds the ``tokext analyze`` job (:mod:`~tokext.studies.analyze`), layer-wise profiles under
interventions (:mod:`~tokext.studies.profiles`), sweep configs, the sweep runner and where its cells run
(:mod:`~tokext.studies.config`, :mod:`~tokext.studies.sweep`, :mod:`~tokext.studies.executors`: serially
or on a Ray cluster), paired statistics (:mod:`~tokext.studies.paired`), ``tokext eval``'s
lm-evaluation-harness runs of a baseline and interventions with their paired table
(:mod:`~tokext.studies.lm_eval_runs`), the computed-token study (:mod:`~tokext.studies.computed_tokens`),
the fine-tuning diagnostic (:mod:`~tokext.studies.finetune`), training the model organism
(:mod:`~tokext.studies.organism`) and ``tokext reproduce`` (:mod:`~tokext.studies.reproduce`).

May import: every room below it (:mod:`tokext.viz`, :mod:`tokext.evaluation`,
:mod:`tokext.interventions`, :mod:`tokext.attention`, :mod:`tokext.models`) and :mod:`tokext.errors`;
never :mod:`tokext.cli`.
"""
