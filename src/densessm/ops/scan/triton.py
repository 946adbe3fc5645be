"""The selective scan as Triton kernels (GPU; on CPU through Triton's interpreter), state sequence included.

``mamba_ssm``'s fused scan returns only the output and the last state; DenseMamba's layers above read every
state of the layers below (:mod:`densessm.ops.scan.readout`), so this scan writes them in the same pass when
they are asked for. One program owns ``BD`` channels of one sequence (their
``[BD, N]`` states stay in registers) and walks the sequence once; the channels are independent, so the
programs are ``b·D/BD``. The decode step is the same kernel over one token: it reads the state once and writes
the next one beside it (the caller's state is not changed), with its read-out, and nothing synchronises with
the host, so it can be captured in a CUDA graph.

The backward walks the sequence backwards on the adjoint ``λ_t = ∂L/∂h_t + y'_t ⊗ C_t + exp(Δ_{t+1} A) λ_{t+1}``
(as :mod:`~densessm.ops.scan.blocked` does). It needs every state: a layer whose states are read above has
them already; for one without readers the forward keeps only the state entering every stretch of
``CHECKPOINT_STEPS`` steps, and the backward recomputes one stretch at a time into a per-program scratch tile
(memory ``b·D·N·L/64`` instead of ``b·D·N·L``, for one more forward pass). The reductions over channels (``∂B,
∂C``) and over the batch and time (``∂A``) are written per program and summed outside. All in fp32, offsets in
64 bits (the state sequence passes 2³¹ elements at real sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHANNEL_BLOCK = 32  # channels per program: b·D/32 programs, a [32, N] state tile each
CHECKPOINT_STEPS = 64  # without readers, the backward restarts from a state kept every this many steps


@triton.jit
def _scan_fwd(
    u, delta, A, B, C, h0, y, states, ckpt, final, L, D, T, N: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    HAS_H0: tl.constexpr, STORE: tl.constexpr, CKPT: tl.constexpr,
):  # fmt: skip
    ib, idb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rd, rn = idb * BD + tl.arange(0, BD), tl.arange(0, BN)
    dmask, nmask = rd < D, rn < N
    dn_mask = dmask[:, None] & nmask[None, :]
    dn_off = rd[:, None] * N + rn[None, :]
    a = tl.load(A + dn_off, mask=dn_mask, other=0.0)
    h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0 + ib * D * N + dn_off, mask=dn_mask, other=0.0)
    for t in range(L):
        if CKPT:  # noqa: SIM102  (a compile-time test apart: no runtime test at all without checkpoints)
            if t % T == 0:  # the state entering each stretch of T steps
                tl.store(ckpt + (ib * tl.cdiv(L, T) + t // T) * D * N + dn_off, h, mask=dn_mask)
        row = ib * L + t
        dt = tl.load(delta + row * D + rd, mask=dmask, other=0.0)
        ut = tl.load(u + row * D + rd, mask=dmask, other=0.0)
        bt = tl.load(B + row * N + rn, mask=nmask, other=0.0)
        ct = tl.load(C + row * N + rn, mask=nmask, other=0.0)
        h = tl.exp(dt[:, None] * a) * h + (dt * ut)[:, None] * bt[None, :]
        tl.store(y + row * D + rd, tl.sum(h * ct[None, :], 1), mask=dmask)
        if STORE:
            tl.store(states + row * D * N + dn_off, h, mask=dn_mask)
    tl.store(final + ib * D * N + dn_off, h, mask=dn_mask)


@triton.jit
def _bwd_step(
    t, ib, idb, lam, grad_a, h, prev, a, u, delta, B, C, gy, gstates, du, ddelta, dB, dC, L, D, NDB,
    N: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_GY: tl.constexpr, HAS_GSTATES: tl.constexpr,
):  # fmt: skip
    """One step back: ``λ_t`` from what step t+1 handed back, this step's gradients, and what it hands back.
    Steps past the end (``t ≥ L``) load nothing, store nothing and hand ``λ`` back unchanged."""
    rd, rn = idb * BD + tl.arange(0, BD), tl.arange(0, BN)
    inside = (tl.zeros([BD], dtype=tl.int32) + t) < L
    dmask = (rd < D) & inside
    nmask = (rn < N) & (tl.zeros([BN], dtype=tl.int32) + t < L)
    dn_mask = dmask[:, None] & nmask[None, :]
    row = ib * L + t
    dt = tl.load(delta + row * D + rd, mask=dmask, other=0.0)
    ut = tl.load(u + row * D + rd, mask=dmask, other=0.0)
    bt = tl.load(B + row * N + rn, mask=nmask, other=0.0)
    part = row * NDB + idb  # this program's share of the reductions over channels
    if HAS_GSTATES:
        lam += tl.load(gstates + row * D * N + rd[:, None] * N + rn[None, :], mask=dn_mask, other=0.0)
    if HAS_GY:
        gyt = tl.load(gy + row * D + rd, mask=dmask, other=0.0)
        ct = tl.load(C + row * N + rn, mask=nmask, other=0.0)
        lam += gyt[:, None] * ct[None, :]
        tl.store(dC + part * N + rn, tl.sum(gyt[:, None] * h, 0), mask=nmask)
    decay = tl.exp(dt[:, None] * a)
    q = lam * decay * prev  # ∂L/∂(Δ_t A)
    grad_a += q * dt[:, None]
    lb = tl.sum(lam * bt[None, :], 1)  # ∂L/∂(Δ_t u_t)
    tl.store(du + row * D + rd, lb * dt, mask=dmask)
    tl.store(ddelta + row * D + rd, tl.sum(q * a, 1) + lb * ut, mask=dmask)
    tl.store(dB + part * N + rn, tl.sum((dt * ut)[:, None] * lam, 0), mask=nmask)
    return lam * decay, grad_a


@triton.jit
def _scan_bwd(
    u, delta, A, B, C, h0, states, ckpt, scratch, gy, gstates, gfinal, du, ddelta, dA, dB, dC, dh0, L, D, NDB, T,
    N: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_H0: tl.constexpr, HAS_GY: tl.constexpr,
    HAS_GSTATES: tl.constexpr, HAS_GFINAL: tl.constexpr, RECOMPUTE: tl.constexpr,
):  # fmt: skip
    ib, idb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rd, rn = idb * BD + tl.arange(0, BD), tl.arange(0, BN)
    dmask, nmask = rd < D, rn < N
    dn_mask = dmask[:, None] & nmask[None, :]
    dn_off = rd[:, None] * N + rn[None, :]
    a = tl.load(A + dn_off, mask=dn_mask, other=0.0)
    lam = tl.zeros([BD, BN], dtype=tl.float32)  # exp(Δ_{t+1} A) λ_{t+1}: what step t+1 hands back
    if HAS_GFINAL:
        lam = tl.load(gfinal + ib * D * N + dn_off, mask=dn_mask, other=0.0)
    grad_a = tl.zeros([BD, BN], dtype=tl.float32)
    if RECOMPUTE:  # per stretch of T steps, last first: its states again from its checkpoint, then back through it
        stretches = tl.cdiv(L, T)
        tile = scratch + (ib * NDB + idb) * T * BD * BN + tl.arange(0, BD)[:, None] * BN + rn[None, :]
        for i in range(stretches):
            start = (stretches - 1 - i) * T
            entry = tl.load(ckpt + (ib * stretches + start // T) * D * N + dn_off, mask=dn_mask, other=0.0)
            h = entry
            for j in range(T):
                inside = (tl.zeros([BD], dtype=tl.int32) + start + j) < L
                row = ib * L + start + j
                dt = tl.load(delta + row * D + rd, mask=dmask & inside, other=0.0)
                ut = tl.load(u + row * D + rd, mask=dmask & inside, other=0.0)
                bt = tl.load(B + row * N + rn, mask=nmask & (tl.zeros([BN], dtype=tl.int32) + start + j < L), other=0.0)
                h = tl.exp(dt[:, None] * a) * h + (dt * ut)[:, None] * bt[None, :]
                tl.store(tile + j * BD * BN, h)
            tl.debug_barrier()
            for jj in range(T):
                j = T - 1 - jj
                h = tl.load(tile + j * BD * BN)
                later = (tl.zeros([BD, BN], dtype=tl.int32) + j) > 0
                prev = tl.where(later, tl.load(tile + (j - 1) * BD * BN, mask=later, other=0.0), entry)
                lam, grad_a = _bwd_step(
                    start + j, ib, idb, lam, grad_a, h, prev, a, u, delta, B, C, gy, gstates, du, ddelta, dB, dC,
                    L, D, NDB, N, BD, BN, HAS_GY, HAS_GSTATES,
                )  # fmt: skip
            tl.debug_barrier()  # the next stretch overwrites the scratch tiles
    else:
        for i in range(L):
            t = L - 1 - i
            h = tl.load(states + (ib * L + t) * D * N + dn_off, mask=dn_mask, other=0.0)
            later = (tl.zeros([BD, BN], dtype=tl.int32) + t) > 0
            prev = tl.load(states + (ib * L + t - 1) * D * N + dn_off, mask=dn_mask & later, other=0.0)  # h_{t-1}
            if HAS_H0:
                prev += tl.load(h0 + ib * D * N + dn_off, mask=dn_mask & (later == 0), other=0.0)
            lam, grad_a = _bwd_step(
                t, ib, idb, lam, grad_a, h, prev, a, u, delta, B, C, gy, gstates, du, ddelta, dB, dC, L, D, NDB,
                N, BD, BN, HAS_GY, HAS_GSTATES,
            )  # fmt: skip
    tl.store(dA + ib * D * N + dn_off, grad_a, mask=dn_mask)
    tl.store(dh0 + ib * D * N + dn_off, lam, mask=dn_mask)


def _tiles(channels: int, size: int) -> tuple[int, int, int]:
    bd = min(CHANNEL_BLOCK, triton.next_power_of_2(channels))
    return bd, triton.next_power_of_2(size), triton.cdiv(channels, bd)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, state, readers):
        ctx.set_materialize_grads(False)
        batch, length, channels = u.shape
        size = A.shape[1]
        bd, bn, blocks = _tiles(channels, size)
        train = any(ctx.needs_input_grad[:6])
        store = readers > 0  # the states are outputs; without readers a backward restarts from checkpoints
        steps = max(1, min(CHECKPOINT_STEPS, length))
        y = torch.empty_like(u)
        final = u.new_empty(batch, channels, size)
        states = u.new_empty(batch, length, channels, size) if store else final
        ckpt = u.new_empty(batch, triton.cdiv(length, steps), channels, size) if train and not store else final
        _scan_fwd[(batch, blocks)](
            u, delta, A, B, C, final if state is None else state, y, states, ckpt, final, length, channels, steps,
            size, bd, bn, state is not None, store, train and not store,
        )  # fmt: skip
        if train:
            ctx.save_for_backward(u, delta, A, B, C, state, states if store else ckpt)
            ctx.recompute, ctx.steps = not store, steps
        return y, final, *(states[:, :length] for _ in range(readers))

    @staticmethod
    def backward(ctx, grad_y, grad_final, *grad_states):
        u, delta, A, B, C, state, kept = ctx.saved_tensors
        batch, length, channels = u.shape
        size = A.shape[1]
        bd, bn, blocks = _tiles(channels, size)
        steps = ctx.steps
        grad_states = [g for g in grad_states if g is not None]
        summed = None
        if grad_states:  # one state-sized sum for several readers; the kernel adds it step by step
            summed = grad_states[0].float().contiguous() if len(grad_states) == 1 else sum(grad_states).float()
        grad_y = None if grad_y is None else grad_y.float().contiguous()
        grad_final = None if grad_final is None else grad_final.float().contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = u.new_empty(batch, channels, size)
        dB = u.new_zeros(batch, length, blocks, size)
        dC = u.new_zeros(batch, length, blocks, size)
        dh0 = u.new_empty(batch, channels, size)
        scratch = u.new_empty(batch * blocks * steps * bd * bn) if ctx.recompute else dh0
        _scan_bwd[(batch, blocks)](
            u, delta, A, B, C, dh0 if state is None else state, kept, kept, scratch, u if grad_y is None else grad_y,
            dh0 if summed is None else summed, dh0 if grad_final is None else grad_final, du, ddelta, dA, dB, dC, dh0,
            length, channels, blocks, steps, size, bd, bn, state is not None, grad_y is not None, summed is not None,
            grad_final is not None, ctx.recompute,
        )  # fmt: skip
        grad_state = dh0 if state is not None and ctx.needs_input_grad[5] else None
        return du, ddelta, dA.sum(0), dB.sum(2), dC.sum(2), grad_state, None


def triton_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor | None = None,
    readers: int = 1,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Same contract as :func:`densessm.ops.scan.sequential.sequential_scan`, in fp32 (the scan's precision in
    the models): the states come as ``readers`` handles, formed only when there are readers."""
    u, delta, A, B, C = (x.float().contiguous() for x in (u, delta, A, B, C))
    state = None if state is None else state.float().contiguous()
    y, final, *states = _Scan.apply(u, delta, A, B, C, state, readers)
    return y, tuple(states), final
