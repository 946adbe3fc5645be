"""densessm: DenseRetNet, DenseMamba and DenseMamba2 language models, Hugging Face native.

Importing the package registers every family's configuration and models (``densessm.models.FAMILIES``) with
the ``transformers`` Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` works without
``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from densessm.cache import RecurrentCache
from densessm.models import FAMILIES
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

__version__ = "0.1.0"

for _family in FAMILIES:
    AutoConfig.register(_family.config.model_type, _family.config, exist_ok=True)
    AutoModel.register(_family.config, _family.model, exist_ok=True)
    AutoModelForCausalLM.register(_family.config, _family.causal_lm, exist_ok=True)
    AutoModelForSequenceClassification.register(_family.config, _family.sequence_classification, exist_ok=True)

__all__ = [
    "DenseMamba2Config",
    "DenseMamba2ForCausalLM",
    "DenseMamba2ForSequenceClassification",
    "DenseMamba2Model",
    "DenseMambaConfig",
    "DenseMambaForCausalLM",
    "DenseMambaForSequenceClassification",
    "DenseMambaModel",
    "DenseRetNetConfig",
    "DenseRetNetForCausalLM",
    "DenseRetNetForSequenceClassification",
    "DenseRetNetModel",
    "RecurrentCache",
    "__version__",
]
