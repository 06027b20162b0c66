"""Room 4, evaluation: scoring a model on tasks, with or without interventions.

Holds the prompt sets (:mod:`~tokext.evaluation.prompts`), the seeded reasoning tasks
(:mod:`~tokext.evaluation.tasks`), multiple-choice data and prompt forms
(:mod:`~tokext.evaluation.mc`), answer extraction (:mod:`~tokext.evaluation.extract`), greedy
generation (:mod:`~tokext.evaluation.generation`), what one evaluation cell runs
(:mod:`~tokext.evaluation.spec`: :class:`EvalSpec`), the scorers and their one entry point
(:mod:`~tokext.evaluation.evaluate`), calibration objectives on task items
(:mod:`~tokext.evaluation.objectives`), the model organism's own scoring
(:mod:`~tokext.evaluation.organism`), and lm-evaluation-harness: the model type ``tokext``
(:mod:`~tokext.evaluation.lm_eval_adapter`, needs the ``eval`` extra) and the offline ``tokext_mmlu``
tasks (:mod:`~tokext.evaluation.lm_eval_tasks`).

May import: :mod:`tokext.interventions`, :mod:`tokext.attention`, :mod:`tokext.models` and
:mod:`tokext.errors`.
"""
