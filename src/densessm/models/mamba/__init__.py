"""DenseMamba (and, with ``dense_block_layers=0``, the plain Mamba baseline)."""

from densessm.models.mamba.configuration_dense_mamba import MAMBA_MODES, DenseMambaConfig
from densessm.models.mamba.modeling_dense_mamba import (
    DenseMambaForCausalLM,
    DenseMambaModel,
    DenseMambaPreTrainedModel,
)

__all__ = [
    "MAMBA_MODES",
    "DenseMambaConfig",
    "DenseMambaForCausalLM",
    "DenseMambaModel",
    "DenseMambaPreTrainedModel",
]
