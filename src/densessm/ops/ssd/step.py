"""Mamba-2's SSM one token at a time: the decode path (and the recurrent mode of a whole call).

The grouped ``B, C`` are never expanded to the heads: the state is viewed as ``[b, G, (H/G)·P, N]`` so that a
group's heads share one broadcast of ``B`` and one batched product with ``C``.
"""

from __future__ import annotations

import torch

from densessm.ops.ssd.reference import heads_per_group


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: ``state [b, H, P, N]``, ``x [b, H, P]``, ``dt [b, H]``, ``A [H]``, ``B, C [b, G, N]``.

    Returns ``(y [b, H, P], new state [b, H, P, N])``; ``dt = 0`` returns the state unchanged (padding).
    """
    batch, heads, width, size = state.shape
    groups = B.shape[1]
    rows = heads_per_group(x, B) * width
    decay = torch.exp(dt * A)[..., None, None]  # [b, H, 1, 1]
    inflow = (dt[..., None] * x).reshape(batch, groups, rows, 1) * B[:, :, None, :]  # Δ x ⊗ B, per group
    new = torch.addcmul(inflow.view(batch, heads, width, size), decay, state)
    y = torch.matmul(new.reshape(batch, groups, rows, size), C[..., None])  # [b, G, rows, 1]
    return y.view(batch, heads, width), new


def ssd_steps(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor | None = None,
    keep_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`ssd_step` over ``x [b, L, H, P]``, ``dt [b, L, H]``, ``B, C [b, L, G, N]`` from ``state``
    (default zeros). Returns ``(y [b, L, H, P], states [b, L, H, P, N] if keep_states else None, final)``."""
    batch, length, heads, width = x.shape
    h = x.new_zeros(batch, heads, width, B.shape[-1]) if state is None else state
    ys, states = [], []
    for t in range(length):
        y_t, h = ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)
        if keep_states:
            states.append(h)
    if length == 1:  # decoding: views, no copies
        return ys[0][:, None], states[0][:, None] if keep_states else None, h
    return torch.stack(ys, 1), torch.stack(states, 1) if keep_states else None, h
