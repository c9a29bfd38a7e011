"""Checks of ``hirank compare``'s options that need no model: numbers in range, non-empty lists, a writable
output folder. Light on purpose (standard library only): the command checks these before importing torch.

Each failure is an :class:`OptionError` whose message is one line naming the option, the value and what is
allowed; the ``hirank`` command prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEARNING_RATE_PRESETS = ("tuned", "paper")


class OptionError(ValueError):
    """An option of a comparison outside what is allowed."""


@dataclass(frozen=True)
class NumberRule:
    """A numeric option: its ``CompareOptions`` field, its command-line flag and the allowed range."""

    field: str
    flag: str
    integer: bool
    minimum: float
    exclusive: bool = False  # minimum itself not allowed
    optional: bool = False  # None allowed (meaning "no limit" / "default")

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        return f"{kind} {'>' if self.exclusive else '≥'} {self.minimum:g}"

    def check(self, value: Any) -> None:
        """Raise :class:`OptionError` unless ``value`` is allowed."""
        if value is None and self.optional:
            return
        wrong_type = isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float))
        if wrong_type or not math.isfinite(value) or value < self.minimum or (self.exclusive and value == self.minimum):
            raise OptionError(f"{self.flag} must be {self.allowed()}, got {value!r}.")

    def parse(self, text: str) -> int | float:
        """argparse ``type=``: the number, or an error that argparse prefixes with the flag."""
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.allowed()}, got {text!r}") from None
        try:
            self.check(value)
        except OptionError:
            raise argparse.ArgumentTypeError(f"must be {self.allowed()}, got {text!r}") from None
        return value


NUMBER_RULES = {
    rule.flag: rule
    for rule in (
        NumberRule("seeds", "--seeds", integer=True, minimum=1),
        NumberRule("epochs", "--epochs", integer=True, minimum=1),
        NumberRule("batch_size", "--batch-size", integer=True, minimum=1),
        NumberRule("max_length", "--max-length", integer=True, minimum=1),
        NumberRule("train_limit", "--train-limit", integer=True, minimum=1, optional=True),
        NumberRule("eval_limit", "--eval-limit", integer=True, minimum=1, optional=True),
        NumberRule("budget_tolerance", "--budget-tolerance", integer=False, minimum=0, optional=True),
        NumberRule("general_text_pairs", "general_text_pairs", integer=True, minimum=1),
    )
}
LEARNING_RATE = NumberRule("learning_rates", "--lr", integer=False, minimum=0, exclusive=True)


def names(text: str, flag: str) -> tuple[str, ...]:
    """A comma-separated list of names; an empty list (``--methods ,``) is an error, not "the default"."""
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise argparse.ArgumentTypeError(
            f"empty name in {text!r}; give comma-separated names (omit {flag} for the default)"
        )
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"{', '.join(duplicates)} given twice")
    return items


def learning_rates(text: str) -> dict[str, float]:
    """``lora=5e-4,surm=2e-3``, or one number for every method (key ``*``); each a finite number > 0."""
    rates = {}
    for item in names(text, "--lr"):
        method, _, text = item.rpartition("=")
        try:
            rate = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {item!r}; write METHOD=LR,... or LR") from None
        try:
            LEARNING_RATE.check(rate)
        except OptionError:
            raise argparse.ArgumentTypeError(f"{item!r}: a learning rate must be {LEARNING_RATE.allowed()}") from None
        key = method.strip() or "*"
        if key in rates:
            raise argparse.ArgumentTypeError(f"two learning rates for {'every method' if key == '*' else key}")
        rates[key] = rate
    return rates


def check_options(options: Any) -> None:
    """Check a ``CompareOptions`` (numbers, lists, learning rates); :class:`OptionError` on the first fault.

    Method names and the learning-rate preset are checked by ``compare`` itself (they need the method table).
    """
    for rule in NUMBER_RULES.values():
        rule.check(getattr(options, rule.field))
    for flag, field in (("--methods", "methods"), ("--target-modules", "target_modules")):
        value = getattr(options, field)
        if value is not None and (isinstance(value, str) or not value or not all(value)):
            raise OptionError(f"{flag} must be a non-empty list of names (or None for the default), got {value!r}.")
    rates: Mapping[str, Any] = options.learning_rates
    for method, rate in rates.items():
        try:
            LEARNING_RATE.check(rate)
        except OptionError:
            raise OptionError(f"--lr of {method}: must be {LEARNING_RATE.allowed()}, got {rate!r}.") from None


def check_output_folder(folder: Path) -> None:
    """Raise :class:`OptionError` unless ``folder`` is, or can be created as, a folder this process can write.

    Nothing is created: a probe file is made and removed in the folder or its nearest existing parent.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is below {existing}, which is a file"
        raise OptionError(f"--out {folder} {where}; give a folder.")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".hirank-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OptionError(f"--out {folder}: cannot write in {existing} ({error.strerror}).") from None
