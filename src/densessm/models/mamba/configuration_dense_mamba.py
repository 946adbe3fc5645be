"""DenseMamba configuration. Field names are those of ``transformers``' ``MambaConfig``, so a Mamba
``config.json`` reads as a DenseMamba configuration (add ``dense_block_layers=0`` for the plain baseline).
"""

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
class DenseMambaConfig(PreTrainedConfig):
    r"""Configuration of a DenseMamba (Mamba-1 blocks with dense hidden connections between SSM states) or,
    with ``dense_block_layers=0``, of the plain Mamba baseline.

    Args:
        vocab_size: Vocabulary size.
        hidden_size: Residual stream width.
        state_size: ``N``, the SSM state size per channel.
        num_hidden_layers: Number of Mamba blocks.
        layer_norm_epsilon: Epsilon of every RMSNorm.
        expand: The SSM width is ``intermediate_size = int(expand * hidden_size)``.
        conv_kernel: Width of the causal depthwise convolution.
        use_bias: Bias in ``in_proj`` and ``out_proj``.
        use_conv_bias: Bias in the convolution.
        hidden_act: The block's activation; Mamba-1 uses ``silu`` (the only one supported).
        initializer_range: Standard deviation of the normal init of linear layers and embeddings.
        residual_in_fp32: Keep the residual stream in float32.
        time_step_rank: Rank of the Δ projection (``"auto"``: ``ceil(hidden_size / 16)``).
        time_step_scale, time_step_min, time_step_max, time_step_init_scheme, time_step_floor: Initialisation
            of Δ's projection, as in Mamba.
        rescale_prenorm_residual: Scale ``out_proj`` by ``1/sqrt(num_hidden_layers)`` at initialisation.
        dense_block_layers: ``m``, how many layers below feed their SSM states to each layer (0: plain Mamba).
        dense_gate_reduction: Bottleneck ratio of the selective-transition gate (hidden width
            ``hidden_size // ratio``).
        forward_mode: Default compute mode of a forward call (``auto``, ``parallel``, ``chunkwise`` or ``recurrent``).
        chunk_size: Tokens per chunk in ``chunkwise`` mode.
    """

    model_type = "dense_mamba"
    # the fields that shape a recurrent state and give it its meaning (recorded by a saved cache)
    state_fields = (
        "vocab_size",
        "hidden_size",
        "state_size",
        "num_hidden_layers",
        "layer_norm_epsilon",
        "expand",
        "intermediate_size",
        "conv_kernel",
        "use_bias",
        "use_conv_bias",
        "hidden_act",
        "residual_in_fp32",
        "time_step_rank",
        "dense_block_layers",
        "dense_gate_reduction",
    )

    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: str | int = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True
    dense_block_layers: int = 2
    dense_gate_reduction: int = 32
    forward_mode: str = "parallel"
    chunk_size: int = 256

    def __post_init__(self, **kwargs):
        # As MambaConfig: derived here, so an explicit ``intermediate_size`` in kwargs (config.json) wins.
        self.intermediate_size = int(self.expand * self.hidden_size)
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        super().__post_init__(**kwargs)

    def validate_dense_mamba(self):
        # The gate's width (hidden_size // dense_gate_reduction >= 1) is checked where the gate is built: a
        # Mamba config.json is validated with the default m before from_pretrained applies an m = 0 override.
        positive = (
            "vocab_size",
            "hidden_size",
            "state_size",
            "num_hidden_layers",
            "expand",
            "intermediate_size",
            "conv_kernel",
            "time_step_rank",
            "dense_gate_reduction",
            "chunk_size",
        )
        for name in positive:
            check_positive_int(self, name)
        check_stack(self)
        check_positive_float(self, "layer_norm_epsilon")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the Mamba-1 block), got {self.hidden_act!r}")
        for name in ("time_step_min", "time_step_max"):
            check_positive_float(self, name)
        if not self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"need 0 < time_step_min <= time_step_max, got {self.time_step_min} and {self.time_step_max}"
            )
        for name in ("time_step_scale", "time_step_floor", "initializer_range"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.time_step_init_scheme not in ("random", "constant"):
            raise ValueError(
                f"time_step_init_scheme must be 'random' or 'constant', got {self.time_step_init_scheme!r}"
            )
        if self.forward_mode not in MODES:
            raise ValueError(f"unknown forward_mode {self.forward_mode!r}: expected one of {', '.join(MODES)}")

    @property
    def layer_types(self) -> list[str]:
        return linear_layer_types(self)


__all__ = ["DenseMambaConfig"]
