"""Inference transforms: module replacements that change how weights are stored.

``fuse_projections`` merges a layer's products that read the same input (any device); ``prepack_for_cpu``
does that and stores the CPU weights in oneDNN's blocked layout; ``quantize_int8`` does it and stores them as
int8 (CPU), which changes the function by its rounding. ``fuse_decode_steps`` gives the mixers a compiled
CPU decode step (one pass over each layer's state); ``prepare_for_decoding`` applies them as the commands do.
The model classes keep one path; the replacement modules refuse to train or be saved
(:class:`~densessm.inference.frozen.InferenceOnly`).
"""

from densessm.inference.decoding import prepare_for_decoding
from densessm.inference.frozen import InferenceOnly, InferenceOnlyError, SiLULinear, frozen_linear
from densessm.inference.fused_step import fuse_decode_steps
from densessm.inference.fusion import fuse_projections
from densessm.inference.prepack import PrepackedLinear, prepack_for_cpu, prepacking_available
from densessm.inference.quantize import QUANTIZE_CHOICES, Int8Linear, int8_problem, quantize_int8

__all__ = [
    "InferenceOnly",
    "InferenceOnlyError",
    "Int8Linear",
    "PrepackedLinear",
    "QUANTIZE_CHOICES",
    "SiLULinear",
    "frozen_linear",
    "fuse_decode_steps",
    "fuse_projections",
    "int8_problem",
    "prepack_for_cpu",
    "prepacking_available",
    "prepare_for_decoding",
    "quantize_int8",
]
