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


class FusedRetention(InferenceOnly, DenseRetNetRetention):
    """DenseRetNet's retention block with one product for every projection of ``x`` (q, k, [v, g] and the
    dense gates' first layers, each followed by silu, which joins the product) and one block-diagonal
    product for both gates' second layers."""

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
        fused.gate_product = None
        if dense is not None:
            fused.gate_product = frozen_linear([dense.k_gate.fc2, dense.v_gate.fc2], block_diagonal=True, silu=True)
            fused.gate_sizes = (dense.k_gate.fc2.out_features, dense.v_gate.fc2.out_features)
            dense.k_gate = dense.v_gate = None  # their weights live on in the fused products
        return fused.eval()

    def project(self, x: torch.Tensor):
        q, k, vg, *gate_hidden = self.projection(x).split(self.sizes, dim=-1)
        v, gate = vg.chunk(2, dim=-1)
        gates = (None, None) if not gate_hidden else self.gate_product(gate_hidden[0]).split(self.gate_sizes, dim=-1)
        return q, k * self.scaling, v, gate, gates


class FusedMambaMixer(InferenceOnly, DenseMambaMixer):
    """A dense DenseMamba mixer with ``in_proj`` and the gate's first layer (both read ``x``) as one product,
    and the gate's final silu inside its second layer's product."""

    @classmethod
    def from_mixer(cls, source: DenseMambaMixer) -> FusedMambaMixer:
        gate = source.dense_gate
        fused = _take_over(source, cls, drop=("in_proj", "dense_gate"))
        fused.inner = source.D.shape[0]
        fused.projection = frozen_linear([source.in_proj, gate.fc1])
        fused.gate_out = frozen_linear([gate.fc2], silu=True)
        fused.dense_gate = None
        return fused.eval()

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, z, hidden = self.projection(x).split([self.inner, self.inner, self.gate_out.in_features], dim=-1)
        return xs, z, self.gate_out(F.silu(hidden))


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


__all__ = ["FusedMambaMixer", "FusedRetention", "fuse_projections"]
