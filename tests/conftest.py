"""Shared fixtures: tiny configurations and the path of the reference golden data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton's kernels run on CPU through its interpreter, read when triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from densessm import DenseMambaConfig, DenseRetNetConfig  # noqa: E402  (it loads triton, through transformers)

GOLDEN = Path(__file__).resolve().parents[1] / ".." / "shared" / "golden" / "dense_retnet_reference"


def tiny_config(**overrides) -> DenseRetNetConfig:
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        query_key_dim=16,
        num_attention_heads=2,
        num_hidden_layers=3,
        v_factor=2,
        dense_block_layers=2,
        k_gate_reduction=4,
        v_gate_reduction=4,
    )
    fields.update(overrides)
    return DenseRetNetConfig(**fields)


def tiny_mamba_config(**overrides) -> DenseMambaConfig:
    fields = dict(
        vocab_size=97,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=3,
        dense_block_layers=2,
        dense_gate_reduction=4,
        chunk_size=4,
    )
    fields.update(overrides)
    return DenseMambaConfig(**fields)


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"reference golden data not found at {GOLDEN} (it lives in the project's shared/ folder)")
    return GOLDEN


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (training runs on 2 shared cores: oversubscribed threads wait on each
    other), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def word_tokenizer():
    """A tiny word-level tokenizer (ids < 97), built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(93)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
