"""Chunkwise retention and the decode step as Triton kernels (GPU; on CPU through Triton's interpreter).

The kernels compute the un-normalised recurrence ``S_t = γ^{m_t} S_{t-1} + k_tᵀ v_t``, ``o_t = q_t S_t``
(``m_t``: 1 for a real token, 0 for padding, so that padding neither adds nor decays), the form
flash-linear-attention calls simple GLA; the decay-sum that normalises it has a closed form
(:func:`decay_sums`), applied around them in PyTorch at ``O(B·H·L)`` cost. Per chunk of ``C`` tokens, as the
PyTorch chunkwise form does:

1. ``_states_fwd``: the state entering every chunk, a loop over chunks per (batch·head, key block, value
   block);
2. ``_out_fwd``: every chunk at once, ``o = γ^{b_t} q H_n + (q kᵀ ⊙ D) v`` with ``D_ts = γ^{b_t - b_s}``;
3. the backward runs 1 backwards in time on the state's gradient, then 2's transposes per chunk (``dq, dk``
   and ``dv`` in two kernels). The chunk states are recomputed rather than kept from the forward: one more
   cheap pass instead of ``B·H·L/C·Dk·Dv`` floats held through the whole forward and backward.

Accumulation is in fp32 whatever the inputs' dtype, offsets in 64 bits (a state buffer passes 2³¹ elements at
real sizes); fp32 inputs use IEEE products (no TF32), so fp32 results equal the PyTorch forms to float rounding.
``log_decay`` is a constant (no gradient), as in the models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from densessm.ops.retention.forms import _TINY

MIN_BLOCK = 16  # tl.dot's smallest operand side on a GPU
MAX_BLOCK = 64  # per-program tiles of the state: 64 x 64 fp32 stays in registers


def block(size: int, cap: int = MAX_BLOCK) -> int:
    """A power-of-two tile side covering ``size`` (masked where it overhangs), between 16 and ``cap``."""
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(size)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _states_fwd(
    k, v, b, h0, hs, hN, L, N, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh, ik, iv = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rk, rv, rc = ik * BK + tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, C)
    kv_mask = (rk[:, None] < DK) & (rv[None, :] < DV)
    kv_off = rk[:, None] * DV + rv[None, :]
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0 + bh * DK * DV + kv_off, mask=kv_mask, other=0.0)
    for n in range(N):
        tl.store(hs + (bh * N + n) * DK * DV + kv_off, h, mask=kv_mask)
        t = n * C + rc
        bt = tl.load(b + bh * N * C + t)
        b_last = tl.load(b + bh * N * C + n * C + C - 1)
        kt = tl.load(
            k + bh * L * DK + t[:, None] * DK + rk[None, :], mask=(t[:, None] < L) & (rk[None, :] < DK), other=0.0
        )
        vt = tl.load(
            v + bh * L * DV + t[:, None] * DV + rv[None, :], mask=(t[:, None] < L) & (rv[None, :] < DV), other=0.0
        )
        kt = (kt * tl.exp(b_last - bt)[:, None]).to(vt.dtype)
        h = h * tl.exp(b_last) + tl.dot(tl.trans(kt), vt, input_precision=PREC)
    tl.store(hN + bh * DK * DV + kv_off, h, mask=kv_mask)


@triton.jit
def _out_fwd(
    q, k, v, b, hs, o, L, N, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    iv, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rv, rc = iv * BV + tl.arange(0, BV), tl.arange(0, C)
    t = n * C + rc
    acc = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        rk = k0 + tl.arange(0, BK)
        qk_mask = (t[:, None] < L) & (rk[None, :] < DK)
        qt = tl.load(q + bh * L * DK + t[:, None] * DK + rk[None, :], mask=qk_mask, other=0.0)
        kt = tl.load(k + bh * L * DK + t[:, None] * DK + rk[None, :], mask=qk_mask, other=0.0)
        h = tl.load(
            hs + (bh * N + n) * DK * DV + rk[:, None] * DV + rv[None, :],
            mask=(rk[:, None] < DK) & (rv[None, :] < DV),
            other=0.0,
        )
        acc += tl.dot(qt, h.to(qt.dtype), input_precision=PREC)
        scores += tl.dot(qt, tl.trans(kt), input_precision=PREC)
    bt = tl.load(b + bh * N * C + t)
    decay = tl.where(rc[:, None] >= rc[None, :], tl.exp(bt[:, None] - bt[None, :]), 0.0)
    vt = tl.load(v + bh * L * DV + t[:, None] * DV + rv[None, :], mask=(t[:, None] < L) & (rv[None, :] < DV), other=0.0)
    acc = acc * tl.exp(bt)[:, None] + tl.dot((scores * decay).to(vt.dtype), vt, input_precision=PREC)
    tl.store(o + bh * L * DV + t[:, None] * DV + rv[None, :], acc, mask=(t[:, None] < L) & (rv[None, :] < DV))


@triton.jit
def _states_bwd(
    q, do, b, dhN, dhs, dh0, L, N, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, HAS_DHN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh, ik, iv = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rk, rv, rc = ik * BK + tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, C)
    kv_mask = (rk[:, None] < DK) & (rv[None, :] < DV)
    kv_off = rk[:, None] * DV + rv[None, :]
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHN:
        dh = tl.load(dhN + bh * DK * DV + kv_off, mask=kv_mask, other=0.0)
    for i in range(N):
        n = N - 1 - i
        tl.store(dhs + (bh * N + n) * DK * DV + kv_off, dh, mask=kv_mask)  # ∂L/∂(state leaving chunk n)
        t = n * C + rc
        bt = tl.load(b + bh * N * C + t)
        b_last = tl.load(b + bh * N * C + n * C + C - 1)
        qt = tl.load(
            q + bh * L * DK + t[:, None] * DK + rk[None, :], mask=(t[:, None] < L) & (rk[None, :] < DK), other=0.0
        )
        dot = tl.load(
            do + bh * L * DV + t[:, None] * DV + rv[None, :], mask=(t[:, None] < L) & (rv[None, :] < DV), other=0.0
        )
        qt = (qt * tl.exp(bt)[:, None]).to(dot.dtype)
        dh = dh * tl.exp(b_last) + tl.dot(tl.trans(qt), dot, input_precision=PREC)
    tl.store(dh0 + bh * DK * DV + kv_off, dh, mask=kv_mask)


@triton.jit
def _dqk_bwd(
    q, k, v, do, b, hs, dhs, dq, dk, L, N, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    ik, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rk, rc = ik * BK + tl.arange(0, BK), tl.arange(0, C)
    t = n * C + rc
    qk_mask = (t[:, None] < L) & (rk[None, :] < DK)
    qt = tl.load(q + bh * L * DK + t[:, None] * DK + rk[None, :], mask=qk_mask, other=0.0)
    kt = tl.load(k + bh * L * DK + t[:, None] * DK + rk[None, :], mask=qk_mask, other=0.0)
    gq = tl.zeros([C, BK], dtype=tl.float32)
    gk = tl.zeros([C, BK], dtype=tl.float32)
    gs = tl.zeros([C, C], dtype=tl.float32)  # ∂L/∂(q_t·k_s) before the decay
    for v0 in range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        tv_mask = (t[:, None] < L) & (rv[None, :] < DV)
        vt = tl.load(v + bh * L * DV + t[:, None] * DV + rv[None, :], mask=tv_mask, other=0.0)
        dot = tl.load(do + bh * L * DV + t[:, None] * DV + rv[None, :], mask=tv_mask, other=0.0)
        kv_off = (bh * N + n) * DK * DV + rk[:, None] * DV + rv[None, :]
        kv_mask = (rk[:, None] < DK) & (rv[None, :] < DV)
        h = tl.load(hs + kv_off, mask=kv_mask, other=0.0).to(dot.dtype)
        dh = tl.load(dhs + kv_off, mask=kv_mask, other=0.0).to(vt.dtype)
        gq += tl.dot(dot, tl.trans(h), input_precision=PREC)
        gk += tl.dot(vt, tl.trans(dh), input_precision=PREC)
        gs += tl.dot(dot, tl.trans(vt), input_precision=PREC)
    bt = tl.load(b + bh * N * C + t)
    b_last = tl.load(b + bh * N * C + n * C + C - 1)
    decay = tl.where(rc[:, None] >= rc[None, :], tl.exp(bt[:, None] - bt[None, :]), 0.0)
    gs = (gs * decay).to(qt.dtype)
    gq = gq * tl.exp(bt)[:, None] + tl.dot(gs, kt, input_precision=PREC)
    gk = gk * tl.exp(b_last - bt)[:, None] + tl.dot(tl.trans(gs), qt, input_precision=PREC)
    out = bh * L * DK + t[:, None] * DK + rk[None, :]
    tl.store(dq + out, gq, mask=qk_mask)
    tl.store(dk + out, gk, mask=qk_mask)


@triton.jit
def _dv_bwd(
    q, k, do, b, dhs, dv, L, N, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    iv, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rv, rc = iv * BV + tl.arange(0, BV), tl.arange(0, C)
    t = n * C + rc
    tv_mask = (t[:, None] < L) & (rv[None, :] < DV)
    gv = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        rk = k0 + tl.arange(0, BK)
        qk_mask = (t[:, None] < L) & (rk[None, :] < DK)
        qt = tl.load(q + bh * L * DK + t[:, None] * DK + rk[None, :], mask=qk_mask, other=0.0)
        kt = tl.load(k + bh * L * DK + t[:, None] * DK + rk[None, :], mask=qk_mask, other=0.0)
        dh = tl.load(
            dhs + (bh * N + n) * DK * DV + rk[:, None] * DV + rv[None, :],
            mask=(rk[:, None] < DK) & (rv[None, :] < DV),
            other=0.0,
        )
        scores += tl.dot(qt, tl.trans(kt), input_precision=PREC)
        gv += tl.dot(kt, dh.to(kt.dtype), input_precision=PREC)
    bt = tl.load(b + bh * N * C + t)
    b_last = tl.load(b + bh * N * C + n * C + C - 1)
    decay = tl.where(rc[:, None] >= rc[None, :], tl.exp(bt[:, None] - bt[None, :]), 0.0)
    dot = tl.load(do + bh * L * DV + t[:, None] * DV + rv[None, :], mask=tv_mask, other=0.0)
    gv = gv * tl.exp(b_last - bt)[:, None] + tl.dot(tl.trans((scores * decay).to(dot.dtype)), dot, input_precision=PREC)
    tl.store(dv + bh * L * DV + t[:, None] * DV + rv[None, :], gv, mask=tv_mask)


def _chunk_states(k, v, b, h0, chunk):
    """The state entering every chunk ``[B·H, N, Dk, Dv]`` and the final one ``[B·H, Dk, Dv]`` (fp32)."""
    bh, length, key_dim = k.shape
    value_dim = v.shape[-1]
    chunks = b.shape[1] // chunk
    bk, bv = block(key_dim), block(value_dim)
    hs = k.new_empty(bh, chunks, key_dim, value_dim, dtype=torch.float32)
    final = k.new_empty(bh, key_dim, value_dim, dtype=torch.float32)
    grid = (bh, triton.cdiv(key_dim, bk), triton.cdiv(value_dim, bv))
    _states_fwd[grid](
        k, v, b, final if h0 is None else h0, hs, final, length, chunks, key_dim, value_dim, chunk, bk, bv,
        h0 is not None, _precision(k.dtype),
    )  # fmt: skip
    return hs, final


class _ChunkRetention(torch.autograd.Function):
    """``(q, k [B·H, L, Dk], v [B·H, L, Dv], b [B·H, N·C], h0 [B·H, Dk, Dv] | None)`` -> ``(o, final state)``:
    the un-normalised recurrence; ``b`` is the log-decay accumulated from each chunk's start (fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, b, h0, chunk):
        ctx.set_materialize_grads(False)
        bh, length, key_dim = q.shape
        value_dim = v.shape[-1]
        hs, final = _chunk_states(k, v, b, h0, chunk)
        out = torch.empty_like(v)
        bv = block(value_dim)
        grid = (triton.cdiv(value_dim, bv), b.shape[1] // chunk, bh)
        _out_fwd[grid](
            q, k, v, b, hs, out, length, b.shape[1] // chunk, key_dim, value_dim, chunk, block(key_dim), bv,
            _precision(q.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, b, h0)
        ctx.chunk = chunk
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, b, h0 = ctx.saved_tensors
        chunk = ctx.chunk
        bh, length, key_dim = q.shape
        value_dim = v.shape[-1]
        chunks = b.shape[1] // chunk
        bk, bv = block(key_dim), block(value_dim)
        prec = _precision(q.dtype)
        grad_out = torch.zeros_like(v) if grad_out is None else grad_out.to(v.dtype).contiguous()
        hs, _ = _chunk_states(k, v, b, h0, chunk)
        dhs = torch.empty_like(hs)
        grad_h0 = torch.empty(bh, key_dim, value_dim, dtype=torch.float32, device=q.device)
        has_final = grad_final is not None
        grad_final = grad_final.float().contiguous() if has_final else grad_h0
        _states_bwd[(bh, triton.cdiv(key_dim, bk), triton.cdiv(value_dim, bv))](
            q, grad_out, b, grad_final, dhs, grad_h0, length, chunks, key_dim, value_dim, chunk, bk, bv,
            has_final, prec,
        )  # fmt: skip
        grad_q = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        grad_k = torch.empty_like(grad_q)
        grad_v = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        _dqk_bwd[(triton.cdiv(key_dim, bk), chunks, bh)](
            q, k, v, grad_out, b, hs, dhs, grad_q, grad_k, length, chunks, key_dim, value_dim, chunk, bk, bv, prec
        )
        _dv_bwd[(triton.cdiv(value_dim, bv), chunks, bh)](
            q, k, grad_out, b, dhs, grad_v, length, chunks, key_dim, value_dim, chunk, bk, bv, prec
        )
        grad_h0 = grad_h0.to(h0.dtype) if h0 is not None and ctx.needs_input_grad[4] else None
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, grad_h0, None


def decay_sums(log_decay: torch.Tensor, counts: torch.Tensor, scale_0: torch.Tensor) -> torch.Tensor:
    """The decay-sum ``γ^{c} scale_0 + Σ_{j<c} γ^j`` after ``c = counts [B, L]`` real tokens, per head
    ``[B, H, L]``: ``(1 - γ^c) / (1 - γ)`` in its accurate ``expm1`` form, ``c`` itself where ``γ = 1``."""
    log_decay = log_decay[None, :, None]
    c = counts[:, None, :]
    geometric = torch.expm1(c * log_decay) / torch.expm1(log_decay).where(log_decay != 0, 1.0)
    return torch.where(log_decay != 0, geometric, c) + (c * log_decay).exp() * scale_0[..., None]


def triton_chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int = 64,
    mask: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Same contract as :func:`densessm.ops.retention.chunkwise.chunkwise_retention`; ``chunk_size`` is rounded
    to a power of two from 16 to 64, the tiles a GPU keeps in registers (any chunk size computes the same
    function)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if log_decay.requires_grad:
        raise ValueError("the Triton retention kernel takes log_decay as a constant: it has no gradient for it")
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    stat = torch.float32
    chunk = block(min(chunk_size, length))
    padded = -(-length // chunk) * chunk
    real = torch.ones(batch, length, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
    if mask is not None:  # selections: whatever a padded position holds (NaN included) never reaches a real one
        k, v = torch.where(real[:, None, :, None], k, 0), torch.where(real[:, None, :, None], v, 0)
    log_decay = log_decay.detach().to(stat)
    steps = F.pad(real.to(stat), (0, padded - length))  # padding after the end: the identity step
    b = (steps[:, None, :] * log_decay[None, :, None]).unflatten(-1, (-1, chunk)).cumsum(-1).flatten(-2)
    b = b.expand(batch, heads, padded).reshape(batch * heads, padded).contiguous()
    scale_0 = torch.zeros(batch, heads, dtype=stat, device=q.device) if state is None else state[1].to(stat)
    h0 = None
    if state is not None:
        h0 = (state[0].to(stat) * scale_0.sqrt()[..., None, None]).reshape(batch * heads, key_dim, value_dim)
        h0 = h0.contiguous()
    flat = [x.reshape(batch * heads, length, -1).contiguous() for x in (q, k, v)]
    out, final = _ChunkRetention.apply(*flat, b, h0, chunk)
    sums = decay_sums(log_decay, real.to(stat).cumsum(-1), scale_0)  # [B, H, L]
    out = out.view(batch, heads, length, value_dim) * sums.clamp_min(_TINY).rsqrt()[..., None].to(out.dtype)
    last = sums[..., -1].contiguous()  # its own memory: decoding updates it in place
    final = final.view(batch, heads, key_dim, value_dim) * last.clamp_min(_TINY).rsqrt()[..., None, None]
    return out, (final.to(v.dtype), last)


@triton.jit
def _step(
    q, k, v, log_decay, mask, state, scale, new_scale, out, H, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    bh, iv = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rv = iv * BV + tl.arange(0, BV)
    old = tl.load(scale + bh)
    decay = tl.exp(tl.load(log_decay + bh % H).to(tl.float32))
    add = 1.0
    if HAS_MASK:
        add = tl.load(mask + bh // H).to(tl.float32)
        decay = tl.where(add > 0, decay, 1.0)
    total = old * decay + add
    inv = 1.0 / tl.sqrt(tl.maximum(total, 1e-30))
    carry, fresh = tl.sqrt(old) * decay * inv, add * inv
    vt = tl.load(v + bh * DV + rv, mask=rv < DV, other=0.0).to(tl.float32) * fresh
    acc = tl.zeros([BV], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        rk = k0 + tl.arange(0, BK)
        off = bh * DK * DV + rk[:, None] * DV + rv[None, :]
        kv_mask = (rk[:, None] < DK) & (rv[None, :] < DV)
        s = tl.load(state + off, mask=kv_mask, other=0.0).to(tl.float32) * carry
        kt = tl.load(k + bh * DK + rk, mask=rk < DK, other=0.0).to(tl.float32)
        s += kt[:, None] * vt[None, :]
        tl.store(state + off, s.to(state.dtype.element_ty), mask=kv_mask)
        qt = tl.load(q + bh * DK + rk, mask=rk < DK, other=0.0).to(tl.float32)
        acc += tl.sum(qt[:, None] * s, 0)
    tl.store(out + bh * DV + rv, acc, mask=rv < DV)
    if iv == 0:
        tl.store(new_scale + bh, total)


def triton_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    scale: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`densessm.ops.retention.step.recurrent_step_`, in one kernel: the state is read
    and written once, the read-out taken from the tile just written. No host synchronisation and fixed
    addresses, so it can be captured in a CUDA graph. ``state`` must be contiguous (the cache's is)."""
    batch, heads, key_dim, value_dim = state.shape
    if not state.is_contiguous() or not scale.is_contiguous():
        raise ValueError("the fused retention step updates the state in place: it needs a contiguous state and scale")
    q, k, v = (x.reshape(batch * heads, -1).contiguous() for x in (q, k, v))
    out = torch.empty(batch * heads, value_dim, dtype=torch.float32, device=q.device)
    new_scale = torch.empty_like(scale)  # each program reads the old decay-sum: the new one goes elsewhere first
    bv = block(value_dim)
    mask_arg = scale if mask is None else mask.contiguous()
    _step[(batch * heads, triton.cdiv(value_dim, bv))](
        q, k, v, log_decay.contiguous(), mask_arg, state, scale, new_scale, out, heads, key_dim, value_dim,
        block(key_dim, cap=32), bv, mask is not None,
    )  # fmt: skip
    return out.view(batch, heads, value_dim).to(q.dtype), state, scale.copy_(new_scale)
