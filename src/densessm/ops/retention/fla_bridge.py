"""Optional GPU path: the chunkwise form through flash-linear-attention's simple-GLA Triton kernel.

Used automatically when ``fla`` imports and the tensors are on CUDA; the pure-PyTorch chunkwise form stays
the reference it is tested against. simple-GLA computes ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t`` and
``o_t = q_t S_t``. We feed ``g_t = m_t log γ`` and ``k_t m_t`` (padding neither decays nor adds) and divide
by the decay-sum ourselves; it has the closed form ``(1 - γ^{c_t}) / (1 - γ) + γ^{c_t} scale_0`` where
``c_t`` counts the real tokens so far, so it costs nothing.
"""

from __future__ import annotations

import functools
import importlib

import torch

from densessm.ops.retention.forms import _TINY, _stat_dtype


@functools.cache
def _kernel():
    try:
        return importlib.import_module("fla.ops.simple_gla").chunk_simple_gla
    except Exception:  # not installed, or installed without a working Triton
        return None


def fla_usable(x: torch.Tensor) -> bool:
    """True when the fla kernel can run on ``x``'s device."""
    return x.is_cuda and _kernel() is not None


def fla_chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    mask: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Same contract as :func:`densessm.ops.retention.chunkwise.chunkwise_retention`."""
    batch, heads, length, _ = q.shape
    stat = _stat_dtype(q.dtype)
    real = torch.ones(batch, length, dtype=stat, device=q.device) if mask is None else mask.to(stat)
    log_decay = log_decay.to(stat)
    gates = real[:, :, None] * log_decay  # [B, L, H]
    k = k * real[:, None, :, None].to(k.dtype)
    initial = None
    scale_0 = torch.zeros(batch, heads, dtype=stat, device=q.device)
    if state is not None:
        scale_0 = state[1].to(stat)
        initial = (state[0] * scale_0.sqrt()[..., None, None].to(state[0].dtype)).to(stat)
    out, final = _kernel()(
        q.transpose(1, 2).contiguous(),
        k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
        g=gates,
        scale=1.0,
        initial_state=initial,
        output_final_state=True,
    )
    counts = real.cumsum(-1)[:, None, :]  # [B, 1, L]
    decayed = (counts * log_decay[None, :, None]).exp()  # γ^{c_t}, [B, H, L]
    sums = (1 - decayed) / (1 - log_decay.exp())[None, :, None] + decayed * scale_0[..., None]
    out = out.transpose(1, 2) * sums.clamp_min(_TINY).rsqrt()[..., None].to(out.dtype)
    last = sums[..., -1].contiguous()  # its own memory: decoding updates it in place
    return out, (final.to(v.dtype) * last.clamp_min(_TINY).rsqrt()[..., None, None].to(v.dtype), last)
