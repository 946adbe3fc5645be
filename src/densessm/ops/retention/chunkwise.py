"""Chunkwise retention: the parallel form inside fixed-size chunks, the recurrent state across them.

Within a chunk the state entering it, ``S̃`` (un-normalised: ``Σ γ^n kᵀv``) and its decay-sum ``scale``,
contribute ``γ^{c_t} q_t S̃`` and ``γ^{c_t} scale`` to position ``t`` (``c_t``: real tokens from the chunk
start to ``t``); the chunk's own tokens contribute through a ``C × C`` decay matrix, exactly as in the
parallel form but without its row normalisation. So the output is the recurrent mode's to float precision,
memory is linear in the sequence length, and any state can be handed in and out.

Lengths that are not a multiple of the chunk size are padded internally with masked (invisible) tokens.
Cost: ``O(L·C·(Dk+Dv))`` for the chunks plus ``O(L/C·Dk·Dv)`` for the hand-over, per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densessm.ops.retention.forms import _TINY, _stat_dtype


def chunkwise_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int,
    mask: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_state: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Retention of ``q, k [B, H, L, Dk]``, ``v [B, H, L, Dv]`` in chunks of ``chunk_size`` tokens.

    ``state`` is the recurrent state ``(S [B, H, Dk, Dv] normalised, scale [B, H])`` to continue from.
    Returns ``(out [B, H, L, Dv], final state)``; the final state is None (and not computed) without
    ``output_state``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | torch.SymInt):
        raise ValueError(f"chunk_size must be a Python int, got {chunk_size!r}, a {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    stat = _stat_dtype(q.dtype)
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    tail = chunks * chunk - length
    if tail:
        q, k, v = (F.pad(x, (0, 0, 0, tail)) for x in (q, k, v))
        real = torch.ones(batch, length, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        mask = F.pad(real, (0, tail), value=False)
    q, k, v = (x.unflatten(2, (chunks, chunk)) for x in (q, k, v))  # [B, H, N, C, D]

    log_decay = log_decay.to(stat)[None, :, None, None]  # [1, H, 1, 1]
    if mask is None:
        counts = torch.arange(1, chunk + 1, device=q.device, dtype=stat).expand(1, 1, chunk)  # [1, 1, C]
        real = None
    else:
        real = mask.unflatten(1, (chunks, chunk)).to(stat)  # [B, N, C]
        counts = real.cumsum(-1)
    counts = counts[:, None]  # [B|1, 1, N|1, C]
    # γ^{c_t}: decay from the chunk start to t, and γ^{c_C - c_s}: from s to the chunk end
    from_start = (counts * log_decay).exp()
    to_end = ((counts[..., -1:] - counts) * log_decay).exp()
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    within = (counts[..., :, None] - counts[..., None, :]).clamp_min(0) * log_decay[..., None]
    weights = torch.where(causal, within.exp(), torch.zeros((), dtype=stat, device=q.device))
    if real is not None:
        weights = weights * real[:, None, :, None, :]
        to_end = to_end * real[:, None]
    intra_scale = weights.sum(-1)  # [B|1, H, N|1, C]

    intra = ((q @ k.transpose(-1, -2)) * weights.to(q.dtype)) @ v  # [B, H, N, C, Dv]
    # the decays go on the narrow operands (q and k, Dk wide), not on the read-outs or the states (Dv wide)
    q_from_start = q * from_start[..., None].to(q.dtype)
    k_to_end = (k * to_end[..., None].to(k.dtype)).transpose(-1, -2)  # [B, H, N, Dk, C]
    chunk_scale = to_end.sum(-1).expand(batch, heads, chunks)  # [B, H, N]
    chunk_decay = from_start[..., -1].expand(batch, heads, chunks)  # γ over the whole chunk

    if state is None:  # an empty state: nothing to read before the first chunk's kᵀv (None skips its product)
        memory = None
        scale = torch.zeros(batch, heads, dtype=stat, device=q.device)
    else:
        memory = state[0] * state[1].sqrt()[..., None, None].to(state[0].dtype)
        scale = state[1].to(stat)
    read_outs, entering_scale = [], []
    # one unbind, not an index per chunk: the backward of each index would fill a zero tensor the size of all
    # the chunks' states, a cost quadratic in the number of chunks. Each chunk's queries read the state entering
    # it, and each chunk's kᵀv is made where it is added, inside the loop: the N states and kᵀv products (Dk·Dv
    # each, 2.4 MB per head at the 350M shape) are never stacked into one tensor, nor their gradients in the
    # backward
    steps = zip(
        q_from_start.unbind(2),
        k_to_end.unbind(2),
        v.unbind(2),
        chunk_decay.unbind(2),
        chunk_scale.unbind(2),
        strict=True,
    )
    for index, (q_chunk, k_chunk, v_chunk, decay, added) in enumerate(steps):
        if memory is None:
            read_outs.append(q_chunk.new_zeros(batch, heads, chunk, value_dim))
        else:
            read_outs.append(q_chunk @ memory)  # [B, H, C, Dv]
        entering_scale.append(scale)
        if index == chunks - 1 and not output_state:
            break  # the state leaving the last chunk is read by nobody
        kv = k_chunk @ v_chunk
        memory = kv if memory is None else torch.addcmul(kv, memory, decay[..., None, None].to(memory.dtype))
        scale = scale * decay + added
    entering_scale = torch.stack(entering_scale, dim=2)  # [B, H, N]

    inter = torch.stack(read_outs, dim=2)
    total_scale = from_start * entering_scale[..., None] + intra_scale
    out = (inter + intra) * total_scale.clamp_min(_TINY).rsqrt()[..., None].to(q.dtype)
    out = out.flatten(2, 3)[:, :, :length]
    if not output_state:
        return out, None
    final = (memory * scale.clamp_min(_TINY).rsqrt()[..., None, None].to(memory.dtype), scale)
    return out, final
