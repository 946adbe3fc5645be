"""CPU inference speed-ups that change how weights are stored, not what the model computes.

Decoding multiplies small batches by every weight matrix each step, so it is bound by how fast the
weights stream from memory. PyTorch's default fp32 GEMM reaches only a fraction of the bandwidth at batch
sizes of a few rows; oneDNN with weights reordered once into its blocked layout ("prepacked") streams them
about three times faster on the CPUs measured here (docs/benchmarks/generation.md). Prepacked weights
cannot be trained or saved, so this is an explicit, inference-only step.
"""

from __future__ import annotations

import torch
from torch import nn


class PrepackedLinear(nn.Module):
    """A bias-free or biased linear layer whose weight is stored in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
        self.out_features = weight.shape[0]
        self.register_buffer("weight", weight.to_mkldnn(weight.dtype), persistent=False)
        self.register_buffer("bias", bias.to_mkldnn(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
        out = torch.ops.aten.mkldnn_linear(flat, self.weight, self.bias).to_dense()
        return out.view(*x.shape[:-1], self.out_features)


def prepack_for_cpu(model: nn.Module, min_weight: int = 2**20) -> nn.Module:
    """Replace every ``nn.Linear`` of a CPU model with at least ``min_weight`` weights by a
    :class:`PrepackedLinear`, in place; returns ``model``.

    Small layers (the dense gates, Mamba's Δ projection) stay as they are: for them the per-call layout
    conversions cost more than the faster product saves. Works for fp32 and bf16 weights. Use the model for
    inference only afterwards (``save_pretrained`` and training need the original model).
    """
    if not torch.backends.mkldnn.is_available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            big = child.weight.numel() >= min_weight
            if big and child.weight.device.type == "cpu" and child.weight.dtype in (torch.float32, torch.bfloat16):
                setattr(parent, name, PrepackedLinear(child))
    model.eval()
    return model
