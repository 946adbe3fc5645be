"""The initialisation the selective-SSM families (DenseMamba, DenseMamba2) share: Mamba's.

``A = -exp(A_log)`` starts at ``-(1 … N)`` along its last axis (S4D-real), ``D`` at one, the time-step bias so
that ``softplus(bias)`` is log-uniform in ``[time_step_min, time_step_max]``, the conv and output
projections as ``nn.Linear`` would be (Kaiming-uniform), optionally scaled down by the depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init


def init_selective_ssm(mixer: nn.Module, time_step_bias: torch.Tensor, config) -> None:
    """Initialise ``mixer``'s ``A_log``, ``D``, ``conv1d``, ``out_proj`` and its ``time_step_bias`` parameter."""
    size = mixer.A_log.shape[-1]
    A = torch.arange(1, size + 1, dtype=torch.float32, device=mixer.A_log.device).expand_as(mixer.A_log)
    init.copy_(mixer.A_log, torch.log(A))
    init.ones_(mixer.D)
    low, high = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = torch.exp(torch.rand(time_step_bias.shape, device=time_step_bias.device) * (high - low) + low)
    dt = dt.clamp(min=config.time_step_floor)
    init.copy_(time_step_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    init.kaiming_uniform_(mixer.conv1d.weight, a=math.sqrt(5))
    if mixer.conv1d.bias is not None:
        init.zeros_(mixer.conv1d.bias)
    init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
    if config.rescale_prenorm_residual:
        init.copy_(mixer.out_proj.weight, mixer.out_proj.weight / math.sqrt(config.num_hidden_layers))


__all__ = ["init_selective_ssm"]
