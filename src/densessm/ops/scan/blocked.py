"""The selective scan in blocks, with a hand-written backward: the fast form for training and prefill.

The sequence is cut into ``K`` blocks of ``T`` steps. Because the recurrence is linear,

1. run every block from a zero state at once (a loop over the ``T`` steps of a block, each step batched
   over the ``K`` blocks): each block's own end state ``e_k``;
2. hand the state across blocks (a loop over ``K``): ``s_{k+1} = exp(Σ_{t∈k} Δ_t ⊗ A) ⊙ s_k + e_k``, from
   the carried state;
3. run every block again from its true start ``s_k``, reading each state out with ``C`` as it is formed.

The backward runs the same three phases backwards in time on the adjoint
``λ_t = ∂L/∂h_t + y'_t ⊗ C_t + exp(Δ_{t+1} ⊗ A) ⊙ λ_{t+1}`` (``y'`` the gradient of the read-out) and
reduces each step's share of ``∂Δ, ∂A, ∂B, ∂C, ∂u`` on the spot. Nothing of size ``[b, L, D, N]`` is
formed but the states (and only when they are asked for or needed by the backward): the discretised
``exp(Δ A)`` and ``Δu ⊗ B`` exist one step at a time, autograd records no per-step graph, and only products
of decays ``≤ 1`` occur, so the form is as stable as the sequential one.

The block count trades Python steps (``2T + K`` forward, as many backward, each a few µs of dispatch)
against the per-step working set ``b·K·D·N``: on a CPU a step should stay cache-resident, on a GPU it
should be wide. See :func:`block_length`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from densessm.ops.scan.readout import read_out

CPU_STEP_ELEMENTS = 1 << 16  # working set of one CPU step (b·K·D·N floats) that stays in a core's L2


def block_length(length: int, width: int = 1, device: torch.device | None = None) -> int:
    """Steps per block for ``length`` steps of ``width = b·D·N`` state elements each.

    ``⌈√L⌉`` balances the in-block loops against the across-block loop; on a CPU the blocks are made longer
    (fewer of them) when ``K`` steps of ``width`` elements would not fit in cache.
    """
    if length <= 1:
        return 1
    steps = math.isqrt(length - 1) + 1
    if device is None or device.type == "cpu":
        blocks = max(1, min(math.ceil(length / steps), CPU_STEP_ELEMENTS // width))
        steps = math.ceil(length / blocks)
    return steps


def _blocked(x: torch.Tensor, blocks: int, steps: int) -> torch.Tensor:
    """``[b, L, ...]`` -> ``[b, K, T, ...]``, padded at the end with zeros (``Δ = 0``: identity steps)."""
    pad = blocks * steps - x.shape[1]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(x.shape[0], blocks, steps, *x.shape[2:])


def _out(op: Callable[..., torch.Tensor], *args: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``op(*args, out=out)``: eagerly into ``out`` (no allocation per step); in a traced program (torch.export,
    torch.compile) the plain op copied into ``out``, since an ``out=`` op in a graph refuses autograd when the
    program runs with gradients on."""
    if torch.compiler.is_compiling():
        return out.copy_(op(*args))
    return op(*args, out=out)


def _decay(delta_t: torch.Tensor, A: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``exp(Δ_t ⊗ A)`` for one step of every block, into ``out [b, K, D, N]``."""
    return _out(torch.mul, delta_t[..., None], A, out=out).exp_()


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, state, steps, readers):
        ctx.set_materialize_grads(False)  # unused outputs give None gradients, not [b, L, D, N] zeros
        batch, length, channels = u.shape
        size = A.shape[1]
        blocks = math.ceil(length / steps)
        dl, du, Bb, Cb = (_blocked(t, blocks, steps) for t in (delta, delta * u, B, C))
        decay = u.new_empty(batch, blocks, channels, size)

        end = u.new_zeros(batch, blocks, channels, size)
        for t in range(steps if blocks > 1 else 0):
            end.mul_(_decay(dl[:, :, t], A, decay)).addcmul_(du[:, :, t, :, None], Bb[:, :, t, None, :])
        block_decay = torch.exp(dl.sum(2)[..., None] * A)
        starts = torch.zeros_like(end)  # the state entering each block
        if state is not None:
            starts[:, 0] = state
        for k in range(1, blocks):
            _out(torch.addcmul, end[:, k - 1], block_decay[:, k - 1], starts[:, k - 1], out=starts[:, k])

        store = readers > 0 or any(ctx.needs_input_grad)  # else keep two steps and read out as we go
        states = u.new_empty(batch, blocks, steps if store else 2, channels, size)
        y = None if store else u.new_empty(batch, blocks, steps, channels)
        prev = starts
        for t in range(steps):
            cur = _out(torch.mul, _decay(dl[:, :, t], A, decay), prev, out=states[:, :, t if store else t % 2])
            prev = cur.addcmul_(du[:, :, t, :, None], Bb[:, :, t, None, :])
            if not store:
                y[:, :, t] = torch.matmul(prev, Cb[:, :, t, :, None])[..., 0]  # no out=: the same bits when traced
        final = prev[:, -1].clone()  # padding steps are the identity, so the last state is the final one
        if not store:
            return y.view(batch, blocks * steps, channels)[:, :length], final
        states = states.view(batch, blocks * steps, channels, size)
        y = read_out(states[:, :length], C)
        ctx.save_for_backward(u, delta, A, B, C, starts, states)
        ctx.steps = steps
        ctx.has_state = state is not None
        # One handle per reader: each reader's gradient then arrives here on its own, and autograd does not
        # allocate their [b, L, D, N] sum; the backward adds them step by step.
        return y, final, *(states[:, :length] for _ in range(readers))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_final, *grad_states):
        u, delta, A, B, C, starts, states = ctx.saved_tensors  # states: all K·T of them, padding included
        # under autocast the incoming gradients may be of a lower precision than the scan's fp32 tensors
        grad_y, grad_final = (None if g is None else g.to(u.dtype) for g in (grad_y, grad_final))
        grad_states = tuple(None if g is None else g.to(u.dtype) for g in grad_states)
        steps = ctx.steps
        batch, length, channels = u.shape
        size = A.shape[1]
        blocks = starts.shape[1]
        # λ_t = g_t + exp(Δ_{t+1} A) λ_{t+1}: a scan backwards in time whose decay at t is the one of t+1
        dl = _blocked(delta, blocks, steps)
        dl_next = _blocked(F.pad(delta[:, 1:], (0, 0, 0, 1)), blocks, steps)
        du, Bb, Cb = (_blocked(t, blocks, steps) for t in (delta * u, B, C))
        gy = _blocked(grad_y if grad_y is not None else u.new_zeros(u.shape), blocks, steps)
        g = [_blocked(grad, blocks, steps) for grad in grad_states if grad is not None]
        hb = states.view(batch, blocks, steps, channels, size)
        decay = u.new_empty(batch, blocks, channels, size)

        def drive(t, lam):  # λ += ∂L/∂h_t, from the states' readers and from the read-out
            for grad in g:
                lam.add_(grad[:, :, t])
            return lam.addcmul_(gy[:, :, t, :, None], Cb[:, :, t, None, :])

        begin = u.new_zeros(batch, blocks, channels, size)
        for t in range(steps - 1, -1, -1) if blocks > 1 else ():
            drive(t, begin.mul_(_decay(dl_next[:, :, t], A, decay)))
        block_decay = torch.exp(dl_next.sum(2)[..., None] * A)
        after = torch.zeros_like(begin)  # λ just after each block
        if grad_final is not None:
            after[:, -1] = grad_final
        for k in range(blocks - 2, -1, -1):
            torch.addcmul(begin[:, k + 1], block_decay[:, k + 1], after[:, k + 1], out=after[:, k])

        grad_dl = u.new_empty(batch, blocks, steps, channels)
        grad_du = u.new_empty(batch, blocks, steps, channels)
        grad_B = u.new_empty(batch, blocks, steps, size)
        grad_C = u.new_empty(batch, blocks, steps, size)
        grad_A = torch.zeros_like(decay)  # summed over batch and blocks at the end
        q = torch.empty_like(decay)
        lam = after
        next_decay = _decay(dl_next[:, :, steps - 1], A, u.new_empty(decay.shape))
        for t in range(steps - 1, -1, -1):
            torch.matmul(gy[:, :, t, None, :], hb[:, :, t], out=grad_C[:, :, t, None, :])
            lam = drive(t, lam * next_decay)
            _decay(dl[:, :, t], A, next_decay)  # exp(Δ_t A): this step's decay, the next (earlier) step's too
            torch.mul(lam, next_decay, out=q).mul_(hb[:, :, t - 1] if t else starts)  # ∂L/∂(Δ_t ⊗ A)
            torch.sum(q * A, dim=-1, out=grad_dl[:, :, t])
            grad_A.addcmul_(q, dl[:, :, t, :, None])
            torch.matmul(lam, Bb[:, :, t, :, None], out=grad_du[:, :, t, :, None])
            torch.matmul(du[:, :, t, None, :], lam, out=grad_B[:, :, t, None, :])

        def unblock(x):
            return x.reshape(batch, blocks * steps, *x.shape[3:])[:, :length]

        grad_du, grad_dl, grad_B, grad_C = unblock(grad_du), unblock(grad_dl), unblock(grad_B), unblock(grad_C)
        grad_state = next_decay[:, 0] * lam[:, 0] if ctx.has_state else None
        grad_A = grad_A.sum((0, 1))
        return grad_du * delta, grad_dl + grad_du * u, grad_A, grad_B, grad_C, grad_state, None, None


def blocked_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor | None = None,
    readers: int = 1,
    block_size: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Same contract as :func:`densessm.ops.scan.sequential.sequential_scan`, except that the states come as
    ``readers`` handles (the same values; without autograd and readers none are formed).
    ``block_size`` defaults to :func:`block_length`."""
    batch, length, channels = u.shape
    steps = block_size or block_length(length, batch * channels * A.shape[1], u.device)
    y, final, *states = _ChunkedScan.apply(u, delta, A, B, C, state, steps, readers)
    return y, tuple(states), final
