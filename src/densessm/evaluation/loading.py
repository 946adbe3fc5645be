"""Open a saved model directory for evaluation, with errors that say what is wrong with it.

Importing ``densessm`` (the parent package) has registered our model types with the Auto classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(model_dir: str | Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The configuration and tokenizer saved in ``model_dir``; raises FileNotFoundError or ValueError naming the
    problem. Evaluation turns text into tokens, so a tokenizer saved with the model is required."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (or is not a directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model saved with save_pretrained()")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the model configuration in {path}: {err}") from err
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): save the tokenizer next to the model "
            "with tokenizer.save_pretrained(MODEL_DIR)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer in {path}: {err}") from err
    return config, tokenizer


def load_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The causal LM in ``model_dir`` (in eval mode, on ``device``, in ``dtype`` or as saved) and its tokenizer."""
    config, tokenizer = check_model_dir(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the model weights in {model_dir}: {err}") from err
    return model.to(device).eval(), tokenizer
