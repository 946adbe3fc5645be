"""Reading SSM states out with ``C`` -- also states that another layer computed (DenseMamba).

``C_t · Σ_i h^i_t`` for several state sequences ``h^i`` costs one pass over each (a batched
matrix-vector product). Its gradient with respect to every ``h^i`` is the same tensor,
``∂L/∂y_t ⊗ C_t``, so the backward forms it once and hands it to all of them.
"""

from __future__ import annotations

import torch


def _rows_and_states(states: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``C`` as ``[b·L, 1, N]`` rows and the states as ``[b·L, N, D]`` (a transposed view): the operands of
    a batched product that reads each state once, in its memory order."""
    batch, length, channels, size = states.shape
    return C.reshape(batch * length, 1, size), states.reshape(batch * length, channels, size).transpose(1, 2)


def read_out(states: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``C_t · h_t`` for every position: ``states [b, L, D, N]``, ``C [b, L, N]`` -> ``[b, L, D]``.

    ``C`` as row vectors times the transposed states: one batched product, where ``einsum`` spends a decode step
    dispatching."""
    rows, states_t = _rows_and_states(states, C)
    return torch.bmm(rows, states_t).view(states.shape[:3])


def _accumulated_read_out(C: torch.Tensor, states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``C_t · Σ_i h^i_t`` with one read pass per state, each added by the product itself (summing the states
    first would read them too, and write a state-sized sum). Out of place, so that autocast can cast all three
    operands alike."""
    rows, first = _rows_and_states(states[0], C)
    out = torch.bmm(rows, first)
    for h in states[1:]:
        out = torch.baddbmm(out, rows, _rows_and_states(h, C)[1])
    return out.view(states[0].shape[:3])


class _SharedReadOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, C, *states):
        ctx.save_for_backward(C, *states)
        return _accumulated_read_out(C, states)

    @staticmethod
    def backward(ctx, grad):
        C, *states = ctx.saved_tensors
        grad = grad.to(states[0].dtype)  # under autocast the incoming gradient may be of a lower precision
        grad_C = None
        if ctx.needs_input_grad[0]:
            grad_C = sum(grad[..., None, :] @ h for h in states).squeeze(-2).to(C.dtype)
        grad_states = grad[..., None] * C[..., None, :].to(grad.dtype) if any(ctx.needs_input_grad[1:]) else None
        return (grad_C, *(grad_states if need else None for need in ctx.needs_input_grad[1:]))


def read_out_sum(C: torch.Tensor, *states: torch.Tensor) -> torch.Tensor:
    """``C_t · Σ_i h^i_t`` for state sequences ``h^i [b, L, D, N]`` and ``C [b, L, N]`` -> ``[b, L, D]``."""
    if torch.is_grad_enabled() and (C.requires_grad or any(h.requires_grad for h in states)):
        return _SharedReadOut.apply(C, *states)
    return _accumulated_read_out(C, states)
