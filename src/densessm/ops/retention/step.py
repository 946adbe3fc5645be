"""The decode step, in place: one token through the recurrent state with as few passes over it as possible.

The state is the big tensor of decoding (``H·Dk·Dv`` per layer and sequence). The reference step
(:func:`densessm.ops.retention.forms.recurrent_step`) builds the outer product ``kᵀv`` and a new state:
about six passes over state-sized memory. Here the state is scaled in place, the rank-1 update is a
batched ``baddbmm_`` (no state-sized temporary) and the read-out a batched matrix-vector product: three
passes. Only for inference: the old state is overwritten, so autograd cannot see through it.
"""

from __future__ import annotations

import torch

from densessm.ops.retention.forms import step_coefficients


def recurrent_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    scale: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`~densessm.ops.retention.forms.recurrent_step`, but ``state`` and ``scale``
    are updated in place (and returned): their addresses stay fixed, as a captured decode step needs."""
    batch, heads, key_dim, value_dim = state.shape
    if not state.is_contiguous():
        state = state.contiguous()
    new_scale, carry, fresh = step_coefficients(log_decay, scale, mask)
    dtype = state.dtype
    # the state keeps its dtype whatever autocast would pick: in-place ops cannot change it
    with torch.autocast(state.device.type, enabled=False):
        flat = state.view(batch * heads, key_dim, value_dim)
        flat.mul_(carry.to(dtype).reshape(-1, 1, 1))
        kick = (k.to(dtype) * fresh.to(dtype)[..., None]).reshape(-1, key_dim, 1)
        flat.baddbmm_(kick, v.to(dtype).reshape(-1, 1, value_dim))
        out = torch.bmm(q.to(dtype).reshape(-1, 1, key_dim), flat).view(batch, heads, value_dim)
    return out.to(q.dtype), state, scale.copy_(new_scale)
