"""RMSNorm as LLaMA and the reference DenseRetNet compute it: statistics in (at least) fp32, result cast back."""

from __future__ import annotations

import torch
from torch import nn

from densessm.models.precision import at_least_fp32
from densessm.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned per-channel scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in at least fp32 (float64 stays float64: a float64 model is a precision reference); the op
        # is torch's arithmetic, with a backward of fewer passes on the CPU (densessm.ops.rms_norm)
        wide = at_least_fp32(x)
        weight = self.weight if self.weight.dtype == wide.dtype else self.weight.to(wide.dtype)
        return rms_norm(wide, weight, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
