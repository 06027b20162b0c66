"""The exceptions tokext raises.

One base class, :class:`TokextError`. Bad input also inherits ``ValueError`` (or ``IndexError``
for indices) so that generic handlers keep working; failures of a model or an intervention
inherit ``RuntimeError``.
"""

from __future__ import annotations


class TokextError(Exception):
    """Base class of every error tokext raises on purpose."""


class InputError(TokextError, ValueError):
    """The caller passed something tokext cannot use (the message names what and why)."""


class UnknownModelError(InputError):
    """A model spec that is neither a known name, a local directory, a .gguf file nor a reachable hub id."""


class LayerIndexError(InputError, IndexError):
    """A layer (or head) index outside the model."""


class EmptyInputError(InputError):
    """No prompts, or a prompt that tokenizes to nothing."""


class SequenceTooLongError(InputError):
    """A sequence longer than the model's context window."""


class DataFileError(InputError):
    """A data or config file that is missing, unreadable or malformed."""


class InterventionSpecError(InputError):
    """An intervention written as text (``"EarlyLayerEmulation(alpha=0.2)"``) that does not parse."""


class MissingDependencyError(TokextError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class ModelConversionError(TokextError, RuntimeError):
    """Converting a model file (GGUF) into a loadable directory failed or gave an incomplete one."""


class UneditableAttentionError(TokextError, RuntimeError):
    """The model's attention pattern cannot be edited: writes to ``hook_pattern`` never reach the logits."""


class InterventionNotAppliedError(TokextError, RuntimeError):
    """An intervention's hooks never fired, or fired without changing the output."""


class MissingExtraError(TokextError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it (``tokext[ray]``)."""


class ClusterError(TokextError, RuntimeError):
    """A compute cluster (Ray) cannot be reached, or its workers failed more often than allowed."""


class TokextWarning(UserWarning):
    """Something tokext did differently from what was asked, and says so (one line on the CLI)."""
