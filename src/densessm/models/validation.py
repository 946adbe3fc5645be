"""Checks shared by the configuration classes: each raises a ValueError naming the field and the fix.

They run as the configs' ``validate_*`` methods, i.e. when a configuration is built, when
``from_pretrained`` reads a ``config.json``, and again when a model is built from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from transformers import PreTrainedConfig


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(config: PreTrainedConfig, name: str) -> None:
    """``config.<name>`` is an integer >= 1 (``True`` is not a size)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):  # numpy's ints: no JSON, and torch splits refuse them
        raise ValueError(
            f"{name} must be a positive integer, got {value!r}: a {type(value).__name__}, not a Python int"
        )
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_float(config: PreTrainedConfig, name: str) -> None:
    """``config.<name>`` is a finite number > 0 (an epsilon of 0 divides by zero on an all-zero input)."""
    value = getattr(config, name)
    if not is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_dense_block_layers(config: PreTrainedConfig) -> None:
    """``m = dense_block_layers`` is in ``[0, num_hidden_layers - 1]``: layer ``l`` receives the states of the
    ``min(m, l)`` layers below it, so the top layer, with ``L - 1`` below it, is the most any layer can take."""
    m, layers = config.dense_block_layers, config.num_hidden_layers
    if isinstance(m, bool) or not isinstance(m, int):
        raise ValueError(
            f"dense_block_layers must be an integer >= 0, got {m!r}: a {type(m).__name__}, not a Python int"
        )
    if m < 0:
        raise ValueError(f"dense_block_layers must be >= 0, got {m!r}")
    if m > layers - 1:
        raise ValueError(
            f"dense_block_layers={m} exceeds the {layers - 1} layer(s) below the top of a {layers}-layer model: "
            f"use at most {layers - 1} (0 for a plain model)"
        )


def check_pad_token_id(config: PreTrainedConfig) -> None:
    """``pad_token_id`` is None or a token of the vocabulary: the embedding's padding row and the padded positions
    of generated batches are indexed by it (transformers only warns)."""
    pad = config.pad_token_id
    if pad is None:
        return
    if isinstance(pad, bool) or not isinstance(pad, numbers.Integral) or not 0 <= pad < config.vocab_size:
        raise ValueError(f"pad_token_id {pad!r} is not a token id of the vocabulary [0, {config.vocab_size})")


MAX_LAYERS = 10_000
"""More layers than any model here has: a ``config.json`` claiming a billion would exhaust memory (the per-layer
lists a configuration builds) before a weight is read."""


def layer_count(config: PreTrainedConfig) -> int:
    """``num_hidden_layers``, checked to be a positive integer of at most :data:`MAX_LAYERS`."""
    check_positive_int(config, "num_hidden_layers")
    if config.num_hidden_layers > MAX_LAYERS:
        raise ValueError(
            f"num_hidden_layers={config.num_hidden_layers} is beyond {MAX_LAYERS:,}: no model has that many layers"
        )
    return config.num_hidden_layers


def linear_layer_types(config: PreTrainedConfig) -> list[str]:
    """``layer_types`` of a recurrent model: every layer ``"linear_attention"``. transformers reads it before the
    validators run, so a layer count beyond :data:`MAX_LAYERS` is refused here before the list is built; other bad
    counts give an empty list and the validators name them."""
    count = config.num_hidden_layers
    if isinstance(count, int) and not isinstance(count, bool) and count <= MAX_LAYERS:
        return ["linear_attention"] * max(count, 0)
    return ["linear_attention"] * layer_count(config)


def check_switches(config: PreTrainedConfig) -> None:
    """Every field the configuration declares ``bool`` holds ``True`` or ``False``: a config.json saying
    ``"use_bias": "false"`` would be taken as true (a non-empty string), and its weights then blamed."""
    for field in dataclasses.fields(config):
        if field.type in (bool, "bool"):
            value = getattr(config, field.name)
            if not isinstance(value, bool):
                raise ValueError(f"{field.name} must be true or false, got {value!r}")


def check_stack(config: PreTrainedConfig) -> None:
    """The fields every family's dense stack reads alike: the layer count, ``m``, the padding token and the
    switches."""
    check_switches(config)
    layer_count(config)
    check_dense_block_layers(config)
    check_pad_token_id(config)
