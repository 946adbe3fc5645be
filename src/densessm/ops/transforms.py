"""Whether a hand-written autograd function must give way to its plain form.

Our ``torch.autograd.Function`` ops define a backward only: forward-mode AD (a tangent on an input) and
``torch.func``'s transforms (grad, vmap, jvp) need the rules that torch's own operators carry, so the ops run their
plain form under them.
"""

from __future__ import annotations

import torch


def transforms_active(*tensors: torch.Tensor) -> bool:
    """True inside a ``torch.func`` transform, or when any of ``tensors`` carries a forward-mode tangent."""
    if torch._C._are_functorch_transforms_active():
        return True
    return any(torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors)
