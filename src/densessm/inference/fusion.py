"""Fused projections: a decode step's products that read the same input become one product.

Each fused module is a family's mixer with its ``project`` method replaced: built from the trained mixer
(its other submodules and settings carried over, the separate projections dropped so no weight is kept
twice), it computes the same function with fewer, larger products. :func:`fuse_projections` swaps them in
for every mixer that has a fused form; others stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densessm.inference.frozen import InferenceOnly, check_model, frozen_linear, seal_for_inference
from densessm.models.mamba.modeling_dense_mamba import DenseMambaMixer
from densessm.models.recurrent import state_identity_kept
from densessm.models.retnet.modeling_dense_retnet import DenseRetNetRetention


def _take_over(source: nn.Module, cls: type[nn.Module], drop: tuple[str, ...]) -> nn.Module:
    """A module of ``cls`` holding ``source``'s settings, parameters and submodules, less those in ``drop``.
    ``source`` is consumed: its submodules now belong to the new module."""
    module = cls.__new__(cls)
    module.__dict__.update(source.__dict__)
    for store in ("_parameters", "_buffers", "_modules"):
        module.__dict__[store] = {k: v for k, v in source.__dict__[store].items() if k not in drop}
    return module


GATE_PANEL = 32
"""Output columns per panel of a packed gate weight (the fused decode step's ``kPanel``)."""


def pack_gate_weight(weight: torch.Tensor) -> torch.Tensor:
    """A selective-transition gate's second layer ``W [n, r]`` as panels of :data:`GATE_PANEL` output columns,
    ``[ceil(n / GATE_PANEL), r, GATE_PANEL]`` (the last zero-padded): the fused decode step streams each panel
    as one contiguous stretch into a tile of rows held in registers. At decode batch sizes this product has so
    few inputs that a library call costs its call and a cold strided read, not its bytes
    (``docs/benchmarks/dense_overhead_fused.md``)."""
    n, r = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -n % GATE_PANEL))
    return padded.view(-1, GATE_PANEL, r).transpose(1, 2).contiguous()


def packed_silu_gate(hidden: torch.Tensor, panels: torch.Tensor, width: int) -> torch.Tensor:
    """``silu(hidden @ W^T)`` for a weight packed by :func:`pack_gate_weight` (``width = n``): the PyTorch
    path (prefill, other devices) and the reference the fused step is tested against."""
    out = torch.einsum("...r,prc->...pc", hidden, panels)
    return F.silu(out.flatten(-2)[..., :width])


def _keep_gate(module: nn.Module, name: str, gate: nn.Linear | None) -> None:
    """Keep a gate's second layer packed (:func:`pack_gate_weight`; None outside dense layers). The gates
    have no bias (:class:`~densessm.models.dense.gate.SelectiveTransitionGate`)."""
    module.register_buffer(name, None if gate is None else pack_gate_weight(gate.weight), persistent=False)


class FusedRetention(InferenceOnly, DenseRetNetRetention):
    """DenseRetNet's retention block with one product for every projection of ``x`` (q, k, [v, g] and the
    dense gates' first layers, each followed by silu, which joins the product); the gates' second layers are
    kept packed (:func:`pack_gate_weight`)."""

    @classmethod
    def from_mixer(cls, source: DenseRetNetRetention) -> FusedRetention:
        parts = [source.q_proj, source.k_proj, source.vg_proj]
        dense = source.dense
        if dense is not None:
            parts += [dense.k_gate.fc1, dense.v_gate.fc1]
        fused = _take_over(source, cls, drop=("q_proj", "k_proj", "vg_proj"))
        sizes = [part.out_features for part in parts]
        fused.sizes = sizes[:3] + ([sum(sizes[3:])] if dense is not None else [])
        fused.projection = frozen_linear(parts, silu=True)
        _keep_gate(fused, "k_gate_weight", None if dense is None else dense.k_gate.fc2)
        _keep_gate(fused, "v_gate_weight", None if dense is None else dense.v_gate.fc2)
        if dense is not None:
            dense.k_gate = dense.v_gate = None  # their weights live on in the fused product and the buffers
        return fused.eval()

    def project_hidden(self, x: torch.Tensor):
        """``q``, ``k`` (scaled), ``v``, the output gate, and in a dense layer both gates' hidden units side by
        side (after silu; else None): what the fused decode step takes."""
        q, k, vg, *gate_hidden = self.projection(x).split(self.sizes, dim=-1)
        v, gate = vg.chunk(2, dim=-1)
        return q, k * self.scaling, v, gate, (gate_hidden[0] if gate_hidden else None)

    def project(self, x: torch.Tensor):
        q, k, v, gate, hidden = self.project_hidden(x)
        if hidden is None:
            return q, k, v, gate, (None, None)
        k_hidden, v_hidden = hidden.split([self.k_gate_weight.shape[1], self.v_gate_weight.shape[1]], dim=-1)
        k_gate = packed_silu_gate(k_hidden, self.k_gate_weight, k.shape[-1])
        return q, k, v, gate, (k_gate, packed_silu_gate(v_hidden, self.v_gate_weight, v.shape[-1]))


class FusedMambaMixer(InferenceOnly, DenseMambaMixer):
    """A dense DenseMamba mixer with ``in_proj`` and the gate's first layer (both read ``x``) as one product;
    the gate's second layer is kept packed (:func:`pack_gate_weight`)."""

    @classmethod
    def from_mixer(cls, source: DenseMambaMixer) -> FusedMambaMixer:
        gate = source.dense_gate
        fused = _take_over(source, cls, drop=("in_proj", "dense_gate"))
        fused.inner = source.D.shape[0]
        fused.projection = frozen_linear([source.in_proj, gate.fc1])
        _keep_gate(fused, "gate_weight", gate.fc2)
        fused.dense_gate = None
        return fused.eval()

    def project_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` and ``z`` of ``in_proj`` and the gate's hidden units (before silu): what the fused decode step
        takes."""
        return self.projection(x).split([self.inner, self.inner, self.gate_weight.shape[1]], dim=-1)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, z, hidden = self.project_hidden(x)
        return xs, z, packed_silu_gate(F.silu(hidden), self.gate_weight, self.inner)


def _fused(module: nn.Module) -> nn.Module | None:
    """The fused form of a mixer, or None if it has none (or nothing to fuse)."""
    if isinstance(module, InferenceOnly):
        return None  # already transformed
    if isinstance(module, DenseRetNetRetention):
        return FusedRetention.from_mixer(module)
    if isinstance(module, DenseMambaMixer) and module.dense_gate is not None:
        return FusedMambaMixer.from_mixer(module)
    return None


def fuse_projections(model: nn.Module) -> nn.Module:
    """Replace every mixer that has a fused form by it, in place; returns ``model`` (in eval mode).

    Irreversible and inference only: the fused modules refuse to train or be saved. A model's caches stay
    valid: the function is unchanged, so its state identity is kept as it was before the fusion (until a weight
    changes after it)."""
    check_model(model, "fuse_projections")
    with state_identity_kept(model):
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                fused = _fused(child)
                if fused is not None:
                    setattr(parent, name, fused)
    return seal_for_inference(model)


__all__ = ["FusedMambaMixer", "FusedRetention", "fuse_projections", "pack_gate_weight", "packed_silu_gate"]
