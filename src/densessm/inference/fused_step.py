"""Fused CPU decode steps as an inference transform: each mixer's one-token step in one compiled pass.

:func:`fuse_decode_steps` swaps every DenseRetNet and DenseMamba mixer for a subclass whose forward, for a
decode step (one token, a kept state, no autograd, on the CPU), calls the kernels of
:mod:`densessm.ops.fused`: the state is read once and written once, and the small per-token work around it
runs in the same call. Every other call (prefill, training-shaped calls, other devices) takes the mixer's
own forward, which is also the tested reference. The weights are untouched: the projections are those
:func:`~densessm.inference.fusion.fuse_projections` (and, if applied, prepacking) made.

The states keep the dtype the model's cache layout gives them (the retention state in the model's dtype, so
bf16 for a bf16 model: half the bytes of the largest tensor of a step; the scan state in at least fp32); the
arithmetic is fp32 (fp64 for a fp64 model) throughout (``docs/benchmarks/fused_step.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from densessm.inference.frozen import InferenceOnly, check_model, seal_for_inference
from densessm.inference.fusion import FusedMambaMixer, FusedRetention, fuse_projections
from densessm.models.dense.mixer import Handoff, LayerState, MixerCall
from densessm.models.mamba.modeling_dense_mamba import DenseMambaMixer
from densessm.models.retnet.modeling_dense_retnet import DenseRetNetRetention
from densessm.ops.fused import fused_ops

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _decode_step(x: torch.Tensor, call: MixerCall, state: LayerState | None) -> bool:
    """Whether this call is a decode step the fused kernels take."""
    return (
        state is not None
        and call.mode == "recurrent"
        and call.output_state
        and x.shape[1] == 1
        and x.device.type == "cpu"
        and x.dtype in FUSED_DTYPES
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself if the kernels may update it in place, else a contiguous copy (an expanded cache row)."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()


class FusedStepRetention(FusedRetention):
    """DenseRetNet's retention block whose decode step is one fused kernel call between its products."""

    def forward(
        self, x: torch.Tensor, shallow: list[Handoff], call: MixerCall, state: LayerState | None
    ) -> tuple[torch.Tensor, list[Handoff], LayerState | None]:
        ops = fused_ops()
        if ops is None or not _decode_step(x, call, state):
            return super().forward(x, shallow, call, state)
        batch = x.shape[0]
        q, k, v, gate, gate_hidden = self.project_hidden(x)
        dense = self.dense is not None and bool(shallow)
        (signed_sin, cos), log_decay = call.shared
        memory, scale = _owned(state["state"]), _owned(state["scale"])
        out = ops.retention_step(
            q,
            k,
            v,
            gate,
            [item[0] for item in shallow] if dense else [],
            [item[1] for item in shallow] if dense else [],
            gate_hidden if dense else None,
            self.k_gate_weight if dense else None,
            self.v_gate_weight if dense else None,
            self.dense.k_norm.weight if dense else None,
            self.dense.v_norm.weight if dense else None,
            self.dense.k_norm.eps if dense else 0.0,
            signed_sin,
            cos,
            log_decay,
            memory,
            scale,
            call.mask,
            self.head_norm.weight,
            self.head_norm.eps,
        )
        out = self.o_proj(out.to(x.dtype).view(batch, 1, -1))
        return self.dropout(out), [(k, v)] * self.readers, {"state": memory, "scale": scale}


class _FusedScanStep:
    """The decode step of a DenseMamba mixer: conv window, then (after the small products of ``u``: ``Δ``, ``B``,
    ``C``) the scan update, its read-out, the dense gate's second layer and the shallow read-outs, skip and
    gate in one pass."""

    def forward(
        self, x: torch.Tensor, shallow: list[Handoff], call: MixerCall, state: LayerState | None
    ) -> tuple[torch.Tensor, list[Handoff], LayerState | None]:
        ops, mask = fused_ops(), call.mask
        if ops is None or not _decode_step(x, call, state) or state["ssm"].dtype not in (torch.float32, torch.float64):
            return super().forward(x, shallow, call, state)
        xs, z, gate_hidden = self.project_hidden(x)
        conv, ssm = _owned(state["conv"]), _owned(state["ssm"])
        u = ops.mamba_conv_step(xs, self.conv1d.weight, self.conv1d.bias, conv, mask)
        delta, B, C = self.ssm_inputs(u)
        shallow_states = [item[0] for item in shallow]
        dense = (gate_hidden, self.gate_weight) if shallow_states else (None, None)
        y = ops.mamba_scan_step(u, delta, self.transition(), B, C, self.D, z, shallow_states, *dense, ssm, mask)
        out = self.out_proj(y.to(x.dtype).view(x.shape[0], 1, -1))
        return out, [(ssm[:, None],)] * self.readers, {"conv": conv, "ssm": ssm}


class FusedStepMambaMixer(_FusedScanStep, FusedMambaMixer):
    """A dense DenseMamba mixer (fused projections) with the fused decode step."""


class StepMambaMixer(_FusedScanStep, InferenceOnly, DenseMambaMixer):
    """A DenseMamba mixer without dense inputs (layer 0, or ``m = 0``) with the fused decode step."""

    gate_weight = None  # no dense gate

    def project_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        xs, z, _ = self.project(x)
        return xs, z, None


def _steppable(module: nn.Module) -> bool:
    """A mixer that has (or is) a fused-step class, before or after the projections are fused."""
    return isinstance(module, DenseRetNetRetention | DenseMambaMixer)


def _with_step(module: nn.Module) -> nn.Module | None:
    """``module`` (consumed) as its fused-step class, or None if it has none or already is one."""
    if isinstance(module, FusedStepRetention | _FusedScanStep):
        return None
    if isinstance(module, FusedRetention):
        cls = FusedStepRetention
    elif isinstance(module, FusedMambaMixer):
        cls = FusedStepMambaMixer
    elif type(module) is DenseMambaMixer:
        cls = StepMambaMixer
    else:
        return None
    stepped = cls.__new__(cls)
    stepped.__dict__.update(module.__dict__)
    return stepped.eval()


def fuse_decode_steps(model: nn.Module) -> bool:
    """Give every DenseRetNet and DenseMamba mixer of ``model`` the fused CPU decode step, in place (after
    :func:`~densessm.inference.fusion.fuse_projections`, which this applies first). Returns whether the fused
    step is in use: False, with a one-line notice logged once, when it cannot be built here (no C++ compiler),
    and the model then decodes with its PyTorch step; False too for a model without such mixers (DenseMamba2),
    which is left as it was. Inference only, like every transform here."""
    check_model(model, "fuse_decode_steps")
    if fused_ops() is None:
        return False
    if not any(_steppable(m) for m in model.modules()):
        return False
    fuse_projections(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            stepped = _with_step(child)
            if stepped is not None:
                setattr(parent, name, stepped)
    seal_for_inference(model)
    return True


__all__ = ["FusedStepMambaMixer", "FusedStepRetention", "StepMambaMixer", "fuse_decode_steps"]
