"""Optional bridge to the ``mamba_ssm`` / ``causal_conv1d`` CUDA kernels for the plain-Mamba (m = 0) path.

Used only when both packages import and the tensors are on CUDA; never a dependency. The kernels return the
block's gated output without the per-position states, so only layers whose states nobody reads (m = 0) can
use them, and only from a fresh state (``selective_scan_fn`` takes no initial state). Untested here: the
development machines have no GPU.
"""

from __future__ import annotations

import functools

import torch

from densessm.ops.dispatch import forced_path


@functools.cache
def _kernels():
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return causal_conv1d_fn, selective_scan_fn


def kernels_usable(x: torch.Tensor) -> bool:
    """Both kernel packages import, ``x`` lives on a CUDA device and no path is forced (``DENSESSM_KERNELS``)."""
    return x.is_cuda and forced_path() is None and _kernels() is not None


def kernel_conv_scan(
    x: torch.Tensor,
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    project,
    A: torch.Tensor,
    D: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(conv(x))`` then the gated selective scan, from zero states.

    ``x, z [b, L, D]``; ``project(u [b, L, D]) -> (delta [b, L, D], B [b, L, N], C [b, L, N])``.
    Returns ``(y [b, L, D], final SSM state [b, D, N])`` with ``y = (C·h + D ⊙ u) ⊙ silu(z)``.
    """
    causal_conv1d_fn, selective_scan_fn = _kernels()
    u = causal_conv1d_fn(x.transpose(1, 2).contiguous(), conv_weight[:, 0], conv_bias, activation="silu")
    delta, B, C = project(u.transpose(1, 2))
    y, final = selective_scan_fn(
        u,
        delta.to(u.dtype).transpose(1, 2).contiguous(),
        A,
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        D.float(),
        z=z.transpose(1, 2).contiguous(),
        delta_softplus=False,
        return_last_state=True,
    )
    return y.transpose(1, 2), final
