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
from densessm.models.recurrent import RecurrentGenerationMixin


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
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every position (or the last ``logits_to_keep``); ``labels`` give the shifted LM loss."""
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
            past_key_values=kwargs.pop("past_key_values", None),
        )
        return self.causal_lm_output(outputs, labels, logits_to_keep, return_dict, **kwargs)


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

    def _last_token_index(self, input_ids, attention_mask, batch, length, device):
        positions = torch.arange(length, device=device)
        if attention_mask is not None:
            real = attention_mask[:, -length:].to(device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(device) != self.config.pad_token_id
        elif batch == 1:
            return torch.full((1,), length - 1, device=device)
        else:
            raise ValueError(
                "cannot find the last token of each row: pass attention_mask, or input_ids with pad_token_id set"
            )
        if not bool(real.any(-1).all()):
            raise ValueError("a row of the batch has no real token to classify")
        return (positions * real).argmax(-1)

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
        batch, length = logits.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, batch, length, logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        if not return_dict:
            output = (pooled,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return (loss,) + output if loss is not None else output
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, hidden_states=outputs.hidden_states)


__all__ = ["DenseSSMForCausalLM", "DenseSSMForSequenceClassification"]
