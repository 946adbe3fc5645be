"""The transforms the commands apply before they decode, in the one order that works.

``densessm generate`` and ``densessm serve`` prepare a loaded model the same way: int8 first (it fuses the
projections and quantizes the large layers), then prepacking (which packs what stayed in float), then the
fused decode step (which reads whatever projections the model then holds). Under ``--compile`` neither
prepacking nor the fused step applies: inductor packs the weights and generates the step itself.
"""

from __future__ import annotations

from torch import nn

from densessm.files import check_flag
from densessm.inference.fused_step import fuse_decode_steps
from densessm.inference.prepack import prepack_for_cpu
from densessm.inference.quantize import QUANTIZE_CHOICES, quantize_int8


def prepare_for_decoding(model: nn.Module, quantize: str | None, prepack: bool, compiled: bool) -> nn.Module:
    """``model`` (in place) as the commands decode with it; ``quantize`` is None or ``"int8"``."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:  # "int4" once gave int8 weights without a word
        raise ValueError(f"quantize must be None or one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    check_flag(prepack, "prepack")  # "no" is truthy
    check_flag(compiled, "compiled")
    if quantize:
        quantize_int8(model)
    if model.device.type == "cpu" and not compiled:
        if prepack:
            prepack_for_cpu(model)  # several times faster decoding on CPU
        fuse_decode_steps(model)  # one pass over each state per token; the PyTorch step where nothing compiles
    return model


__all__ = ["prepare_for_decoding"]
