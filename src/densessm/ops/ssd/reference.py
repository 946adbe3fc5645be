"""Mamba-2's selective state space model written as its definition: one step at a time.

Per head ``h`` of ``H`` heads the state is a ``P × N`` matrix (``P`` the head width, ``N`` the state size). The
transition is a *scalar* per head and step, ``exp(Δ_t A_h)``, and ``B, C`` are shared by the ``H / G`` heads of
each of ``G`` groups (grouped like grouped-query attention)::

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t        h_t ∈ R^{H×P×N};  x_t ∈ R^{H×P};  Δ_t ∈ R^H;  B_t ∈ R^{G×N}
    y_t = h_t C_t                                   C_t ∈ R^{G×N},  y_t ∈ R^{H×P}

``Δ_t = 0`` makes the step the identity (no decay, no input), which is how padded positions are kept out of the
state. This module is the readable reference the blocked form (:mod:`densessm.ops.ssd.blocked`) and the decode
step (:mod:`densessm.ops.ssd.step`) are tested against; it is not on any model's path.
"""

from __future__ import annotations

import torch


def heads_per_group(x: torch.Tensor, B: torch.Tensor) -> int:
    """``H / G`` for ``x [..., H, P]`` and ``B [..., G, N]``; a clear error when the heads do not split evenly."""
    heads, groups = x.shape[-2], B.shape[-2]
    if heads % groups:
        raise ValueError(f"{heads} heads do not split into {groups} groups of B and C: use a divisor of {heads}")
    return heads // groups


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the recurrence over ``x [b, L, H, P]``, ``dt [b, L, H]``, ``A [H]``, ``B, C [b, L, G, N]`` from
    ``state [b, H, P, N]`` (default zeros).

    Returns ``(y [b, L, H, P], states [b, L, H, P, N], final state [b, H, P, N])``.
    """
    batch, length, heads, width = x.shape
    size = B.shape[-1]
    r = heads_per_group(x, B)
    h = x.new_zeros(batch, heads, width, size) if state is None else state
    ys, states = [], []
    for t in range(length):
        B_t = B[:, t].repeat_interleave(r, dim=1)  # [b, H, N]: each head's group
        C_t = C[:, t].repeat_interleave(r, dim=1)
        decay = torch.exp(dt[:, t] * A)  # [b, H]
        h = decay[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_t))
        states.append(h)
    return torch.stack(ys, 1), torch.stack(states, 1), h
