"""The selective scan written as its definition: one step at a time.

Mamba's discretised SSM with a diagonal ``A`` keeps, per channel ``d`` of the ``D`` SSM channels, a state
over ``N`` dimensions and reads it out with ``C``::

    h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t ⊙ u_t) ⊗ B_t        h_t, A ∈ R^{D×N};  Δ_t, u_t ∈ R^D;  B_t ∈ R^N
    y_t = h_t C_t                                            C_t ∈ R^N,  y_t ∈ R^D

(zero-order hold for ``A``, Euler for ``B``, as Mamba-1; the ``D ⊙ u`` skip and the gate are the block's).
``Δ_t = 0`` makes the step the identity, which is how padded positions are kept out of the state. This
module is the readable reference the fast form (:mod:`densessm.ops.scan.blocked`) is tested against, and
``scan_step`` is the decode path.
"""

from __future__ import annotations

import torch

from densessm.ops.scan.readout import read_out


def scan_step(
    state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """One step: ``state [b, D, N]``, ``u, delta [b, D]``, ``A [D, N]``, ``B [b, N]`` -> the next state."""
    return torch.addcmul((delta * u)[..., None] * B[:, None, :], torch.exp(delta[..., None] * A), state)


def sequential_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor | None = None,
    readers: int = 1,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Scan ``u, delta [b, L, D]`` with ``B, C [b, L, N]`` from ``state [b, D, N]`` (default zeros).

    Returns ``(y [b, L, D], (states [b, L, D, N],) * readers, final state [b, D, N])``.
    """
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]) if state is None else state
    states = []
    for u_t, delta_t, B_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), strict=True):
        h = scan_step(h, u_t, delta_t, A, B_t)
        states.append(h)
    states = states[0][:, None] if len(states) == 1 else torch.stack(states, dim=1)  # decoding: no copy
    return read_out(states, C), (states,) * readers, h
