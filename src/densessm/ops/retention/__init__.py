"""Retention: one computation, several schedules (modes).

``retention(q, k, v, log_decay, mode=...)`` is the single entry point the models call. Every mode
computes the same function (see :mod:`densessm.ops.retention.forms`); a mode only chooses how:

- ``parallel``: the quadratic matrix form of the reference, with its row normalisation (training);
- ``chunkwise``: parallel inside chunks, recurrent across them; linear memory, exact hand-over of state
  (on CUDA: ``fla``'s simple-GLA kernel when installed, see :mod:`.fla_bridge`, else our Triton kernel,
  :mod:`.triton`);
- ``recurrent``: token by token through the O(1) state (decoding; on CUDA the in-place step is one Triton kernel).

Which implementation runs is chosen by :mod:`densessm.ops.dispatch`.
"""

from __future__ import annotations

import torch

from densessm.modes import check_mode
from densessm.ops.dispatch import kernel_path, load_kernels
from densessm.ops.retention.chunkwise import chunkwise_retention
from densessm.ops.retention.fla_bridge import fla_chunk_retention, fla_usable
from densessm.ops.retention.forms import empty_state, parallel_retention, recurrent_retention
from densessm.ops.retention.rotation import head_log_decays, rotate, rotation_angles, rotation_tables
from densessm.ops.retention.step import recurrent_step_

RETENTION_MODES = ("parallel", "chunkwise", "recurrent")
MODEL_MODES = ("auto", *RETENTION_MODES)

# "auto" picks the parallel form up to this length when no state is kept, chunkwise beyond it: where chunkwise
# gains nothing, parallel keeps the reference's exact training function (docs/benchmarks/chunkwise.md).
AUTO_PARALLEL_MAX_LENGTH = 256

RetentionState = tuple[torch.Tensor, torch.Tensor]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the Triton kernels accumulate in fp32


def select_mode(mode: str, length: int, stateful: bool) -> str:
    """Resolve ``auto``: with a state to carry, chunkwise (recurrent for one token); without one, parallel for
    short sequences and chunkwise for long ones. Other modes pass through."""
    check_mode(mode, MODEL_MODES)
    if mode != "auto":
        return mode
    if stateful:
        return "recurrent" if length == 1 else "chunkwise"
    return "parallel" if length <= AUTO_PARALLEL_MAX_LENGTH else "chunkwise"


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    mode: str,
    mask: torch.Tensor | None = None,
    state: RetentionState | None = None,
    output_state: bool = False,
    chunk_size: int = 64,
    inplace: bool = False,
) -> tuple[torch.Tensor, RetentionState | None]:
    """Multi-scale retention of ``q, k [B, H, L, Dk]`` and ``v [B, H, L, Dv]``.

    ``state`` continues from an earlier call (chunkwise or recurrent: the parallel form's row
    normalisation has no meaning across a carried state). ``inplace`` lets recurrent mode overwrite the
    given state (decoding, when the caller owns it and needs no gradient). Returns ``(out [B, H, L, Dv],
    final state or None)``.
    """
    check_mode(mode, RETENTION_MODES)
    if mask is not None:
        # a padded k or v is weighted by 0 in every form, but 0 * NaN is NaN: select instead, so that whatever a
        # padded position holds never reaches a real one
        real = mask.bool()[:, None, :, None]
        k, v = torch.where(real, k, 0), torch.where(real, v, 0)
    if mode == "parallel":
        if state is not None:
            raise ValueError(
                "mode='parallel' starts from an empty state; continue from a recurrent state with "
                "mode='chunkwise' or 'recurrent'"
            )
        return parallel_retention(q, k, v, log_decay, mask=mask, output_state=output_state)
    if mode == "chunkwise":
        covered = q.dtype in TRITON_DTYPES and not log_decay.requires_grad
        path = kernel_path("chunkwise retention", q, fla=fla_usable(q), triton=covered)
        if path == "fla":
            out, final = fla_chunk_retention(q, k, v, log_decay, mask=mask, state=state)
        elif path == "triton":
            out, final = load_kernels("retention").triton_chunk_retention(q, k, v, log_decay, chunk_size, mask, state)
        else:
            out, final = chunkwise_retention(q, k, v, log_decay, chunk_size, mask=mask, state=state)
    else:
        step = None
        if inplace:
            memory = state[0] if state is not None else v
            covered = memory.dtype in TRITON_DTYPES and (state is None or all(x.is_contiguous() for x in state))
            fused = kernel_path("retention decode step", q, triton=covered) == "triton"
            step = load_kernels("retention").triton_step_ if fused else recurrent_step_
        out, final = recurrent_retention(q, k, v, log_decay, mask=mask, state=state, step=step)
    return out, final if output_state else None


__all__ = [
    "AUTO_PARALLEL_MAX_LENGTH",
    "MODEL_MODES",
    "RETENTION_MODES",
    "RetentionState",
    "chunkwise_retention",
    "empty_state",
    "recurrent_step_",
    "head_log_decays",
    "retention",
    "rotate",
    "rotation_angles",
    "rotation_tables",
    "select_mode",
]
