"""The task heads every family shares: a causal LM and a sequence classifier on top of its dense stack.

A family's head classes are these with its own ``PreTrainedModel`` base (config class, checkpoint prefix,
initialisation) and ``backbone_class``; they add nothing else.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast

from densessm.cache import RecurrentCache
from densessm.models.dense.stack import DenseSSMModel, DenseSSMPreTrainedModel
from densessm.models.recurrent import (
    LOSS_ARGUMENTS,
    RecurrentGenerationMixin,
    broken_by,
    check_no_other_arguments,
    given_cache,
)


class DenseSSMForCausalLM(RecurrentGenerationMixin, DenseSSMPreTrainedModel, GenerationMixin):
    """The stack with an LM head; ``generate()`` decodes through the O(1) recurrent state. The head is tied
    to the embeddings when the config says so (``tie_word_embeddings``)."""

    backbone_class: ClassVar[type[DenseSSMModel]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "backbone_class" in cls.__dict__:  # a family's head: its LM head may be tied to its embeddings
            embeddings = cls.backbone_class.module_names.embeddings
            cls._tied_weights_keys = {"lm_head.weight": f"{cls.base_model_prefix}.{embeddings}.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.add_module(self.base_model_prefix, self.backbone_class(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RecurrentCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every position (or the last ``logits_to_keep``, or the positions a 1-D tensor of them
        lists); ``labels`` give the shifted LM loss. ``skip_logits=True`` (with ``labels``; the name transformers'
        Trainer passes) returns the loss alone, computed without ever holding every logit at once
        (:func:`~densessm.ops.linear_cross_entropy.linear_cross_entropy`): what a long training step needs."""
        cache = given_cache(cache, kwargs)
        check_no_other_arguments(self, kwargs, accepted=LOSS_ARGUMENTS)
        labels = self.check_head_arguments(input_ids, inputs_embeds, labels, logits_to_keep, skip_logits, kwargs)
        outputs = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            mode=mode,
            chunk_size=chunk_size,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        if cache is None or torch.compiler.is_compiling():
            return self.causal_lm_output(outputs, labels, logits_to_keep, skip_logits, return_dict, **kwargs)
        try:
            return self.causal_lm_output(outputs, labels, logits_to_keep, skip_logits, return_dict, **kwargs)
        except BaseException as err:  # out of memory for the logits, Ctrl-C...: the state has taken this step
            cache.broken = broken_by(err)
            raise


class DenseSSMForSequenceClassification(DenseSSMPreTrainedModel):
    """The stack with a linear score head on the last real token of each row."""

    backbone_class: ClassVar[type[DenseSSMModel]]

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.add_module(self.base_model_prefix, self.backbone_class(config))
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.set_input_embeddings(value)

    def _real_tokens(self, input_ids, attention_mask, batch: int, length: int, device) -> torch.Tensor | None:
        """``[B, L]`` bool of the real tokens (from ``attention_mask``, else the ids that are not
        ``pad_token_id``); None when a single row without either is all real."""
        if attention_mask is not None:
            return attention_mask[:, -length:].to(device).bool()
        if input_ids is not None and self.config.pad_token_id is not None:
            return input_ids.to(device) != self.config.pad_token_id
        if batch == 1:
            return None
        raise ValueError(
            "cannot find the last token of each row: pass attention_mask, or input_ids with pad_token_id set"
        )

    def _pool(self, logits: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Each row's logits at its last real token. Computed without a branch on the values, so that a compiled
        or exported program takes it as it is; a row without any real token is refused eagerly and gives NaN in
        such a program (never another token's logits)."""
        if real is None:
            return logits[:, -1]
        length = logits.shape[1]
        if not torch.compiler.is_compiling() and not bool(real.any(-1).all()):
            raise ValueError("a row of the batch has no real token to classify: every token of it is padding")
        last = (torch.arange(length, device=logits.device) * real).argmax(-1)
        pooled = logits.gather(1, last[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        return torch.where(real.any(-1, keepdim=True), pooled, torch.nan)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """Pooled logits ``[B, num_labels]``; ``labels`` give a regression, single- or multi-label loss."""
        if given_cache(None, kwargs) is not None:
            raise ValueError("sequence classification reads whole sequences: it takes no cache")
        # the Trainer passes num_items_in_batch for a loss summed over tokens; a classification loss is a mean
        # over rows, and takes none
        check_no_other_arguments(self, kwargs, accepted=frozenset({"use_cache", "num_items_in_batch"}))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            mode=mode,
            chunk_size=chunk_size,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.score(outputs.last_hidden_state)
        real = self._real_tokens(input_ids, attention_mask, *logits.shape[:2], logits.device)
        pooled = self._pool(logits, real)
        loss = None
        if labels is not None:
            if labels.dtype in (torch.int8, torch.int16, torch.uint8):  # class ids, as long ones: transformers
                labels = labels.long()  # takes any other dtype for multi-label targets and fails on their shape
            _check_class_ids(labels, self.num_labels)
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        if not return_dict:
            output = (pooled,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return (loss,) + output if loss is not None else output
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, hidden_states=outputs.hidden_states)


def _check_class_ids(labels: torch.Tensor, num_labels: int) -> None:
    """Class ids (integer labels of a single-label task) must name a class, or be -100 (ignored): torch's own
    error for one that does not is an IndexError deep in the loss, naming no label."""
    if num_labels < 2 or labels.is_floating_point() or labels.dtype == torch.bool or torch.compiler.is_compiling():
        return
    bad = (labels != -100) & ((labels < 0) | (labels >= num_labels))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be class ids in [0, {num_labels}) (or -100: ignored), found {int(labels[bad][0])}"
        )


__all__ = ["DenseSSMForCausalLM", "DenseSSMForSequenceClassification"]
