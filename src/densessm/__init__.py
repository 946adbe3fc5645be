"""densessm: DenseRetNet and DenseMamba language models, Hugging Face native.

Importing the package registers our configurations and models with the ``transformers`` Auto classes,
so ``AutoModelForCausalLM.from_pretrained(dir)`` works without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from densessm.cache import RecurrentCache
from densessm.models.mamba import DenseMambaConfig, DenseMambaForCausalLM, DenseMambaModel
from densessm.models.retnet import (
    DenseRetNetConfig,
    DenseRetNetForCausalLM,
    DenseRetNetForSequenceClassification,
    DenseRetNetModel,
)

__version__ = "0.1.0"

AutoConfig.register(DenseRetNetConfig.model_type, DenseRetNetConfig, exist_ok=True)
AutoModel.register(DenseRetNetConfig, DenseRetNetModel, exist_ok=True)
AutoModelForCausalLM.register(DenseRetNetConfig, DenseRetNetForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DenseRetNetConfig, DenseRetNetForSequenceClassification, exist_ok=True)
AutoConfig.register(DenseMambaConfig.model_type, DenseMambaConfig, exist_ok=True)
AutoModel.register(DenseMambaConfig, DenseMambaModel, exist_ok=True)
AutoModelForCausalLM.register(DenseMambaConfig, DenseMambaForCausalLM, exist_ok=True)

__all__ = [
    "DenseMambaConfig",
    "DenseMambaForCausalLM",
    "DenseMambaModel",
    "DenseRetNetConfig",
    "DenseRetNetForCausalLM",
    "DenseRetNetForSequenceClassification",
    "DenseRetNetModel",
    "RecurrentCache",
    "__version__",
]
