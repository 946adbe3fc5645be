"""The recurrent state of a whole model, as ``generate()``'s cache.

A recurrent model's cache is its state: a fixed set of tensors per layer whose size does not grow with
the sequence. This class holds them explicitly (named tensors per layer, plus the per-row count of real
tokens already consumed, which gives the next positions), and offers what ``GenerationMixin`` asks of a
cache: reorder for beam search, repeat/select along the batch, the number of steps seen. Nothing is
hidden in module attributes, so a state can be copied, reordered, saved and restored.

A state means something only to the model that computed it: the same tensors read by another model (or
by another family, whose layers expect other tensors) give fluent nonsense. So a cache made by a model
carries that model's :class:`CacheIdentity`, a saved cache keeps it in the file, and a model given a
cache checks it (see :meth:`densessm.models.recurrent.RecurrentBackbone.check_cache`). Experts who know
better can drop the identity (``cache.identity = None``, or ``RecurrentCache.load(..., check_model=False)``):
the model then checks only the structure of the state.

A state also means something only after the tokens it consumed. ``generate(input_ids, cache=...)`` is handed
the whole sequence (or only the new tokens, with an attention mask over the whole sequence) and feeds only what
the state has not consumed yet, so a cache of another prompt of the same length would silently continue that
prompt. A cache therefore keeps a per-row digest of the real tokens
it consumed (:func:`digest_tokens`, a polynomial hash: a few integer operations per call), and ``generate()``
checks the sequence it is given against it. A prompt can also come as embeddings (``inputs_embeds``), which
name no token: so the cache keeps a second digest, of the input vectors it consumed bit for bit
(:func:`digest_embeddings`), made whether the input came as ids (their embeddings) or as vectors, and
``generate(inputs_embeds=..., cache=...)`` checks the vectors it is given against that one.

The class is a ``transformers.Cache``, so code that asks ``isinstance(cache, Cache)`` (and transformers'
exporters, which register every ``Cache`` subclass they find, keeping this module's registration) treats it
as one. It defines every method and property of that protocol itself, with what it means for a fixed-size
state; the key/value operations (``update``, ``crop`` of past tokens, mask sizes, layer offloading) are
refused with the reason. It does not build on
``Cache.__init__`` or any base implementation, whose per-layer objects it does not have, so a new release of
transformers cannot change it from below (the tests list the protocol and fail on a method it has not defined).

It is also a registered pytree node, so ``torch.export`` takes it as an input and returns it as an output: the
leaves are the state tensors, the positions and the step counter (an integer: pass ``Dim.DYNAMIC`` for it, see
:meth:`RecurrentCache.dynamic_shapes`, or the program holds only for the count it was traced with). The identity
and the digests belong to the eager model's checks and are not part of the tree: a cache an exported
program returns is unchecked and records no digests.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from transformers import Cache

from densessm.errors import UsageError
from densessm.files import DestinationExistsError, atomic_write_bytes, check_flag, check_link, check_path

_FORMAT = "densessm.RecurrentCache/2"
_UNCHECKED_FORMATS = ("densessm.RecurrentCache/1",)  # no identity recorded: readable with check_model=False
_KEY = re.compile(r"layers\.(0|[1-9][0-9]{0,8})\.([A-Za-z_][A-Za-z0-9_]{0,63})")
_COUNT = re.compile(r"0|[1-9][0-9]{0,17}")
_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DIGEST_MODULUS = 2**31 - 1  # a prime below 2**31: the product of two residues fits in int64
_DIGEST_BASE = 1_000_003
_DIGESTS = re.compile(r"(0|[1-9][0-9]{0,9})(,(0|[1-9][0-9]{0,9}))*")

Layout = list[dict[str, tuple[tuple[int, ...], torch.dtype]]]
"""Per layer: tensor name -> (shape without the batch dimension, dtype)."""


@dataclass(frozen=True)
class CacheIdentity:
    """What a state belongs to: the model family, the configuration fields that shape and give meaning to
    the state (canonical JSON), and a fingerprint of the weights the state depends on."""

    model_type: str
    config: str
    weights: str

    def __copy__(self) -> CacheIdentity:
        return self  # immutable: copies of a cache share it, so a model recognises it without comparing

    def __deepcopy__(self, memo: dict) -> CacheIdentity:
        return self

    def mismatch(self, model: CacheIdentity) -> str | None:
        """How this (a cache's) identity differs from ``model``'s, as a phrase; None if they agree."""
        if self.model_type != model.model_type:
            return f"it was made by a {self.model_type} model and this is a {model.model_type} model"
        mine, theirs = json.loads(self.config), json.loads(model.config)
        if mine != theirs:
            fields = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            shown = ", ".join(f"{k}={mine.get(k)!r} (this model: {theirs.get(k)!r})" for k in fields[:4])
            return f"it was made by a {self.model_type} model of another configuration: {shown}"
        if self.weights != model.weights:
            return (
                f"it was made by a {self.model_type} model with other weights (fingerprint {self.weights[:12]}, "
                f"this model's {model.weights[:12]})"
            )
        return None


class RecurrentCache(Cache):
    """Per-layer recurrent state ``{name: tensor [B, ...]}`` of a stack of ``num_layers`` layers.

    ``identity`` names the model the state belongs to (None: unchecked, see the module docstring).
    """

    is_compileable = True  # a decode step can be captured: see densessm.compiled_decoding
    is_croppable = False  # a state cannot be rolled back: see crop()

    def __init__(self, num_layers: int, identity: CacheIdentity | None = None):  # not Cache's: see the module doc
        if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
            raise TypeError(f"num_layers must be an int (the model's number of layers), got {num_layers!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (the model's number of layers), got {num_layers}")
        self.layers: list[dict[str, torch.Tensor] | None] = [None] * int(num_layers)
        self.positions: torch.Tensor | None = None  # [B] real tokens consumed per row
        self.steps = 0  # tokens consumed per row, padding included
        self.identity = identity
        # [B] digest of the real tokens among the first `digest_steps` consumed (see digest_tokens); None: unknown.
        # It covers every consumed token while the state is advanced eagerly by token ids; a compiled decode step
        # or an input given as embeddings leaves it covering the tokens before them.
        self.token_digest: torch.Tensor | None = None
        self.digest_steps = 0
        # [B] the same for the input vectors consumed (see digest_embeddings), over `embedding_digest_steps`
        self.embedding_digest: torch.Tensor | None = None
        self.embedding_digest_steps = 0
        # why the state is unusable: an error raised in the middle of a step, after some layers had taken theirs
        self.broken: str | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        made_by = "" if self.identity is None else f", model_type={self.identity.model_type}"
        return f"{type(self).__name__}(layers={len(self.layers)}, steps={self.steps}{made_by})"

    # ---- the transformers.Cache protocol, as a fixed-size state means it ---------------------------------------

    @property
    def is_linear(self) -> list[bool]:
        """Every layer keeps a recurrent (linear-attention-like) state: ``generate()`` then slices no positions."""
        return [True] * len(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        """Whether every layer holds a state (the model fills a cache on its first call; nothing to pre-allocate)."""
        return not self.is_empty and all(layer is not None for layer in self.layers)

    @property
    def is_empty(self) -> bool:
        # decided by structure, not by the step counter, so a compiled step does not specialise on the count
        return self.positions is None

    @property
    def batch_size(self) -> int:
        """Rows of the state; -1 before the first call fills it (as ``transformers.Cache`` says)."""
        return -1 if self.positions is None else self.positions.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the state consumed per row, padding included (``generate()`` feeds what comes after them); the
        same for every layer, which ``layer_idx`` must name."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx {layer_idx!r} names no layer of this {len(self.layers)}-layer cache")
        return self.steps

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.steps

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: no maximum, the state does not grow with the sequence."""
        return -1

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """Whether layer ``layer_idx`` (None: every layer) holds a state from earlier calls."""
        if self.is_empty:
            return False
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        return all(layer is not None for layer in layers)

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        return False

    def update(self, *args, **kwargs):
        raise NotImplementedError(
            "a RecurrentCache holds no keys and values to append to: the model that made it advances the state "
            "itself, in its forward call with cache=..."
        )

    def update_conv_state(self, *args, **kwargs):
        self.update()

    def update_recurrent_state(self, *args, **kwargs):
        self.update()

    def update_indexer(self, *args, **kwargs):
        self.update()

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        raise NotImplementedError(self._by_name(layer_idx))

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        raise NotImplementedError(self._by_name(layer_idx))

    def _by_name(self, layer_idx: int) -> str:
        held = sorted(self.layers[layer_idx] or {}) if 0 <= layer_idx < len(self.layers) else []
        return (
            f"a RecurrentCache names each layer's state tensors by what they are: read cache.layers[{layer_idx}], a "
            f"dict holding {', '.join(held) or 'nothing yet'}"
        )

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        raise ValueError(
            "a RecurrentCache has no past keys for an attention mask to cover: the state already holds the past, "
            "and the model masks only the tokens of the current call"
        )

    def early_initialization(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a RecurrentCache is filled by its model's first call (model(..., use_cache=True)); it has no "
            "heads x head_dim key/value layout to allocate ahead"
        )

    def offload(self, layer_idx: int = 0, only_non_sliding: bool = True) -> None:
        raise NotImplementedError(
            "a RecurrentCache does not offload layer by layer (its state is small and does not grow): move it "
            "whole with cache.to(device)"
        )

    def prefetch(self, layer_idx: int = 0, only_non_sliding: bool = True) -> None:
        self.offload()

    def dynamic_shapes(self, batch: object = None, steps: object = None) -> list:
        """The ``dynamic_shapes`` entry of this cache for ``torch.export``, one per leaf of its tree, in order: the
        batch dimension of every tensor as ``batch`` (e.g. a ``torch.export.Dim``; None: static) and the step
        counter as ``steps`` (None: ``Dim.DYNAMIC``, so the program continues a state of any length)."""
        rows = None if batch is None else {0: batch}
        layers = [None if layer is None else dict.fromkeys(sorted(layer), rows) for layer in self.layers]
        return [layers, None if self.positions is None else rows, torch.export.Dim.DYNAMIC if steps is None else steps]

    def layout(self) -> Layout:
        """Per layer: name -> (shape without the batch dimension, dtype) of each state tensor."""
        return [{name: (tuple(t.shape[1:]), t.dtype) for name, t in (layer or {}).items()} for layer in self.layers]

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
        if self.token_digest is not None:
            self.token_digest = fn(self.token_digest)
        if self.embedding_digest is not None:
            self.embedding_digest = fn(self.embedding_digest)

    def _check_rows(self, indices: object, what: str, same_batch: bool = False) -> None:
        """Row indices into the state, checked before any tensor changes (an index out of range would
        otherwise be a bare IndexError, or leave some layers reordered and others not)."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"{what} must be a tensor of row indices, got {type(indices).__name__}")
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(
                f"{what} must be a 1-D tensor of integer row indices, got {indices.dtype} of shape "
                f"{tuple(indices.shape)}"
            )
        batch = self.batch_size
        if batch < 0:
            return  # nothing held yet: nothing to reorder
        if same_batch and indices.shape[0] != batch:
            raise ValueError(
                f"{what} picks {indices.shape[0]} rows, but the cache holds {batch}: reordering keeps them all"
            )
        if indices.numel():
            low, high = (int(value) for value in torch.aminmax(indices))
            if low < 0 or high >= batch:
                raise ValueError(
                    f"{what} holds row {low if low < 0 else high}, but the cache holds {batch} rows (0 to {batch - 1})"
                )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` (beam search), in place: the tensors keep their addresses (a captured
        decode step reads them there)."""
        self._check_rows(beam_idx, "beam_idx", same_batch=True)

        def reorder(t: torch.Tensor) -> torch.Tensor:
            picked = t.index_select(0, beam_idx.to(t.device))
            return picked if t.requires_grad else t.copy_(picked)

        self._map_batch(reorder)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._check_rows(indices, "indices")
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int (copies of each row), got {repeats!r}")
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: str | torch.device) -> RecurrentCache:
        """Move the state to ``device``, in place; returns the cache. Only a device: the states keep the dtypes
        the model's layout gives them, and positions and digests are integers a cast would ruin."""
        if not isinstance(device, str | torch.device):
            raise TypeError(
                f"RecurrentCache.to takes a device (such as 'cpu' or 'cuda'), got {device!r}: a cache keeps the "
                "dtypes its model gives it"
            )
        device = _usable_device(device)
        if device.type == "meta":
            raise ValueError("a cache cannot be moved to the meta device: its state would be lost")
        self._map_batch(lambda t: t.to(device))
        return self

    def reset(self) -> None:
        self.layers = [None] * len(self.layers)
        self.positions = None
        self.steps = 0
        self.token_digest = None
        self.digest_steps = 0
        self.embedding_digest = None
        self.embedding_digest_steps = 0

    def __copy__(self) -> RecurrentCache:
        """``copy.copy`` gives an independent copy (:meth:`clone`): a shallow one would share the state tensors,
        which a step updates in place, while each copy counted its own steps."""
        return self.clone()

    def __deepcopy__(self, memo: dict) -> RecurrentCache:
        """``copy.deepcopy`` gives :meth:`clone` (detached): torch cannot deep-copy a state that is part of an
        autograd graph (the cache of a forward run with gradients enabled)."""
        return self.clone()

    def clone(self) -> RecurrentCache:
        """An independent copy, e.g. to branch several continuations from one prefix. Detached from any
        autograd graph: a clone is a state to continue from (the cache of a forward run with gradients
        enabled clones too)."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.layers = [
            None if layer is None else {name: _detached(t) for name, t in layer.items()} for layer in self.layers
        ]
        twin.positions = _detached(self.positions)
        twin.token_digest = _detached(self.token_digest)
        twin.embedding_digest = _detached(self.embedding_digest)
        return twin

    def crop(self, tokens_to_remove: int) -> None:
        """Nothing to do for 0 tokens; any other count is refused: a state cannot be rolled back token by token."""
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "a recurrent state cannot be rolled back token by token; clone() the cache before the tokens "
                "you may want to undo"
            )

    def activate_past_recording(self) -> None:
        """Refused: recording the past is for a later crop(), which a recurrent state cannot do."""
        self.crop(-1)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the state and the identity of its model to a safetensors file, atomically (a prompt cache
        to restore later); an existing file is replaced only with ``overwrite``. Returns the path."""
        check_flag(overwrite, "overwrite")
        path = check_path(path, "cache file")
        if path.is_dir():
            raise UsageError(f"{path} is a directory: name the cache file to write, e.g. {path / 'prompt.safetensors'}")
        if self.is_empty:
            raise ValueError("nothing to save: the cache holds no state yet")
        if self.broken is not None:
            raise ValueError(f"nothing to save: {self.broken}")
        if any(layer is None for layer in self.layers):
            raise ValueError("cannot save a partial state: some layers hold no state")
        if self.identity is None:
            raise ValueError(
                "this cache records no model identity (it was built by hand, or loaded or marked unchecked): "
                "set cache.identity = model.state_identity() for the model it belongs to, then save"
            )
        check_link(path, "cache file", overwrite)  # a symlink loop or one to nowhere: named, not "already exists"
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise _exists(path)
        # the counters load checks, checked here: a cache whose steps were set by hand was saved, then never loaded
        from densessm.models.recurrent import check_digests  # the models import this module

        check_digests(self, None)
        positions = self.positions
        if not isinstance(positions, torch.Tensor) or positions.dtype != torch.long or positions.dim() != 1:
            raise ValueError(
                "cannot save the state: cache.positions must be an int64 tensor [batch] (real tokens consumed per "
                f"row), got {positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}"
            )
        if positions.numel() and (bool((positions < 0).any()) or int(positions.max()) > self.steps):
            raise ValueError(
                f"cannot save the state: cache.positions {positions.tolist()[:8]} must lie in [0, cache.steps="
                f"{self.steps}] (real tokens consumed per row, at most the tokens consumed)"
            )
        # contiguous copies: a state tensor may be a strided view sharing memory with another (safetensors refuses)
        tensors = {f"layers.{i}.{name}": _copy(t) for i, layer in enumerate(self.layers) for name, t in layer.items()}
        nonfinite = next((key for key, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()), None)
        if nonfinite is not None:  # load refuses such a file: saving it would keep nothing usable
            raise ValueError(f"cannot save the state: tensor {nonfinite} holds NaN or infinite values")
        tensors["positions"] = _copy(self.positions)
        layout = [
            {name: [list(shape), _dtype_name(dtype)] for name, (shape, dtype) in layer.items()}
            for layer in self.layout()
        ]
        metadata = {
            "format": _FORMAT,
            "tensors_sha256": _checksum(tensors),
            "num_layers": str(len(self.layers)),
            "steps": str(self.steps),
            "layout": json.dumps(layout, separators=(",", ":")),
            "model_type": self.identity.model_type,
            "config": self.identity.config,
            "weights": self.identity.weights,
        }
        for digest, field, steps_field, covered in (
            (self.token_digest, "token_digest", "digest_steps", self.digest_steps),
            (self.embedding_digest, "embedding_digest", "embedding_digest_steps", self.embedding_digest_steps),
        ):
            if digest is not None:
                metadata[field] = ",".join(str(v) for v in digest.tolist())
                metadata[steps_field] = str(covered)
        try:
            return atomic_write_bytes(path, save(tensors, metadata=metadata), overwrite=overwrite)
        except DestinationExistsError:  # another writer created it meanwhile
            raise _exists(path) from None

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", check_model: bool = True) -> RecurrentCache:
        """Read a state written by :meth:`save`.

        The file's header is checked against its metadata before any tensor is read (names, shapes, dtypes,
        one batch size throughout), so a crafted or damaged file is a ValueError naming the problem and
        never allocates more than the file holds. A state holding NaN or infinite values is refused (no
        finite model computes one). ``check_model=False`` drops the recorded identity (and reads files of
        the first format, which had none): any model whose state has this layout will then accept the cache.
        """
        check_flag(check_model, "check_model")
        path = Path(path)
        device = _usable_device(device)
        if device.type == "meta":  # a state without values: every read of it would fail later, far from here
            raise ValueError("a cache cannot be loaded onto the meta device (its state would hold no values)")
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory: name the cache file to read")
        if not path.exists():
            raise FileNotFoundError(f"no cache file at {path}")
        if not path.is_file():
            raise ValueError(f"{path} is not a regular file (a pipe, socket or device): name the cache file to read")
        try:
            with safe_open(str(path), "pt", device="cpu") as f:
                metadata = f.metadata() or {}
                header = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
                shapes = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in header.items()}
                identity, num_layers, steps, layout = _check_header(path, metadata, shapes, check_model)
                batch = shapes["positions"][0][0]
                digest, digest_steps = _digest(path, metadata, batch, steps, "token_digest", "digest_steps")
                embedding_digest = _digest(path, metadata, batch, steps, "embedding_digest", "embedding_digest_steps")
                tensors = {key: f.get_tensor(key) for key in shapes}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"corrupt or truncated cache file {path}: {err}") from err
        positions = tensors.pop("positions")
        if bool((positions < 0).any()) or int(positions.max()) > steps:
            raise ValueError(
                f"{path}: positions {positions.tolist()[:8]} must lie in [0, steps={steps}] (real tokens consumed "
                "per row, at most the tokens consumed)"
            )
        for key, tensor in sorted(tensors.items()):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"{path}: tensor {key} holds NaN or infinite values; a state computed by a model with finite "
                    "weights is finite: compute it again"
                )
        recorded = metadata.get("tensors_sha256")  # checked after the named checks; older files record none
        if recorded is not None and recorded != _checksum({**tensors, "positions": positions}):
            raise ValueError(
                f"{path}: the state's bytes do not match the checksum recorded when it was saved (the file was "
                "damaged or edited): compute the state again"
            )
        cache = cls(num_layers, identity)
        cache.steps = steps
        cache.positions = positions
        cache.token_digest, cache.digest_steps = digest, digest_steps
        cache.embedding_digest, cache.embedding_digest_steps = embedding_digest
        cache.layers = [{name: tensors[f"layers.{i}.{name}"] for name in layer} for i, layer in enumerate(layout)]
        if device.type != "cpu":
            try:
                cache.to(device)
            except (RuntimeError, AssertionError) as err:  # torch's ways of saying the device is not there
                raise ValueError(f"cannot place the cache on {device}: {err}") from None
        return cache


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names and bytes, in name order: a flipped bit in a state passes every structural
    check (a wrong answer, silently) but not this."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(memoryview(tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


# ---- the pytree node (torch.export) ---------------------------------------------------------------------------


def _flatten_with_keys(cache: RecurrentCache) -> tuple[list[tuple[pytree.GetAttrKey, object]], None]:
    """Children: the layers (a list of dicts, names sorted so that equal layouts give equal trees), the positions
    and the step counter."""
    layers = [None if layer is None else {name: layer[name] for name in sorted(layer)} for layer in cache.layers]
    children = {"layers": layers, "positions": cache.positions, "steps": cache.steps}
    return [(pytree.GetAttrKey(name), child) for name, child in children.items()], None


def _flatten(cache: RecurrentCache) -> tuple[list[object], None]:
    children, context = _flatten_with_keys(cache)
    return [child for _, child in children], context


def _unflatten(children, context: None) -> RecurrentCache:
    layers, positions, steps = children
    cache = RecurrentCache(len(layers))
    cache.layers, cache.positions, cache.steps = list(layers), positions, steps
    return cache


pytree.register_pytree_node(
    RecurrentCache,
    _flatten,
    _unflatten,
    serialized_type_name=f"{RecurrentCache.__module__}.{RecurrentCache.__qualname__}",
    flatten_with_keys_fn=_flatten_with_keys,
)


def _exists(path: Path) -> DestinationExistsError:
    return DestinationExistsError(f"{path} already exists; nothing was written (pass overwrite=True to replace it)")


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this process can allocate on, or a ValueError naming it (checked before
    any tensor moves: a failure half-way would leave the state split over two devices)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use e.g. 'cpu', 'cuda' or 'cuda:1'") from err
    if device.type != "meta":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, ValueError) as err:
            raise ValueError(f"device {str(device)!r} is not available here ({err})") from None
    return device


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if not isinstance(tensor, torch.Tensor):
        return copy.copy(tensor)  # None, or a value the model's checks will name when the cache is used
    return tensor.detach().clone()


def _powers(count: int, device: torch.device) -> torch.Tensor:
    """``BASE**k mod MODULUS`` for ``k < count``, by doubling (a few operations, not one per token)."""
    powers = torch.ones(1, dtype=torch.long, device=device)
    while powers.numel() < count:
        powers = torch.cat([powers, powers * pow(_DIGEST_BASE, powers.numel(), _DIGEST_MODULUS) % _DIGEST_MODULUS])
    return powers[:count]


def digest_tokens(
    tokens: torch.Tensor, mask: torch.Tensor | None = None, start: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row, a digest of the real tokens of ``tokens [B, L]`` (``mask [B, L]`` bool: which are real; None:
    all), continuing ``start [B]``, the digest of the tokens before them: the polynomial hash
    ``start·b^n + Σ (t_i + 1)·b^(n-i) mod (2^31 - 1)`` over the row's ``n`` real tokens.

    Exact integer arithmetic on any device, so a digest computed over a whole prompt equals one computed
    piece by piece; padding is skipped, so it depends only on the real tokens. It tells sequences apart (two
    different ones agree with a chance of about 1 in 2 billion), it is no cryptographic hash.
    """
    modulus = _DIGEST_MODULUS
    values = tokens.long() % modulus + 1  # + 1: token 0 counts
    mask = None if mask is None else mask.bool()
    if start is None:
        start = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    if values.shape[1] == 1:  # a decode step: start·b + t
        new = (start * _DIGEST_BASE + values[:, 0]) % modulus
        return new if mask is None else torch.where(mask[:, 0], new, start)
    real = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    count = real.sum(-1)
    powers = _powers(values.shape[1] + 1, values.device)
    after = count[:, None] - real.long().cumsum(-1)  # real tokens after each one in its row
    terms = torch.where(real, values * powers[after] % modulus, 0)
    return (start * powers[count] % modulus + terms.sum(-1) % modulus) % modulus


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> integer view


@functools.cache
def _vector_weights(size: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random factors in [1, modulus) that reduce a vector of ``size`` values to one."""
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, _DIGEST_MODULUS, (size,), generator=generator, dtype=torch.long).to(device)


def embedding_values(vectors: torch.Tensor, block: int = 2**20) -> torch.Tensor:
    """``vectors [..., H]`` each reduced to one integer in [0, modulus): its values' bits read as integers,
    weighted by fixed factors, summed mod the modulus. Exact integer arithmetic on the bits, so equal vectors
    give equal values on any device, and two different vectors agree with a chance of about 1 in 2 billion.
    Computed over ``block`` values at a time, so a long prompt needs no large temporary."""
    size = vectors.shape[-1]
    bits = vectors.detach().contiguous().view(_BITS[vectors.element_size()]).reshape(-1, size)
    weights = _vector_weights(size, vectors.device)
    out = torch.empty(bits.shape[0], dtype=torch.long, device=vectors.device)
    rows = max(1, block // size)
    for first in range(0, bits.shape[0], rows):
        part = bits[first : first + rows].long() % _DIGEST_MODULUS * weights % _DIGEST_MODULUS
        out[first : first + rows] = part.sum(-1) % _DIGEST_MODULUS  # size * modulus < 2**63 for any real width
    return out.view(vectors.shape[:-1])


def digest_embeddings(
    vectors: torch.Tensor, mask: torch.Tensor | None = None, start: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row, a digest of the real input vectors of ``vectors [B, L, H]``, as :func:`digest_tokens` digests
    ids (each vector standing for a token through :func:`embedding_values`): the embeddings of a prompt's ids,
    or any vectors given as ``inputs_embeds``, bit for bit."""
    return digest_tokens(embedding_values(vectors), mask, start)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_FLOAT_NAMES = {code: _dtype_name(dtype) for code, dtype in _FLOATS.items()}  # safetensors code -> torch name


def _count(path: Path, metadata: dict[str, str], field: str) -> int:
    value = metadata.get(field)
    if not isinstance(value, str) or not _COUNT.fullmatch(value):
        raise ValueError(f"{path}: metadata field {field!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_header(
    path: Path, metadata: dict[str, str], shapes: dict[str, tuple[tuple[int, ...], str]], check_model: bool
) -> tuple[CacheIdentity | None, int, int, list[dict[str, tuple[int, ...]]]]:
    """Validate a cache file's metadata against its tensor header; returns (identity, layers, steps, layout)."""
    found = metadata.get("format")
    if found not in (_FORMAT, *_UNCHECKED_FORMATS):
        raise ValueError(f"{path} is not a densessm recurrent-state file (format {found!r})")
    if found != _FORMAT and check_model:
        raise ValueError(
            f"{path} was saved in the older format {found}, which does not record the model that made it: "
            "compute the state again and save it, or pass check_model=False if you know which model it belongs to"
        )
    num_layers, steps = _count(path, metadata, "num_layers"), _count(path, metadata, "steps")
    if "positions" not in shapes:
        raise ValueError(f"{path} lacks the positions tensor")
    positions_shape, positions_dtype = shapes["positions"]
    if len(positions_shape) != 1 or positions_dtype != "I64" or positions_shape[0] < 1:
        raise ValueError(
            f"{path}: positions must be a non-empty int64 vector [batch], got {positions_dtype} {list(positions_shape)}"
        )
    batch = positions_shape[0]
    by_layer: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, (shape, dtype) in shapes.items():
        if key == "positions":
            continue
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (a state tensor is named layers.<index>.<name>)")
        index = int(match[1])
        if index >= num_layers:
            raise ValueError(f"{path}: tensor {key} names layer {index}, but the file declares {num_layers} layers")
        if dtype not in _FLOATS:
            raise ValueError(f"{path}: tensor {key} has dtype {dtype}; a state is floating point")
        if len(shape) < 1 or shape[0] != batch:
            raise ValueError(f"{path}: tensor {key} has shape {list(shape)}, not [batch={batch}, ...] as positions")
        by_layer.setdefault(index, {})[match[2]] = (shape[1:], dtype)
    if num_layers == 0 or len(by_layer) != num_layers:
        missing = sorted(set(range(min(num_layers, len(by_layer) + 8))) - by_layer.keys())[:8]
        raise ValueError(
            f"{path} declares {num_layers} layers but holds the state of {len(by_layer)}"
            + (f" (no tensor for layers {missing})" if missing else "")
        )
    layout = _declared_layout(path, metadata, num_layers, found == _FORMAT)
    if layout is not None:
        for index in range(num_layers):
            declared = layout[index]
            stored = {name: [list(shape), _FLOAT_NAMES[dtype]] for name, (shape, dtype) in by_layer[index].items()}
            if declared != stored:
                raise ValueError(
                    f"{path}: layer {index} holds {_describe(stored)} but its metadata declares {_describe(declared)}"
                )
    names = {frozenset(layer) for layer in by_layer.values()}
    if len(names) != 1:
        raise ValueError(f"{path}: the layers hold different sets of tensors: {sorted(sorted(n) for n in names)}")
    identity = None
    if check_model:
        identity = _identity(path, metadata)
    return identity, num_layers, steps, [by_layer[i] for i in range(num_layers)]


def _json(path: Path, metadata: dict[str, str], field: str) -> object:
    """The JSON value of a metadata field; None if absent or not JSON (the caller names what it expected)."""
    raw = metadata.get(field)
    if not isinstance(raw, str):
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None
    except RecursionError:
        raise ValueError(f"{path}: metadata field {field!r} is nested too deeply to be read") from None


def _digest(
    path: Path, metadata: dict[str, str], batch: int, steps: int, field: str, steps_field: str
) -> tuple[torch.Tensor | None, int]:
    """The digest a file records in ``field`` (one value per row) and the steps it covers (``steps_field``);
    (None, 0) if none."""
    raw, covered = metadata.get(field), metadata.get(steps_field)
    if raw is None and covered is None:
        return None, 0
    if not isinstance(raw, str) or not _DIGESTS.fullmatch(raw) or raw.count(",") + 1 != batch:
        raise ValueError(f"{path}: metadata field {field!r} must hold {batch} comma-separated integers")
    digest_steps = _count(path, metadata, steps_field)
    if digest_steps > steps:
        raise ValueError(f"{path}: metadata field {steps_field!r} ({digest_steps}) exceeds steps ({steps})")
    digest = torch.tensor([int(v) for v in raw.split(",")], dtype=torch.long)
    if bool((digest >= _DIGEST_MODULUS).any()):
        raise ValueError(f"{path}: metadata field {field!r} holds a value of {_DIGEST_MODULUS} or more")
    return digest, digest_steps


def _describe(layer: dict[str, list]) -> str:
    return ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in sorted(layer.items())) or "nothing"


def _declared_layout(path: Path, metadata: dict[str, str], num_layers: int, required: bool) -> list[dict] | None:
    if metadata.get("layout") is None and not required:
        return None
    layout = _json(path, metadata, "layout")
    valid = isinstance(layout, list) and all(
        isinstance(layer, dict)
        and all(
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry[0])
            and entry[1] in _FLOAT_NAMES.values()
            for entry in layer.values()
        )
        for layer in layout
    )
    if not valid:
        raise ValueError(f"{path}: metadata field 'layout' is missing or not a list of per-layer tensor shapes")
    if len(layout) != num_layers:
        raise ValueError(f"{path}: metadata declares {num_layers} layers but its layout describes {len(layout)}")
    return [{name: [shape, dtype] for name, (shape, dtype) in layer.items()} for layer in layout]


def _identity(path: Path, metadata: dict[str, str]) -> CacheIdentity:
    model_type, config, weights = (metadata.get(k) for k in ("model_type", "config", "weights"))
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{path}: metadata lacks the model_type that made the state")
    fields = _json(path, metadata, "config")
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: metadata field 'config' is missing or not a JSON object")
    if not isinstance(weights, str) or not re.fullmatch(r"[0-9a-f]{16,128}", weights):
        raise ValueError(f"{path}: metadata field 'weights' is missing or not a hexadecimal fingerprint")
    return CacheIdentity(model_type, config, weights)


__all__ = ["CacheIdentity", "Layout", "RecurrentCache", "digest_embeddings", "digest_tokens", "embedding_values"]
