"""CPU inference speed-ups that change how weights are stored, not what the model computes.

Decoding multiplies small batches by every weight matrix each step, so it is bound by how fast the
weights stream from memory. PyTorch's default fp32 GEMM reaches only a fraction of the bandwidth at batch
sizes of a few rows. oneDNN with weights reordered once into its blocked layout ("prepacked"), called
through the same dense-tensor entry point that inductor uses for frozen CPU graphs, streams them several
times faster: a ``[6, 1536] × [1536, 6144]`` product takes 0.54 ms instead of 3.4 ms in fp32, and 0.16 ms
instead of 0.34 ms in bf16 (docs/benchmarks/generation.md). Prepacked weights cannot be trained or saved,
so this is an explicit, inference-only step.
"""

from __future__ import annotations

import torch
from torch import nn

from densessm.models.recurrent import RecurrentBackbone, SiLULinear


def prepacking_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernels :class:`PrepackedLinear` calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PrepackedLinear(nn.Module):
    """A linear layer whose weight is stored in oneDNN's blocked layout (fp32 or bf16, CPU only). Made from a
    :class:`~densessm.models.recurrent.SiLULinear`, it applies the silu in the kernel (oneDNN's ``swish``
    post-op, in fp32 before rounding): one pass less over the output."""

    def __init__(self, linear: nn.Linear, batch_size_hint: int | None = None):
        super().__init__()
        self.activation = "swish" if isinstance(linear, SiLULinear) else "none"
        weight = linear.weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)
        self.register_buffer("weight", packed, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.dtype)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel wants the weight's dtype (autocast does not see this op), so cast as nn.Linear would
        x = x.to(self.weight.dtype).contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "")

    def extra_repr(self) -> str:
        silu = ", silu" if self.activation == "swish" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{silu}"


def _seal(model: nn.Module) -> None:
    """Refuse what a transformed model can no longer do right, instead of doing it wrong: its checkpoint would
    lack the fused or packed weights (and reload with them randomly initialised), and training would leave
    the fused copies behind."""

    def save_pretrained(*args, **kwargs):
        raise RuntimeError(
            "this model's weights were fused or prepacked for inference (densessm.inference): save the original "
            "model instead"
        )

    def train(mode: bool = True) -> nn.Module:
        if mode:
            raise RuntimeError(
                "this model's weights were fused or prepacked for inference (densessm.inference): train the "
                "original model instead"
            )
        return nn.Module.train(model, False)

    model.save_pretrained = save_pretrained
    model.train = train


def fuse_projections(model: nn.Module) -> nn.Module:
    """Merge the products that share an input into one (any device), in place; returns ``model``.

    Every module with a ``fuse_projections()`` method takes part (DenseRetNet's retention block merges q,
    k, [v, g] and the dense gates' first layers). Irreversible and inference only, like prepacking.
    """
    for module in model.modules():
        if isinstance(module, RecurrentBackbone):
            module.pin_state_identity()  # the weights' storage changes, not the function: caches still fit
    for module in list(model.modules()):
        fuse = getattr(module, "fuse_projections", None)
        if callable(fuse) and module is not model:
            fuse()
    model.eval()
    _seal(model)
    return model


def prepack_for_cpu(model: nn.Module, min_weight: int = 2**15, batch_size_hint: int | None = None) -> nn.Module:
    """Fuse the projections that share an input (:func:`fuse_projections`), then replace every CPU
    ``nn.Linear`` or ``SiLULinear`` (fp32 or bf16) with at least ``min_weight`` weights by a
    :class:`PrepackedLinear`, in place; returns ``model``.

    Tiny layers stay as they are (below ~32k weights the default kernel is as fast). A model whose build
    lacks oneDNN is returned unchanged. Use the model for inference only afterwards: ``save_pretrained`` and
    training need the original weights.
    """
    fuse_projections(model)
    if not prepacking_available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (nn.Linear, SiLULinear):
                continue
            weight = child.weight
            if (
                weight.numel() >= min_weight
                and weight.device.type == "cpu"
                and weight.dtype in (torch.float32, torch.bfloat16)
            ):
                setattr(parent, name, PrepackedLinear(child, batch_size_hint))
    model.eval()
    _seal(model)
    return model
