"""Tokenizers for training: the bundled byte-level BPE, or any tokenizer directory (e.g. the reference's LLaMA one).

The bundled tokenizer (4,096 tokens; ``<pad>``, ``<s>``, ``</s>`` = 0, 1, 2 like the presets) was trained on the
bundled corpus by ``scripts/train_tokenizer.py``; it needs no network and no extra package.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

BUNDLED_TOKENIZER = Path(__file__).parent / "resources" / "tokenizer"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds tokenizer files (as a saved model directory does)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` from ``name_or_path``; the bundled BPE when it is None."""
    source = BUNDLED_TOKENIZER if name_or_path is None else Path(name_or_path)
    if not has_tokenizer(source):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source}")
    return AutoTokenizer.from_pretrained(source)


__all__ = ["BUNDLED_TOKENIZER", "has_tokenizer", "load_tokenizer"]
