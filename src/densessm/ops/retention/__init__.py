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

import math

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

TRITON_CHUNK_SIZE = 64  # the Triton kernels' tile along the sequence, when no chunk size is asked for


def state_ratio(key_dim: int, value_dim: int) -> float:
    """``Dk·Dv / (Dk + Dv)`` of a head: what its state costs per token (read-out and update, ``Dk·Dv``)
    against what one more token of a chunk costs (``Dk + Dv``). The two rules below are written in it."""
    return key_dim * value_dim / (key_dim + value_dim)


def default_chunk_size(key_dim: int, value_dim: int) -> int:
    """The chunk length of chunkwise retention for heads of ``key_dim × value_dim``: the power of two nearest
    ``sqrt(80 · Dk·Dv / (Dk + Dv))``, within [64, 1024].

    A longer chunk does more work inside it (``C·(Dk + Dv)`` per token); a shorter one hands the state on more
    often (``Dk·Dv / C`` per token, through memory). Their sum is least near ``sqrt(c · ratio)``; ``c = 80`` fits
    the fastest chunks measured on the CPU (docs/benchmarks/chunk_size.md), forward and backward as well as a
    forward alone up to 2k tokens: 128 for the 1.3B's 320 × 1,280 and the 350M's 384 × 1,536 heads. Below 64
    tokens a chunk's fixed cost (a few operators per chunk) outweighs what it saves, whatever the heads.
    """
    best = math.sqrt(80 * state_ratio(key_dim, value_dim))
    return int(min(1024, max(64, 2 ** round(math.log2(best)))))


def auto_parallel_max_length(chunk_size: int, key_dim: int, value_dim: int) -> int:
    """The longest input ``auto`` runs in the parallel form when no state is kept (chunkwise beyond it):
    ``C + 3 · Dk·Dv / (Dk + Dv)``. Parallel costs ``L·(Dk + Dv)`` per token, chunkwise about
    ``C·(Dk + Dv) + 3·Dk·Dv``; the crossover measured on the CPU (forward and backward) lies there: ~200 tokens
    for heads of 64 × 256, ~1,000 for the 350M's (docs/benchmarks/chunkwise.md). Below it the parallel form
    also keeps the reference's exact training function (its row normalisation)."""
    return int(chunk_size + 3 * state_ratio(key_dim, value_dim))


RetentionState = tuple[torch.Tensor, torch.Tensor]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the Triton kernels accumulate in fp32


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    mode: str,
    mask: torch.Tensor | None = None,
    state: RetentionState | None = None,
    output_state: bool = False,
    chunk_size: int | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, RetentionState | None]:
    """Multi-scale retention of ``q, k [B, H, L, Dk]`` and ``v [B, H, L, Dv]``.

    ``state`` continues from an earlier call (chunkwise or recurrent: the parallel form's row
    normalisation has no meaning across a carried state). ``chunk_size`` (chunkwise; None: the Triton kernels'
    tile, or on the PyTorch path :func:`default_chunk_size` of the heads). ``inplace`` lets recurrent mode overwrite the
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
            chunk = TRITON_CHUNK_SIZE if chunk_size is None else chunk_size
            out, final = load_kernels("retention").triton_chunk_retention(q, k, v, log_decay, chunk, mask, state)
        else:
            chunk = default_chunk_size(q.shape[-1], v.shape[-1]) if chunk_size is None else chunk_size
            out, final = chunkwise_retention(
                q, k, v, log_decay, chunk, mask=mask, state=state, output_state=output_state
            )
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
    "TRITON_CHUNK_SIZE",
    "auto_parallel_max_length",
    "MODEL_MODES",
    "RETENTION_MODES",
    "RetentionState",
    "chunkwise_retention",
    "default_chunk_size",
    "empty_state",
    "recurrent_step_",
    "head_log_decays",
    "retention",
    "rotate",
    "rotation_angles",
    "rotation_tables",
    "state_ratio",
]
