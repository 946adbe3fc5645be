"""The error kinds the command line tells apart, and the exit code each one gets.

A command ends with one line naming the problem, never a traceback for something the user can fix.
The exit codes follow the usual conventions: 2 for a usage error (a flag or argument that cannot work),
1 for a failure while doing the work (a missing or corrupt file, a model that does not load, a
non-finite value), 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a shell reports a command whose reader closed the pipe (128 + SIGPIPE)


class UsageError(ValueError):
    """A flag, argument or option value that cannot work, found before any work was done (exit code 2)."""


class ModelLoadError(ValueError):
    """A model directory that does not hold exactly the model its ``config.json`` describes."""


class NonFiniteError(FloatingPointError):
    """A NaN or infinite value where a result is expected; the message names where it first appears."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the user needs to know to continue (e.g. the checkpoint to resume from)."""


__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "Interrupted",
    "ModelLoadError",
    "NonFiniteError",
    "UsageError",
]
