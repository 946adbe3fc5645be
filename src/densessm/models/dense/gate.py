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

from densessm.models.recurrent import frozen_linear


class SelectiveTransitionGate(nn.Module):
    """``silu(fc2(silu(fc1(x))))``: a cheap bottleneck MLP from the layer input to a gate over the state."""

    def __init__(self, in_dim: int, out_dim: int, reduction: int):
        super().__init__()
        bottleneck = in_dim // reduction
        if bottleneck < 1:
            raise ValueError(f"gate bottleneck width {in_dim} // {reduction} is 0: use a reduction ratio <= {in_dim}")
        self.fc1 = nn.Linear(in_dim, bottleneck, bias=False)
        self.fc2 = nn.Linear(bottleneck, out_dim, bias=False)
        self.output_silu_fused = False  # see fuse_output_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_hidden(F.silu(self.fc1(x)))

    def from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gate from ``silu(fc1(x))`` computed elsewhere (fused with other projections of ``x``)."""
        gate = self.fc2(hidden)
        return gate if self.output_silu_fused else F.silu(gate)

    def fuse_output_activation(self) -> None:
        """Inference only: ``fc2`` becomes a :class:`~densessm.models.recurrent.SiLULinear`, which a prepacked
        product computes in its epilogue (one pass less per decode step)."""
        if not self.output_silu_fused:
            self.fc2 = frozen_linear([self.fc2], silu=True)
            self.output_silu_fused = True


def fuse_hidden(current: torch.Tensor, shallow: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """Hidden fusion: ``current + Σ_i gate ⊙ shallow_i`` (oldest layer first, as the reference sums)."""
    for state in shallow:
        current = torch.addcmul(current, gate, state)  # one fused pass instead of a product and a sum
    return current
