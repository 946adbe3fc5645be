"""Model families on the shared dense stack (``dense/``): one folder per family, its configuration and its
mixer, and the thin model classes that name its submodules.

``FAMILIES`` is the one list a family is registered in: the ``transformers`` Auto classes, strict loading in
the command line and anything else that must know every family read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedConfig, PreTrainedModel

from densessm.models.mamba import (
    DenseMambaConfig,
    DenseMambaForCausalLM,
    DenseMambaForSequenceClassification,
    DenseMambaModel,
)
from densessm.models.mamba2 import (
    DenseMamba2Config,
    DenseMamba2ForCausalLM,
    DenseMamba2ForSequenceClassification,
    DenseMamba2Model,
)
from densessm.models.retnet import (
    DenseRetNetConfig,
    DenseRetNetForCausalLM,
    DenseRetNetForSequenceClassification,
    DenseRetNetModel,
)


@dataclass(frozen=True)
class Family:
    """A model family: its name (the plain baseline's preset prefix; the dense model's is ``dense_<name>``),
    its title in reports, and its classes."""

    name: str
    title: str
    config: type[PreTrainedConfig]
    model: type[PreTrainedModel]
    causal_lm: type[PreTrainedModel]
    sequence_classification: type[PreTrainedModel]


FAMILIES = (
    Family(
        "retnet",
        "RetNet",
        DenseRetNetConfig,
        DenseRetNetModel,
        DenseRetNetForCausalLM,
        DenseRetNetForSequenceClassification,
    ),
    Family(
        "mamba", "Mamba", DenseMambaConfig, DenseMambaModel, DenseMambaForCausalLM, DenseMambaForSequenceClassification
    ),
    Family(
        "mamba2",
        "Mamba-2",
        DenseMamba2Config,
        DenseMamba2Model,
        DenseMamba2ForCausalLM,
        DenseMamba2ForSequenceClassification,
    ),
)

MODEL_TYPES = tuple(family.config.model_type for family in FAMILIES)

__all__ = ["FAMILIES", "MODEL_TYPES", "Family"]
