"""The parallel and recurrent forms of retention: the formulas of the public DenseRetNet, written plainly. They are
the reference the chunkwise form is tested against, and the paths the models run in those two modes.

Shapes: ``q, k`` are ``[B, H, L, Dk]`` (already rotated), ``v`` is ``[B, H, L, Dv]``, ``log_decay`` is
``[H]`` (``log γ_h``) and ``mask`` is an optional ``[B, L]`` 0/1 tensor of real (1) and padded (0) tokens.

All modes compute, for every query position ``t`` of a row,

    o_t = Σ_{s≤t, s real} γ^{n(s,t)} (q_t·k_s) v_s / sqrt(Σ_{s≤t, s real} γ^{n(s,t)})

where ``n(s, t)`` counts the *real* tokens in ``(s, t]``. Padded tokens add nothing and do not decay the
state, so a padded row gives exactly what the same row gives unpadded. The parallel form additionally
divides each ``q·k`` row by its (detached) absolute sum clamped to ``[1, 5e4]``, as the reference does; the
per-head RMSNorm that follows undoes that scale except for its epsilon.

The recurrent state is ``(state, scale)``: ``scale_t = γ^{m_t} scale_{t-1} + m_t`` is the running
decay-sum and ``state = Σ γ^{n} k_sᵀ v_s / sqrt(scale)`` is kept normalised, as in the reference, so its
magnitude stays bounded.
"""

from __future__ import annotations

import torch

_TINY = 1e-30


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decays and decay-sums are kept in at least fp32, whatever the activations' dtype."""
    return torch.promote_types(dtype, torch.float32)


def _decay_weights(
    log_decay: torch.Tensor, length: int, mask: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised decay matrix ``γ^{n(s,t)}`` (zero where ``s > t`` or ``s`` is padding), in ``dtype``.

    Returns ``(weights [B|1, H, L, L], counts [B|1, L])`` where ``counts`` is the running number of real
    tokens (positions 1-based).
    """
    if mask is None:
        counts = torch.arange(1, length + 1, device=device, dtype=dtype)[None]
        valid = torch.ones(1, length, dtype=torch.bool, device=device)
    else:
        valid = mask.bool()
        counts = valid.to(dtype).cumsum(-1)
    steps = counts[:, :, None] - counts[:, None, :]  # [B, L, L]: real tokens in (s, t]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    keep = causal[None] & valid[:, None, :]
    steps = steps.clamp_min(0)[:, None] * log_decay.to(dtype)[None, :, None, None]
    weights = torch.where(keep[:, None], steps.exp(), torch.zeros((), device=device))
    return weights, counts


def parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    mask: torch.Tensor | None = None,
    normalize_rows: bool = True,
    output_state: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Quadratic (matrix) form over the whole sequence from an empty state."""
    length = q.shape[-2]
    weights, _ = _decay_weights(log_decay, length, mask, q.device, _stat_dtype(q.dtype))
    decay = weights / weights.sum(-1, keepdim=True).sqrt().clamp_min(_TINY)
    qk = (q @ k.transpose(-1, -2)) * decay.to(q.dtype)
    if normalize_rows:
        qk = qk / qk.detach().abs().sum(-1, keepdim=True).clamp(min=1, max=5e4)
    out = qk @ v
    state = None
    if output_state:
        last = weights[:, :, -1]  # [B|1, H, L]: γ^{n(s, L-1)} for the final position
        scale = last.sum(-1).expand(q.shape[0], -1).contiguous()  # its own memory: decoding updates it in place
        kw = k * last[..., None].to(k.dtype)
        kv = kw.transpose(-1, -2) @ v
        state = (kv / scale.sqrt().clamp_min(_TINY)[..., None, None].to(kv.dtype), scale)
    return out, state


def step_coefficients(
    log_decay: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one token: the new decay-sum ``[B, H]`` and the factors ``carry`` (old state) and ``fresh``
    (``kᵀv``) that give the new normalised state ``carry·S + fresh·kᵀv``. A padded token decays nothing."""
    gamma = log_decay.to(scale.dtype).exp()[None, :]  # [1, H]
    if mask is None:
        decay = gamma.expand_as(scale)
        add = torch.ones_like(scale)
    else:
        real = mask.to(scale.dtype)[:, None]
        decay = torch.where(real > 0, gamma, torch.ones_like(gamma))
        add = real.expand_as(scale)
    new_scale = scale * decay + add
    inv = new_scale.clamp_min(_TINY).rsqrt()
    return new_scale, scale.sqrt() * decay * inv, add * inv


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    scale: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token: ``q, k`` ``[B, H, Dk]``, ``v`` ``[B, H, Dv]``, ``state`` ``[B, H, Dk, Dv]``, ``scale``
    ``[B, H]`` (at least fp32), ``mask`` ``[B]``. Returns ``(out [B, H, Dv], state, scale)``."""
    new_scale, carry, fresh = step_coefficients(log_decay, scale, mask)
    carry, fresh = (x[..., None, None].to(state.dtype) for x in (carry, fresh))
    new_state = state * carry + (k[..., :, None] * v[..., None, :]) * fresh
    out = (q[..., None, :] @ new_state).squeeze(-2)
    return out, new_state, new_scale


def empty_state(
    batch: int, heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state before any token: zero memory and zero decay-sum."""
    return (
        torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=device),
        torch.zeros(batch, heads, dtype=_stat_dtype(dtype), device=device),
    )


def recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    mask: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    step=None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Token-by-token through the recurrent state; ``state`` defaults to the empty state. ``step`` replaces
    :func:`recurrent_step` (e.g. by the in-place decode step)."""
    step = recurrent_step if step is None else step
    batch, heads, length, key_dim = q.shape
    if state is None:
        state = empty_state(batch, heads, key_dim, v.shape[-1], v.dtype, v.device)
    memory, scale = state
    outs = []
    for t in range(length):
        step_mask = None if mask is None else mask[:, t]
        out, memory, scale = step(q[:, :, t], k[:, :, t], v[:, :, t], log_decay, memory, scale, step_mask)
        outs.append(out)
    return torch.stack(outs, dim=2), (memory, scale)
