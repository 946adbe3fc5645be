"""Open a saved model directory for evaluation, strictly: the model its config.json describes, with its tokenizer.

Importing ``densessm`` (the parent package) has registered our model types with the Auto classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from densessm.loading import check_weights, load_causal_lm, read_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(model_dir: str | Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The configuration and tokenizer saved in ``model_dir``, after checking that its weights are exactly the
    model the configuration describes; raises FileNotFoundError or ValueError naming the problem. Evaluation
    turns text into tokens, so a tokenizer saved with the model is required."""
    path = Path(model_dir)
    config = read_config(path)
    check_weights(path, config)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): save the tokenizer next to the model "
            "with tokenizer.save_pretrained(MODEL_DIR)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # tokenizers raise OSError, ValueError, TypeError or their own exceptions
        raise ValueError(f"cannot load the tokenizer in {path}: {err}") from None
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model only {config.vocab_size} "
            "(vocab_size): it is not the tokenizer the model was trained with"
        )
    return config, tokenizer


def load_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The causal LM in ``model_dir`` (in eval mode, on ``device``, in ``dtype`` or as saved) and its tokenizer."""
    config, tokenizer = check_model_dir(model_dir)
    return load_causal_lm(model_dir, dtype=dtype, device=device, config=config), tokenizer
