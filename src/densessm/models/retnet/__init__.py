"""DenseRetNet (and, with ``dense_block_layers=0``, the plain GAU-RetNet baseline)."""

from densessm.models.retnet.configuration_dense_retnet import DenseRetNetConfig
from densessm.models.retnet.modeling_dense_retnet import (
    DenseRetNetForCausalLM,
    DenseRetNetForSequenceClassification,
    DenseRetNetModel,
    DenseRetNetPreTrainedModel,
)

__all__ = [
    "DenseRetNetConfig",
    "DenseRetNetForCausalLM",
    "DenseRetNetForSequenceClassification",
    "DenseRetNetModel",
    "DenseRetNetPreTrainedModel",
]
