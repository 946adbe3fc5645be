"""What every recurrent LM here shares: input checks, the step bookkeeping of a carried state, and the
``GenerationMixin`` hooks that make ``generate()`` decode through a :class:`~densessm.cache.RecurrentCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from densessm.cache import RecurrentCache


class SiLULinear(nn.Linear):
    """``silu(linear(x))`` as one module, so that inference can compute the activation inside the product
    (:class:`~densessm.inference.PrepackedLinear` applies it in the kernel's epilogue) instead of in a pass
    of its own over the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


def frozen_linear(parts: list[nn.Linear], block_diagonal: bool = False, silu: bool = False) -> nn.Linear:
    """One inference-only linear layer computing several: their weights stacked (the same input) or
    block-diagonal (inputs side by side); a :class:`SiLULinear` with ``silu`` (every part is followed by
    it). Used to fuse a decode step's small products into fewer calls."""
    weights = [p.weight.detach() for p in parts]
    weight = torch.block_diag(*weights) if block_diagonal else torch.cat(weights)
    has_bias = any(p.bias is not None for p in parts)
    kind = SiLULinear if silu else nn.Linear
    fused = kind(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        biases = [p.bias.detach() if p.bias is not None else weight.new_zeros(p.out_features) for p in parts]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


def check_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    vocab_size: int,
    hidden_size: int,
) -> tuple[int, int]:
    """Validate a forward call's inputs; returns ``(batch, length)`` or raises a ValueError naming the problem."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"empty input: input_ids has shape {tuple(input_ids.shape)}")
        if not torch.compiler.is_compiling():  # a captured step cannot read values (its tokens are the model's own)
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"token id {low if low < 0 else high} is out of range for vocab_size {vocab_size}")
        batch, length = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [batch, length, {hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"empty input: inputs_embeds has shape {tuple(inputs_embeds.shape)}")
        batch, length = inputs_embeds.shape[:2]
    if attention_mask is not None and (
        attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length
    ):
        raise ValueError(
            f"attention_mask must have shape [{batch}, >= {length}] (one entry per token), "
            f"got {tuple(attention_mask.shape)}"
        )
    return batch, length


@dataclass
class StepInputs:
    """One forward call's view of the sequence: which tokens are real and where it starts."""

    cache: RecurrentCache | None  # the state to read and update (None: stateless call)
    carried: bool  # the cache already holds a state from earlier calls
    mask: torch.Tensor | None  # [B, L] bool of real tokens, None when all are real
    start: torch.Tensor  # [B] real tokens consumed before this call
    position_ids: torch.Tensor  # [B, L] position of each token among the row's real tokens

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


def prepare_step(
    num_layers: int,
    batch: int,
    length: int,
    device: torch.device,
    cache: RecurrentCache | None,
    use_cache: bool,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> StepInputs:
    """Create or check the cache and derive the mask and positions of this call's tokens.

    ``attention_mask`` may be longer than the input (``generate()`` passes the whole history): its last
    ``length`` columns belong to this call.
    """
    if use_cache and cache is None:
        cache = RecurrentCache(num_layers)
    if cache is not None and not isinstance(cache, RecurrentCache):
        raise TypeError(f"cache must be a densessm RecurrentCache, got {type(cache).__name__}")
    if cache is not None and len(cache) != num_layers:
        raise ValueError(f"cache holds the state of {len(cache)} layers but the model has {num_layers}")
    carried = cache is not None and not cache.is_empty
    if carried and cache.batch_size != batch:
        raise ValueError(f"cache holds {cache.batch_size} rows but the input has {batch}")
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, -length:].to(device).bool()
        if not torch.compiler.is_compiling() and bool(mask.all()):
            mask = None  # nothing to hide: take the shared (cheaper) path (not in a captured step: host sync)
    start = cache.positions if carried else torch.zeros(batch, dtype=torch.long, device=device)
    if position_ids is None:
        if mask is None:
            position_ids = start[:, None] + torch.arange(length, device=device)
        else:
            position_ids = start[:, None] + mask.long().cumsum(-1) - 1
    return StepInputs(cache, carried, mask, start, position_ids.to(device))


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

    def get_compiled_call(self, compile_config):
        """The decode step for ``generate()``: a :class:`~densessm.compiled_decoding.CompiledDecoder`, built
        once per configuration (``reduce-overhead`` on CUDA: CUDA graphs)."""
        from densessm.compiled_decoding import CompiledDecoder

        decoder = self.__dict__.get("_compiled_decoder")
        if decoder is None or decoder.compile_config != compile_config:
            decoder = CompiledDecoder(self, compile_config)
            self.__dict__["_compiled_decoder"] = decoder  # not a submodule: keep it out of state_dict and .to()
        return decoder

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        """Feed only the tokens the state has not consumed yet."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
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
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        if not return_dict:
            output = (logits,) + tuple(x for x in (outputs.cache, outputs.hidden_states) if x is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
