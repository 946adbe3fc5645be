"""Mamba-2's SSM (state space duality, SSD): one computation, two schedules.

``ssd(x, dt, A, B, C, mode)`` is the entry point the models call: ``parallel`` runs the blocked form of
:mod:`~densessm.ops.ssd.blocked` over the whole input (training, prefill), ``recurrent`` steps through it with
:func:`~densessm.ops.ssd.step.ssd_step` (decoding), which also yields every per-position state on request.
:func:`time_step` turns the projected ``dt`` into the step ``Δ`` both use. The readable definition both are
tested against is :mod:`~densessm.ops.ssd.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from densessm.modes import check_mode
from densessm.ops.dispatch import forced_path
from densessm.ops.ssd.blocked import segment_sums, ssd_blocked
from densessm.ops.ssd.reference import heads_per_group, ssd_reference
from densessm.ops.ssd.step import ssd_step, ssd_steps

SSD_MODES = ("parallel", "recurrent")


def time_step(
    dt: torch.Tensor, dt_bias: torch.Tensor, limit: Sequence[float], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``Δ = clamp(softplus(dt + dt_bias), *limit)`` as Mamba-2 computes it, for ``dt [b, L, H]``; 0 where
    ``mask [b, L]`` is False, so a padded step is the identity. Selected, not multiplied: a padded ``dt`` may be
    NaN, and ``0 · NaN`` is NaN."""
    delta = F.softplus(dt + dt_bias).clamp(limit[0], limit[1])
    return delta if mask is None else torch.where(mask[..., None], delta, 0)


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    mode: str,
    state: torch.Tensor | None = None,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    keep_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t``, ``y_t = h_t C_t + D ⊙ x_t``.

    ``x [b, L, H, P]``, ``dt [b, L, H]`` (the step Δ, see :func:`time_step`), ``A, D [H]``,
    ``B, C [b, L, G, N]``, ``state [b, H, P, N]`` (default zeros). Returns ``(y [b, L, H, P], states, final
    state [b, H, P, N])``: ``states [b, L, H, P, N]`` are the per-position states when ``keep_states`` (recurrent
    mode only -- the blocked form never forms them), else None.
    """
    check_mode(mode, SSD_MODES)
    if not torch.compiler.is_compiling():  # no kernel of its own, but a DENSESSM_KERNELS naming no path is refused
        forced_path()
    if mode == "parallel":
        if keep_states:
            raise ValueError("the blocked SSD forms no per-position states: use mode='recurrent' to keep them")
        y, final = ssd_blocked(x, dt, A, B, C, chunk_size, state)
        states = None
    else:
        y, states, final = ssd_steps(x, dt, A, B, C, state, keep_states)
    if D is not None:
        y = torch.addcmul(y, D[:, None], x)
    return y, states, final


__all__ = [
    "SSD_MODES",
    "heads_per_group",
    "segment_sums",
    "ssd",
    "ssd_blocked",
    "ssd_reference",
    "ssd_step",
    "ssd_steps",
    "time_step",
]
