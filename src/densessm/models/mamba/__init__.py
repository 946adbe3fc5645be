"""DenseMamba (and, with ``dense_block_layers=0``, the plain Mamba baseline)."""

from densessm.models.mamba.configuration_dense_mamba import DenseMambaConfig
from densessm.models.mamba.modeling_dense_mamba import (
    DenseMambaForCausalLM,
    DenseMambaForSequenceClassification,
    DenseMambaModel,
    DenseMambaPreTrainedModel,
)

__all__ = [
    "DenseMambaConfig",
    "DenseMambaForCausalLM",
    "DenseMambaForSequenceClassification",
    "DenseMambaModel",
    "DenseMambaPreTrainedModel",
]
