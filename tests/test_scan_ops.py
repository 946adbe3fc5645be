"""Selective scan and causal convolution: the fast forms against the step-by-step definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from densessm.ops.conv import causal_conv, causal_conv_step
from densessm.ops.scan import (
    block_length,
    blocked_scan,
    read_out,
    read_out_sum,
    scan_step,
    selective_scan,
    sequential_scan,
)
from densessm.ops.scan.kernels import kernels_usable


def _inputs(batch, length, channels, size, dtype=torch.float64):
    u = torch.randn(batch, length, channels, dtype=dtype)
    delta = F.softplus(torch.randn(batch, length, channels, dtype=dtype))
    A = -torch.rand(channels, size, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, length, size, dtype=dtype)
    C = torch.randn(batch, length, size, dtype=dtype)
    state = torch.randn(batch, channels, size, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, state)]


def _definition(u, delta, A, B, C, state):
    """The recurrence and its read-out written element by element."""
    h = state.clone()
    states, y = [], torch.zeros_like(u)
    for t in range(u.shape[1]):
        for b in range(u.shape[0]):
            for d in range(u.shape[2]):
                for n in range(A.shape[1]):
                    decay = torch.exp(delta[b, t, d] * A[d, n])
                    h[b, d, n] = decay * h[b, d, n] + delta[b, t, d] * u[b, t, d] * B[b, t, n]
                    y[b, t, d] += h[b, d, n] * C[b, t, n]
        states.append(h.clone())
    return y, torch.stack(states, 1), h


def test_naive_scan_is_the_definition():
    inputs = _inputs(2, 4, 3, 2)
    y, (states,), final = sequential_scan(*inputs)
    for ours, ref in zip((y, states, final), _definition(*inputs), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 40),
    block=st.one_of(st.none(), st.integers(1, 12)),
    carried=st.booleans(),
    readers=st.integers(0, 2),
    used=st.sampled_from(["all", "y", "states", "final"]),
)
def test_chunked_scan_equals_naive_forward_and_backward(batch, length, block, carried, readers, used):
    u, delta, A, B, C, state = _inputs(batch, length, 5, 3)
    state_in = state if carried else None
    y, states, final = blocked_scan(u, delta, A, B, C, state_in, readers=readers, block_size=block)
    ref_y, (ref_states,), ref_final = sequential_scan(u, delta, A, B, C, state_in)
    assert len(states) == readers
    for ours, expected in zip((y, *states, final), (ref_y, *[ref_states] * readers, ref_final), strict=True):
        torch.testing.assert_close(ours, expected, atol=1e-10, rtol=1e-9)
    if used == "states" and not readers:
        return
    weights = [torch.randn_like(ref_states) for _ in range(readers)]
    w_y, w_final = torch.randn_like(ref_y), torch.randn_like(ref_final)

    def loss(y, states, final):
        total = 0.0
        if used in ("all", "y"):
            total = total + (y * w_y).sum()
        if used in ("all", "states"):
            total = total + sum((h * w).sum() for h, w in zip(states, weights, strict=True))
        if used in ("all", "final"):
            total = total + (final * w_final).sum()
        return total

    leaves = [u, delta, A, B, C] + ([state] if carried else [])
    g_fast = torch.autograd.grad(loss(y, states, final), leaves, allow_unused=True)
    g_ref = torch.autograd.grad(loss(ref_y, [ref_states] * readers, ref_final), leaves, allow_unused=True)
    for a, b in zip(g_fast, g_ref, strict=True):
        if b is None:  # e.g. C when only the states are used
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


def test_chunked_scan_without_readers_forms_no_states():
    u, delta, A, B, C, state = (t.detach() for t in _inputs(2, 9, 3, 2))
    y, states, final = blocked_scan(u, delta, A, B, C, state, readers=0)
    ref = sequential_scan(u, delta, A, B, C, state)
    assert states == ()
    torch.testing.assert_close(y, ref[0])
    torch.testing.assert_close(final, ref[2])


def test_zero_step_is_identity():
    """Δ = 0 neither decays nor feeds the state: how padding stays out of it."""
    u, delta, A, B, C, state = (t.detach() for t in _inputs(1, 6, 4, 2))
    delta[:, 2:4] = 0
    _, (states,), _ = blocked_scan(u, delta, A, B, C, state, block_size=4)
    torch.testing.assert_close(states[:, 2], states[:, 1])
    torch.testing.assert_close(states[:, 3], states[:, 1])
    torch.testing.assert_close(scan_step(state, u[:, 0], torch.zeros_like(delta[:, 0]), A, B[:, 0]), state)


def test_chunked_scan_is_stable_for_fast_decay():
    u, delta, A, B, C, state = (t.detach().float() for t in _inputs(1, 300, 4, 3))
    delta = delta * 50  # exp(Δ A) underflows to 0 within a step
    y, (states,), final = blocked_scan(u, delta, A, B, C, state)
    ref_y, (ref_states,), ref_final = sequential_scan(u, delta, A, B, C, state)
    assert all(torch.isfinite(t).all() for t in (y, states, final))
    for ours, expected in zip((y, states, final), (ref_y, ref_states, ref_final), strict=True):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_modes_dispatch():
    inputs = [t.detach() for t in _inputs(2, 9, 3, 2)]
    par = selective_scan(*inputs[:5], "parallel", inputs[5], readers=2)
    rec = selective_scan(*inputs[:5], "recurrent", inputs[5], readers=2)
    for a, b in zip((par[0], *par[1], par[2]), (rec[0], *rec[1], rec[2]), strict=True):
        torch.testing.assert_close(a, b)
    assert selective_scan(*inputs[:5], "recurrent")[1] == ()
    assert [block_length(n) for n in (1, 2, 4, 5)] == [1, 2, 2, 3]
    assert block_length(4096, width=1 << 16) == 4096  # a wide step on a CPU: one block
    assert block_length(4096, width=1 << 16, device=torch.device("cuda")) == 64


def test_read_out_sum_shares_one_gradient():
    C = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    torch.testing.assert_close(read_out_sum(C, *states), sum(read_out(h, C) for h in states))
    assert torch.autograd.gradcheck(read_out_sum, (C, *states))
    torch.testing.assert_close(read_out(states[0], C), (states[0] * C[:, :, None, :]).sum(-1))
    explicit = sum((h * C[:, :, None, :]).sum(-1) for h in states)
    with torch.no_grad():  # the decode path: accumulated in place, one pass per state
        torch.testing.assert_close(read_out_sum(C, *states), explicit)
        torch.testing.assert_close(read_out_sum(C[:, :1], *(h[:, :1] for h in states)), explicit[:, :1])


def _conv_reference(x, weight, bias, state, mask):
    """Each row convolved over its real tokens only, the carried state in front."""
    out = torch.zeros_like(x)
    width = weight.shape[-1]
    states = []
    for b in range(x.shape[0]):
        real = mask[b].nonzero().flatten()
        seq = torch.cat([state[b], x[b, real]])
        if len(real):
            out[b, real] = F.conv1d(seq.T[None], weight, bias, groups=x.shape[2])[0].T
        states.append(seq[len(seq) - (width - 1) :])
    return out, torch.stack(states)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 9), width=st.integers(1, 4), data=st.data())
def test_causal_conv_skips_padding_anywhere(length, width, data):
    batch, channels = 3, 4
    mask = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=3, max_size=3))
    )
    x = torch.randn(batch, length, channels, dtype=torch.float64)
    weight = torch.randn(channels, 1, width, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64)
    state = torch.randn(batch, width - 1, channels, dtype=torch.float64)
    y, new_state = causal_conv(x, weight, bias, state, mask)
    ref, ref_state = _conv_reference(x, weight, bias, state, mask)
    torch.testing.assert_close(y * mask[..., None], ref)
    torch.testing.assert_close(new_state, ref_state)
    # the step form, token by token, agrees
    h, steps = state, []
    for t in range(length):
        y_t, h = causal_conv_step(x[:, t], weight, bias, h, mask[:, t])
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1) * mask[..., None], ref)
    torch.testing.assert_close(h, ref_state)


def test_kernels_are_not_chosen_on_cpu():
    assert not kernels_usable(torch.zeros(1))
