"""The dense stack: every DenseSSM family is this stack around its own mixer.

``DenseSSMModel`` owns what the DenseSSM idea means for a stack of layers, once for all families:

- the forward skeleton: input checks, the step bookkeeping (mask, positions, a carried cache), embeddings,
  ``L`` pre-norm residual blocks, the final norm, the outputs;
- the modes: ``auto`` (resolved here, for every family), and ``chunkwise`` for a mixer that has no
  chunkwise form of its own (the whole stack then runs ``chunk_size`` tokens at a time, each chunk from the
  states the previous one left);
- the dense hidden connection's bookkeeping: the history of what the ``m`` layers below handed up, and
  which item each layer reads;
- the cache: its layout (through the family's ``state_layout``) and the one place where it advances.

A family (one folder under ``models/``) supplies a :class:`~densessm.models.dense.mixer.Mixer`, its config,
and a subclass that names its submodules (so its checkpoints keep their names) and builds them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torch._higher_order_ops import scan
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from densessm.cache import RecurrentCache
from densessm.files import check_link
from densessm.models.dense.mixer import Handoff, LayerState, Mixer, MixerCall
from densessm.models.norm import RMSNorm
from densessm.models.precision import at_least_fp32
from densessm.models.recurrent import (
    RecurrentBackbone,
    StepInputs,
    broken_by,
    check_chunk_size,
    check_embeds,
    check_inputs,
    check_no_other_arguments,
    given_cache,
    prepare_step,
    values_trusted,
)
from densessm.modes import MODES, check_mode


class ModuleNames(NamedTuple):
    """The attribute names of a family's submodules: its checkpoints' tensor names depend on them."""

    embeddings: str  # e.g. "embed_tokens"
    block_norm: str  # the norm before each mixer, e.g. "input_layernorm"
    mixer: str  # e.g. "retention"
    final_norm: str  # e.g. "norm"


class DenseBlock(GradientCheckpointingLayer):
    """One layer: ``x + mixer(norm(x), what the layers below hand up)``.

    The handed-up tensors come in as positional arguments and go out as a flat tail of the outputs (not inside
    a list), so that gradient checkpointing, reentrant included, sees every tensor the layer depends on and
    every tensor it hands up."""

    def __init__(self, layer_idx: int, names: ModuleNames, norm: nn.Module, mixer: Mixer, residual_in_fp32: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm_name, self.mixer_name = names.block_norm, names.mixer
        self.add_module(names.block_norm, norm)
        self.add_module(names.mixer, mixer)
        self.residual_in_fp32 = residual_in_fp32

    @property
    def handoff_arity(self) -> int:
        return self._modules[self.mixer_name].handoff_arity

    def forward(self, hidden: torch.Tensor, *shallow: torch.Tensor, call: MixerCall, state: LayerState | None) -> tuple:
        """``(hidden, new state, *handed-up tensors)``: the items of the handoff, flattened (see
        :meth:`handoff_items`)."""
        norm, mixer = self._modules[self.norm_name], self._modules[self.mixer_name]
        items = self.handoff_items(shallow)
        residual = at_least_fp32(hidden) if self.residual_in_fp32 else hidden
        out, handoff, new_state = mixer(norm(hidden.to(norm.weight.dtype)), items, call, state)
        return residual + out, new_state, *(tensor for item in handoff for tensor in item)

    def handoff_items(self, flat: Sequence[torch.Tensor]) -> list[Handoff]:
        """Flat handed-up tensors grouped back into items of ``handoff_arity``."""
        arity = self.handoff_arity
        return [tuple(flat[i : i + arity]) for i in range(0, len(flat), arity)]


class DenseSSMPreTrainedModel(PreTrainedModel):
    """What every DenseSSM model shares as a ``PreTrainedModel``; a family's base class sets ``config_class``
    and ``base_model_prefix``."""

    supports_gradient_checkpointing = True
    _no_split_modules = ["DenseBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """``PreTrainedModel``'s initialisation, and zeros for a layer marked ``zero_init`` (the second layer of a
        selective-transition gate that starts closed: a fresh dense model then computes its plain twin's
        function, and a plain checkpoint loaded into it computes what it computed before)."""
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            init.zeros_(module.weight)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, after asking every module for its state first: a module that
        cannot be saved (an inference transform's, see :mod:`densessm.inference`) refuses before anything is
        written, not halfway through. A ``save_directory`` that is a file is refused (transformers logs it and
        returns, saving nothing: a caller would believe the model saved), and so is a symlink that leads nowhere
        (transformers' ``os.makedirs`` said only "File exists")."""
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"cannot save the model into {save_directory}: it is a file, not a directory")
        check_link(save_directory, "save_directory")
        self.state_dict()
        return super().save_pretrained(save_directory, *args, **kwargs)


class DenseSSMModel(RecurrentBackbone, DenseSSMPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` dense blocks and the final norm (see the module docstring).

    A family sets ``module_names``, ``mixer_class`` and ``mixer_modes`` (the modes its mixer runs itself;
    ``chunkwise`` outside them is run by the stack) and implements ``state_layout``; it may change how the
    embeddings and norms are built, and ``call_constants`` computes per-call tensors every layer shares.
    """

    module_names: ClassVar[ModuleNames]
    mixer_class: ClassVar[type[Mixer]]  # built as mixer_class(config, layer_idx, dense)
    mixer_modes: ClassVar[tuple[str, ...]]
    norm_epsilon: ClassVar[str] = "rms_norm_eps"  # the config field holding the RMSNorms' epsilon
    # auto, with no state kept: the parallel form up to this length, chunkwise beyond it
    auto_parallel_max_length: ClassVar[float] = math.inf
    # auto, continuing a kept state over more than one token (one token: recurrent)
    auto_carried_mode: ClassVar[str] = "chunkwise"
    # chunkwise by a mixer's own form: inputs longer than this run the whole stack this many tokens at a time
    # (see _chunk_by_chunk); None: in one piece
    stack_piece_tokens: ClassVar[int | None] = None

    def __init__(self, config):
        config.validate()  # again: from_pretrained applies its keyword overrides after the config was validated
        super().__init__(config)
        names = self.module_names
        self.add_module(names.embeddings, self.build_embeddings(config))
        residual_in_fp32 = getattr(config, "residual_in_fp32", False)
        self.layers = nn.ModuleList(
            DenseBlock(i, names, self.build_norm(config), self.build_mixer(config, i), residual_in_fp32)
            for i in range(config.num_hidden_layers)
        )
        m, last = config.dense_block_layers, config.num_hidden_layers - 1
        for i, block in enumerate(self.layers):
            block.get_submodule(names.mixer).readers = min(m, last - i)
        self.add_module(names.final_norm, self.build_norm(config))
        self.post_init()

    # ---- what a family provides ---------------------------------------------------------------------------

    def build_embeddings(self, config) -> nn.Embedding:
        return nn.Embedding(config.vocab_size, config.hidden_size)

    def build_norm(self, config) -> nn.Module:
        return RMSNorm(config.hidden_size, eps=getattr(config, self.norm_epsilon))

    def build_mixer(self, config, layer_idx: int) -> Mixer:
        """The layer's mixer; dense (receiving what the layers below hand up) from the second layer on, when
        ``m > 0``."""
        return self.mixer_class(config, layer_idx, dense=config.dense_block_layers > 0 and layer_idx > 0)

    def call_constants(self, step: StepInputs, dtype: torch.dtype, device: torch.device) -> Any:
        """Tensors every layer's mixer uses in one call (``MixerCall.shared``); none by default."""
        return None

    # ---- the stack ------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self._modules[self.module_names.embeddings]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        setattr(self, self.module_names.embeddings, value)

    def resolve_mode(self, mode: str | None, length: int, carried: bool, stateful: bool) -> str:
        """The schedule of this call. ``None``: the config's ``forward_mode`` (``auto`` when that is
        ``parallel`` but a state is carried: the parallel form starts from an empty state). ``auto``: with a
        state kept, recurrent for one token, else the family's ``auto_carried_mode``; without one, parallel
        up to ``auto_parallel_max_length`` tokens, chunkwise beyond."""
        if mode is None:
            mode = self.config.forward_mode
            if carried and mode == "parallel":
                mode = "auto"
        check_mode(mode, MODES)
        if mode != "auto":
            return mode
        if stateful:
            return "recurrent" if length == 1 else self.auto_carried_mode
        return "parallel" if length <= self.auto_parallel_max_length else "chunkwise"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RecurrentCache | None = None,
        use_cache: bool | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the stack.

        ``mode`` picks the schedule (``auto``, ``parallel``, ``chunkwise`` or ``recurrent``: see
        :meth:`resolve_mode`); ``chunk_size`` overrides ``config.chunk_size``. ``cache`` carries the recurrent
        state across calls; it is created when ``use_cache`` is set. ``attention_mask`` may be longer than the
        input (as ``generate()`` passes it): its last ``length`` columns belong to this input.
        """
        cache = given_cache(cache, kwargs)
        check_no_other_arguments(self, kwargs)
        config = self.config
        input_ids, batch, length = check_inputs(
            input_ids,
            inputs_embeds,
            attention_mask,
            config.vocab_size,
            config.hidden_size,
            self.get_input_embeddings().weight.device,
        )
        check_chunk_size(chunk_size)
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        elif not use_cache and cache is not None:  # it would advance in place and be returned to no one
            raise ValueError(
                "a cache was given with use_cache=False: the forward advances a given cache in place, so pass "
                "use_cache=True to continue it (or no cache)"
            )
        embeddings = self.get_input_embeddings()
        hidden = embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        step = prepare_step(self, batch, length, hidden, cache, use_cache, attention_mask, position_ids, input_ids)
        if inputs_embeds is not None:
            check_embeds(inputs_embeds, embeddings.weight.dtype, step.mask)
        if input_ids is not None and not step.carried and not values_trusted():
            # a prompt or training input: transformers' one-time note (it reads the first and last ids)
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
        hidden = step.hide_padding(hidden)
        cache = step.cache
        if chunk_size is None:  # the configuration's, checked again: it may have been set after loading
            chunk_size = config.chunk_size
            check_chunk_size(chunk_size, "config.chunk_size")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict

        scan = torch.compiler.is_exporting() and isinstance(batch * length, torch.SymInt)  # shapes left free
        if scan:
            if mode is not None:
                check_mode(mode, MODES)  # any mode computes what the scan does
        else:
            mode = self.resolve_mode(mode, length, step.carried, cache is not None)
        schedule = None if scan else mode
        if cache is None or torch.compiler.is_compiling():
            hidden, inputs = self._run(hidden, step, schedule, chunk_size, length, output_hidden_states)
        else:
            try:
                hidden, inputs = self._run(hidden, step, schedule, chunk_size, length, output_hidden_states)
            except BaseException as err:  # Ctrl-C, out of memory...: some layers may have taken their new state
                if step.carried or any(layer is not None for layer in cache.layers):
                    cache.broken = broken_by(err)
                raise

        all_hidden = (*inputs, hidden) if output_hidden_states else None
        if not return_dict:
            return tuple(x for x in (hidden, cache if use_cache else None, all_hidden) if x is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, cache=cache if use_cache else None, hidden_states=all_hidden
        )

    def _run(
        self,
        hidden: torch.Tensor,
        step: StepInputs,
        mode: str | None,
        chunk_size: int,
        length: int,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Every layer over the input (by the schedule ``mode`` names; None: the token scan of an exported
        program), the final norm, and the cache advanced past it: the part of a step that changes the cache."""
        cache = step.cache
        states = list(cache.layers) if step.carried else [None] * self.config.num_hidden_layers
        if mode is None:
            hidden, states, inputs = self._token_scan(hidden, step, states, output_hidden_states)
        else:
            piece = self.stack_piece_tokens
            if mode == "chunkwise" and "chunkwise" not in self.mixer_modes:
                hidden, states, inputs = self._chunk_by_chunk(hidden, step, chunk_size, states, output_hidden_states)
            elif mode == "chunkwise" and piece is not None and length > piece:
                hidden, states, inputs = self._chunk_by_chunk(
                    hidden, step, piece, states, output_hidden_states, "chunkwise", chunk_size
                )
            else:
                hidden, states, inputs = self._layers(hidden, step, mode, chunk_size, states, output_hidden_states)
        hidden = self._modules[self.module_names.final_norm](hidden)
        if cache is not None:
            self._advance(cache, step, states)
        step.finish(length)
        return hidden, inputs

    def _layers(
        self,
        hidden: torch.Tensor,
        step: StepInputs,
        mode: str,
        chunk_size: int,
        states: list[LayerState | None],
        output_hidden_states: bool,
        keep_states: bool = False,
    ) -> tuple[torch.Tensor, list[LayerState | None], list[torch.Tensor] | None]:
        """Every layer once over ``hidden``, from ``states``; each reads what the ``m`` layers below handed up.
        The new states are returned when a cache keeps them or ``keep_states`` (the next chunk starts there)."""
        call = MixerCall(
            mask=step.mask,
            position_ids=step.position_ids,
            mode=mode,
            chunk_size=chunk_size,
            output_state=step.cache is not None or keep_states,
            shared=self.call_constants(step, hidden.dtype, hidden.device),
        )
        m = self.config.dense_block_layers
        history: list[list[Handoff]] = []  # per layer below, oldest first: its item for each reader
        new_states: list[LayerState | None] = []
        inputs = [] if output_hidden_states else None
        for block, state in zip(self.layers, states, strict=True):
            if output_hidden_states:
                inputs.append(hidden)
            # the layer `distance` below hands this one its item `distance - 1` (this is its distance-th reader)
            distances = range(len(history), 0, -1)
            shallow = [t for d, items in zip(distances, history, strict=True) for t in items[d - 1]]
            hidden, new_state, *handed_up = block(hidden, *shallow, call=call, state=state)
            new_states.append(new_state)
            if m:
                history = (history + [block.handoff_items(handed_up)])[-m:]
        return hidden, new_states, inputs

    def _chunk_by_chunk(
        self,
        hidden: torch.Tensor,
        step: StepInputs,
        chunk_size: int,
        states: list[LayerState | None],
        output_hidden_states: bool,
        inner_mode: str = "parallel",
        inner_chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, list[LayerState | None], list[torch.Tensor] | None]:
        """The whole stack over ``chunk_size`` tokens at a time, each chunk starting from the states the previous
        one left: exact. For a mixer without a chunkwise form this is its chunkwise mode (parallel inside: the
        activations of one chunk are all that is held at a time). A mixer with one runs long inputs so too
        (``inner_mode`` chunkwise, ``inner_chunk_size`` its chunk, None: the mixer's own choice, never the
        piece: a piece taken as one chunk would be quadratic in its length): every elementwise pass of a layer
        then works on a piece that stays in the cache instead of streaming the whole sequence through memory, so
        tokens/s holds as the input grows (docs/benchmarks/chunkwise_long.md)."""
        inner = chunk_size if inner_mode == "parallel" else inner_chunk_size
        pieces, piece_inputs = [], []
        # split, not a slice per chunk: the backward of each slice would fill a zero tensor the size of the
        # whole input, a cost quadratic in the number of chunks
        for start, chunk in zip(range(0, hidden.shape[1], chunk_size), hidden.split(chunk_size, 1), strict=True):
            piece = step.piece(start, start + chunk_size)
            out, states, inputs = self._layers(chunk, piece, inner_mode, inner, states, output_hidden_states, True)
            pieces.append(out)
            piece_inputs.append(inputs)
        inputs = None
        if output_hidden_states:
            inputs = [torch.cat(per_layer, dim=1) for per_layer in zip(*piece_inputs, strict=True)]
        return torch.cat(pieces, dim=1), states, inputs

    def _token_scan(
        self,
        hidden: torch.Tensor,
        step: StepInputs,
        states: list[LayerState | None],
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, list[LayerState], list[torch.Tensor] | None]:
        """The stack in an exported program that leaves the batch size or the length free: the eager decode step
        (every layer in recurrent mode on one token) as the body of one ``scan`` over the tokens.

        Every other schedule cuts the sequence with Python loops over its length (chunks, blocks, tokens), whose
        count a trace fixes to the one it saw (DenseMamba's blocks depend on the batch size too); a ``scan`` is one
        graph for any shape, and its body is the code eager decoding runs. A program of fixed shapes traces the
        eager schedule itself. All modes compute one function, so the program gives the eager logits and state to
        float rounding (DenseRetNet's parallel form also divides each ``q·k`` row by its clamped sum, which the
        per-head norm undoes up to its epsilon).

        The state starts from zeros where none is carried (every family's empty state). A scan's body may neither
        update its carry in place (a DenseRetNet decode step does, to keep addresses fixed) nor return it: each
        step works on a copy and returns fresh tensors. Without gradients only: torch's scan does not trace its
        backward with a free batch size."""
        if torch.is_grad_enabled():
            raise ValueError(
                "a program with a free batch size or length is an inference program: export it under "
                "torch.no_grad() (as transformers' DynamoExporter does), or fix every dimension"
            )
        layout = self.state_layout(hidden.dtype)
        batch = hidden.shape[0]
        start = [
            {
                name: hidden.new_zeros((batch, *shape), dtype=dtype) if state is None else state[name].clone()
                for name, (shape, dtype) in layout.items()
            }
            for state in states
        ]
        xs = {"hidden": hidden, "position_ids": step.position_ids.expand(batch, -1)}
        if step.mask is not None:
            xs["mask"] = step.mask
        xs = {name: x.transpose(0, 1) for name, x in xs.items()}  # scan runs over the first dimension

        def one_token(carry: list[LayerState], x: dict[str, torch.Tensor]):
            token = dataclasses.replace(
                step, mask=x["mask"][:, None] if "mask" in x else None, position_ids=x["position_ids"][:, None]
            )
            carry = [{name: t.clone() for name, t in state.items()} for state in carry]
            out, new, inputs = self._layers(
                x["hidden"][:, None], token, "recurrent", 1, carry, output_hidden_states, keep_states=True
            )
            new = [{name: t.contiguous().clone() for name, t in state.items()} for state in new]
            return new, [out[:, 0], *(i[:, 0] for i in inputs or ())]

        final, outputs = scan(one_token, start, xs)
        out, *inputs = (o.transpose(0, 1) for o in outputs)
        return out, final, inputs if output_hidden_states else None

    @staticmethod
    def _advance(cache: RecurrentCache, step: StepInputs, states: list[LayerState | None]) -> None:
        """The one place where a cache takes the new state. Inside a compiled decode step a carried state keeps
        its addresses (a captured graph reads and writes it there): new values are copied in, unless the mixer
        already updated the kept tensor in place. An exported program replaces the state instead (it mutates
        nothing it is given: the cache it returns holds the new state)."""
        if step.carried and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            for kept, new in zip(cache.layers, states, strict=True):
                for name, tensor in new.items():
                    if tensor is not kept[name]:
                        kept[name].copy_(tensor)
        else:
            cache.layers = states


__all__ = ["DenseBlock", "DenseSSMModel", "DenseSSMPreTrainedModel", "ModuleNames"]
