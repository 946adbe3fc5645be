"""Mamba-2's SSD: the chunked form and the decode step against the step-by-step definition (fp64, 1e-9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from densessm.ops.ssd import segment_sums, ssd, ssd_blocked, ssd_reference, ssd_step, ssd_steps, time_step


def _inputs(batch, length, heads, width, groups, size, dtype=torch.float64):
    x = torch.randn(batch, length, heads, width, dtype=dtype)
    dt = F.softplus(torch.randn(batch, length, heads, dtype=dtype))
    A = -torch.rand(heads, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, length, groups, size, dtype=dtype)
    C = torch.randn(batch, length, groups, size, dtype=dtype)
    state = torch.randn(batch, heads, width, size, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, state)]


def _definition(x, dt, A, B, C, state):
    """The recurrence and its read-out written element by element (head h reads group h // (H / G))."""
    h = state.clone()
    batch, length, heads, width = x.shape
    groups, size = B.shape[-2:]
    y = torch.zeros_like(x)
    for t in range(length):
        for b in range(batch):
            for i in range(heads):
                g = i // (heads // groups)
                decay = torch.exp(dt[b, t, i] * A[i])
                for p in range(width):
                    for n in range(size):
                        h[b, i, p, n] = decay * h[b, i, p, n] + dt[b, t, i] * x[b, t, i, p] * B[b, t, g, n]
                        y[b, t, i, p] += h[b, i, p, n] * C[b, t, g, n]
    return y, h


def test_reference_is_the_definition():
    inputs = [t.detach() for t in _inputs(2, 3, 4, 2, 2, 3)]
    y, states, final = ssd_reference(*inputs)
    ref_y, ref_final = _definition(*inputs)
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(final, ref_final, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(states[:, -1], final)


def _shapes():
    # (heads, groups): one group, a group per head, and heads shared unevenly across fewer groups
    return st.sampled_from([(1, 1), (4, 1), (4, 2), (6, 3), (4, 4)])


def _compare_gradients(outputs, expected, leaves):
    weights = [torch.randn_like(t) for t in expected]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    ref_loss = sum((e * w).sum() for e, w in zip(expected, weights, strict=True))
    grads = torch.autograd.grad(loss, leaves, retain_graph=True)  # the inputs may share a graph (padding)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    for name, a, b in zip(["x", "dt", "A", "B", "C", "state"], grads, ref_grads, strict=False):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 19),
    chunk=st.integers(1, 8),
    shape=_shapes(),
    carried=st.booleans(),
    data=st.data(),
)
def test_chunked_equals_reference_forward_and_backward(batch, length, chunk, shape, carried, data):
    heads, groups = shape
    x, dt, A, B, C, state = _inputs(batch, length, heads, 2, groups, 3)
    # padding anywhere: Δ = 0 there (what the models select), so the step is the identity
    real = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
    dt_used = torch.where(real.view(batch, length, 1), dt, 0)
    state_in = state if carried else None
    y, final = ssd_blocked(x, dt_used, A, B, C, chunk, state_in)
    ref_y, ref_states, ref_final = ssd_reference(x, dt_used, A, B, C, state_in)
    torch.testing.assert_close(y, ref_y, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(final, ref_final, atol=1e-10, rtol=1e-9)
    leaves = [x, dt, A, B, C] + ([state] if carried else [])
    _compare_gradients((y, final), (ref_y, ref_final), leaves)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(1, 9), shape=_shapes(), carried=st.booleans())
def test_steps_equal_reference_forward_and_backward(batch, length, shape, carried):
    heads, groups = shape
    x, dt, A, B, C, state = _inputs(batch, length, heads, 3, groups, 2)
    state_in = state if carried else None
    y, states, final = ssd_steps(x, dt, A, B, C, state_in, keep_states=True)
    expected = ssd_reference(x, dt, A, B, C, state_in)
    for ours, ref in zip((y, states, final), expected, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)
    leaves = [x, dt, A, B, C] + ([state] if carried else [])
    _compare_gradients((y, states, final), expected, leaves)


def test_zero_step_is_the_identity():
    """Δ = 0 neither decays nor feeds the state: how padding stays out of it."""
    x, dt, A, B, C, state = (t.detach() for t in _inputs(1, 6, 4, 2, 2, 3))
    dt[:, 2:4] = 0
    _, states, _ = ssd_reference(x, dt, A, B, C, state)
    torch.testing.assert_close(states[:, 2], states[:, 1])
    torch.testing.assert_close(states[:, 3], states[:, 1])
    _, new = ssd_step(state, x[:, 0], torch.zeros_like(dt[:, 0]), A, B[:, 0], C[:, 0])
    torch.testing.assert_close(new, state)


def test_chunked_is_stable_for_fast_decay():
    x, dt, A, B, C, state = (t.detach().float() for t in _inputs(1, 300, 4, 2, 2, 3))
    dt = dt * 50  # exp(Δ A) underflows to 0 within a step, and the running sums reach ~-1e5
    y, final = ssd_blocked(x, dt, A, B, C, 64, state)
    ref_y, _, ref_final = ssd_reference(x, dt, A, B, C, state)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=1e-4)


def test_segment_sums_are_the_span_sums():
    a = torch.randn(2, 5, dtype=torch.float64)
    sums = segment_sums(a)
    for t in range(5):
        for s in range(t + 1):
            torch.testing.assert_close(sums[:, t, s], a[:, s + 1 : t + 1].sum(-1))


def test_entry_point_modes_agree_and_add_the_skip():
    x, dt, A, B, C, state = (t.detach() for t in _inputs(2, 7, 4, 2, 2, 3))
    D = torch.randn(4, dtype=torch.float64)
    par, none, par_final = ssd(x, dt, A, B, C, "parallel", state, chunk_size=3, D=D)
    rec, states, rec_final = ssd(x, dt, A, B, C, "recurrent", state, D=D, keep_states=True)
    ref_y, ref_states, _ = ssd_reference(x, dt, A, B, C, state)
    assert none is None
    torch.testing.assert_close(par, ref_y + D[:, None] * x)
    torch.testing.assert_close(rec, par)
    torch.testing.assert_close(rec_final, par_final)
    torch.testing.assert_close(states, ref_states)
    with pytest.raises(ValueError, match="forms no per-position states"):
        ssd(x, dt, A, B, C, "parallel", keep_states=True)
    with pytest.raises(ValueError, match="unknown mode 'chunkwise'"):
        ssd(x, dt, A, B, C, "chunkwise")


def test_heads_must_split_into_groups():
    x, dt, A, B, C, _ = (t.detach() for t in _inputs(1, 3, 4, 2, 3, 2))
    with pytest.raises(ValueError, match="4 heads do not split into 3 groups"):
        ssd_blocked(x, dt, A, B, C, 2)


def test_time_step_is_mamba2s_and_selects_padding_away():
    dt = torch.randn(2, 4, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(time_step(dt, bias, (0.0, math.inf)), F.softplus(dt + bias))
    torch.testing.assert_close(time_step(dt, bias, (0.2, 0.9)), F.softplus(dt + bias).clamp(0.2, 0.9))
    mask = torch.tensor([[True, False, True, True], [False, False, True, True]])
    dt[~mask] = math.nan  # whatever a padded position holds
    delta = time_step(dt, bias, (0.0, math.inf), mask)
    assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask]))
    assert torch.isfinite(delta).all()
