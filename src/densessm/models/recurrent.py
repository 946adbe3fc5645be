"""What every recurrent LM here shares: input checks, the step bookkeeping of a carried state, and the
``GenerationMixin`` hooks that make ``generate()`` decode through a :class:`~densessm.cache.RecurrentCache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from densessm.cache import CacheIdentity, RecurrentCache
from densessm.compiled_decoding import CompiledDecoder


def check_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    vocab_size: int,
    hidden_size: int,
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
        if input_ids.dtype not in (torch.int32, torch.int64):
            input_ids = input_ids.long()
        if not torch.compiler.is_compiling():  # a captured step cannot read values (its tokens are the model's own)
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


def check_embeds(inputs_embeds: torch.Tensor, weight_dtype: torch.dtype, mask: torch.Tensor | None) -> None:
    """``inputs_embeds`` must be in the model's dtype (unless autocast casts it) and finite where it is real;
    masked positions may hold anything, since they are never read."""
    if torch.compiler.is_compiling():
        return
    if inputs_embeds.dtype != weight_dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
        raise ValueError(
            f"inputs_embeds is {inputs_embeds.dtype} but the model's weights are {weight_dtype}: "
            f"pass inputs_embeds.to({weight_dtype})"
        )
    real = inputs_embeds if mask is None else torch.where(mask[..., None], inputs_embeds, 0)
    if not bool(torch.isfinite(real).all()):
        raise ValueError("inputs_embeds holds NaN or infinite values at real (unmasked) positions")


def check_chunk_size(chunk_size: object) -> None:
    """A chunk size, if given, is a positive integer (it only schedules the computation: any one gives the same
    result, and modes that do not cut the input into chunks ignore it)."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be >= 1 (a positive integer), got {chunk_size!r}")


def check_labels(labels: object, expected_shape: tuple[int, ...], vocab_size: int, ignore_index: int) -> torch.Tensor:
    """LM labels: integer ids in ``[0, vocab_size)`` or ``ignore_index``, shaped like the input; returned as
    int64 (narrow integer dtypes are widened)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor of token ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer token ids (or {ignore_index} to ignore a position), got {labels.dtype}"
        )
    if labels.shape != expected_shape:
        raise ValueError(f"labels must have shape {expected_shape}, got {tuple(labels.shape)}")
    labels = labels.long()
    if not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"label {value} is out of range: labels are token ids in [0, {vocab_size}) or {ignore_index} "
                "(a position without loss)"
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
        """Advance the cache's counters past this call's tokens.

        A carried cache's positions are advanced in place (a captured decode step needs fixed addresses);
        inside a compiled step the Python step counter is left to the caller
        (:class:`densessm.compiled_decoding.CompiledDecoder`), since reading it would specialise the
        compiled code on its value.
        """
        if self.cache is None:
            return
        consumed = length if self.mask is None else self.mask.long().sum(-1)
        if self.carried:
            self.cache.positions.add_(consumed)
        else:
            self.cache.positions = self.start + consumed
        if not torch.compiler.is_compiling():
            self.cache.steps += length


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
            f"position_ids must have shape [{batch}, {length}] (or [1, {length}]), one per input token, "
            f"got {tuple(position_ids.shape)}"
        )
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must be integers, got dtype {position_ids.dtype}")


def prepare_step(
    backbone: RecurrentBackbone,
    batch: int,
    length: int,
    hidden: torch.Tensor,
    cache: RecurrentCache | None,
    use_cache: bool,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> StepInputs:
    """Create or check the cache and derive the mask and positions of this call's tokens (``hidden`` is the
    embedded input: its dtype and device are the computation's).

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
    return StepInputs(cache, carried, mask, start, position_ids.to(device))


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

    def state_identity(self) -> CacheIdentity:
        """This model as a cache records it: family, the configuration fields of the state, and a fingerprint
        of the weights (recomputed only when a weight has changed)."""
        pinned = self.__dict__.get("_pinned_identity")
        if pinned is not None:
            return pinned
        config = self.config
        fields = json.dumps({name: getattr(config, name) for name in config.state_fields}, sort_keys=True)
        named = list(self.named_parameters())
        key = (fields, tuple((t.data_ptr(), t._version, t.device) for _, t in named))
        memo = self.__dict__.get("_identity_memo")
        if memo is None or memo[0] != key:
            memo = (key, CacheIdentity(config.model_type, fields, weights_fingerprint(named)))
            self.__dict__["_identity_memo"] = memo
        return memo[1]

    def pin_state_identity(self) -> None:
        """Freeze the identity as it is now: for inference transformations (fused or prepacked weights) that
        change how the weights are stored but not the function, so the model still accepts its caches."""
        if "_pinned_identity" not in self.__dict__:
            self.__dict__["_pinned_identity"] = self.state_identity()

    def _known_identity(self, identity: object) -> bool:
        """Whether ``identity`` is one this model made or already accepted: the object itself, so the steps of a
        decode loop skip the comparison (a weight changed in place since is not noticed there)."""
        memo = self.__dict__.get("_identity_memo")
        return any(
            identity is known
            for known in (
                self.__dict__.get("_pinned_identity"),
                self.__dict__.get("_accepted_identity"),
                None if memo is None else memo[1],
            )
        )

    def check_cache(self, cache: object, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise unless ``cache`` can carry this model's state for ``batch`` rows computed in ``dtype`` on
        ``device``.

        An empty cache takes this model's identity (the state it will hold is this model's). A carried one
        must have been made by this model (family, configuration, weights) unless its identity was dropped,
        and hold exactly the tensors this model's layers keep.
        """
        if not isinstance(cache, RecurrentCache):
            raise TypeError(f"cache must be a densessm RecurrentCache, got {type(cache).__name__}")
        num_layers = self.config.num_hidden_layers
        if len(cache) != num_layers:
            raise ValueError(f"cache holds the state of {len(cache)} layers but the model has {num_layers}")
        if cache.is_empty:
            cache.identity = self.state_identity()
            return
        if cache.identity is not None and not self._known_identity(cache.identity):
            if not isinstance(cache.identity, CacheIdentity):
                raise ValueError(f"cache.identity must be a CacheIdentity or None, got {type(cache.identity).__name__}")
            problem = cache.identity.mismatch(self.state_identity())
            if problem is not None:
                raise ValueError(
                    f"this cache does not belong to this model: {problem}; compute the state with this model "
                    "(or, if you know it fits, set cache.identity = None to skip this check)"
                )
            self.__dict__["_accepted_identity"] = cache.identity  # the next steps with it skip the comparison
        _check_state(cache, self.state_layout(dtype), batch, dtype, device)


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

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        """Feed only the tokens the state has not consumed yet."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if cache is not None and not isinstance(cache, RecurrentCache):
            raise TypeError(f"cache must be a densessm RecurrentCache, got {type(cache).__name__}")
        if cache is not None and not cache.is_empty:
            if input_ids.shape[1] <= cache.get_seq_length():
                raise ValueError(
                    f"the cache already holds {cache.get_seq_length()} tokens and input_ids has "
                    f"{input_ids.shape[1]}: pass the full sequence with at least one token the state has not "
                    "consumed (e.g. keep the state of a prompt without its last token)"
                )
            input_ids = input_ids[:, cache.get_seq_length() :]
            kwargs.pop("inputs_embeds", None)
            kwargs.pop("position_ids", None)
        elif kwargs.get("inputs_embeds") is not None:
            input_ids = None
        model_inputs = {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask}
        model_inputs.update(
            {k: v for k, v in kwargs.items() if k not in ("next_sequence_length", "is_first_iteration")}
        )
        return model_inputs

    def causal_lm_output(
        self,
        outputs: BaseModelOutputWithPast,
        labels: torch.Tensor | None,
        logits_to_keep: int,
        return_dict: bool | None,
        **loss_kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits of the backbone's output (or of its last ``logits_to_keep`` positions) and, with ``labels``,
        the shifted LM loss."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            ignore_index = loss_kwargs.get("ignore_index", -100)
            labels = check_labels(labels, tuple(logits.shape[:2]), self.config.vocab_size, ignore_index)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        if not return_dict:
            output = (logits,) + tuple(x for x in (outputs.cache, outputs.hidden_states) if x is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
