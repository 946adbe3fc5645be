"""CPU inference speed-ups that change how weights are stored, not what the model computes.

Decoding multiplies small batches by every weight matrix each step, so it is bound by how fast the weights
stream from memory. PyTorch's default fp32 GEMM reaches only a fraction of the bandwidth at batch sizes of a
few rows; oneDNN with weights reordered once into its blocked layout ("prepacked"), called through the same
dense-tensor entry point that inductor uses for frozen CPU graphs, streams them several times faster
(measured in docs/benchmarks/generation.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from densessm.inference.frozen import (
    InferenceOnly,
    InferenceOnlyError,
    SiLULinear,
    check_count,
    check_model,
    seal_for_inference,
)
from densessm.inference.fusion import fuse_projections
from densessm.models.recurrent import state_identity_kept


def prepacking_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernels :class:`PrepackedLinear` calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_NO_COPY = (
    "cannot copy or pickle PrepackedLinear: oneDNN's packed weights have no storage to copy; copy or save the "
    "original model, then prepack the copy"
)


class PrepackedLinear(InferenceOnly):
    """A linear layer whose weight is stored in oneDNN's blocked layout (fp32 or bf16, CPU only). Made from a
    :class:`~densessm.inference.frozen.SiLULinear`, it applies the silu in the kernel (oneDNN's ``swish``
    post-op, in fp32 before rounding): one pass less over the output."""

    onednn_packed = True  # torch.compile's inductor cannot take these weights: see densessm.compiled_decoding

    def __init__(self, linear: nn.Linear, batch_size_hint: int | None = None):
        super().__init__()
        self.activation = "swish" if isinstance(linear, SiLULinear) else "none"
        weight = linear.weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)
        self.register_buffer("weight", packed, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.dtype)
        self.register_buffer("bias", bias, persistent=False)
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():  # the program would run, but torch.export.save fails on these weights
            raise InferenceOnlyError(
                "a prepacked model cannot be exported: its oneDNN-packed weights cannot be saved with the program "
                "(nor compiled by inductor); export the model before prepack_for_cpu"
            )
        # the kernel wants the weight's dtype (autocast does not see this op), so cast as nn.Linear would
        x = x.to(self.weight.dtype).contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "")

    def __deepcopy__(self, memo: dict) -> PrepackedLinear:
        raise InferenceOnlyError(_NO_COPY)

    def __reduce_ex__(self, protocol: int):  # pickle, torch.save
        raise InferenceOnlyError(_NO_COPY)

    def conversion_problem(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
        """oneDNN's packed layout exists on the CPU and in the dtype it was packed in only."""
        packed = self.weight.dtype
        probe = fn(torch.zeros(1, dtype=packed))
        if probe.device.type != "cpu":
            return f"prepacked weights run on the CPU only, not on {probe.device}"
        if probe.dtype != packed:
            return f"prepacked weights stay in {str(packed).removeprefix('torch.')}, they cannot become {probe.dtype}"
        return None

    def extra_repr(self) -> str:
        silu = ", silu" if self.activation == "swish" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{silu}"


def prepack_for_cpu(model: nn.Module, min_weight: int = 2**15, batch_size_hint: int | None = None) -> nn.Module:
    """Fuse the projections that share an input (:func:`~densessm.inference.fusion.fuse_projections`), then
    replace every CPU linear layer (fp32 or bf16) with at least ``min_weight`` weights by a
    :class:`PrepackedLinear`, in place; returns ``model`` (in eval mode).

    Tiny layers stay as they are (below ~32k weights the default kernel is as fast). A build without oneDNN
    leaves the weights as they are. Inference only: the replaced modules refuse to train or be saved.
    """
    check_model(model, "prepack_for_cpu")
    check_count("min_weight", min_weight)
    if batch_size_hint is not None:
        check_count("batch_size_hint", batch_size_hint, minimum=1)
    with state_identity_kept(model):  # the same function: the model's caches stay valid
        fuse_projections(model)
        if not prepacking_available():
            return model
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                weight = child.weight
                if (
                    weight.numel() >= min_weight
                    and weight.device.type == "cpu"
                    and weight.dtype in (torch.float32, torch.bfloat16)
                ):
                    setattr(parent, name, PrepackedLinear(child, batch_size_hint))
    return seal_for_inference(model)


__all__ = ["PrepackedLinear", "prepack_for_cpu", "prepacking_available"]
