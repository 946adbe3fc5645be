"""What every recurrent LM here shares: input checks, the step bookkeeping of a carried state, and the
``GenerationMixin`` hooks that make ``generate()`` decode through a :class:`~densessm.cache.RecurrentCache`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import numbers
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateOutput
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from densessm.cache import CacheIdentity, RecurrentCache, digest_embeddings, digest_tokens, embedding_values
from densessm.compiled_decoding import CompiledDecoder
from densessm.ops.linear_cross_entropy import linear_cross_entropy

# The models holding a list of their parameters (see RecurrentBackbone._weights_key). Registering a parameter
# or a submodule anywhere drops those lists (they may be stale), so the per-step check walks a list instead of
# the module tree, and a list never keeps replaced weights alive.
_listed: weakref.WeakSet = weakref.WeakSet()


def _structure_changed(*_) -> None:
    if _listed:
        for backbone in list(_listed):
            backbone.__dict__.pop("_parameter_list", None)
        _listed.clear()


torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)
_data_ptr, _version = torch.Tensor.data_ptr, torch.Tensor._version.__get__


_TRUSTED = contextvars.ContextVar("densessm_trusted_values", default=False)


@contextlib.contextmanager
def trusted_values() -> Iterator[None]:
    """Forward passes whose token ids and labels were validated where they were made (``densessm train``'s
    token blocks: ids from a tokenizer the model's vocabulary covers, checked at the start; labels copied from
    them) skip the range checks that read values back to the host: on a GPU each is a synchronisation per step,
    which leaves the GPU idle while the host waits. Types and shapes are still checked."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def values_trusted() -> bool:
    """Whether this forward pass runs under :func:`trusted_values`."""
    return _TRUSTED.get()


def check_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    vocab_size: int,
    hidden_size: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | None, int, int]:
    """Validate a forward call's inputs; returns ``(input_ids, batch, length)`` or raises a ValueError naming the
    problem. Narrow integer ids (int8, uint8, int16...) come back widened to int64, which the embedding takes."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"empty input: input_ids has shape {tuple(input_ids.shape)}")
        if device is not None and input_ids.device != device and "meta" in (input_ids.device.type, device.type):
            # the range check below cannot read meta values; other pairs are torch's to refuse, naming both
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}: move them there")
        if input_ids.dtype not in (torch.int32, torch.int64):
            input_ids = input_ids.long()
        if torch.compiler.is_exporting():  # kept in the program as an assertion node (it cannot read the id)
            torch._assert_async(
                ((input_ids >= 0) & (input_ids < vocab_size)).all(),
                f"a token id is out of range for vocab_size {vocab_size}: token ids must be in [0, {vocab_size})",
            )
        elif not torch.compiler.is_compiling() and not values_trusted():  # a captured step cannot read values
            low, high = torch.aminmax(input_ids)
            low, high = int(low), int(high)
            if low < 0 or high >= vocab_size:
                raise ValueError(f"token id {low if low < 0 else high} is out of range for vocab_size {vocab_size}")
        batch, length = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            kind = inputs_embeds.dtype if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"inputs_embeds must be a floating-point tensor, got {kind}")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [batch, length, {hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"empty input: inputs_embeds has shape {tuple(inputs_embeds.shape)}")
        batch, length = inputs_embeds.shape[:2]
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor)
        or attention_mask.dim() != 2
        or attention_mask.shape[0] != batch
        or attention_mask.shape[1] < length
    ):
        shape = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        )
        raise ValueError(f"attention_mask must have shape [{batch}, >= {length}] (one entry per token), got {shape}")
    return input_ids, batch, length


def check_embeds_dtype(inputs_embeds: torch.Tensor, weight_dtype: torch.dtype) -> None:
    if inputs_embeds.dtype != weight_dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
        raise ValueError(
            f"inputs_embeds is {inputs_embeds.dtype} but the model's weights are {weight_dtype}: "
            f"pass inputs_embeds.to({weight_dtype})"
        )


def check_embeds(inputs_embeds: torch.Tensor, weight_dtype: torch.dtype, mask: torch.Tensor | None) -> None:
    """``inputs_embeds`` must be in the model's dtype (unless autocast casts it) and finite where it is real;
    masked positions may hold anything, since they are never read."""
    if torch.compiler.is_compiling():
        return
    check_embeds_dtype(inputs_embeds, weight_dtype)
    real = inputs_embeds if mask is None else torch.where(mask[..., None], inputs_embeds, 0)
    if not bool(torch.isfinite(real).all()):
        raise ValueError("inputs_embeds holds NaN or infinite values at real (unmasked) positions")


CACHE_ALIASES = ("past_key_values", "cache_params")
"""transformers' names for what our models call ``cache``: ``generate()`` passes ``past_key_values``; Mamba's
forward took ``cache_params``. Taken as ``cache``, so code written for those models keeps its state."""

IGNORED_FORWARD_ARGUMENTS = frozenset({"output_attentions", "cache_position"})
"""Arguments transformers passes to every model that ours have no use for: there are no attention weights to
return, and positions come from the cache and the mask."""


LOSS_ARGUMENTS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})
"""What the causal LM's forward passes on to its loss (the Trainer's token count for gradient accumulation)."""


def plain_linear(head: torch.nn.Module) -> bool:
    """Whether a loss may read ``head``'s weight instead of calling it: not where the head computes something
    else (int8, prepacked or adapter layers, a subclass, a hook, a replaced forward), nor under DeepSpeed ZeRO-3,
    which gathers a partitioned weight only inside its module's forward. Those get their logits made (and
    dropped)."""
    modules = torch.nn.modules.module
    return (
        type(head) is torch.nn.Linear
        and "forward" not in vars(head)  # accelerate's offloading hooks replace the instance's forward
        and head.bias is None
        and not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks or head._backward_pre_hooks)
        and not (modules._global_forward_hooks or modules._global_forward_pre_hooks)
        and not (modules._global_backward_hooks or modules._global_backward_pre_hooks)
        and not is_deepspeed_zero3_enabled()
    )


def given_cache(cache: object, kwargs: dict) -> object:
    """``cache``, or the state given under one of transformers' names for it (:data:`CACHE_ALIASES`), popped from
    ``kwargs``; the same state under two names is fine, two different ones are refused."""
    given = "cache"
    for name in CACHE_ALIASES:
        other = kwargs.pop(name, None)
        if other is None or other is cache:
            continue
        if cache is not None:
            raise ValueError(f"two caches were given ({given} and {name}): pass the state once, as cache=")
        cache, given = other, name
    return cache


def check_no_other_arguments(model: torch.nn.Module, kwargs: dict, accepted: frozenset[str] = frozenset()) -> None:
    """Refuse keyword arguments the forward does not read (a misspelt ``attention_masks=`` would otherwise be
    dropped without a word and the call run without it); ``accepted`` names those a caller passes on."""
    unknown = sorted(set(kwargs) - accepted - IGNORED_FORWARD_ARGUMENTS)
    if unknown:
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword argument(s): {', '.join(unknown)}")


MAX_CHUNK_SIZE = 2**31 - 1
"""The largest chunk size taken: torch's sizes beyond it fail with its own words."""


def check_chunk_size(chunk_size: object, name: str = "chunk_size") -> None:
    """A chunk size, if given, is a positive integer (it only schedules the computation: any one gives the same
    result, and modes that do not cut the input into chunks ignore it)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):  # numpy's ints fail in torch's split
        raise ValueError(
            f"{name} must be a Python int, got {chunk_size!r}, a {type(chunk_size).__name__} (pass int(...))"
        )
    if chunk_size < 1:
        raise ValueError(f"{name} must be >= 1 (a positive integer), got {chunk_size!r}")
    if chunk_size > MAX_CHUNK_SIZE:
        raise ValueError(f"{name} must be at most {MAX_CHUNK_SIZE} (2**31 - 1), got {chunk_size!r}")


def check_labels(
    labels: object, expected_shape: tuple[int, ...], vocab_size: int, ignore_index: int, name: str = "labels"
) -> torch.Tensor:
    """LM labels (or the ``shift_labels`` given as the loss's targets): integer ids in ``[0, vocab_size)`` or
    ``ignore_index``, shaped like the input; returned as int64 (narrow integer dtypes are widened)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of token ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} must be integer token ids (or {ignore_index} to ignore a position), got {labels.dtype}"
        )
    if labels.shape != expected_shape:
        raise ValueError(f"{name} must have shape {expected_shape}, got {tuple(labels.shape)}")
    labels = labels.long().contiguous()  # transformers' loss views them flat
    if not torch.compiler.is_compiling() and not values_trusted():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"{'label' if name == 'labels' else name} {value} is out of range: {name} are token ids in "
                f"[0, {vocab_size}) or {ignore_index} (a position without loss)"
            )
    return labels


@dataclass
class StepInputs:
    """One forward call's view of the sequence: which tokens are real and where it starts."""

    cache: RecurrentCache | None  # the state to read and update (None: stateless call)
    carried: bool  # the cache already holds a state from earlier calls
    mask: torch.Tensor | None  # [B, L] bool of real tokens, None when all are real
    start: torch.Tensor  # [B] real tokens consumed before this call
    position_ids: torch.Tensor  # [B, L] position of each token among the row's real tokens
    tokens: torch.Tensor | None = None  # [B, L] the token ids (None: the input came as embeddings)
    vectors: torch.Tensor | None = None  # [B, L] each input vector as one integer (None: not digested)

    def hide_padding(self, hidden: torch.Tensor) -> torch.Tensor:
        """Zero the padded positions of the input: they are never read, but a NaN or inf there would reach the
        real tokens through any product that "masks" by multiplying with 0 (``0 * nan = nan``). A selection,
        not a product, and none at all without padding."""
        return hidden if self.mask is None else torch.where(self.mask[..., None], hidden, 0)

    def piece(self, start: int, end: int) -> StepInputs:
        """The view of tokens ``[start, end)`` of this call (the stack's chunk-by-chunk schedule)."""
        mask = None if self.mask is None else self.mask[:, start:end]
        if mask is not None and not torch.compiler.is_compiling() and bool(mask.all()):
            mask = None  # nothing to hide in this piece: the shared (cheaper) path
        return dataclasses.replace(self, mask=mask, position_ids=self.position_ids[:, start:end])

    def finish(self, length: int) -> None:
        """Advance the cache's counters and token digest past this call's tokens.

        A carried cache's positions are advanced in place (a captured decode step needs fixed addresses);
        inside a compiled step the Python step counter is left to the caller
        (:class:`densessm.compiled_decoding.CompiledDecoder`), since reading it would specialise the
        compiled code on its value, and the digest is left as it is (it then covers the tokens before).
        """
        if self.cache is None:
            return
        consumed = length if self.mask is None else self.mask.long().sum(-1)
        exporting = torch.compiler.is_exporting()  # an exported program mutates nothing it is given
        if self.carried and not exporting:
            self.cache.positions.add_(consumed)
        else:
            self.cache.positions = self.start + consumed
        if not torch.compiler.is_compiling():
            self._advance_digest(length)
        if exporting or not torch.compiler.is_compiling():  # exported: a symbolic count, an output of the program
            self.cache.steps += length

    def _advance_digest(self, length: int) -> None:
        """Extend the cache's digests (of token ids, and of input vectors) by this call's tokens, each if it
        covers every token before them (a compiled step, or embeddings for the token digest, leave it covering
        fewer: it then stays as it is)."""
        cache = self.cache
        cache.token_digest, cache.digest_steps = self._extended(
            cache.token_digest, cache.digest_steps, self.tokens, length
        )
        cache.embedding_digest, cache.embedding_digest_steps = self._extended(
            cache.embedding_digest, cache.embedding_digest_steps, self.vectors, length
        )

    def _extended(
        self, digest: torch.Tensor | None, covered: int, values: torch.Tensor | None, length: int
    ) -> tuple[torch.Tensor | None, int]:
        if not self.carried:
            fresh = values is not None and self.cache.steps == 0
            return (digest_tokens(values, self.mask), length) if fresh else (None, 0)
        if (
            values is not None
            and digest is not None
            and covered == self.cache.steps
            and digest.shape == self.start.shape
        ):
            return digest_tokens(values, self.mask, digest.to(values.device)), covered + length
        return digest, covered


def _mask_of(attention_mask: torch.Tensor, length: int, device: torch.device) -> torch.Tensor | None:
    """This call's ``[B, L]`` bool mask of real tokens, or None when every token is real (the cheaper shared
    path). Outside a compiled step the values are checked: 1 (or True) marks a real token, 0 a padded one."""
    mask = attention_mask[:, -length:].to(device)
    if torch.compiler.is_compiling():  # no host reads in a captured step: the mask is generate()'s own
        return mask.bool()
    if mask.dtype == torch.bool:
        full = bool(mask.all())
    else:
        if mask.is_complex():
            raise ValueError(f"attention_mask must hold 1 for real tokens and 0 for padding, got dtype {mask.dtype}")
        binary, full = torch.stack([((mask == 0) | (mask == 1)).all(), (mask == 1).all()]).tolist()
        if not binary:
            value = mask[(mask != 0) & (mask != 1)][0].item()
            raise ValueError(
                f"attention_mask must hold 1 for real tokens and 0 for padding, found {value!r} (an additive or "
                "4-D attention mask is not what this model takes)"
            )
    return None if full else mask.bool()


def _check_position_ids(position_ids: object, batch: int, length: int) -> None:
    if not isinstance(position_ids, torch.Tensor):
        raise ValueError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(
            f"position_ids must have shape [{batch}, {length}]{f' (or [1, {length}])' if batch != 1 else ''}, one per "
            "input token, "
            f"got {tuple(position_ids.shape)}"
        )
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must be integers, got dtype {position_ids.dtype}")


def _first(values: list, shown: int = 8) -> str:
    return f"{values[:shown]}{' ...' if len(values) > shown else ''}"


def _check_position_values(
    position_ids: torch.Tensor, mask: torch.Tensor | None, start: torch.Tensor, cached: bool
) -> None:
    """Refuse positions that disagree with what the layers compute: retention decays one step per real token and
    a cache counts the real tokens it consumed, so a row's positions must count up by one over its real tokens
    (no gap, repeat or restart: packed documents would silently read each other's state) and, where a cache is
    kept, continue the cache's count (decoding rotates its queries from that count). Without a cache, a row may
    start at any position >= 0 (rotations compare only differences)."""
    batch, length = start.shape[0], position_ids.shape[1]
    real = torch.ones(batch, length, dtype=torch.bool, device=start.device) if mask is None else mask
    derived = start[:, None] + real.long().cumsum(-1) - 1
    given = position_ids.expand(batch, -1).long()
    offset = torch.where(real, given - derived, 0)
    low = torch.where(real, offset, torch.iinfo(torch.long).max).amin(-1)
    high = torch.where(real, offset, torch.iinfo(torch.long).min).amax(-1)
    has_real = real.any(-1)
    negative = (real & (given < 0)).any(-1)
    wrong = has_real & ((low != high) | (cached & (low != 0)) | negative)
    if not bool(wrong.any()):
        return
    row = int(wrong.nonzero()[0, 0])
    shown = given[row][real[row]].tolist()
    expected = derived[row][real[row]].tolist()
    if bool(negative[row]):
        problem = "holds a negative position"
    elif low[row] != high[row]:
        problem = "must count up by one per real token (no gap, repeat or restart: pack documents as separate rows)"
    else:
        problem = "must continue the cache's count of real tokens (pass use_cache=False to shift every position)"
    raise ValueError(
        f"position_ids of row {row} {problem}: got {_first(shown)} at its real tokens, this model's positions are "
        f"{_first(expected)}"
    )


def prepare_step(
    backbone: RecurrentBackbone,
    batch: int,
    length: int,
    hidden: torch.Tensor,
    cache: RecurrentCache | None,
    use_cache: bool,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    input_ids: torch.Tensor | None = None,
) -> StepInputs:
    """Create or check the cache and derive the mask and positions of this call's tokens (``hidden`` is the
    embedded input: its dtype and device are the computation's, and it extends the cache's digest of input
    vectors; ``input_ids`` extend its token digest).

    ``attention_mask`` may be longer than the input (``generate()`` passes the whole history): its last
    ``length`` columns belong to this call.
    """
    device = hidden.device
    compiling = torch.compiler.is_compiling()
    if cache is None and use_cache:
        # no identity inside a compiled region: fingerprinting reads the weights on the host
        cache = RecurrentCache(backbone.config.num_hidden_layers, None if compiling else backbone.state_identity())
    elif cache is not None and not compiling:  # a compiled step's cache is checked before it (CompiledDecoder)
        backbone.check_cache(cache, batch, hidden.dtype, device)
    carried = cache is not None and not cache.is_empty
    mask = None if attention_mask is None else _mask_of(attention_mask, length, device)
    start = cache.positions if carried else torch.zeros(batch, dtype=torch.long, device=device)
    if position_ids is None:
        if mask is None:
            position_ids = start[:, None] + torch.arange(length, device=device)
        else:
            position_ids = start[:, None] + mask.long().cumsum(-1) - 1
    elif not compiling:
        _check_position_ids(position_ids, batch, length)
        _check_position_values(position_ids.to(device), mask, start, cache is not None)
    # the input vectors as integers, only where the vector digest will be extended by them (a fresh cache, or one
    # whose digest covers every step so far): a server's batch cache keeps none, and its steps skip the work
    # (never inside a compiled step: reading cache.steps there would specialise the compiled code on its value)
    extended = (
        not compiling
        and cache is not None
        and (not carried or (cache.embedding_digest is not None and cache.embedding_digest_steps == cache.steps))
    )
    vectors = embedding_values(hidden) if extended else None
    return StepInputs(cache, carried, mask, start, position_ids.to(device), input_ids, vectors)


def weights_fingerprint(named: list[tuple[str, torch.Tensor]], samples: int = 64) -> str:
    """A cheap fingerprint of a set of weights: names, shapes and ``samples`` evenly strided values of each
    tensor (rounded to bfloat16, so a copy of the model in another precision has the same fingerprint).

    It tells two models apart, not two versions that differ in a few weights; its cost does not grow with
    the model's size beyond one small read per tensor. Values that cannot be read here (meta or otherwise
    placeholder tensors of an offloaded or sharded model) count by name and shape only.
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}{list(tensor.shape)};".encode())
        values = tensor.detach()
        if type(values) is torch.Tensor and values.layout == torch.strided and not values.is_meta and values.numel():
            flat = values.reshape(-1)
            picked = flat[:: max(1, flat.numel() // samples)][:samples].to(torch.bfloat16).cpu()
            digest.update(picked.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


class RecurrentBackbone:
    """What the base model of a family (the stack that owns the state) knows about its state: the layout of
    its tensors, the identity of the model, and the checks of a cache handed to it.

    A family provides ``state_layout``; its config class names the ``state_fields`` that give the state its
    meaning.
    """

    # `config`: the family configuration (a PreTrainedConfig with `state_fields`), set by PreTrainedModel

    def state_layout(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape without the batch dimension, dtype) of each layer's state when computing in ``dtype``."""
        raise NotImplementedError

    def _weights_key(self) -> tuple:
        """What changes when a weight changes: each parameter's address and version counter (an in-place
        update, ``load_state_dict`` or ``.to()`` changes one of them; a replaced parameter is another).

        Cheap enough for every eager step with a cache (about 0.1 µs per parameter tensor): a pass over a list
        of the parameters, which registering a parameter or submodule anywhere drops (see ``_listed``). Not
        seen: a parameter put into a module's ``_parameters`` directly, bypassing registration (``.to()`` does
        so only under ``torch.__future__.set_overwrite_module_params_on_conversion(True)``)."""
        listed = self.__dict__.get("_parameter_list")
        if listed is None or listed[0] != id(self):  # id: a deep copy of the model has a list of its own
            listed = (id(self), list(self.parameters()))
            self.__dict__["_parameter_list"] = listed
            _listed.add(self)
        params = listed[1]
        return tuple(map(_data_ptr, params)), tuple(map(_version, params))

    def state_identity(self) -> CacheIdentity:
        """This model as a cache records it: family, the configuration fields of the state, and a fingerprint
        of the weights; recomputed when a weight has changed, the same object until then (so a cache check
        compares identities only after a change)."""
        key = self._weights_key()
        pinned = self.__dict__.get("_pinned_identity")
        if pinned is not None:
            if pinned[1] == key:
                return pinned[0]
            del self.__dict__["_pinned_identity"]  # a weight changed since: the identity follows the weights again
        memo = self.__dict__.get("_identity_memo")
        if memo is None or memo[0] != key:
            config = self.config
            fields = json.dumps({name: getattr(config, name) for name in config.state_fields}, sort_keys=True)
            identity = CacheIdentity(config.model_type, fields, weights_fingerprint(list(self.named_parameters())))
            memo = (key, identity)
            self.__dict__["_identity_memo"] = memo
        return memo[1]

    def check_cache(self, cache: object, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise unless ``cache`` can carry this model's state for ``batch`` rows computed in ``dtype`` on
        ``device``.

        An empty cache takes this model's identity (the state it will hold is this model's). A carried one
        must have been made by this model (family, configuration, weights) unless its identity was dropped,
        and hold exactly the tensors this model's layers keep.
        """
        if not isinstance(cache, RecurrentCache):
            raise TypeError(f"cache must be a densessm RecurrentCache, got {type(cache).__name__}")
        if cache.broken is not None:
            raise ValueError(cache.broken)
        num_layers = self.config.num_hidden_layers
        if len(cache) != num_layers:
            raise ValueError(f"cache holds the state of {len(cache)} layers but the model has {num_layers}")
        _checked_steps(cache)
        if cache.is_empty:
            cache.identity = self.state_identity()
            return
        identity = cache.identity
        if identity is not None:
            # the model's identity is the same object while its weights are unchanged (a cheap check), so a decode
            # loop compares identities only once; any weight changed since makes it a new object: compared again
            current = self.state_identity()
            accepted = self.__dict__.get("_accepted_identity")
            if identity is not current and (
                accepted is None or accepted[0] is not identity or accepted[1] is not current
            ):
                if not isinstance(identity, CacheIdentity):
                    raise ValueError(f"cache.identity must be a CacheIdentity or None, got {type(identity).__name__}")
                problem = identity.mismatch(current)
                if problem is not None:
                    raise ValueError(
                        f"this cache does not belong to this model: {problem}; compute the state with this model "
                        "(or, if you know it fits, set cache.identity = None to skip this check)"
                    )
                self.__dict__["_accepted_identity"] = (identity, current)
        _check_state(cache, self.state_layout(dtype), batch, dtype, device)
        check_digests(cache, batch)


@contextlib.contextmanager
def state_identity_kept(model: torch.nn.Module) -> Iterator[None]:
    """Keep the state identity of every backbone in ``model`` through an inference transform that stores the same
    weights another way (fused, prepacked, or rounded to int8 as a copy in another precision is), so the model
    still accepts the caches it made before.

    The identity is taken before the transform and tied to the weights as the transform leaves them: any change
    after it (in place, loaded, replaced) drops the kept identity, and the model's caches are then checked
    against its weights again. A transform that fails keeps nothing."""
    backbones = [module for module in model.modules() if isinstance(module, RecurrentBackbone)]
    identities = [backbone.state_identity() for backbone in backbones]
    yield
    for backbone, identity in zip(backbones, identities, strict=True):
        backbone.__dict__["_pinned_identity"] = (identity, backbone._weights_key())


def _check_state(
    cache: RecurrentCache,
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """The structure of a carried state: every layer holds exactly ``layout``'s tensors for ``batch`` rows,
    in its dtypes (any floating dtype under autocast, whose operations cast) and on ``device``."""
    positions = cache.positions
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.dtype != torch.long:
        raise ValueError("cache.positions must be an int64 tensor [batch] (real tokens consumed per row)")
    if positions.shape[0] != batch:
        raise ValueError(f"cache holds {positions.shape[0]} rows but the input has {batch}")
    if positions.device != device:
        raise ValueError(
            f"the cache is on {positions.device} but the model computes on {device}: cache.to({str(device)!r})"
        )
    autocast = torch.is_autocast_enabled(device.type)
    expected = {name: ((batch, *shape), want) for name, (shape, want) in layout.items()}
    inference = positions.is_inference()  # any tensor made under torch.inference_mode()
    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, dict) or layer.keys() != expected.keys():
            held = "nothing" if not isinstance(layer, dict) else ", ".join(sorted(layer)) or "nothing"
            raise ValueError(
                f"layer {index} of the cache holds {held}, but this model's layers keep {', '.join(sorted(expected))}"
                " (a state of another model family?)"
            )
        for name, (shape, want) in expected.items():
            tensor = layer[name]
            if not isinstance(tensor, torch.Tensor) or tensor.shape != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"cache tensor layers.{index}.{name} has shape {got}, this model keeps {shape}")
            if tensor.dtype != want and not (autocast and tensor.is_floating_point()):
                raise ValueError(
                    f"cache tensor layers.{index}.{name} is {tensor.dtype}, but this model, computing in {dtype}, "
                    f"keeps it in {want}: compute the state with the model in the dtype it runs in"
                )
            if tensor.device != device:
                raise ValueError(
                    f"cache tensor layers.{index}.{name} is on {tensor.device} but the model computes on {device}: "
                    f"cache.to({str(device)!r})"
                )
            inference = inference or tensor.is_inference()
    if inference and not torch.is_inference_mode_enabled():
        # found only at the first update, after some layers had taken theirs: the cache would be ruined
        raise ValueError(
            "this cache was filled under torch.inference_mode(), and its tensors can be updated only there: "
            "continue it under torch.inference_mode() too"
        )


def _checked_steps(cache: RecurrentCache) -> int:
    steps = cache.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"cache.steps must be a non-negative int (the tokens the state consumed), got {steps!r}")
    return steps


DIGESTS = (("token_digest", "digest_steps"), ("embedding_digest", "embedding_digest_steps"))
"""A cache's digests of what it consumed, each with the count of steps it covers."""


def check_digests(cache: RecurrentCache, batch: int | None) -> None:
    """Raise unless each of the cache's digests is None or one int64 value per row of ``batch`` (None: the
    cache's own batch) covering a whole number of steps, at most ``cache.steps``: a digest of another shape
    used to be skipped silently, one of another type failed inside the comparison. Shapes and types only (no
    read from the device): every forward given a cache checks them."""
    steps = _checked_steps(cache)
    if batch is None:  # the rows the cache's positions count (their own check names a malformed one)
        positions = cache.positions
        batch = positions.shape[0] if isinstance(positions, torch.Tensor) and positions.dim() == 1 else None
    for field, steps_field in DIGESTS:
        digest, covered = getattr(cache, field), getattr(cache, steps_field)
        if digest is None:
            continue
        rows = (batch,) if batch is not None else digest.shape[:1] if isinstance(digest, torch.Tensor) else None
        if not isinstance(digest, torch.Tensor) or digest.dtype != torch.long or digest.shape != rows:
            kind = (
                f"a {digest.dtype} tensor of shape {tuple(digest.shape)}"
                if isinstance(digest, torch.Tensor)
                else type(digest).__name__
            )
            raise ValueError(
                f"cache.{field} must be an int64 tensor with one value per row of the state or None, got {kind}"
            )
        if isinstance(covered, bool) or not isinstance(covered, int) or covered < 0:
            raise ValueError(
                f"cache.{steps_field} must be a non-negative int, the steps cache.{field} covers, got {covered!r}"
            )
        if covered > steps:
            raise ValueError(
                f"cache.steps is {steps}, but cache.{field} covers {covered} tokens it consumed: cache.steps must "
                "count every token the state consumed"
            )


_GENERATION_REALS = (
    "temperature",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "epsilon_cutoff",
    "eta_cutoff",
    "length_penalty",
    "guidance_scale",
    "diversity_penalty",
)
# the least each count can be: a count below it (or fractional) failed deep in transformers or meant nothing
_GENERATION_COUNTS = {
    "max_new_tokens": 0,
    "min_new_tokens": 0,
    "max_length": 0,
    "min_length": 0,
    "top_k": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
}
_GENERATION_SWITCHES = (
    "do_sample",
    "use_cache",
    "renormalize_logits",
    "remove_invalid_values",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_hidden_states",
    "output_attentions",
)


def check_generation_arguments(args: tuple, kwargs: dict, config: object, vocab_size: int) -> None:
    """Generation arguments that transformers takes without a word although they cannot mean anything: a NaN or
    infinite ``top_p`` (or temperature, length penalty, guidance scale, ...) compares false everywhere and so
    turned the filter off or made every score NaN; a fractional ``max_new_tokens`` was rounded up, a fractional
    or zero ``num_beams`` failed deep inside; a switch given as ``"no"`` (truthy) sampled; an ``eos_token_id``
    outside the vocabulary never stopped the text; ids that are no tensor failed on their ``.device``. Settings
    are taken from the arguments or the generation config."""
    for name, given in (("inputs", args[0] if args else kwargs.get("inputs")), ("input_ids", kwargs.get("input_ids"))):
        if given is not None and not isinstance(given, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(given).__name__}")
    eos = kwargs["eos_token_id"] if "eos_token_id" in kwargs else getattr(config, "eos_token_id", None)
    eos = eos.tolist() if isinstance(eos, torch.Tensor) else eos
    for token in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
            raise ValueError(f"eos_token_id {token!r} is not a token of this model (ids 0..{vocab_size - 1})")
    for name in (*_GENERATION_REALS, *_GENERATION_COUNTS, *_GENERATION_SWITCHES):
        value = kwargs[name] if name in kwargs else getattr(config, name, None)
        if value is None:
            continue
        if name in _GENERATION_SWITCHES and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        if name in _GENERATION_COUNTS:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < _GENERATION_COUNTS[name]:
                raise ValueError(f"{name} must be at least {_GENERATION_COUNTS[name]}, got {value!r}")
        if name in _GENERATION_REALS and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_continuation(
    cache: RecurrentCache,
    consumed: torch.Tensor | None,
    consumed_mask: torch.Tensor | None,
    batch: int,
    consumed_vectors: torch.Tensor | None = None,
) -> None:
    """Raise unless ``cache`` can have consumed the first ``cache.steps`` tokens of a sequence of ``batch`` rows,
    as ``generate(..., cache=cache)`` assumes before feeding only the rest.

    ``consumed``: those tokens' ids ``[batch, steps]`` when the input holds them (None when it holds only the new
    tokens, or embeddings); ``consumed_mask``: their attention-mask columns (None: all real). Per row, the real
    tokens among them must be as many as the cache's positions count (a ``steps`` counter that disagrees would
    re-feed or skip tokens), their digest must equal the cache's where both are known (a cache of another prompt
    of the same length would silently continue that one), and the state must be finite (a NaN state makes every
    next token 0). ``consumed_vectors``: those tokens as input vectors ``[batch, steps, hidden]`` (the prompt's
    ``inputs_embeds``), checked against the cache's digest of the vectors it consumed. One read from the
    device, once per ``generate()``.
    """
    steps = _checked_steps(cache)
    check_digests(cache, None)  # the batch against the input's: the model's cache check
    positions = cache.positions
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.shape[0] != batch:
        return  # the model's cache check names the problem
    device = positions.device
    real = None if consumed_mask is None else consumed_mask.to(device) != 0
    counts = torch.full_like(positions, steps) if real is None else real.long().sum(-1)
    checks = [(counts == positions).all()]
    digest = cache.token_digest
    compared = consumed is not None and isinstance(digest, torch.Tensor) and digest.shape == positions.shape
    if compared:
        covered = cache.digest_steps
        expected = digest_tokens(consumed[:, :covered].to(device), None if real is None else real[:, :covered])
        checks.append((expected == digest.to(device)).all())
    vector_digest = cache.embedding_digest
    vectors_compared = (
        consumed_vectors is not None
        and isinstance(vector_digest, torch.Tensor)
        and vector_digest.shape == positions.shape
    )
    if vectors_compared:
        covered = cache.embedding_digest_steps
        expected = digest_embeddings(
            consumed_vectors[:, :covered].to(device), None if real is None else real[:, :covered]
        )
        checks.append((expected == vector_digest.to(device)).all())
    tensors = [
        (f"layers.{i}.{name}", tensor)
        for i, layer in enumerate(cache.layers)
        if isinstance(layer, dict)
        for name, tensor in layer.items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
    ]
    checks += [torch.isfinite(tensor).all().to(device) for _, tensor in tensors]
    ok = torch.stack(checks).tolist()
    if not ok[0]:
        raise ValueError(
            f"the cache consumed {positions.tolist()[:8]} real tokens per row, but the first {steps} tokens of "
            f"input_ids hold {counts.tolist()[:8]} (per attention_mask): pass the sequence and attention_mask the "
            "cache was computed from (cache.steps counts the tokens it consumed, padding included)"
        )
    if compared and not ok[1]:
        raise ValueError(
            f"input_ids does not begin with the {cache.digest_steps} tokens this cache consumed (their digest "
            "differs): pass the sequence the cache was computed from, or only the new tokens with an attention_mask "
            "over the whole sequence (or, if you know the state fits, set cache.token_digest = None to skip this "
            "check)"
        )
    if vectors_compared and not ok[1 + compared] and consumed is not None:  # ids given, the state made from vectors
        raise ValueError(
            f"input_ids do not begin with the {cache.embedding_digest_steps} input vectors this cache consumed (it "
            "was given inputs_embeds, and these ids embed to other vectors): pass the sequence the cache was "
            "computed from, or only the new tokens with an attention_mask over the whole sequence (or, if you know "
            "the state fits, set cache.embedding_digest = None to skip this check)"
        )
    if vectors_compared and not ok[1 + compared]:
        raise ValueError(
            f"inputs_embeds does not begin with the {cache.embedding_digest_steps} input vectors this cache consumed "
            "(their digest differs): pass the embeddings of the sequence the cache was computed from, or only the "
            "new tokens' with an attention_mask over the whole sequence (or, if you know the state fits, set "
            "cache.embedding_digest = None to skip this check)"
        )
    for (name, _), finite in zip(tensors, ok[len(ok) - len(tensors) :], strict=True):
        if not finite:
            raise ValueError(f"cache tensor {name} holds NaN or infinite values: no finite model computes such a state")


def new_tokens(cache: RecurrentCache, length: int, whole: int, what: str, first: bool) -> int:
    """How many of the input's ``length`` last tokens the carried ``cache`` has not consumed, for a sequence of
    ``whole`` tokens (the attention mask's length: the mask always covers the whole sequence). At the first step
    of ``generate()`` the input is the whole sequence or only its new tokens, nothing in between."""
    steps = _checked_steps(cache)
    new = whole - steps
    if new < 1:
        given = f"{what} has {length}" if whole == length else f"attention_mask has {whole} columns"
        raise ValueError(
            f"the cache already holds {steps} tokens and {given}: pass the whole sequence with at least one token "
            "the state has not consumed (e.g. keep the state of a prompt without its last token), or only the new "
            f"tokens with an attention_mask over the whole sequence ({steps} + new columns)"
        )
    if new > length or (first and new not in (length, length - steps)):
        raise ValueError(
            f"attention_mask has {whole} columns, {what} has {length} and the cache holds {steps} tokens: pass the "
            f"whole sequence ({what} as long as attention_mask) or only the new tokens (attention_mask {steps} "
            f"columns longer than {what}, covering the cache's tokens too)"
        )
    return new


def _checked_count(logits_to_keep: object) -> int:
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, numbers.Integral) or logits_to_keep < 0:
        raise ValueError(
            "logits_to_keep must be a number of last positions (an int >= 0; 0 keeps all) or a 1-D tensor of "
            f"positions, got {logits_to_keep!r}"
        )
    return int(logits_to_keep)


def _checked_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    if positions.dim() != 1 or positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(
            "logits_to_keep as a tensor must list positions (1-D, integers), got "
            f"{positions.dtype} of shape {tuple(positions.shape)}"
        )
    if positions.numel() and not torch.compiler.is_compiling():
        low, high = (int(value) for value in torch.aminmax(positions))
        if low < -length or high >= length:
            raise ValueError(
                f"logits_to_keep lists position {high if high >= length else low}, outside the input's {length} "
                "positions"
            )
    return positions.to(torch.long)


def broken_by(err: BaseException) -> str:
    """Why a cache is unusable after ``err`` was raised in the middle of a step (see :attr:`RecurrentCache.broken`)."""
    what = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"this cache was left half-updated by an error in the middle of an earlier step ({type(err).__name__}"
        f"{': ' + what[:200] if what else ''}): compute the state again from the tokens"
    )


def check_left_padded(attention_mask: object) -> None:
    """Refuse a prompt batch whose padding is on the right: decoding continues every row from its last position,
    so a row ending in padding would continue from a pad token instead of its text, a silently wrong answer
    (transformers only warns)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.numel() == 0:
        return
    ended = attention_mask[:, -1] == 0
    if bool(ended.any()):
        row = int(ended.nonzero()[0, 0])
        if not bool((attention_mask[row] != 0).any()):
            raise ValueError(f"row {row} of the attention_mask holds no real token: give each row a prompt")
        raise ValueError(
            f"row {row} of the attention_mask ends in padding (right padding): generation continues each row from "
            "its last position, so pad the prompts on the left (tokenizer padding_side='left')"
        )


def check_unmasked_padding(input_ids: object, kwargs: dict, config) -> None:
    """Without an attention mask transformers infers one from the padding token, except where that token is also
    the end-of-text token: a batch row ending in it then continued from the padding, silently. Refused: only a
    mask tells padding from text there."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] < 2:
        return
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    eos = set(eos.tolist() if isinstance(eos, torch.Tensor) else eos if isinstance(eos, list | tuple) else [eos])
    if pad is None or int(pad) not in eos:
        return
    ended = input_ids[:, -1] == int(pad)
    if bool(ended.any()):
        row = int(ended.nonzero()[0, 0])
        raise ValueError(
            f"row {row} ends in token {int(pad)}, the padding token and also the end-of-text token, and no "
            "attention_mask was given, so padding cannot be told from text: pass attention_mask (with the padding "
            "on the left)"
        )


class RecurrentGenerationMixin:
    """``GenerationMixin`` hooks for models whose cache is a :class:`RecurrentCache` they create themselves,
    and the LM head's part of their forward."""

    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: the model makes its RecurrentCache

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """Compile the decode steps when asked (``generate(compile_config=...)``), on any device.

        Opt-in rather than automatic on CUDA: the first steps spend tens of seconds compiling.
        """
        return generation_config.compile_config is not None and not generation_config.disable_compile

    def state_identity(self) -> CacheIdentity:
        """The identity this model's caches record: see :meth:`RecurrentBackbone.state_identity`."""
        return self.base_model.state_identity()

    def get_compiled_call(self, compile_config):
        """The decode step for ``generate()``: a :class:`~densessm.compiled_decoding.CompiledDecoder`, built
        once per configuration (``reduce-overhead`` on CUDA: CUDA graphs)."""
        decoder = self.__dict__.get("_compiled_decoder")
        if decoder is None or decoder.compile_config != compile_config:
            decoder = CompiledDecoder(self, compile_config)
            self.__dict__["_compiled_decoder"] = decoder  # not a submodule: keep it out of state_dict and .to()
        return decoder

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """``GenerationMixin``'s expansion of the inputs to one row per beam or returned sequence, extended to a
        carried cache passed to ``generate()``: its rows are repeated the same way (in place, as ``generate()``
        advances a cache it is given), so a cache of the prompts continues every beam of them."""
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        rows = None if input_ids is None else input_ids.shape[0]
        if expand_size > 1 and isinstance(cache, RecurrentCache) and rows is not None and cache.batch_size == rows:
            cache.batch_repeat_interleave(expand_size)
        return super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )

    def generate(self, *args, **kwargs) -> GenerateOutput | torch.LongTensor:
        """``GenerationMixin.generate``. With a carried ``cache``, the input is either the whole sequence (its first
        ``cache.steps`` tokens, which the cache consumed, are checked against the cache's token digest) or only the
        new tokens with an ``attention_mask`` over the whole sequence, as transformers' caches take it."""
        cache = kwargs.get("cache")
        cache = kwargs.get("past_key_values") if cache is None else cache
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "generate() takes no position_ids for this model: it derives each token's position from the "
                "attention_mask and the cache (pass attention_mask for padding)"
            )
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)) is not None:
            raise ValueError(
                "prefill_chunk_size is not taken by this model: pass mode='chunkwise' (and chunk_size=N), which "
                "prefills chunk by chunk inside one forward, holding one chunk's activations at a time"
            )
        check_generation_arguments(args, kwargs, config, self.config.vocab_size)
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask is None:
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            check_unmasked_padding(ids, kwargs, config)
        if isinstance(cache, RecurrentCache) and not cache.is_empty:
            if kwargs.get("use_cache") is False:
                raise ValueError("generate() was given a cache and use_cache=False: pass use_cache=True to continue it")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                # generate() drops an all-ones mask before the first step: its length says what the input holds
                kwargs["_mask_length"] = mask.shape[1]
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: RecurrentCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        _mask_length: int | None = None,
        **kwargs,
    ) -> dict:
        """One step's inputs: what the state has not consumed yet, as ``inputs_embeds`` at the first step when
        ``generate()`` was given them, as token ids otherwise.

        At a decode step ``generate()`` says how many tokens are new (``next_sequence_length``). At the first
        step the attention mask covers the whole sequence (``_mask_length``: the length of the mask
        ``generate()`` was given, which it drops when all ones; no mask: the input is the whole sequence), so the
        input's last ``whole - cache.steps`` tokens are new, and what a carried cache consumed is checked (see
        :func:`check_continuation`). Positions come from the cache and the mask, not from ``position_ids``.
        """
        cache = given_cache(cache, kwargs)
        if cache is not None and not isinstance(cache, RecurrentCache):
            raise TypeError(f"cache must be a densessm RecurrentCache, got {type(cache).__name__}")
        kwargs.pop("position_ids", None)
        if is_first_iteration:  # the mask given, or the one generate() inferred from the padding token
            check_left_padded(attention_mask)
        embeds = inputs_embeds if is_first_iteration else None  # embeddings stand for the prompt only
        inputs, what = (input_ids, "input_ids") if embeds is None else (embeds, "inputs_embeds")
        if cache is not None and not cache.is_empty:
            length = inputs.shape[1]
            if next_sequence_length is not None:
                whole = cache.get_seq_length() + next_sequence_length
            elif attention_mask is not None:
                whole = attention_mask.shape[1]
            else:
                whole = _mask_length if is_first_iteration and _mask_length is not None else length
            new = new_tokens(cache, length, whole, what, bool(is_first_iteration))
            if is_first_iteration:
                if embeds is not None:  # named as such, before the digest of the vectors it changes
                    check_embeds_dtype(embeds, self.get_input_embeddings().weight.dtype)
                steps = cache.get_seq_length()
                holds_ids = new < length and input_ids is not None and input_ids.shape[1] == length
                vectors = embeds[:, :steps] if new < length and embeds is not None else None
                # ids whose token digest does not cover every step the vector digest covers (a state made from
                # embeddings, or continued by some): their embeddings are checked too. A token digest set to None
                # after it covered steps is the expert's override, not a state made from embeddings
                check_digests(cache, None)
                overridden = cache.token_digest is None and cache.digest_steps > 0
                uncovered = cache.token_digest is None or cache.digest_steps < cache.embedding_digest_steps
                if (
                    vectors is None
                    and holds_ids
                    and cache.embedding_digest is not None
                    and uncovered
                    and not overridden
                ):
                    vectors = self.get_input_embeddings()(input_ids[:, :steps])
                check_continuation(
                    cache,
                    input_ids[:, :steps] if holds_ids else None,
                    None if attention_mask is None else attention_mask[:, :steps],
                    inputs.shape[0],
                    vectors,
                )
            inputs = inputs[:, length - new :]
        model_inputs = {
            "input_ids": inputs if embeds is None else None,
            "inputs_embeds": None if embeds is None else inputs,
            "cache": cache,
            "attention_mask": attention_mask,
        }
        # generate() hands every model keyword on (its tokenizer for stop strings, too): forward the ones the
        # forward reads, which refuses any other
        model_inputs.update((k, v) for k, v in kwargs.items() if k in self._forward_parameters())
        return model_inputs

    @classmethod
    @functools.cache
    def _forward_parameters(cls) -> frozenset[str]:
        names = inspect.signature(cls.forward).parameters
        return frozenset(names) | LOSS_ARGUMENTS | IGNORED_FORWARD_ARGUMENTS | frozenset(CACHE_ALIASES)

    def check_head_arguments(
        self,
        input_ids: object,
        inputs_embeds: object,
        labels: object,
        logits_to_keep: object,
        skip_logits: object,
        loss_kwargs: dict,
    ) -> torch.Tensor | None:
        """``labels`` (widened to int64), ``logits_to_keep`` and ``skip_logits`` checked before the backbone runs:
        found after it, an error left a carried cache advanced by the tokens of a call that failed, and a retry fed
        them twice. Returns the labels; inputs of a shape the backbone refuses are left to it."""
        if not isinstance(skip_logits, bool | None):
            raise ValueError(f"skip_logits must be True, False or None, got {skip_logits!r}")
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True returns the loss alone: it needs labels")
        if loss_kwargs.get("shift_labels") is not None and labels is None:
            raise ValueError("shift_labels (the loss's targets) need labels too: without labels no loss is computed")
        given = input_ids if input_ids is not None else inputs_embeds
        if not isinstance(given, torch.Tensor) or given.dim() < 2:
            return labels
        batch, length = given.shape[:2]
        kept = length
        if isinstance(logits_to_keep, torch.Tensor):
            kept = _checked_positions(logits_to_keep, length).shape[0]
        elif logits_to_keep:
            kept = min(_checked_count(logits_to_keep), length)
        if labels is None:
            return None
        ignore_index = loss_kwargs.get("ignore_index", -100)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int (the label of a position without loss): {ignore_index!r}")
        count = loss_kwargs.get("num_items_in_batch")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int | torch.Tensor)):
            raise ValueError(f"num_items_in_batch must be an int or a tensor (the tokens counted), got {count!r}")
        if loss_kwargs.get("shift_labels") is not None:
            loss_kwargs["shift_labels"] = check_labels(
                loss_kwargs["shift_labels"], (batch, kept), self.config.vocab_size, ignore_index, "shift_labels"
            )
        return check_labels(labels, (batch, kept), self.config.vocab_size, ignore_index)

    def causal_lm_output(
        self,
        outputs: BaseModelOutputWithPast,
        labels: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
        skip_logits: bool | None,
        return_dict: bool | None,
        **loss_kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits of the backbone's output (or of its last ``logits_to_keep`` positions, or of the positions a 1-D
        tensor ``logits_to_keep`` lists, as transformers takes it) and, with ``labels``, the shifted LM loss
        (``labels`` and ``logits_to_keep`` as :meth:`check_head_arguments` returned and checked them); with
        ``skip_logits`` the loss alone, scored a chunk of positions at a time."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep.to(torch.long)]
        elif logits_to_keep:
            hidden = hidden[:, -int(logits_to_keep) :]
        logits = loss = None
        if skip_logits and plain_linear(self.lm_head) and self.loss_function is LOSS_MAPPING["ForCausalLM"]:
            loss = linear_cross_entropy(hidden, self.lm_head.weight, labels, **loss_kwargs)
        else:  # a head or a loss of another kind (see plain_linear): its own logits, then dropped
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        if labels is not None and logits is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        if skip_logits:
            logits = None
        if not return_dict:
            output = tuple(x for x in (logits, outputs.cache, outputs.hidden_states) if x is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
