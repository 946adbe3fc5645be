"""Retention: one computation, several schedules (modes).

``retention(q, k, v, log_decay, mode=...)`` is the single entry point the models call. Every mode
computes the same function (see :mod:`densessm.ops.retention.naive`); a mode only chooses how.
"""

from __future__ import annotations

import torch

from densessm.modes import check_mode
from densessm.ops.retention.naive import empty_state, parallel_retention, recurrent_retention
from densessm.ops.retention.rotation import head_log_decays, rotate, rotation_angles, rotation_tables

RETENTION_MODES = ("parallel", "recurrent")

RetentionState = tuple[torch.Tensor, torch.Tensor]


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    mode: str,
    mask: torch.Tensor | None = None,
    state: RetentionState | None = None,
    output_state: bool = False,
) -> tuple[torch.Tensor, RetentionState | None]:
    """Multi-scale retention of ``q, k [B, H, L, Dk]`` and ``v [B, H, L, Dv]``.

    ``state`` continues from an earlier call (recurrent mode only: the parallel form's row normalisation
    has no meaning across a carried state). Returns ``(out [B, H, L, Dv], final state or None)``.
    """
    check_mode(mode, RETENTION_MODES)
    if mode == "parallel":
        if state is not None:
            raise ValueError(
                "mode='parallel' starts from an empty state; continue from a recurrent state with mode='recurrent'"
            )
        return parallel_retention(q, k, v, log_decay, mask=mask, output_state=output_state)
    out, final = recurrent_retention(q, k, v, log_decay, mask=mask, state=state)
    return out, final if output_state else None


__all__ = [
    "RETENTION_MODES",
    "RetentionState",
    "empty_state",
    "head_log_decays",
    "retention",
    "rotate",
    "rotation_angles",
    "rotation_tables",
]
