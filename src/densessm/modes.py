"""Compute modes: a mode is a schedule of the same computation, never a different model."""

from __future__ import annotations


def check_mode(mode: str, allowed: tuple[str, ...]) -> str:
    """Return ``mode`` or raise a ValueError naming the valid ones."""
    if mode not in allowed:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(allowed)}")
    return mode
