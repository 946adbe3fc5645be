"""What every inference transform builds on: modules that refuse to train or be saved, and fused linears.

A transformed module stores its weights in another form (concatenated, in panels, prepacked): training
it would update copies its original no longer shares, and a checkpoint of it would lack the original
weights, which would then reload randomly initialised. So such a module refuses both itself, whatever
model it sits in.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class InferenceOnlyError(RuntimeError):
    """Training or saving a module that an inference transform made."""


_WHY = "its weights were fused, prepacked or quantized for inference (densessm.inference)"


class InferenceOnly(nn.Module):
    """Mixed into a module made by an inference transform: ``train()``, ``state_dict()`` (so
    ``save_pretrained``) and loading weights into it raise :class:`InferenceOnlyError`; ``eval()`` works."""

    def train(self, mode: bool = True) -> nn.Module:
        if mode:
            raise InferenceOnlyError(f"cannot train {type(self).__name__}: {_WHY}; train the original model instead")
        return super().train(False)

    def state_dict(self, *args, **kwargs):
        raise InferenceOnlyError(f"cannot save {type(self).__name__}: {_WHY}; save the original model instead")

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        raise InferenceOnlyError(
            f"cannot load weights into {type(self).__name__}: {_WHY}; load them into the original model, then "
            "transform it again"
        )

    def conversion_problem(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
        """Why this module's weights cannot follow ``fn`` (what ``nn.Module._apply`` gets from ``.half()``,
        ``.to(dtype or device)``), or None if they can. Weights in a plain layout can."""
        return None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        refuse_conversion(self, fn)
        return super()._apply(fn, recurse)


def refuse_conversion(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise :class:`InferenceOnlyError` if a transformed module of ``model`` cannot follow the conversion
    ``fn``, before any module changes (``nn.Module._apply`` converts the modules one by one: a refusal from the
    first such module would come after the ones before it were converted)."""
    for module in model.modules():
        problem = module.conversion_problem(fn) if isinstance(module, InferenceOnly) else None
        if problem is not None:
            raise InferenceOnlyError(
                f"cannot convert {type(module).__name__}: {problem}; choose the dtype and device first, then "
                "transform (reload the model to use it in another dtype or on another device)"
            )


def _apply_checked(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
    refuse_conversion(model, fn)
    return type(model)._apply(model, fn, recurse)


def seal_for_inference(model: nn.Module) -> nn.Module:
    """What every transform does last to the model it changed: its parameters stop requiring gradients (a
    backward through copies of the weights would update nothing: a silent no-op training step), and a
    conversion of the whole model is checked against its transformed modules before any module changes.
    Returns ``model`` in eval mode."""
    model.requires_grad_(False)
    if not isinstance(vars(model).get("_apply"), functools.partial):
        model._apply = functools.partial(_apply_checked, model)
        model.register_forward_pre_hook(_refuse_training_forward, with_kwargs=True)
    return model.eval()


def _refuse_training_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """A forward that could start a training step (gradients on, and labels given or a parameter made to
    require gradients again) is refused: the transformed modules' weights are copies a step would not update
    (a loss from them has no gradient, and its backward failed with torch's words only). Free under no_grad."""
    if not torch.is_grad_enabled():
        return
    if any(p.requires_grad for p in model.parameters()):
        raise InferenceOnlyError(
            f"cannot train {type(model).__name__}: {_WHY}, and a parameter was made to require gradients again; "
            "train the original model instead"
        )
    if kwargs.get("labels") is not None:
        raise InferenceOnlyError(
            f"cannot train {type(model).__name__}: {_WHY}, so a loss computed with gradients enabled has none to "
            "give; train the original model, or compute the loss under torch.no_grad() to evaluate"
        )


def check_model(model: object, transform: str) -> None:
    """A transform is given a module (``None`` or a path would fail deep inside with an AttributeError)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{transform} takes a model (a torch.nn.Module), got {type(model).__name__}: {model!r:.80}")


def check_count(name: str, value: object, minimum: int = 0) -> None:
    """A transform's size argument is an int of at least ``minimum`` (a string or float would fail deep inside
    with a bare comparison error)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class SiLULinear(nn.Linear):
    """``silu(linear(x))`` as one module, so that a prepacked product can compute the activation in its
    epilogue (:class:`~densessm.inference.prepack.PrepackedLinear`) instead of in a pass of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class FrozenLinear(InferenceOnly, nn.Linear):
    """A linear layer computing several that read one input, their weights stacked. A decode step multiplies a
    few rows by each weight, so every separate product pays a call of its own; concatenated weights stream the
    same bytes in fewer calls."""


class FrozenSiLULinear(InferenceOnly, SiLULinear):
    """:class:`FrozenLinear` followed by silu (every part was followed by it)."""


def frozen_linear(parts: list[nn.Linear], silu: bool = False) -> nn.Linear:
    """One inference-only linear layer computing ``parts`` (stacked: they read one input; biases kept)."""
    weight = torch.cat([p.weight.detach() for p in parts])
    has_bias = any(p.bias is not None for p in parts)
    kind = FrozenSiLULinear if silu else FrozenLinear
    fused = kind(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        biases = [p.bias.detach() if p.bias is not None else weight.new_zeros(p.out_features) for p in parts]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused.eval()


__all__ = [
    "FrozenLinear",
    "FrozenSiLULinear",
    "InferenceOnly",
    "InferenceOnlyError",
    "SiLULinear",
    "frozen_linear",
    "refuse_conversion",
    "seal_for_inference",
]
