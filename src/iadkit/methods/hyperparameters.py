"""Declared hyperparameters: a method states each of its hyperparameters once, in its class
body, with its default, the values it may take and what it does.

    class PatchCore(BackboneDetector):
        coreset_ratio: float = hyperparameter(
            0.01, Number(float, 0, 1, low_open=True), "share of training patches kept")

:class:`~iadkit.methods.base.Detector` collects the declarations along the class hierarchy
(a subclass inherits its parents' and adds its own) and builds the constructor, ``get_params``
and the validation from them. A subclass changes an inherited default by assigning a plain
value (``num_hard = 10``); the rule and the description stay the parent's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

from ..validation import Rule


@dataclass(frozen=True)
class Hyperparameter:
    """One declared hyperparameter.

    Attributes:
        default: its value when not given (an allowed value).
        rule: the values it may take.
        help: what it does, in a few words (``iadkit methods --verbose`` prints it).
        inference: it changes inference only, so :meth:`Detector.set_inference_params` may
            change it on a fitted detector and a search may choose it.
        name: filled in from the attribute name.
    """

    default: Any
    rule: Rule
    help: str
    inference: bool = False
    name: str = ""


def hyperparameter(default: Any, rule: Rule, help: str, *, inference: bool = False) -> Any:
    """Declare a hyperparameter in a detector's class body (see the module docstring).

    Typed ``Any`` so that the attribute's annotation states the value's type, as with
    :func:`dataclasses.field`.
    """
    return Hyperparameter(default, rule, help, inference)


def collect_hyperparameters(cls: type) -> dict[str, Hyperparameter]:
    """The hyperparameters of ``cls``: its parents' (in their order), then its own.

    A plain value assigned to an inherited name becomes that hyperparameter's new default.
    Every class attribute that names a hyperparameter is left holding its declaration.

    Raises:
        TypeError: a default that its own rule refuses, or a method or property with a
            hyperparameter's name.
    """
    merged: dict[str, Hyperparameter] = {}
    for base in reversed(cls.__mro__[1:]):
        merged.update(getattr(base, "hyperparameters", {}))
    for attribute, value in list(vars(cls).items()):
        if isinstance(value, Hyperparameter):
            merged[attribute] = replace(value, name=attribute)
        elif attribute in merged:
            if inspect.isroutine(value) or isinstance(value, property | classmethod):
                raise TypeError(f"{cls.__name__}.{attribute} hides the hyperparameter "
                                f"{attribute!r}")
            merged[attribute] = replace(merged[attribute], default=value)
        else:
            continue
        setattr(cls, attribute, merged[attribute])
    for name, declared in merged.items():
        try:
            declared.rule.check(name, declared.default)
        except ValueError as error:
            raise TypeError(f"{cls.__name__}: the default of {error}") from None
    return merged


def constructor_signature(hyperparameters: dict[str, Hyperparameter]) -> inspect.Signature:
    """The keyword-only signature the generated constructor has (for help() and IDEs)."""
    return inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=declared.default)
        for name, declared in hyperparameters.items()])
