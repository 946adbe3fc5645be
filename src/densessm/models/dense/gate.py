"""The DenseSSM idea, shared by DenseRetNet and DenseMamba.

A layer receives hidden states of the ``m`` layers below it. A *selective transition module* maps each
shallow state into the current layer: a projection (here the identity, as the paper's ablation favours)
times a gate computed from the current layer's input. *Hidden fusion* adds the gated states to the
layer's own. Both are position-wise, so the parallel and recurrent forms stay equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SelectiveTransitionGate(nn.Module):
    """``silu(fc2(silu(fc1(x))))``: a cheap bottleneck MLP from the layer input to a gate over the state."""

    def __init__(self, in_dim: int, out_dim: int, reduction: int):
        super().__init__()
        bottleneck = in_dim // reduction
        if bottleneck < 1:
            raise ValueError(f"gate bottleneck width {in_dim} // {reduction} is 0: use a reduction ratio <= {in_dim}")
        self.fc1 = nn.Linear(in_dim, bottleneck, bias=False)
        self.fc2 = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.fc2(F.silu(self.fc1(x))))


def fuse_hidden(current: torch.Tensor, shallow: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """Hidden fusion: ``current + Σ_i gate ⊙ shallow_i`` (oldest layer first, as the reference sums)."""
    for state in shallow:
        current = torch.addcmul(current, gate, state)  # one fused pass instead of a product and a sum
    return current
