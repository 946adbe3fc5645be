"""Mamba-2's state space duality (SSD): the SSM in blocks ("chunks" in the paper), the fast form for training and
prefill.

Because the transition is a scalar per head and step, the map from inputs to outputs within a chunk of ``Q``
steps is a masked, attention-like matrix, and across chunks only the ``[H, P, N]`` state needs handing on.
The sequence is cut into chunks and the output split into (Dao & Gu 2024, "Transformers are SSMs", §6):

1. *within a chunk* (diagonal blocks): ``y_t = Σ_{s≤t} (C_t·B_s) exp(a_{s+1} + … + a_t) Δ_s x_s`` with
   ``a = Δ A`` -- batched matrix products, no state formed;
2. *each chunk's own end state* from zero: ``Σ_s exp(a_{s+1} + … + a_Q) Δ_s x_s ⊗ B_s``;
3. *across chunks*: ``s_{k+1} = exp(a_1 + … + a_Q) s_k + e_k`` from the carried state (a loop over the
   ``L / Q`` chunks, one state-sized product each);
4. *from each chunk's start state* (off-diagonal blocks): ``y_t += exp(a_1 + … + a_t) C_t · s_k``.

The decays are sums of ``Δ A <= 0`` taken over the right spans (a masked cumulative sum, never a difference
of two cumulative sums, which loses digits to cancellation), so every factor is ``exp`` of a value ``<= 0``:
the form is as stable as the recurrence. A length that is not a multiple of ``Q`` is padded at the end with
``Δ = 0`` steps (the identity), so the last state is the final one. Gradients are autograd's: every step is a
batched product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from densessm.ops.ssd.reference import heads_per_group


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """``a [..., Q]`` -> ``[..., Q, Q]`` with ``out[..., t, s] = a_{s+1} + … + a_t`` for ``s <= t`` (0 on and
    above the diagonal, where the caller masks): a cumulative sum of masked copies, free of cancellation."""
    length = a.shape[-1]
    later = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)  # k > s
    spans = torch.where(later, a[..., :, None], 0)  # [..., k, s] = a_k where k > s
    return spans.cumsum(-2)


def ssd_blocked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of :func:`~densessm.ops.ssd.reference.ssd_reference` over ``x [b, L, H, P]``,
    ``dt [b, L, H]``, ``A [H]``, ``B, C [b, L, G, N]`` from ``state [b, H, P, N]`` (default zeros), in chunks of
    ``chunk_size`` steps. Returns ``(y [b, L, H, P], final state [b, H, P, N])``."""
    batch, length, heads, width = x.shape
    groups, size = B.shape[-2:]
    r = heads_per_group(x, B)
    steps = min(chunk_size, length)
    chunks = math.ceil(length / steps)
    pad = chunks * steps - length

    def blocked(t: torch.Tensor, *shape: int) -> torch.Tensor:  # [b, L, ...] -> [b, K, Q, *shape]
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, chunks, steps, *shape)

    X = blocked(x * dt[..., None], groups, r, width)  # Δ x, heads split into their groups
    a = blocked(dt * A, groups, r).movedim(2, -1)  # [b, K, G, r, Q]: log-decay of each step
    Bc, Cc = blocked(B, groups, size), blocked(C, groups, size)
    causal = torch.tril(torch.ones(steps, steps, dtype=torch.bool, device=x.device))
    decay = torch.where(causal, segment_sums(a).exp(), 0)  # [b, K, G, r, t, s]

    # 1. within each chunk
    scores = torch.einsum("bktgn,bksgn->bkgts", Cc, Bc)[:, :, :, None] * decay
    y = torch.einsum("bkgrts,bksgrp->bktgrp", scores, X)
    # 2. each chunk's end state from zero: the last row of ``decay`` carries each step to the chunk's end
    to_end = decay[..., -1, :].movedim(-1, 2)[..., None]  # [b, K, Q, G, r, 1]
    ends = torch.einsum("bksgn,bksgrp->bkgrpn", Bc, X * to_end)
    # 3. across chunks, from the carried state
    into = a.cumsum(-1)  # [b, K, G, r, Q]: log-decay from a chunk's start to each of its steps (inclusive)
    h = x.new_zeros(batch, groups, r, width, size) if state is None else state.reshape(batch, groups, r, width, size)
    starts = []
    # one unbind, not an index per chunk: the backward of each index would fill a zero tensor the size of all
    # the chunks' states, a cost quadratic in the number of chunks
    for end, decay in zip(ends.unbind(1), into[..., -1, None, None].exp().unbind(1), strict=True):
        starts.append(h)
        h = torch.addcmul(end, decay, h)
    # 4. from each chunk's start state
    carried = torch.einsum("bktgn,bkgrpn->bktgrp", Cc, torch.stack(starts, 1))
    y = torch.addcmul(y, carried, into.exp().movedim(-1, 2)[..., None])
    return y.reshape(batch, chunks * steps, heads, width)[:, :length], h.reshape(batch, heads, width, size)
