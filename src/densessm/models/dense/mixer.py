"""The contract between the dense stack and a family's mixer.

The DenseSSM idea is one thing for every family: layer ``l`` receives what the ``m`` layers below it hand
up, a selective-transition gate of its own input picks from it, and hidden fusion adds it in. The stack
(:class:`~densessm.models.dense.stack.DenseSSMModel`) owns that: the forward skeleton, the modes, the
history of the layers below, the cache and the one place where the state advances. A family supplies only
its *mixer*, the sequence operator of one layer, with this signature::

    out, handoff, new_state = mixer(x, shallow, call, state)

- ``x [B, L, H]``: the layer's normed input;
- ``shallow``: what the layers below handed up to this one, oldest first, each a tuple of
  ``handoff_arity`` tensors (DenseRetNet: its un-fused ``(k, v)``; DenseMamba: its state sequence);
- ``call``: this forward call's :class:`MixerCall` (mask, positions, mode, chunk size, how many layers
  above read this one, whether the state is kept, and the family's per-call tensors);
- ``state``: the layer's carried state (a dict of tensors named by the family's ``state_layout``), or None;
- ``handoff``: a list with one item per reader above (``call.readers`` of them; reader ``i`` takes item
  ``i - 1``), each a tuple of ``handoff_arity`` tensors;
- ``new_state``: the layer's state after this input (None unless ``call.output_state``).

A mixer may update ``state`` in place when no gradient is needed (decoding), and return the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

LayerState = dict[str, torch.Tensor]
Handoff = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class MixerCall:
    """What every layer's mixer needs to know about one forward call (made once per call, not per layer)."""

    mask: torch.Tensor | None  # [B, L] bool of real tokens; None when every token is real
    position_ids: torch.Tensor  # [B, L] position of each token among its row's real tokens
    mode: str  # one of the family's mixer modes
    chunk_size: int | None  # chunk length of a chunkwise mixer (None: the mixer chooses it)
    output_state: bool  # the state is kept (a cache): return it
    shared: Any = None  # the family's per-call tensors (e.g. rotation tables), see DenseSSMModel.call_constants


class Mixer(nn.Module):
    """Base of a family's mixer: the sequence operator of one layer (see the module docstring).

    ``handoff_arity``: how many tensors one handed-up item holds. ``readers``: set by the stack, the number
    of layers above that read this one (``min(m, L - 1 - l)``), so a mixer hands up exactly what is read.
    """

    handoff_arity: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self.readers = 0

    def forward(
        self, x: torch.Tensor, shallow: list[Handoff], call: MixerCall, state: LayerState | None
    ) -> tuple[torch.Tensor, list[Handoff], LayerState | None]:
        raise NotImplementedError


__all__ = ["Handoff", "LayerState", "Mixer", "MixerCall"]
