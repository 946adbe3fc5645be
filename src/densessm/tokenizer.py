"""Tokenizers for training: the bundled byte-level BPE, or any tokenizer directory (e.g. the reference's LLaMA one).

The bundled tokenizer (4,096 tokens; ``<pad>``, ``<s>``, ``</s>`` = 0, 1, 2 like the presets) was trained on the
bundled corpus by ``scripts/train_tokenizer.py``; it needs no network and no extra package.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from densessm.files import read_json
from densessm.loading import load_tokenizer_dir

BUNDLED_TOKENIZER = Path(__file__).parent / "resources" / "tokenizer"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the presets' pad/bos/eos_token_id


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds tokenizer files (as a saved model directory does)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the directory ``name_or_path`` (the bundled BPE when it is None), or one line saying
    why not (:func:`densessm.loading.load_tokenizer_dir`: custom code is never run); a damaged ``tokenizer.json``
    is named, where the tokenizers library would report only a JSON position."""
    source = BUNDLED_TOKENIZER if name_or_path is None else Path(name_or_path)
    vocabulary = source / "tokenizer.json"
    if vocabulary.is_file():
        try:
            read_json(vocabulary)
        except ValueError as err:
            raise ValueError(f"{vocabulary} is not valid JSON ({err}): the tokenizer is damaged") from None
    return load_tokenizer_dir(source)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: every byte sequence encodes, no unknown token) trained on ``texts``, with
    ``SPECIAL_TOKENS`` first. Deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens: {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos)


__all__ = ["BUNDLED_TOKENIZER", "SPECIAL_TOKENS", "has_tokenizer", "load_tokenizer", "train_bpe"]
