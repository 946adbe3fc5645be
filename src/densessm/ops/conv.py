"""Causal depthwise convolution over time with an explicit carried state and padding masks.

The state is the last ``K - 1`` real inputs (``[b, K-1, D]``). A padded position is not part of any
window: the real tokens of a row see the ``K - 1`` real tokens (or carried state) before them, wherever
the padding sits, so a padded row convolves exactly as the row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [b, L, D]``, ``weight [D, 1, K]`` (``nn.Conv1d`` depthwise layout), ``state [b, K-1, D]`` (default
    zeros), ``mask [b, L]`` bool of real tokens. Returns ``(y [b, L, D], new state [b, K-1, D])``; ``y`` at
    padded positions is unspecified.
    """
    batch, length, channels = x.shape
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(batch, width - 1, channels)
    extended = torch.cat([state.to(x.dtype), x], dim=1)
    if mask is not None:
        # Move each row's padding to its front (a stable sort keeps the real tokens in order) so every
        # window holds real tokens only; map the outputs back afterwards.
        real = torch.cat([mask.new_ones(batch, width - 1), mask], dim=1)
        order = torch.sort(real.to(torch.uint8), dim=1, stable=True).indices
        extended = extended.gather(1, order[..., None].expand(-1, -1, channels))
    y = F.conv1d(extended.transpose(1, 2), weight, bias, groups=channels).transpose(1, 2)
    new_state = extended[:, length:]
    if mask is not None:
        where = torch.argsort(order, dim=1)[:, width - 1 :] - (width - 1)  # sorted index of each input
        y = y.gather(1, where.clamp_min(0)[..., None].expand(-1, -1, channels))
    return y, new_state


def causal_conv_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor,
    real: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``x [b, D]``, ``state [b, K-1, D]``, ``real [b]`` bool (a padded token leaves the state
    as it was). Returns ``(y [b, D], new state)``.
    """
    window = torch.cat([state.to(x.dtype), x[:, None]], dim=1)
    y = (window * weight[:, 0].t()).sum(1)  # not einsum: its dispatch dominates a decode step
    if bias is not None:
        y = y + bias
    new_state = window[:, 1:]
    if real is not None:
        new_state = torch.where(real[:, None, None], new_state, state)
    return y, new_state
