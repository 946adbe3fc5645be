"""Shared fixtures: tiny configurations and the path of the reference golden data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densessm import DenseRetNetConfig

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


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"reference golden data not found at {GOLDEN} (it lives in the project's shared/ folder)")
    return GOLDEN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
