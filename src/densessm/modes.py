"""Compute modes: a mode is a schedule of the same computation, never a different model."""

from __future__ import annotations

MODES = ("auto", "parallel", "chunkwise", "recurrent")
"""Every family takes every mode: ``parallel`` (the whole input at once, training), ``chunkwise`` (parallel
inside chunks, recurrent across them: linear memory), ``recurrent`` (token by token through the state:
decoding) and ``auto`` (chosen from the length and whether a state is kept)."""


def check_mode(mode: str, allowed: tuple[str, ...]) -> str:
    """Return ``mode`` or raise a ValueError naming the valid ones."""
    if mode not in allowed:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(allowed)}")
    return mode
