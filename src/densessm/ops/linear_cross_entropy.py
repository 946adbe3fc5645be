"""The LM loss of a linear head, computed over chunks of positions so that the ``[tokens, vocab]`` logits never
exist whole.

Why: at long inputs the logits dominate a training step's memory. A 32k-vocabulary head over 16,384 tokens makes
2 GB of fp32 logits; the loss keeps their log-softmax for the backward and the backward makes two more tensors of
that size, so the head alone holds about 6 GB at 16k and 12 GB at 32k, more than a 350M model's layers. Here each
chunk's logits live only while that chunk is scored. The loss is a scalar, so the gradients of the hidden states
and of the head's weight are computed in the same pass (softmax minus the one-hot target, times the head); the
backward only scales them by the incoming gradient, and no logits are computed twice.

:func:`naive_linear_cross_entropy` is the reference it is tested against: the head's logits and transformers'
``ForCausalLMLoss`` on them (as the model's forward computes its loss when it returns logits), in float64 where
the inputs are.
"""

from __future__ import annotations

import torch

from densessm.ops.transforms import transforms_active

CHUNK_BYTES = 128 * 2**20
"""Bytes of fp32 logits one chunk may hold (1,048 positions of a 32k vocabulary): large enough that the head's
products stay efficient, small beside the model's activations."""


def shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The target of each position is the next position's label; the last position has none (as transformers'
    ``ForCausalLMLoss`` shifts them)."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def chunk_rows(vocab_size: int) -> int:
    """Positions per chunk: :data:`CHUNK_BYTES` of fp32 logits."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The causal LM loss of the logits ``hidden @ weight.T``, equal to transformers' ``ForCausalLMLoss`` on them:
    ``hidden [..., L, H]``, ``weight [V, H]``, ``labels [..., L]`` (shifted here) or ``shift_labels`` (already
    the targets). Positions whose target is ``ignore_index`` add nothing; the sum is divided by the positions
    scored, or by ``num_items_in_batch`` when given (the Trainer's count over accumulated micro-batches).
    ``chunk_size`` positions are scored at a time (default: :func:`chunk_rows`).

    Differentiable once (``create_graph=True`` is refused: a second-order gradient would be wrong); forward-mode
    AD and ``torch.func`` transforms (grad, vmap) get every logit at once. Token ids are not range-checked here
    (the models check them before their backbone runs)."""
    targets = _checked_targets(hidden, weight, labels, shift_labels, ignore_index)
    rows = chunk_rows(weight.shape[0]) if chunk_size is None else chunk_size
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {rows!r}")
    count = (targets != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(hidden.device)
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and weight.dtype != torch.float64:  # as autocast runs nn.Linear
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    if transforms_active(hidden, weight):
        # torch.func's transforms and forward-mode AD: the plain form, which has their rules
        logits = _upcast(hidden @ weight.T)
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
        return loss / count
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, rows, count)
        return _chunked_loss(hidden, weight, targets, ignore_index, rows, False, False)[0] / count


def _checked_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    ignore_index: object,
) -> torch.Tensor:
    """The flat int64 targets, after the checks whose failure would otherwise be a raw error from inside (or,
    for labels of another shape, a shift across rows)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden states [..., L, H] and a head weight [V, H] are needed, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    name, given = ("labels", labels) if shift_labels is None else ("shift_labels", shift_labels)
    if given is None:
        raise ValueError("linear_cross_entropy needs labels or shift_labels")
    if not isinstance(given, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of token ids, got {type(given).__name__}")
    if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
        raise ValueError(f"{name} must be integer token ids, got {given.dtype}")
    if given.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name} must have the hidden states' shape {tuple(hidden.shape[:-1])}, got {tuple(given.shape)}"
        )
    given = given.to(hidden.device, torch.long)
    return (given if shift_labels is not None else shifted_targets(given, ignore_index)).reshape(-1)


def naive_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference: every logit at once, then the cross-entropy of transformers' ``ForCausalLMLoss`` (which
    this equals at fp32; it would round float64 logits to fp32)."""
    logits = _upcast(hidden.to(weight.dtype) @ weight.T)
    targets = shifted_targets(labels, ignore_index).reshape(-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, weight.shape[0]), targets, ignore_index=ignore_index, reduction=reduction
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits of a half-precision head in fp32 for the loss (as transformers' loss takes them)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    rows: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss of every scored position and, where asked, its gradients (the hidden states' in their
    dtype, the weight's accumulated in fp32 over the chunks). The logits are upcast to fp32 as transformers'
    loss does (float64 stays float64); no value is read back to the host (a CUDA step is not made to wait)."""
    wide = torch.promote_types(weight.dtype, torch.float32)  # the loss's dtype, as _upcast gives the logits
    total = torch.zeros((), dtype=wide, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    allocate = torch.empty if hidden.shape[0] else torch.zeros  # no position: nothing writes the gradient
    d_weight = allocate(weight.shape, dtype=wide, device=weight.device) if grad_weight else None
    # one logits buffer for every chunk: a fresh [rows, vocab] tensor per chunk costs its first touch of memory
    # (page faults) as much as a pass over it; a half-precision head's logits are upcast into new memory instead
    buffer = None
    if weight.dtype == wide:
        buffer = torch.empty(min(rows, hidden.shape[0]), weight.shape[0], dtype=wide, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        stop = min(start + rows, hidden.shape[0])
        chunk = hidden[start:stop]
        target = targets[start:stop]
        scored = target != ignore_index
        picked = target.masked_fill(~scored, 0).unsqueeze(1)
        if buffer is not None:
            logits = torch.mm(chunk, weight.T, out=buffer[: stop - start])
        else:
            logits = _upcast(chunk @ weight.T)
        log_probs = _log_softmax_(logits)
        # where, not a product with the mask: an ignored position's non-finite logits add nothing (0 * inf is NaN)
        total -= torch.where(scored, log_probs.gather(1, picked).squeeze(1), 0).sum()
        if not (grad_hidden or grad_weight):
            continue
        probs = log_probs.exp_()  # softmax, in the logits' memory
        probs.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=probs.dtype))
        grad = probs.masked_fill_(~scored.unsqueeze(1), 0).to(weight.dtype)
        if d_hidden is not None:
            torch.matmul(grad, weight, out=d_hidden[start:stop])
        if d_weight is None:
            continue
        if d_weight.dtype != grad.dtype and start == 0:  # a half-precision head: its gradient summed in fp32
            d_weight.copy_(grad.T @ chunk)
        elif d_weight.dtype != grad.dtype:
            d_weight += grad.T @ chunk
        elif start == 0:  # the first chunk writes it: no pass to zero it first
            torch.mm(grad.T, chunk, out=d_weight)
        else:
            d_weight.addmm_(grad.T, chunk)
    return total, d_hidden, d_weight


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """The log-softmax over the vocabulary written over the logits: one fused pass over each row, no new memory.
    (Row by row, each output is written after its row is read: bit-identical to ``torch.log_softmax`` on the CPU
    and CUDA kernels; other devices get the out-of-place call.)"""
    if logits.device.type in ("cpu", "cuda"):
        return torch._log_softmax(logits, 1, False, out=logits)
    return torch.log_softmax(logits, 1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loss over ``count``, with its gradients computed in the forward and scaled in the backward. As with
    transformers' loss: no position scored gives a NaN loss and zero gradients; a ``count`` of 0 with positions
    scored, non-finite ones."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows, count):
        total, d_hidden, d_weight = _chunked_loss(
            hidden, weight, targets, ignore_index, rows, *ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.count = count
        ctx.scored = (targets != ignore_index).any()  # on the device: no read back
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the scaled gradients would have no graph to go on
            raise RuntimeError(
                "the LM loss scored in chunks (skip_logits=True) is differentiable once: a second-order gradient "
                "(create_graph=True) needs the loss from the logits (skip_logits=False)"
            )
        d_hidden, d_weight = ctx.saved_tensors
        count = torch.as_tensor(ctx.count, dtype=grad_loss.dtype, device=grad_loss.device)
        scale = torch.where(ctx.scored, grad_loss / count, 0)  # nothing scored: the gradients are exactly 0
        if d_hidden is not None:
            d_hidden = d_hidden * scale.to(d_hidden.dtype)
        if d_weight is not None:
            d_weight = (d_weight * scale).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None, None
