"""Open a saved model directory for evaluation, strictly: the model its config.json describes, with its tokenizer.

Importing ``densessm`` (the parent package) has registered our model types with the Auto classes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from densessm.loading import check_weights, load_tokenizer_dir, read_config, special_token_beyond


def check_model_dir(model_dir: str | Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The configuration and tokenizer saved in ``model_dir``, after checking that its weights are exactly the
    model the configuration describes; raises FileNotFoundError or ValueError naming the problem. Evaluation
    turns text into tokens, so a tokenizer saved with the model is required."""
    path = Path(model_dir)
    config = read_config(path)
    check_weights(path, config)
    tokenizer = load_tokenizer_dir(path)
    special = special_token_beyond(tokenizer, config.vocab_size)
    if special is not None:
        raise ValueError(
            f"the tokenizer in {path}: {special} (a special token its tokenizer_config.json names that the "
            "vocabulary lacks?)"
        )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model only {config.vocab_size} "
            "(vocab_size): it is not the tokenizer the model was trained with"
        )
    return config, tokenizer
