"""Compute dtypes: the numerically delicate parts (norm statistics, the SSM scan) run in at least fp32.

"At least": a bf16 or fp16 model computes them in fp32, and a float64 model stays in float64, which is what the
tests use as a precision reference when they compare the modes against each other.
"""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 when it is narrower, else unchanged (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
