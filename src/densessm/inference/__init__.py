"""Inference transforms: module replacements that change how weights are stored, not what is computed.

``fuse_projections`` merges a layer's products that read the same input (any device); ``prepack_for_cpu``
does that and stores the CPU weights in oneDNN's blocked layout. The model classes keep one path; the
replacement modules refuse to train or be saved (:class:`~densessm.inference.frozen.InferenceOnly`).
"""

from densessm.inference.frozen import InferenceOnly, InferenceOnlyError, SiLULinear, frozen_linear
from densessm.inference.fusion import fuse_projections
from densessm.inference.prepack import PrepackedLinear, prepack_for_cpu, prepacking_available

__all__ = [
    "InferenceOnly",
    "InferenceOnlyError",
    "PrepackedLinear",
    "SiLULinear",
    "frozen_linear",
    "fuse_projections",
    "prepack_for_cpu",
    "prepacking_available",
]
