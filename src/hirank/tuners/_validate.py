"""Checks of config fields, shared by every hirank config's ``__post_init__``.

Each check raises a one-line ``ValueError`` naming the config, the field, what is allowed and the value
("QuantaConfig: factors must be a list of at least 2 positive integers, got '88'."), and returns the value
normalized to plain Python (numpy numbers become int/float, tuples become lists) so that it saves to JSON.
Values read back from adapter_config.json are accepted: lists for tuples and sets, whole numbers for floats.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, NoReturn, Optional, Sequence


def is_integer(value: object) -> bool:
    """An int (or numpy integer) that is not a bool: ``True`` is an int in Python, never a rank."""
    return isinstance(value, Integral) and not isinstance(value, bool)


class FieldCheck:
    """Validates the fields of one config instance (``FieldCheck(self).integer("r", minimum=1)``)."""

    def __init__(self, config: object) -> None:
        self._config = config

    def fail(self, name: str, expected: str, verb: str = "be") -> NoReturn:
        value = getattr(self._config, name)
        raise ValueError(f"{type(self._config).__name__}: {name} must {verb} {expected}, got {value!r}.")

    def integer(self, name: str, minimum: int = 1, expected: Optional[str] = None) -> int:
        value = getattr(self._config, name)
        if not is_integer(value) or value < minimum:
            self.fail(name, expected or ("a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"))
        return int(value)

    def optional_integer(self, name: str) -> Optional[int]:
        """None or a positive integer."""
        value = getattr(self._config, name)
        return None if value is None else self.integer(name, expected="None or a positive integer")

    def number(self, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
               high_open: bool = False, nonzero: bool = False, expected: Optional[str] = None) -> float:
        """A finite real in [low, high] ([low, high) with ``high_open``), optionally ≠ 0."""
        value = getattr(self._config, name)
        if (
            not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value)
            or (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high))
            or (nonzero and value == 0)
        ):
            if expected is None and low is not None and high is not None:
                expected = f"in [{low:g}, {high:g}{')' if high_open else ']'}"
            elif expected is None:
                expected = f"a finite{' non-zero' if nonzero else ''} number"
            self.fail(name, expected)
        return float(value)

    def choice(self, name: str, allowed: Sequence[str], why: str = "") -> str:
        value = getattr(self._config, name)
        if not isinstance(value, str) or value not in allowed:
            self.fail(name, f"one of {tuple(allowed)}{why}")
        return value

    def flag(self, name: str, meaning: str = "True or False") -> bool:
        value = getattr(self._config, name)
        if not isinstance(value, bool):
            self.fail(name, meaning)
        return value

    def integers(self, name: str, *, min_length: int, minimum: int, expected: str,
                 verb: str = "be") -> Optional[list[int]]:
        """None, or a list (tuple) of at least ``min_length`` integers ≥ ``minimum``."""
        value = getattr(self._config, name)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) < min_length \
                or not all(is_integer(v) and v >= minimum for v in value):
            self.fail(name, expected, verb)
        return [int(v) for v in value]

    def module_names(self, name: str, allow_string: bool = True,
                     expected: str = "None, a regex string or a list of module names") -> Any:
        """None, a string (if ``allow_string``), or a list/set/tuple of strings (kept as given)."""
        value = getattr(self._config, name)
        if value is None or (allow_string and isinstance(value, str)):
            return value
        if not isinstance(value, (list, set, tuple)) or not all(isinstance(v, str) for v in value):
            self.fail(name, expected)
        return value
