"""Where and in what precision a command runs: the ``--dtype`` names and the ``--device`` check.

A device string is checked before any model work starts, so ``--device cuda`` on a machine without a GPU
(or ``--device gpu``, a typo) is one line naming the problem, not a traceback from the first ``.to()``.
"""

from __future__ import annotations

import torch

from densessm.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a command accepts by name (``--dtype``)."""


def resolve_device(name: str) -> torch.device:
    """``name`` as a device this machine has; :class:`UsageError` naming what is wrong otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), numbered 0..{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
        return device
    raise UsageError(f"--device {name}: densessm runs on cpu, cuda or mps, not {device.type}")


__all__ = ["DTYPES", "resolve_device"]
