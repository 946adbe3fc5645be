"""RMSNorm with a backward of few passes over memory, for training on the CPU.

Why: on the CPU, torch's ``rms_norm`` is composed of a power, a mean, an rsqrt and two products, and autograd
differentiates each of them: its backward makes about ten passes and six new tensors the size of the input, where
both gradients need six passes and two. A norm sits four times in each DenseRetNet layer (block input, k and v
after the dense fusion, the heads' output); at the 350M shapes a forward and backward take a quarter to two thirds
of torch's time (docs/benchmarks/rms_norm.md). The forward is torch's arithmetic, in its order, so the values are
bit-identical to :func:`naive_rms_norm`; the gradients equal its gradients to rounding.

CUDA keeps torch's own fused kernel; forward-mode AD and ``torch.func`` transforms get :func:`naive_rms_norm`
(they have its rules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densessm.ops.transforms import transforms_active


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: torch's ``rms_norm`` over the last dimension."""
    return F.rms_norm(x, weight.shape, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) * weight`` over the last dimension of ``x``, in the dtype of ``x`` (the caller
    widens it for the statistics). Other inputs (a narrower ``x``, a weight of another dtype or over more than one
    dimension) get torch's form."""
    differentiated = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    wide = x.dtype in (torch.float32, torch.float64)  # torch's form widens narrower inputs inside
    fits = weight.dim() == 1 and weight.shape[0] == x.shape[-1] > 0  # else torch's form raises (or is empty)
    covered = wide and fits and weight.dtype == x.dtype and x.device.type == "cpu"
    if not differentiated or not covered or transforms_active(x, weight):
        return naive_rms_norm(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    """Saves the input and its per-row ``1/rms`` (``r``); the backward is
    ``dx = r·(g⊙w) - x·r³/D·Σ(x⊙g⊙w)`` and ``dw = Σ_rows g⊙x·r``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        inverse_rms = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        normalized = x.mul(inverse_rms)
        ctx.eps = eps
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, weight, inverse_rms)
            return normalized.mul_(weight)
        # the weight's gradient alone needs the normalized input, not the input (which may be written in place later)
        ctx.save_for_backward(normalized)
        return normalized * weight

    @staticmethod
    def backward(ctx, grad):
        # in the precision of the forward, whatever autocast region the backward is called in
        with torch.autocast("cpu", enabled=False):
            if not ctx.needs_input_grad[0]:  # linear in grad: differentiable as it stands (create_graph=True)
                (normalized,) = ctx.saved_tensors
                return None, (grad * normalized).reshape(-1, normalized.shape[-1]).sum(0), None
            x, weight, inverse_rms = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True: torch's form, whose gradient has a graph of its own
                return _differentiable_backward(ctx, x, weight, grad)
            width = x.shape[-1]
            d_weight = None
            if ctx.needs_input_grad[1]:
                d_weight = torch.mv((grad * x).reshape(-1, width).T, inverse_rms.reshape(-1))
            scaled = grad * weight
            spread = torch.linalg.vecdot(x, scaled, dim=-1).unsqueeze(-1).mul_(inverse_rms.pow(3)).div_(-width)
            return scaled.mul_(inverse_rms).addcmul_(x, spread), d_weight, None


def _differentiable_backward(ctx, x, weight, grad):
    """The gradients through :func:`naive_rms_norm`, as a graph (for second-order gradients); ``x`` needs one."""
    with_weight = ctx.needs_input_grad[1]
    wanted = (x, weight) if with_weight else (x,)
    found = torch.autograd.grad(naive_rms_norm(x, weight, ctx.eps), wanted, grad, create_graph=True)
    return found[0], found[1] if with_weight else None, None
