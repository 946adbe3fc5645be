"""Selective scan (Mamba's SSM recurrence and its read-out): one computation, two schedules.

``selective_scan(u, delta, A, B, C, mode)`` is the entry point the models call: ``parallel`` runs the
blocked scan of :mod:`~densessm.ops.scan.blocked` over the whole input, ``recurrent`` steps through it
with :func:`~densessm.ops.scan.sequential.scan_step` (the decode path). On request both also return every
state, so that the layers above can read them out too (DenseMamba, :mod:`~densessm.ops.scan.readout`). On CUDA
both modes run one Triton kernel (:mod:`.triton`; chosen by :mod:`densessm.ops.dispatch`).
"""

from __future__ import annotations

import torch

from densessm.modes import check_mode
from densessm.ops.dispatch import kernel_path, load_kernels
from densessm.ops.scan.blocked import block_length, blocked_scan
from densessm.ops.scan.readout import read_out, read_out_sum
from densessm.ops.scan.sequential import scan_step, sequential_scan

SCAN_MODES = ("parallel", "recurrent")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    mode: str,
    state: torch.Tensor | None = None,
    readers: int = 0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """``h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t ⊙ u_t) ⊗ B_t`` read out as ``y_t = h_t C_t``.

    ``u, delta [b, L, D]``, ``A [D, N]``, ``B, C [b, L, N]``, ``state [b, D, N]`` (default zeros). Returns
    ``(y [b, L, D], states, final state [b, D, N])`` where ``states`` holds the state sequence
    ``[b, L, D, N]`` once per reader that will read it out (the layers above, in DenseMamba).
    """
    check_mode(mode, SCAN_MODES)
    covered = all(x.dtype == torch.float32 for x in (u, delta, A, B, C))
    if kernel_path("selective scan", u, triton=covered) == "triton":  # one kernel for both modes
        return load_kernels("scan").triton_scan(u, delta, A, B, C, state=state, readers=readers)
    if mode == "parallel":
        return blocked_scan(u, delta, A, B, C, state=state, readers=readers)
    return sequential_scan(u, delta, A, B, C, state=state, readers=readers)


__all__ = [
    "SCAN_MODES",
    "block_length",
    "blocked_scan",
    "sequential_scan",
    "read_out",
    "read_out_sum",
    "scan_step",
    "selective_scan",
]
