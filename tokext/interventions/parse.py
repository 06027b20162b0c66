"""Interventions written as text, as on a command line: ``"EarlyLayerEmulation(alpha=0.2)"``.

:func:`parse_interventions` reads one call of a class exported by :mod:`tokext.interventions`, or a
list of calls (``"[SinkRebalance(), EarlyLayerEmulation()]"``, applied in order), with literal
arguments only (numbers, strings, booleans, ``None``, and lists / tuples of them). The text is
parsed with :mod:`ast` and never evaluated, so nothing but the named constructor runs. The
``repr`` of every intervention is such a call, so ``parse_interventions(repr(iv))`` gives ``iv``
back.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any

from tokext.errors import InputError, InterventionSpecError
from tokext.interventions.base import Intervention


def intervention_classes() -> dict[str, type]:
    """Intervention class name -> class, for every :class:`Intervention` subclass defined in this room.

    Importing any module of the room imports the room's ``__init__`` first, which imports every
    intervention module, so all of them are defined by the time this runs; subclasses defined
    elsewhere (a user's, a test's) are left out.
    """
    found, todo = {}, list(Intervention.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("tokext.interventions."):
            found[cls.__name__] = cls
    return dict(sorted(found.items()))


def parse_interventions(text: str) -> tuple[Intervention, ...]:
    """The interventions written in ``text``: one call, or a list / tuple of calls (applied in order).

    Raises :class:`InterventionSpecError` (one line naming the problem) for text that is not such
    a call, an unknown class, a non-literal argument, an unknown parameter or a bad value.

    >>> parse_interventions("EarlyLayerEmulation(alpha=0.1)")
    (EarlyLayerEmulation(alpha=0.1),)
    >>> parse_interventions("[SinkRebalance(scale=0.5), AttentionTemperature(2.0)]")
    (SinkRebalance(scale=0.5), AttentionTemperature(temperature=2.0))
    """
    if not isinstance(text, str) or not text.strip():
        raise InterventionSpecError(
            f"an intervention must be written as a call such as 'EarlyLayerEmulation(alpha=0.2)', got {text!r}"
        )
    source = " ".join(text.split())
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError as e:
        raise InterventionSpecError(
            f"intervention {source!r} does not parse ({e.msg}); write a call such as 'EarlyLayerEmulation(alpha=0.2)'"
        ) from None
    calls = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    if not calls:
        raise InterventionSpecError(f"intervention {source!r} is an empty list")
    return tuple(_build(call, source) for call in calls)


def _build(node: ast.AST, source: str) -> Intervention:
    classes = intervention_classes()
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise InterventionSpecError(
            f"intervention {source!r}: expected a call such as 'EarlyLayerEmulation(alpha=0.2)', "
            f"got {ast.unparse(node)!r}"
        )
    name = node.func.id
    if name not in classes:
        close = difflib.get_close_matches(name, list(classes), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InterventionSpecError(
            f"unknown intervention {name!r} in {source!r}.{hint} Available: {', '.join(sorted(classes))}"
        )
    cls = classes[name]
    args = [_literal(a, name, source) for a in node.args]
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise InterventionSpecError(f"intervention {source!r}: ** arguments are not allowed; name each parameter")
        kwargs[kw.arg] = _literal(kw.value, name, source)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InterventionSpecError(f"{name} has no parameter {key!r}.{hint} Parameters: {', '.join(fields)}")
    if len(args) > len(fields):
        raise InterventionSpecError(
            f"{name} takes at most {len(fields)} positional arguments ({', '.join(fields)}), got {len(args)}"
        )
    try:
        return cls(*args, **kwargs)
    except InputError as e:
        raise InterventionSpecError(f"intervention {source!r}: {e}") from None
    except (TypeError, ValueError) as e:
        message = str(e).replace(f"{name}.__init__() ", "")
        raise InterventionSpecError(f"intervention {source!r}: {message}") from None


def _literal(node: ast.AST, name: str, source: str) -> Any:
    if (  # range(a, b) with literal ints: how reprs write long runs (layers, dims)
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and not node.keywords
        and 1 <= len(node.args) <= 3
    ):
        bounds = [_literal(a, name, source) for a in node.args]
        if all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
            return tuple(range(*bounds))
    if isinstance(node, ast.Starred):
        raise InterventionSpecError(f"intervention {source!r}: * arguments are not allowed")
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise InterventionSpecError(
            f"{name} argument {ast.unparse(node)!r} in {source!r} is not a literal "
            "(numbers, strings, True/False/None, lists and tuples of them)"
        ) from None
    if isinstance(value, (dict, set, bytes, complex)):
        raise InterventionSpecError(
            f"{name} argument {ast.unparse(node)!r} in {source!r}: {type(value).__name__} values are not accepted"
        )
    return value
