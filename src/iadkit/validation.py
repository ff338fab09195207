"""Rules for the values a hyperparameter or a run setting may take.

A rule answers three questions: is a value allowed (:meth:`Rule.allows`), how to say what is
allowed (:meth:`Rule.describe`, used in every error message), and which values it refuses
(:meth:`Rule.invalid_examples`, so that the contract tests can try them). A rule may also put a
value into its canonical form first (:meth:`Rule.normalise`: a YAML list becomes a tuple).

Example:
    >>> Choice("sum", "mean").check("map_reduction", "avg")
    Traceback (most recent call last):
    ...
    iadkit.errors.ConfigError: map_reduction='avg' is not allowed: it must be one of 'sum', 'mean'
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError


class Rule(ABC):
    """What one setting may be."""

    def normalise(self, value: Any) -> Any:
        """The canonical form of an allowed value (the value itself unless a rule says)."""
        return value

    @abstractmethod
    def allows(self, value: Any) -> bool:
        """Whether ``value`` (normalised) is allowed."""

    @abstractmethod
    def describe(self) -> str:
        """What is allowed, as the end of the sentence "it must be ..."."""

    @abstractmethod
    def invalid_examples(self) -> list[Any]:
        """Values this rule refuses (at least one)."""

    def check(self, name: str, value: Any) -> Any:
        """The normalised ``value``; raises :class:`ConfigError` naming ``name`` if refused."""
        normalised = self.normalise(value)
        if not self.allows(normalised):
            raise ConfigError(f"{name}={value!r} is not allowed: it must be {self.describe()}")
        return normalised


class Choice(Rule):
    """One of a fixed set of values (usually strings)."""

    def __init__(self, *options: Any) -> None:
        self.options = options

    def allows(self, value: Any) -> bool:
        return any(value == option and type(value) is type(option) for option in self.options)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(option) for option in self.options)

    def invalid_examples(self) -> list[Any]:
        return ["no-such-option", 3]


class Number(Rule):
    """An int (``kind=int``) or a float (``kind=float``, ints accepted), optionally bounded.

    Args:
        low, high: bounds (None: unbounded).
        low_open, high_open: exclude the bound itself.
    """

    def __init__(self, kind: type = float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open = low_open, high_open

    def normalise(self, value: Any) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None
                    and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        kind = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low}, {self.high}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high}"
        return kind

    def invalid_examples(self) -> list[Any]:
        examples: list[Any] = ["many", True]
        if self.kind is int:
            examples.append(2.5)
        if self.low is not None:
            examples.append(self.kind(self.low - 1))
        if self.high is not None:
            examples.append(self.kind(self.high + 1))
        return examples


class Flag(Rule):
    """True or False."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"

    def invalid_examples(self) -> list[Any]:
        return ["yes", 1]


class Text(Rule):
    """Any non-empty string."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and value != ""

    def describe(self) -> str:
        return "a non-empty string"

    def invalid_examples(self) -> list[Any]:
        return [3, ""]


class Items(Rule):
    """A sequence (a tuple, or a list that becomes one) whose items the rule ``item`` allows.

    Args:
        item: the rule of every item.
        length: the exact number of items (None: any).
        min_length: at least this many items.
    """

    def __init__(self, item: Rule, length: int | None = None, min_length: int = 0) -> None:
        self.item, self.length, self.min_length = item, length, min_length

    def normalise(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(self.item.normalise(v) for v in value)
        return value

    def allows(self, value: Any) -> bool:
        if not isinstance(value, tuple) or len(value) < self.min_length:
            return False
        if self.length is not None and len(value) != self.length:
            return False
        return all(self.item.allows(v) for v in value)

    def describe(self) -> str:
        least = self.length if self.length is not None else self.min_length
        count = ("" if not least else f"{least} " if self.length is not None
                 else f"at least {least} ")
        return f"a list of {count}item{'' if least == 1 else 's'}, each {self.item.describe()}"

    def invalid_examples(self) -> list[Any]:
        size = self.length or max(self.min_length, 1)
        return ["text", (self.item.invalid_examples()[0],) * size]


class Either(Rule):
    """Allowed by any of several rules (e.g. a layer given by index or by name)."""

    def __init__(self, *rules: Rule) -> None:
        self.rules = rules

    def normalise(self, value: Any) -> Any:
        for rule in self.rules:
            if rule.allows(rule.normalise(value)):
                return rule.normalise(value)
        return value

    def allows(self, value: Any) -> bool:
        return any(rule.allows(value) for rule in self.rules)

    def describe(self) -> str:
        return " or ".join(rule.describe() for rule in self.rules)

    def invalid_examples(self) -> list[Any]:
        return [v for v in (None, [], {}) if not self.allows(self.normalise(v))][:1]


class Optional(Rule):
    """None, or a value ``rule`` allows."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def normalise(self, value: Any) -> Any:
        return None if value is None else self.rule.normalise(value)

    def allows(self, value: Any) -> bool:
        return value is None or self.rule.allows(value)

    def describe(self) -> str:
        return f"null or {self.rule.describe()}"

    def invalid_examples(self) -> list[Any]:
        return [v for v in self.rule.invalid_examples() if v is not None]


class Mapping(Rule):
    """A mapping from strings to anything (e.g. another method's hyperparameters)."""

    def normalise(self, value: Any) -> Any:
        return dict(value) if isinstance(value, dict) else value

    def allows(self, value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)

    def describe(self) -> str:
        return "a mapping of names to values"

    def invalid_examples(self) -> list[Any]:
        return ["text", [1, 2]]


class Check(Rule):
    """A value a predicate accepts; for rules no simpler one states.

    Args:
        predicate: True for an allowed value (any exception counts as False).
        description: what is allowed.
        invalid: values the predicate refuses.
    """

    def __init__(self, predicate: Callable[[Any], bool], description: str,
                 invalid: Sequence[Any]) -> None:
        self.predicate, self.description, self.invalid = predicate, description, list(invalid)

    def allows(self, value: Any) -> bool:
        try:
            return bool(self.predicate(value))
        except Exception:  # noqa: BLE001 (a predicate that fails refuses the value)
            return False

    def describe(self) -> str:
        return self.description

    def invalid_examples(self) -> list[Any]:
        return self.invalid
