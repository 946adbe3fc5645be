"""DenseRetNet configuration. Field names follow the public reference ``config.json`` where it has one."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from densessm.models.validation import (
    check_positive_float,
    check_positive_int,
    check_stack,
    is_number,
    linear_layer_types,
)
from densessm.modes import MODES


@strict
class DenseRetNetConfig(PreTrainedConfig):
    r"""Configuration of a DenseRetNet (GAU-style retention, no FFN) or, with ``dense_block_layers=0``, of the
    plain GAU-RetNet baseline.

    Args:
        vocab_size: Vocabulary size.
        hidden_size: Residual stream width.
        query_key_dim: Total width of q and k (split over heads).
        num_attention_heads: Retention heads; head ``h`` decays with ``γ_h = 1 - 2^(-5-h)``.
        num_hidden_layers: Number of retention layers.
        v_factor: The value/gate width is ``hidden_size * v_factor``.
        dense_block_layers: ``m``, how many layers below feed each layer's k and v (0: plain RetNet).
        k_gate_reduction, v_gate_reduction: Bottleneck ratio of the selective-transition gates of k and v
            (the gate's hidden width is ``hidden_size // ratio``; the public code hard-codes 32).
        rms_norm_eps: Epsilon of every RMSNorm.
        dropout: Dropout on each retention block's output.
        max_position_embeddings: Training context length (retention itself has no position limit).
        forward_mode: Default compute mode of a forward call: ``auto`` (parallel for short sequences without a
            state, chunkwise for long ones or when a state is kept, recurrent for single tokens), ``parallel``,
            ``chunkwise`` or ``recurrent``.
        chunk_size: Tokens per chunk in chunkwise mode; None (the default) chooses it from the heads' sizes
            (:func:`densessm.ops.retention.default_chunk_size`: 128 for the 350M and 1.3B shapes).
    """

    model_type = "dense_retnet"
    # the fields that shape a recurrent state and give it its meaning (recorded by a saved cache)
    state_fields = (
        "vocab_size",
        "hidden_size",
        "query_key_dim",
        "num_attention_heads",
        "num_hidden_layers",
        "v_factor",
        "dense_block_layers",
        "k_gate_reduction",
        "v_gate_reduction",
        "rms_norm_eps",
    )

    vocab_size: int = 32000
    hidden_size: int = 1536
    query_key_dim: int = 768
    num_attention_heads: int = 2
    num_hidden_layers: int = 16
    v_factor: int | float = 2
    dense_block_layers: int = 1
    k_gate_reduction: int = 32
    v_gate_reduction: int = 32
    rms_norm_eps: float = 1e-6
    dropout: float = 0.0
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    forward_mode: str = "auto"
    chunk_size: int | None = None
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    @property
    def value_dim(self) -> int:
        """Width of v and of the output gate."""
        return int(self.hidden_size * self.v_factor)

    def validate_dense_retnet(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "query_key_dim",
            "num_attention_heads",
            "num_hidden_layers",
            "k_gate_reduction",
            "v_gate_reduction",
            "max_position_embeddings",
        )
        for name in positive:
            check_positive_int(self, name)
        if self.chunk_size is not None:
            check_positive_int(self, "chunk_size")
        if not is_number(self.v_factor) or not 0 < self.v_factor < math.inf:
            raise ValueError(f"v_factor must be a positive number, got {self.v_factor!r}")
        if self.hidden_size * self.v_factor != self.value_dim:
            raise ValueError(
                f"hidden_size * v_factor ({self.hidden_size} * {self.v_factor}) must be a whole number: it is the "
                "width of v and of the output gate"
            )
        heads = self.num_attention_heads
        if self.query_key_dim % heads or (self.query_key_dim // heads) % 2:
            raise ValueError(
                f"query_key_dim ({self.query_key_dim}) must split into {heads} heads of even width "
                "(the rotation turns pairs of channels)"
            )
        if self.value_dim % heads:
            raise ValueError(f"hidden_size * v_factor ({self.value_dim}) must be divisible by {heads} heads")
        check_stack(self)
        for name, ratio in (("k_gate_reduction", self.k_gate_reduction), ("v_gate_reduction", self.v_gate_reduction)):
            if self.dense_block_layers and self.hidden_size // ratio < 1:
                raise ValueError(f"{name}={ratio} leaves no gate width for hidden_size={self.hidden_size}")
        check_positive_float(self, "rms_norm_eps")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not is_number(self.initializer_range) or not 0 <= self.initializer_range < math.inf:
            raise ValueError(f"initializer_range must be a finite number >= 0, got {self.initializer_range!r}")
        if self.forward_mode not in MODES:
            raise ValueError(f"unknown forward_mode {self.forward_mode!r}: expected one of {', '.join(MODES)}")

    @property
    def layer_types(self) -> list[str]:
        return linear_layer_types(self)


__all__ = ["DenseRetNetConfig"]
