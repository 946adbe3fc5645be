"""DenseMamba2 (and, with ``dense_block_layers=0``, plain Mamba-2)."""

from densessm.models.mamba2.configuration_dense_mamba2 import DenseMamba2Config
from densessm.models.mamba2.modeling_dense_mamba2 import (
    DenseMamba2ForCausalLM,
    DenseMamba2ForSequenceClassification,
    DenseMamba2Mixer,
    DenseMamba2Model,
    DenseMamba2PreTrainedModel,
)

__all__ = [
    "DenseMamba2Config",
    "DenseMamba2ForCausalLM",
    "DenseMamba2ForSequenceClassification",
    "DenseMamba2Mixer",
    "DenseMamba2Model",
    "DenseMamba2PreTrainedModel",
]
