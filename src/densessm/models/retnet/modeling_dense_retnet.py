"""DenseRetNet: GAU-style multi-scale retention (no FFN) with dense hidden connections on k and v.

Per layer: ``x + Retention(RMSNorm(x))``; a final RMSNorm and an untied LM head. In the retention block
``q = silu(W_q x)``, ``k = silu(W_k x)·Dk^-1/2`` and ``[v, g] = silu(W_vg x)``. Layers ``l ≥ 1`` of a
DenseRetNet (``m = dense_block_layers > 0``) add the *un-fused* k and v of layers ``l-m … l-1`` at the same
position, each times a selective-transition gate of the layer input, then RMSNorm k and v. The dense inputs
are per position, so recurrent decoding needs no cache beyond each layer's retention state.

``m = 0`` is the plain GAU-RetNet baseline: no gates and no k/v norms are allocated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from densessm.cache import RecurrentCache
from densessm.models.dense import SelectiveTransitionGate, fuse_hidden
from densessm.models.norm import RMSNorm
from densessm.models.recurrent import (
    RecurrentBackbone,
    RecurrentGenerationMixin,
    check_chunk_size,
    check_embeds,
    check_inputs,
    frozen_linear,
    prepare_step,
)
from densessm.models.retnet.configuration_dense_retnet import DenseRetNetConfig
from densessm.ops.retention import (
    head_log_decays,
    retention,
    rotate,
    rotation_angles,
    rotation_tables,
    select_mode,
)


class DenseKVFusion(nn.Module):
    """Dense hidden connection of one layer: gated sum of shallow k (v) into the current k (v), then RMSNorm."""

    def __init__(self, config: DenseRetNetConfig):
        super().__init__()
        self.k_gate = SelectiveTransitionGate(config.hidden_size, config.query_key_dim, config.k_gate_reduction)
        self.v_gate = SelectiveTransitionGate(config.hidden_size, config.value_dim, config.v_gate_reduction)
        self.k_norm = RMSNorm(config.query_key_dim, eps=config.rms_norm_eps)
        self.v_norm = RMSNorm(config.value_dim, eps=config.rms_norm_eps)
        self.fused_gate: nn.Linear | None = None  # both gates' second layers, block-diagonal (inference)

    def fuse_gates(self) -> tuple[nn.Linear, nn.Linear]:
        """Inference only: one block-diagonal product for both gates' second layers; hands back their first
        layers (for the caller to merge with its own projections of ``x``) and removes them here."""
        self.fused_gate = frozen_linear([self.k_gate.fc2, self.v_gate.fc2], block_diagonal=True, silu=True)
        first = self.k_gate.fc1, self.v_gate.fc1
        self.k_gate.fc1 = self.k_gate.fc2 = self.v_gate.fc1 = self.v_gate.fc2 = None
        return first

    def forward(self, x, k, v, k_shallow, v_shallow, gate_hidden=None):
        """``gate_hidden``: both gates' ``silu(fc1(x))``, side by side, computed by the caller's fused
        projection (after :meth:`fuse_gates`)."""
        if self.fused_gate is not None:
            k_gate, v_gate = self.fused_gate(gate_hidden).split((k.shape[-1], v.shape[-1]), dim=-1)
        else:
            k_gate, v_gate = self.k_gate(x), self.v_gate(x)
        k = self.k_norm(fuse_hidden(k, k_shallow, k_gate))
        v = self.v_norm(fuse_hidden(v, v_shallow, v_gate))
        return k, v


class DenseRetNetRetention(nn.Module):
    """The GAU retention block: gated multi-scale retention with per-head RMSNorm."""

    def __init__(self, config: DenseRetNetConfig, dense: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.key_dim = config.query_key_dim // self.num_heads
        self.value_dim = config.value_dim
        self.scaling = self.key_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, config.query_key_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.query_key_dim, bias=False)
        self.vg_proj = nn.Linear(config.hidden_size, 2 * self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)
        self.head_norm = RMSNorm(self.value_dim // self.num_heads, eps=config.rms_norm_eps)
        self.dense = DenseKVFusion(config) if dense else None
        self.dropout = nn.Dropout(config.dropout)
        self.fused_projection: nn.Linear | None = None  # see fuse_projections()
        self.fused_sizes: list[int] = []

    def fuse_projections(self) -> None:
        """Inference only, irreversible: one product for every projection of ``x`` (q, k, [v, g] and the
        dense gates' first layers, all followed by silu, which becomes part of the product) and one for both
        gates' second layers.

        A decode step multiplies a few rows by each weight, so every separate product pays a call of its
        own; concatenated weights stream the same bytes in fewer calls. The separate layers are removed
        (no weight is kept twice), so the model cannot be trained or saved afterwards.
        """
        if self.fused_projection is not None:
            return
        parts = [self.q_proj, self.k_proj, self.vg_proj]
        if self.dense is not None:
            parts += self.dense.fuse_gates()
        sizes = [p.out_features for p in parts]
        self.fused_projection = frozen_linear(parts, silu=True)
        self.fused_sizes = sizes[:3] + ([sum(sizes[3:])] if self.dense else [])
        self.q_proj = self.k_proj = self.vg_proj = None

    def forward(self, x, k_shallow, v_shallow, rotation, log_decay, mask, mode, chunk_size, state, output_state):
        batch, length, _ = x.shape
        gate_hidden = None
        if self.fused_projection is not None:
            q, k, vg, *gates = self.fused_projection(x).split(self.fused_sizes, dim=-1)
            k, gate_hidden = k * self.scaling, (gates[0] if gates else None)
        else:
            q = F.silu(self.q_proj(x))
            k = F.silu(self.k_proj(x)) * self.scaling
            vg = F.silu(self.vg_proj(x))
        v, gate = vg.chunk(2, dim=-1)
        k_own, v_own = k, v
        if self.dense is not None and k_shallow:
            k, v = self.dense(x, k, v, k_shallow, v_shallow, gate_hidden)
        q = rotate(q.view(batch, length, self.num_heads, -1).transpose(1, 2), *rotation)
        k = rotate(k.view(batch, length, self.num_heads, -1).transpose(1, 2), *rotation)
        v = v.view(batch, length, self.num_heads, -1).transpose(1, 2)
        # a kept state that no gradient needs can be overwritten in place (the cache owns it)
        inplace = output_state and not torch.is_grad_enabled()
        out, new_state = retention(
            q,
            k,
            v,
            log_decay,
            mode,
            mask=mask,
            state=state,
            output_state=output_state,
            chunk_size=chunk_size,
            inplace=inplace,
        )
        out = self.head_norm(out.transpose(1, 2)).reshape(batch, length, self.value_dim) * gate
        return self.dropout(self.o_proj(out)), k_own, v_own, new_state


class DenseRetNetDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual retention layer. Returns its un-fused k and v for the layers above."""

    def __init__(self, config: DenseRetNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        dense = config.dense_block_layers > 0 and layer_idx > 0
        self.retention = DenseRetNetRetention(config, dense=dense)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *shallow: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        log_decay: torch.Tensor,
        mask: torch.Tensor | None = None,
        mode: str = "parallel",
        chunk_size: int = 64,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_state: bool = False,
    ):
        # shallow = (k_{l-n}, …, k_{l-1}, v_{l-n}, …, v_{l-1}), positional so checkpointing sees every tensor
        half = len(shallow) // 2
        out, k, v, new_state = self.retention(
            self.input_layernorm(hidden_states),
            shallow[:half],
            shallow[half:],
            rotation,
            log_decay,
            mask,
            mode,
            chunk_size,
            state,
            output_state,
        )
        return hidden_states + out, k, v, new_state


class DenseRetNetPreTrainedModel(PreTrainedModel):
    config_class = DenseRetNetConfig
    config: DenseRetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DenseRetNetDecoderLayer"]


class DenseRetNetModel(RecurrentBackbone, DenseRetNetPreTrainedModel):
    """Embeddings, the retention stack and the final norm."""

    def __init__(self, config: DenseRetNetConfig):
        config.validate()  # again: from_pretrained applies its keyword overrides after the config was validated
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DenseRetNetDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def state_layout(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per layer: the retention memory ``[H, Dk, Dv]`` (per head) and its decay-sum ``[H]`` (at least fp32)."""
        heads = self.config.num_attention_heads
        key_dim, value_dim = self.config.query_key_dim // heads, self.config.value_dim // heads
        stat = torch.promote_types(dtype, torch.float32)
        return {"state": ((heads, key_dim, value_dim), dtype), "scale": ((heads,), stat)}

    def retention_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation angles ``[Dk]`` and per-head ``log γ`` ``[H]``: fixed by the shape, computed once per device."""
        if device not in self._constants:
            heads = self.config.num_attention_heads
            angles = rotation_angles(self.config.query_key_dim // heads)
            self._constants[device] = (angles.to(device), head_log_decays(heads).to(device))
        return self._constants[device]

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

        ``mode`` picks the schedule (``auto``, ``parallel``, ``chunkwise`` or ``recurrent``; default:
        ``config.forward_mode``, made ``auto`` when that is ``parallel`` but a state is carried);
        ``chunk_size`` overrides ``config.chunk_size``. ``cache`` carries the recurrent state across calls; it
        is created when ``use_cache`` is set. ``attention_mask`` may be longer than the input (as
        ``generate()`` passes it): its last ``length`` columns belong to this input.
        """
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        config = self.config
        input_ids, batch, length = check_inputs(
            input_ids, inputs_embeds, attention_mask, config.vocab_size, config.hidden_size
        )
        check_chunk_size(chunk_size)
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        step = prepare_step(self, batch, length, hidden, cache, use_cache, attention_mask, position_ids)
        if inputs_embeds is not None:
            check_embeds(inputs_embeds, self.embed_tokens.weight.dtype, step.mask)
        hidden = step.hide_padding(hidden)
        cache = step.cache
        if mode is None:
            mode = "auto" if step.carried and config.forward_mode == "parallel" else config.forward_mode
        mode = select_mode(mode, length, stateful=cache is not None)
        chunk_size = config.chunk_size if chunk_size is None else chunk_size
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        angles, log_decay = self.retention_constants(hidden.device)
        rotation = rotation_tables(step.position_ids, angles, hidden.dtype)

        m = self.config.dense_block_layers
        k_hist: list[torch.Tensor] = []
        v_hist: list[torch.Tensor] = []
        all_hidden = () if output_hidden_states else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden,)
            state = cache.layers[idx] if step.carried else None
            hidden, k, v, new_state = layer(
                hidden,
                *k_hist,
                *v_hist,
                rotation=rotation,
                log_decay=log_decay,
                mask=step.mask,
                mode=mode,
                chunk_size=chunk_size,
                state=None if state is None else (state["state"], state["scale"]),
                output_state=cache is not None,
            )
            if cache is not None:
                cache.layers[idx] = {"state": new_state[0], "scale": new_state[1]}
            if m:
                k_hist = (k_hist + [k])[-m:]
                v_hist = (v_hist + [v])[-m:]
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        step.finish(length)

        if not return_dict:
            return tuple(x for x in (hidden, cache if use_cache else None, all_hidden) if x is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, cache=cache if use_cache else None, hidden_states=all_hidden
        )


class DenseRetNetForCausalLM(RecurrentGenerationMixin, DenseRetNetPreTrainedModel, GenerationMixin):
    """DenseRetNet with an (untied) LM head; ``generate()`` decodes through the O(1) recurrent state."""

    def __init__(self, config: DenseRetNetConfig):
        super().__init__(config)
        self.model = DenseRetNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
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
        outputs = self.model(
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


class DenseRetNetForSequenceClassification(DenseRetNetPreTrainedModel):
    """DenseRetNet with a linear score head on the last real token of each row."""

    def __init__(self, config: DenseRetNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DenseRetNetModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

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
        outputs = self.model(
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


__all__ = [
    "DenseRetNetForCausalLM",
    "DenseRetNetForSequenceClassification",
    "DenseRetNetModel",
    "DenseRetNetPreTrainedModel",
]
