"""``argparse`` value types that refuse impossible values when the command line is parsed.

A ``--batch-size 0`` found by argparse is a usage error (exit 2) with the flag's name, before any model
is loaded; found later it would be a traceback from deep inside a loop.
"""

from __future__ import annotations

import argparse
import math

MAX_COUNT = 2**31 - 1
"""The largest count a flag takes: beyond it torch's sizes and Python's slices overflow (with their own words,
naming no flag, after the model is loaded); no count of steps, tokens, beams or rows comes near it."""


def _number(text: str, kind: type, counted: bool = True) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if kind is int and counted and value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT} (2**31 - 1), got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


MIN_TEMPERATURE = 1e-6


def temperature(text: str) -> float:
    """A sampling temperature: the logits are divided by it, so one below ``MIN_TEMPERATURE`` overflows them
    (a NaN distribution); the most likely token is greedy decoding's."""
    value = positive_float(text)
    if value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_TEMPERATURE:g}, got {text}: a smaller one overflows the logits (for the most "
            "likely token, leave out --do-sample)"
        )
    return value


def finite_float(text: str) -> float:
    return _number(text, float)


def seed(text: str) -> int:
    """A random seed: what ``torch.manual_seed`` and numpy take, ``[0, 2**32)``."""
    value = _number(text, int, counted=False)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def path_name(text: str) -> str:
    """A file or directory name; an empty one is refused (it would silently mean the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: name a file or directory")
    return text


__all__ = [
    "MAX_COUNT",
    "MIN_TEMPERATURE",
    "finite_float",
    "nonnegative_int",
    "path_name",
    "positive_float",
    "positive_int",
    "seed",
    "temperature",
]


class Once(argparse.Action):
    """A flag that names one thing and may be given once: argparse keeps the last of repeated values without a
    word, where a user repeating ``--data`` or ``--prompt-file`` (as ``--prompt`` repeats for a batch) meant
    them all."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:  # its default is None: given before
            parser.error(f"argument {option_string}: given more than once; {self.help_once}")
        setattr(namespace, self.dest, values)

    help_once = "give it once"


class OnceCorpus(Once):
    help_once = "name one file, or a folder holding all the files to evaluate"


class OncePromptFile(Once):
    help_once = "put every prompt in one file, one per line"
