"""int8 weights for CPU inference: the linear layers store int8 weights and quantize their input per call.

Decoding streams every weight once per step at a few rows per product, so it is bound by the bytes of the
weights; int8 moves a quarter of fp32's. Each replaced layer is PyTorch's dynamically quantized linear
(``torch.ao.nn.quantized.dynamic.Linear``, the fbgemm/x86 kernel behind ``torch.ao.quantization.
quantize_dynamic``): weights int8 per output channel; int32 accumulation, float32 out. The input is rounded at
each call to 8 bits per row, on the row's own scale: the kernel picks one scale for a whole call, so each row is
divided by its largest magnitude and two fixed rows holding -1 and 1 are appended, which pin that scale; the
product is multiplied back by the row's magnitude. So a row's result depends on that row alone, never on the
other rows of its call (a server's batch-mates, a batch's padding). On a CPU without VNNI the kernel sums
pairs of products in 16 bits, which the full range could overflow, so there the input gets 7 bits (the
library's "reduced range", its default everywhere, at half the resolution).

torchao, the successor PyTorch points to, does not fit: on a CPU its int8 schemes (weight-only and dynamic
activation) are fast only under ``torch.compile``, and eagerly, as ``generate`` and ``eval`` run, they are
slower than fp32 (measured in docs/benchmarks/quantize.md). ``torch.ao.quantization`` warns that it is
deprecated in favour of torchao; its kernels are still in PyTorch's core, and this module is the one place
that would change if they went.

Layers are replaced after :func:`~densessm.inference.fusion.fuse_projections`, so each fused product (the
mixer's projections with the dense gates' first layers) is one int8 product; the embedding stays float (a
lookup reads one row per token), and so do layers under ``min_weight`` weights, whose call costs more than
the few bytes it saves, and the dense gates' second layers, which the fused decode step computes inside its
own pass (:mod:`~densessm.inference.fusion`). :func:`~densessm.inference.prepack.prepack_for_cpu`
afterwards packs what stays float. The function changes (by the rounding): a model's caches stay valid, as
for a copy of it in another precision.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import per_channel_dynamic_qconfig

from densessm.inference.frozen import (
    InferenceOnly,
    InferenceOnlyError,
    SiLULinear,
    check_count,
    check_model,
    seal_for_inference,
)
from densessm.inference.fusion import fuse_projections
from densessm.inference.prepack import PrepackedLinear
from densessm.models.recurrent import state_identity_kept

QUANTIZE_CHOICES = ("int8",)
"""The names ``--quantize`` takes."""

REDUCE_RANGE = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
"""Whether inputs are rounded to 7 bits instead of 8 (see the module docstring): on CPUs without VNNI."""


def int8_problem(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why int8 weights cannot run on ``device`` computing in ``dtype``, or None if they can: the kernels are
    CPU-only and take float32 activations."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"int8 weights run on the CPU only, not on {device}"
    if dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        return f"int8 weights compute in float32, not in {name}"
    if torch.backends.quantized.engine == "none":
        return "this PyTorch build has no quantized CPU engine (fbgemm, x86, onednn or qnnpack)"
    return None


class Int8Linear(InferenceOnly):
    """A linear layer with int8 weights (per output channel) whose input is quantized at each call.
    Made from a :class:`~densessm.inference.frozen.SiLULinear`, it applies the silu after the product."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.silu = isinstance(linear, SiLULinear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # what code reading a linear layer's weight learns (its shape, the dtype its input is cast to); holding
        # no values, it fails loudly where the values would be read
        self.weight = torch.empty(self.out_features, self.in_features, device="meta")
        # the library converts only plain nn.Linear (by exact type): show it one that shares our weights
        # the bias is added after the product is scaled back (see the module docstring), so the kernel gets none
        plain = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        plain.weight = linear.weight
        plain.qconfig = per_channel_dynamic_qconfig
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        pinned = torch.zeros(2, self.in_features)
        pinned[:, 0] = torch.tensor([-1.0, 1.0])  # in a column of its own: a layer may have one input
        self.register_buffer("range_rows", pinned, persistent=False)
        with warnings.catch_warnings():  # the deprecation notices of torch.ao (see the module docstring)
            warnings.filterwarnings("ignore", message=r".*(deprecated|will be removed).*")
            quantized = DynamicQuantizedLinear.from_float(plain)
        # the packed weights are a TorchScript object, on which torch.export fails with a raw AttributeError
        # before it calls forward: held outside the module tree (a tuple is no module attribute to it), forward
        # is reached and names the cause
        self._packed = (quantized._packed_params._packed_params,)
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise InferenceOnlyError(
                "an int8-quantized model cannot be exported: torch.export cannot trace its packed int8 weights; "
                "export the float model"
            )
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        # each row on the scale of its largest magnitude (a zero row stays zero), the fixed rows last. The kernel
        # refuses NaN, so a non-finite row enters as zeros and leaves as NaN through its non-finite scale: the
        # model's non-finite checks then name the cause instead of the kernel failing
        scale = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp(min=1e-30)
        unit = torch.cat([(rows / scale).nan_to_num_(0.0, 0.0, 0.0), self.range_rows])
        # the library module's own forward always takes the reduced range: call its kernel with ours
        y = torch.ops.quantized.linear_dynamic(unit, self._packed[0], REDUCE_RANGE)[:n]
        y = y * scale if self.bias is None else torch.addcmul(self.bias, y, scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return F.silu(y) if self.silu else y

    def extra_repr(self) -> str:
        silu = ", silu" if self.silu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{silu}"

    def conversion_problem(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
        """int8 weights cannot follow a ``.half()`` or a move off the CPU: their kernel takes float32 on the
        CPU (a float16 model would fail at its first call with a bare dtype error)."""
        probe = fn(torch.zeros(1))
        return int8_problem(probe.device, probe.dtype)


def quantize_int8(model: nn.Module, min_weight: int = 2**15) -> nn.Module:
    """Fuse the projections that share an input, then replace every linear layer with at least ``min_weight``
    weights by an :class:`Int8Linear`, in place; returns ``model`` (in eval mode).

    The model must be float32 on the CPU and not yet prepacked (prepack afterwards: what stays float is then
    packed). Inference only: the replaced modules refuse to train or be saved. Raises ValueError when there is
    nothing the model could quantize, rather than return it unchanged as if it were int8.
    """
    check_model(model, "quantize_int8")
    check_count("min_weight", min_weight)
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    if any(isinstance(child, PrepackedLinear) for _, _, child in linears):
        raise ValueError("the model is already prepacked for the CPU: quantize it first, then call prepack_for_cpu")
    for _, _, child in linears:
        if isinstance(child, nn.Linear):
            problem = int8_problem(child.weight.device, child.weight.dtype)
            if problem is not None:
                raise ValueError(problem)
    if not _has_large_linear(model, min_weight):  # refused before anything changes: the caller keeps its model
        raise ValueError(f"no linear layer of this model has {min_weight} weights or more: nothing to quantize")
    with state_identity_kept(model):  # rounded weights: the model's caches stay valid (see the module docstring)
        fuse_projections(model)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child.weight.numel() >= min_weight:
                    setattr(parent, name, Int8Linear(child))
    return seal_for_inference(model)


def _has_large_linear(model: nn.Module, min_weight: int) -> bool:
    """Whether quantizing ``model`` would replace a layer (or it already holds int8 ones). Fusing the projections
    can make a large layer of small ones, so a model without one is tried fused on a copy (a small model: cheap)."""

    def large(modules) -> bool:
        return any(
            isinstance(m, Int8Linear) or (isinstance(m, nn.Linear) and m.weight.numel() >= min_weight) for m in modules
        )

    if large(model.modules()):
        return True
    trial = copy.deepcopy(model)
    fuse_projections(trial)
    return large(trial.modules())


__all__ = ["QUANTIZE_CHOICES", "REDUCE_RANGE", "Int8Linear", "int8_problem", "quantize_int8"]
