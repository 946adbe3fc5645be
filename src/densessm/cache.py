"""The recurrent state of a whole model, as ``generate()``'s cache.

A recurrent model's cache is its state: a fixed set of tensors per layer whose size does not grow with
the sequence. This class holds them explicitly (named tensors per layer, plus the per-row count of real
tokens already consumed, which gives the next positions), and offers what ``GenerationMixin`` asks of a
cache: reorder for beam search, repeat/select along the batch, the number of steps seen. Nothing is
hidden in module attributes, so a state can be copied, reordered, saved and restored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_FORMAT = "densessm.RecurrentCache/1"


class RecurrentCache:
    """Per-layer recurrent state ``{name: tensor [B, ...]}`` of a stack of ``num_layers`` layers."""

    is_compileable = True  # a decode step can be captured: see densessm.compiled_decoding
    is_croppable = False

    def __init__(self, num_layers: int):
        self.layers: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # [B] real tokens consumed per row
        self.steps = 0  # tokens consumed per row, padding included

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, steps={self.steps})"

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.layers)

    @property
    def is_empty(self) -> bool:
        # decided by structure, not by the step counter, so a compiled step does not specialise on the count
        return self.positions is None

    @property
    def batch_size(self) -> int | None:
        return None if self.positions is None else self.positions.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.steps

    def _tensors(self) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
        for layer in self.layers:
            if layer is not None:
                for name in layer:
                    yield layer, name

    def _map_batch(self, fn) -> None:
        for layer, name in self._tensors():
            layer[name] = fn(layer[name])
        if self.positions is not None:
            self.positions = fn(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` (beam search), in place: the tensors keep their addresses (a captured
        decode step reads them there)."""

        def reorder(t: torch.Tensor) -> torch.Tensor:
            picked = t.index_select(0, beam_idx.to(t.device))
            return picked if t.requires_grad else t.copy_(picked)

        self._map_batch(reorder)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.layers = [None] * len(self.layers)
        self.positions = None
        self.steps = 0

    def clone(self) -> RecurrentCache:
        """An independent copy, e.g. to branch several continuations from one prefix."""
        return copy.deepcopy(self)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent state cannot be rolled back token by token; clone() the cache before the tokens "
            "you may want to undo"
        )

    def activate_past_recording(self) -> None:
        self.crop(0)

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (a prompt cache that can be restored later)."""
        if self.is_empty:
            raise ValueError("nothing to save: the cache holds no state yet")
        tensors = {
            f"layers.{i}.{name}": layer[name].contiguous() for i, layer in enumerate(self.layers) for name in layer
        }
        tensors["positions"] = self.positions
        metadata = {"format": _FORMAT, "num_layers": str(len(self.layers)), "steps": str(self.steps)}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RecurrentCache:
        """Read a state written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no cache file at {path}")
        try:
            with safe_open(str(path), "pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"corrupt or truncated cache file {path}: {err}") from err
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a densessm recurrent-state file (format {metadata.get('format')!r})")
        cache = cls(int(metadata["num_layers"]))
        cache.steps = int(metadata["steps"])
        cache.positions = tensors.pop("positions")
        for key, tensor in tensors.items():
            _, index, name = key.split(".", 2)
            if cache.layers[int(index)] is None:
                cache.layers[int(index)] = {}
            cache.layers[int(index)][name] = tensor
        if any(layer is None for layer in cache.layers):
            raise ValueError(f"{path} lacks the state of some layers")
        return cache
