"""DenseMamba2 configuration. Field names and defaults are those of ``transformers``' ``Mamba2Config``, so a
Mamba-2 ``config.json`` reads as a DenseMamba2 configuration (add ``dense_block_layers=0`` for plain Mamba-2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
class DenseMamba2Config(PreTrainedConfig):
    r"""Configuration of a DenseMamba2 (Mamba-2 blocks with dense hidden connections between SSM states) or,
    with ``dense_block_layers=0``, of plain Mamba-2.

    Args:
        num_heads: ``H``, SSM heads; ``num_heads * head_dim`` must equal ``expand * hidden_size``.
        head_dim: ``P``, channels per head.
        vocab_size: Vocabulary size.
        hidden_size: Residual stream width.
        state_size: ``N``, the state size per channel (each head keeps a ``P × N`` state).
        num_hidden_layers: Number of Mamba-2 blocks.
        layer_norm_epsilon: Epsilon of every RMSNorm (the block norms and the gated norm of the mixer).
        expand: The SSM width is ``expand * hidden_size``.
        conv_kernel: Width of the causal depthwise convolution (over ``x``, ``B`` and ``C``).
        n_groups: ``G``, groups of heads that share one ``B`` and ``C`` (and one statistic of the gated norm).
        use_bias: Bias in ``in_proj`` and ``out_proj``.
        use_conv_bias: Bias in the convolution.
        hidden_act: The block's activation; Mamba-2 uses ``silu`` (the only one supported).
        initializer_range: Standard deviation of the normal init of linear layers and embeddings.
        residual_in_fp32: Keep the residual stream in float32.
        time_step_rank: Kept for ``Mamba2Config`` compatibility; Mamba-2 projects ``Δ`` per head directly.
        time_step_min, time_step_max, time_step_floor: Initialisation of ``dt_bias`` (``Δ`` per head).
        time_step_limit: ``(min, max)`` that ``Δ`` is clamped to after its softplus.
        rescale_prenorm_residual: Scale ``out_proj`` by ``1/sqrt(num_hidden_layers)`` at initialisation.
        chunk_size: Steps per chunk of the blocked SSD (the parallel form); also the tokens per chunk of the
            ``chunkwise`` schedule.
        dense_block_layers: ``m``, how many layers below feed their SSM states to each layer (0: plain Mamba-2).
        dense_gate_reduction: Bottleneck ratio of the selective-transition gate (hidden width
            ``hidden_size // ratio``).
        forward_mode: Default compute mode of a forward call (``auto``, ``parallel``, ``chunkwise`` or
            ``recurrent``).
    """

    model_type = "dense_mamba2"
    # the fields that shape a recurrent state and give it its meaning (recorded by a saved cache)
    state_fields = (
        "vocab_size",
        "hidden_size",
        "state_size",
        "num_hidden_layers",
        "layer_norm_epsilon",
        "num_heads",
        "head_dim",
        "expand",
        "conv_kernel",
        "n_groups",
        "use_bias",
        "use_conv_bias",
        "hidden_act",
        "residual_in_fp32",
        "time_step_limit",
        "dense_block_layers",
        "dense_gate_reduction",
    )

    num_heads: int = 128
    head_dim: int = 64
    vocab_size: int = 32768
    hidden_size: int = 4096
    state_size: int = 128
    num_hidden_layers: int = 64
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    expand: int = 2
    conv_kernel: int = 4
    n_groups: int = 8
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: str | int = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    chunk_size: int = 256
    tie_word_embeddings: bool = False
    dense_block_layers: int = 2
    dense_gate_reduction: int = 32
    forward_mode: str = "auto"

    def __post_init__(self, **kwargs):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        super().__post_init__(**kwargs)

    def validate_dense_mamba2(self):
        # The gate's width (hidden_size // dense_gate_reduction >= 1) is checked where the gate is built: a
        # Mamba-2 config.json is validated with the default m before from_pretrained applies an m = 0 override.
        positive = (
            "vocab_size",
            "hidden_size",
            "state_size",
            "num_hidden_layers",
            "num_heads",
            "head_dim",
            "expand",
            "conv_kernel",
            "n_groups",
            "time_step_rank",
            "dense_gate_reduction",
            "chunk_size",
        )
        for name in positive:
            check_positive_int(self, name)
        if self.hidden_size * self.expand != self.num_heads * self.head_dim:
            raise ValueError(
                f"hidden_size * expand ({self.hidden_size * self.expand}) must equal num_heads * head_dim "
                f"({self.num_heads * self.head_dim})"
            )
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"num_heads={self.num_heads} does not split into n_groups={self.n_groups}: use a divisor of "
                f"{self.num_heads}"
            )
        check_stack(self)
        check_positive_float(self, "layer_norm_epsilon")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the Mamba-2 block), got {self.hidden_act!r}")
        for name in ("time_step_min", "time_step_max"):
            check_positive_float(self, name)
        if not self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"need 0 < time_step_min <= time_step_max, got {self.time_step_min} and {self.time_step_max}"
            )
        for name in ("time_step_floor", "initializer_range"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        check_time_step_limit(self.time_step_limit)
        if self.forward_mode not in MODES:
            raise ValueError(f"unknown forward_mode {self.forward_mode!r}: expected one of {', '.join(MODES)}")

    @property
    def layer_types(self) -> list[str]:
        return linear_layer_types(self)


def check_time_step_limit(limit: Sequence[float]) -> None:
    """``(min, max)`` with ``0 <= min <= max`` (``max`` may be infinite): a clamp of ``Δ = softplus(·) >= 0``."""
    ok = len(limit) == 2 and all(is_number(v) for v in limit) and 0 <= limit[0] <= limit[1] and limit[0] < math.inf
    if not ok:
        raise ValueError(f"time_step_limit must be (min, max) with 0 <= min <= max (max may be inf), got {limit!r}")


__all__ = ["DenseMamba2Config"]
