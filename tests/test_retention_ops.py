"""The retention op: its schedules compute one function, padding is invisible, states hand over exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densessm.ops.retention import head_log_decays, retention
from densessm.ops.retention.forms import parallel_retention, recurrent_retention


def _inputs(batch, heads, length, key_dim, value_dim, dtype=torch.float64):
    q = torch.randn(batch, heads, length, key_dim, dtype=dtype)
    k = torch.randn(batch, heads, length, key_dim, dtype=dtype)
    v = torch.randn(batch, heads, length, value_dim, dtype=dtype)
    return q, k, v, head_log_decays(heads).double()


def _explicit(q, k, v, log_decay):
    """The defining sum, one output at a time, with no shared code."""
    batch, heads, length, _ = q.shape
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=q.dtype)
    gamma = log_decay.exp()
    for t in range(length):
        for h in range(heads):
            w = gamma[h] ** torch.arange(t, -1, -1, dtype=q.dtype)  # γ^(t-s), s = 0..t
            scores = (q[:, h, t, None, :] * k[:, h, : t + 1]).sum(-1) * w
            out[:, h, t] = (scores[..., None] * v[:, h, : t + 1]).sum(1) / w.sum().sqrt()
    return out


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 4),
    length=st.integers(1, 12),
    key_dim=st.sampled_from([2, 4, 6]),
    value_dim=st.integers(1, 5),
)
def test_modes_match_the_defining_sum(batch, heads, length, key_dim, value_dim):
    q, k, v, log_decay = _inputs(batch, heads, length, key_dim, value_dim)
    expected = _explicit(q, k, v, log_decay)
    parallel, _ = parallel_retention(q, k, v, log_decay, normalize_rows=False)
    recurrent, _ = recurrent_retention(q, k, v, log_decay)
    torch.testing.assert_close(parallel, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(recurrent, expected, rtol=1e-10, atol=1e-10)


def test_row_normalisation_is_a_per_row_scale():
    q, k, v, log_decay = _inputs(2, 2, 9, 4, 3)
    q = q * 20  # large scores: the reference's abs-sum normalisation becomes active
    plain, _ = parallel_retention(q, k, v, log_decay, normalize_rows=False)
    normed, _ = parallel_retention(q, k, v, log_decay, normalize_rows=True)
    assert not torch.allclose(plain, normed)
    ratio = plain / normed
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))


@settings(max_examples=15, deadline=None)
@given(length=st.integers(2, 10), split=st.integers(1, 9), mode=st.sampled_from(["parallel", "recurrent"]))
def test_state_hand_over_equals_one_pass(length, split, mode):
    split = min(split, length - 1)
    q, k, v, log_decay = _inputs(2, 3, length, 4, 3)
    full, full_state = recurrent_retention(q, k, v, log_decay)
    _, state = retention(q[:, :, :split], k[:, :, :split], v[:, :, :split], log_decay, mode, output_state=True)
    if mode == "parallel":  # the prefix state from the matrix form equals the recurrent one
        _, rec_state = recurrent_retention(q[:, :, :split], k[:, :, :split], v[:, :, :split], log_decay)
        torch.testing.assert_close(state[0], rec_state[0])
        torch.testing.assert_close(state[1], rec_state[1])
    rest, final = retention(
        q[:, :, split:], k[:, :, split:], v[:, :, split:], log_decay, "recurrent", state=state, output_state=True
    )
    torch.testing.assert_close(rest, full[:, :, split:])
    torch.testing.assert_close(final[0], full_state[0])
    torch.testing.assert_close(final[1], full_state[1])


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 8), min_size=2, max_size=3),
    left=st.booleans(),
    mode=st.sampled_from(["parallel", "recurrent"]),
)
def test_padding_is_invisible(lengths, left, mode):
    """Each row of a padded batch equals the same row run alone (left or right padding)."""
    width = max(lengths)
    heads, key_dim, value_dim = 2, 4, 3
    rows = [_inputs(1, heads, n, key_dim, value_dim) for n in lengths]
    log_decay = rows[0][3]
    q = torch.zeros(len(lengths), heads, width, key_dim, dtype=torch.float64)
    k, v = torch.zeros_like(q), torch.zeros(len(lengths), heads, width, value_dim, dtype=torch.float64)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    spans = []
    for i, (n, (qi, ki, vi, _)) in enumerate(zip(lengths, rows, strict=True)):
        span = slice(width - n, width) if left else slice(0, n)
        q[i, :, span], k[i, :, span], v[i, :, span] = qi[0], ki[0], vi[0]
        # garbage in padded slots must not matter
        pad = torch.ones(width, dtype=torch.bool)
        pad[span] = False
        k[i, :, pad] = 1e3
        v[i, :, pad] = -1e3
        mask[i, span] = 1
        spans.append(span)
    batched, state = retention(q, k, v, log_decay, mode, mask=mask, output_state=True)
    for i, (qi, ki, vi, _) in enumerate(rows):
        alone, alone_state = retention(qi, ki, vi, log_decay, mode, output_state=True)
        torch.testing.assert_close(batched[i : i + 1, :, spans[i]], alone)
        torch.testing.assert_close(state[0][i : i + 1], alone_state[0])
        torch.testing.assert_close(state[1][i : i + 1], alone_state[1])


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    length=st.integers(1, 40),
    chunk=st.sampled_from([1, 3, 7, 16, 64]),
    with_state=st.booleans(),
    masked=st.booleans(),
)
def test_chunkwise_equals_recurrent(batch, heads, length, chunk, with_state, masked):
    q, k, v, log_decay = _inputs(batch, heads, length, 4, 3)
    mask = (torch.rand(batch, length) > 0.3).long() if masked else None
    state = None
    if with_state:
        prefix = _inputs(batch, heads, 5, 4, 3)
        _, state = recurrent_retention(*prefix)
    expected, expected_state = recurrent_retention(q, k, v, log_decay, mask=mask, state=state)
    out, final = retention(q, k, v, log_decay, "chunkwise", mask=mask, state=state, output_state=True, chunk_size=chunk)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final[0], expected_state[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final[1], expected_state[1], rtol=1e-9, atol=1e-9)


def test_chunkwise_gradients_equal_recurrent():
    q, k, v, log_decay = _inputs(2, 2, 23, 4, 3)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[0, :5] = 0
    grads = []
    for mode in ("recurrent", "chunkwise"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, (state, _) = retention(*leaves, log_decay, mode, mask=mask, output_state=True, chunk_size=6)
        (out.square().sum() + state.sum()).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_chunk_size_must_be_positive():
    import pytest

    q, k, v, log_decay = _inputs(1, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        retention(q, k, v, log_decay, "chunkwise", chunk_size=0)


def _simple_gla_reference(q, k, v, g, scale, initial_state, output_final_state):
    """fla's documented simple-GLA semantics ([B, T, H, D] layout), written as a loop."""
    batch, length, heads, key_dim = q.shape
    state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=q.dtype) if initial_state is None else initial_state
    outs = []
    for t in range(length):
        state = state * g[:, t].exp()[..., None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ state).squeeze(-2))
    return torch.stack(outs, dim=1), state


def test_fla_bridge_glue_matches_chunkwise(monkeypatch):
    """The GPU bridge's pre/post-processing, run on CPU with the kernel replaced by its reference semantics."""
    from densessm.ops.retention import fla_bridge

    monkeypatch.setattr(fla_bridge, "_kernel", lambda: _simple_gla_reference)
    q, k, v, log_decay = _inputs(2, 3, 17, 4, 3)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :6] = 0
    _, state = recurrent_retention(*_inputs(2, 3, 4, 4, 3))
    expected, expected_state = recurrent_retention(q, k, v, log_decay, mask=mask, state=state)
    out, final = fla_bridge.fla_chunk_retention(q, k, v, log_decay, mask=mask, state=state)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(final[0], expected_state[0])
    torch.testing.assert_close(final[1], expected_state[1])


@pytest.mark.parametrize("masked", [False, True])
def test_inplace_decode_step_equals_reference(masked):
    from densessm.ops.retention import recurrent_step_
    from densessm.ops.retention.forms import recurrent_step

    q, k, v, log_decay = _inputs(3, 2, 6, 4, 5)
    _, (state, scale) = recurrent_retention(q, k, v, log_decay)
    mask = torch.tensor([1, 0, 1]) if masked else None
    step = (q[:, :, 0], k[:, :, 0], v[:, :, 0], log_decay)
    expected = recurrent_step(*step, state.clone(), scale, mask)
    target = state.clone()
    got = recurrent_step_(*step, target, scale, mask)
    assert got[1].data_ptr() == target.data_ptr()  # really in place
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_rotation_turns_each_pair_by_position_times_its_angle():
    """Against complex multiplication: pair ``(a, b)`` is ``a + ib``, turned by ``e^{i·position·θ}``."""
    from densessm.ops.retention import rotate, rotation_angles, rotation_tables

    torch.manual_seed(0)
    key_dim, positions = 8, torch.tensor([[0, 3, 17], [5, 6, 2048]])
    x = torch.randn(2, 3, 3, key_dim, dtype=torch.float64)  # [B, H, L, D]
    angles = rotation_angles(key_dim)
    turned = rotate(x, *rotation_tables(positions, angles, torch.float64))
    theta = positions[:, None, :, None].double() * angles[0::2].double()
    expected = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(theta), theta)
    ).flatten(-2)
    torch.testing.assert_close(turned, expected, atol=1e-5, rtol=1e-5)  # the tables are fp32, as the model's
    # and it is a rotation, so scores depend on relative positions only
    q, k = turned[:, :, 1], turned[:, :, 2]
    shifted = rotate(x, *rotation_tables(positions + 1000, angles, torch.float64))
    torch.testing.assert_close((q * k).sum(-1), (shifted[:, :, 1] * shifted[:, :, 2]).sum(-1), atol=1e-3, rtol=1e-4)
