"""xPos-style rotation of q and k and the per-head decay, as in the public RetNet/DenseRetNet code.

The rotation turns each pair ``(x_2i, x_2i+1)`` by ``position · θ_i`` with ``θ_i = 10000^-linspace(0, 1,
D/2)_i``. It is a true rotation, so ``q_t · k_s`` depends only on ``t - s``: any consistent position
origin gives the same retention.
"""

from __future__ import annotations

import torch


def rotation_angles(key_dim: int) -> torch.Tensor:
    """``[key_dim]`` angles, each repeated for its pair."""
    angle = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2))
    return angle.repeat_interleave(2)


def head_log_decays(num_heads: int) -> torch.Tensor:
    """``log γ_h`` with ``γ_h = 1 - 2^(-5-h)``: each head sees a different horizon."""
    return torch.log(1 - 2 ** (-5 - torch.arange(num_heads, dtype=torch.float)))


def rotation_tables(
    positions: torch.Tensor, angles: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signed_sin, cos)`` of ``positions [B|1, L]`` (any integer origin), shaped ``[B|1, 1, L, D]``;
    computed in at least fp32 once per forward and shared by every layer. ``signed_sin`` is ``(-sin, sin)``
    on each pair: the sign :func:`rotate` needs, folded in here once instead of negating ``x`` in every call."""
    wide = torch.promote_types(dtype, torch.float32)  # float64 models get float64 tables
    theta = positions.to(wide)[:, None, :, None] * angles.to(wide)
    sign = torch.arange(angles.shape[-1], device=theta.device) % 2 * 2 - 1  # -1, +1, -1, ... (no host copy)
    return (theta.sin() * sign).to(dtype), theta.cos().to(dtype)


def rotate(x: torch.Tensor, signed_sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair of ``x [B, H, L, D]``: ``(a, b) -> (a cos - b sin, b cos + a sin)``, with the
    tables of :func:`rotation_tables`: ``x ⊙ cos + swap(x) ⊙ signed_sin`` (three passes)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)
