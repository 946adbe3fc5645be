"""Equal-size baselines for the dense-vs-plain experiment: the widened m = 0 model lands within 2%."""

from __future__ import annotations

import pytest

from densessm.presets import load_preset
from densessm_lab.experiments.matching import matched_baseline, non_embedding_parameters, widen_to_match


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("dense_retnet_tiny", {}),
        ("dense_retnet_tiny", {"hidden_size": 96, "query_key_dim": 48, "num_hidden_layers": 6}),
        ("dense_mamba_tiny", {}),
        ("dense_mamba_tiny", {"hidden_size": 96, "num_hidden_layers": 6}),
    ],
)
def test_baseline_is_widened_to_within_two_percent(preset, overrides):
    dense = load_preset(preset, **overrides)
    baseline, target, count = matched_baseline(dense)
    assert baseline.dense_block_layers == 0
    assert baseline.hidden_size > dense.hidden_size  # the baseline pays for the gates with width
    assert abs(count - target) <= 0.02 * target
    assert count == non_embedding_parameters(baseline)
    # depth, heads and vocabulary are untouched: only the width changed
    for field in ("num_hidden_layers", "vocab_size"):
        assert getattr(baseline, field) == getattr(dense, field)


def test_embeddings_are_not_counted():
    small, large = load_preset("retnet_tiny"), load_preset("retnet_tiny", vocab_size=4096)
    assert non_embedding_parameters(small) == non_embedding_parameters(large)


def test_unreachable_target_is_an_error():
    with pytest.raises(ValueError, match="within 2%"):
        widen_to_match(load_preset("retnet_tiny"), target=10**9)
