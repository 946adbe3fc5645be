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

from densessm.models.dense.gate import SelectiveTransitionGate, fuse_hidden
from densessm.models.dense.heads import DenseSSMForCausalLM, DenseSSMForSequenceClassification
from densessm.models.dense.mixer import Handoff, LayerState, Mixer, MixerCall
from densessm.models.dense.stack import DenseSSMModel, DenseSSMPreTrainedModel, ModuleNames
from densessm.models.norm import RMSNorm
from densessm.models.recurrent import StepInputs
from densessm.models.retnet.configuration_dense_retnet import DenseRetNetConfig
from densessm.ops.retention import (
    RETENTION_MODES,
    auto_parallel_max_length,
    default_chunk_size,
    head_log_decays,
    retention,
    rotate,
    rotation_angles,
    rotation_tables,
)


class DenseKVFusion(nn.Module):
    """Dense hidden connection of one layer: gated sum of shallow k (v) into the current k (v), then RMSNorm."""

    def __init__(self, config: DenseRetNetConfig):
        super().__init__()
        self.k_gate = SelectiveTransitionGate(config.hidden_size, config.query_key_dim, config.k_gate_reduction)
        self.v_gate = SelectiveTransitionGate(config.hidden_size, config.value_dim, config.v_gate_reduction)
        self.k_norm = RMSNorm(config.query_key_dim, eps=config.rms_norm_eps)
        self.v_norm = RMSNorm(config.value_dim, eps=config.rms_norm_eps)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selective-transition gates over k and over v, from the layer input."""
        return self.k_gate(x), self.v_gate(x)

    def forward(self, k, v, k_shallow, v_shallow, k_gate, v_gate):
        k = self.k_norm(fuse_hidden(k, k_shallow, k_gate))
        v = self.v_norm(fuse_hidden(v, v_shallow, v_gate))
        return k, v


class DenseRetNetRetention(Mixer):
    """The GAU retention block: gated multi-scale retention with per-head RMSNorm. It hands its un-fused k and
    v up to the layers above (per position: recurrent decoding needs nothing but each layer's own state)."""

    handoff_arity = 2

    def __init__(self, config: DenseRetNetConfig, layer_idx: int, dense: bool):
        super().__init__()
        self.layer_idx = layer_idx
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

    def project(self, x: torch.Tensor):
        """Every product of the layer input: ``q``, ``k`` (scaled), ``v``, the output gate, and in a dense layer
        the gates over k and v (else ``(None, None)``). One method, so that an inference transform can compute
        them all in one product (:mod:`densessm.inference.fusion`)."""
        q = F.silu(self.q_proj(x))
        k = F.silu(self.k_proj(x)) * self.scaling
        v, gate = F.silu(self.vg_proj(x)).chunk(2, dim=-1)
        return q, k, v, gate, (self.dense.gates(x) if self.dense is not None else (None, None))

    def forward(
        self, x: torch.Tensor, shallow: list[Handoff], call: MixerCall, state: LayerState | None
    ) -> tuple[torch.Tensor, list[Handoff], LayerState | None]:
        batch, length, _ = x.shape
        q, k, v, gate, (k_gate, v_gate) = self.project(x)
        k_own, v_own = k, v
        if self.dense is not None and shallow:
            k_shallow, v_shallow = [item[0] for item in shallow], [item[1] for item in shallow]
            k, v = self.dense(k, v, k_shallow, v_shallow, k_gate, v_gate)
        rotation, log_decay = call.shared
        q = rotate(q.view(batch, length, self.num_heads, -1).transpose(1, 2), *rotation)
        k = rotate(k.view(batch, length, self.num_heads, -1).transpose(1, 2), *rotation)
        v = v.view(batch, length, self.num_heads, -1).transpose(1, 2)
        # a kept state that no gradient needs can be overwritten in place (the cache owns it)
        inplace = call.output_state and not torch.is_grad_enabled()
        out, new_state = retention(
            q,
            k,
            v,
            log_decay,
            call.mode,
            mask=call.mask,
            state=None if state is None else (state["state"], state["scale"]),
            output_state=call.output_state,
            chunk_size=call.chunk_size,
            inplace=inplace,
        )
        out = self.head_norm(out.transpose(1, 2)).reshape(batch, length, self.value_dim) * gate
        new_state = None if new_state is None else {"state": new_state[0], "scale": new_state[1]}
        return self.dropout(self.o_proj(out)), [(k_own, v_own)] * self.readers, new_state


class DenseRetNetPreTrainedModel(DenseSSMPreTrainedModel):
    config_class = DenseRetNetConfig
    config: DenseRetNetConfig
    base_model_prefix = "model"


class DenseRetNetModel(DenseSSMModel, DenseRetNetPreTrainedModel):
    """Embeddings, the retention stack and the final norm."""

    module_names = ModuleNames(
        embeddings="embed_tokens", block_norm="input_layernorm", mixer="retention", final_norm="norm"
    )
    mixer_class = DenseRetNetRetention
    mixer_modes = RETENTION_MODES

    def __init__(self, config: DenseRetNetConfig):
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(config)

    stack_piece_tokens = 2048  # a training block: longer inputs run the stack in pieces (measured, see the stack)

    @property
    def auto_parallel_max_length(self) -> int:  # from the heads' sizes: see ops.retention
        heads = self.config.num_attention_heads
        key_dim, value_dim = self.config.query_key_dim // heads, self.config.value_dim // heads
        chunk = self.config.chunk_size or default_chunk_size(key_dim, value_dim)
        return auto_parallel_max_length(chunk, key_dim, value_dim)

    def build_embeddings(self, config: DenseRetNetConfig) -> nn.Embedding:
        return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def state_layout(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per layer: the retention memory ``[H, Dk, Dv]`` (per head) and its decay-sum ``[H]`` (at least fp32)."""
        heads = self.config.num_attention_heads
        key_dim, value_dim = self.config.query_key_dim // heads, self.config.value_dim // heads
        stat = torch.promote_types(dtype, torch.float32)
        return {"state": ((heads, key_dim, value_dim), dtype), "scale": ((heads,), stat)}

    def retention_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation angles ``[Dk]`` and per-head ``log γ`` ``[H]``: fixed by the shape, computed once per device.
        An exported program computes them in its graph instead: tensors kept from an eager call are no constants
        an export may capture (a scan's body refuses them), and the tensors an export computes are fake."""
        exporting = torch.compiler.is_exporting()
        constants = None if exporting else self._constants.get(device)
        if constants is None:
            heads = self.config.num_attention_heads
            angles = rotation_angles(self.config.query_key_dim // heads)
            constants = (angles.to(device), head_log_decays(heads).to(device))
            if not exporting:
                self._constants[device] = constants
        return constants

    def call_constants(self, step: StepInputs, dtype: torch.dtype, device: torch.device):
        """The rotation tables of this call's positions and the per-head decays, shared by every layer."""
        angles, log_decay = self.retention_constants(device)
        return rotation_tables(step.position_ids, angles, dtype), log_decay


class DenseRetNetForCausalLM(DenseSSMForCausalLM, DenseRetNetPreTrainedModel):
    """DenseRetNet with an (untied) LM head; ``generate()`` decodes through the O(1) recurrent state."""

    backbone_class = DenseRetNetModel


class DenseRetNetForSequenceClassification(DenseSSMForSequenceClassification, DenseRetNetPreTrainedModel):
    """DenseRetNet with a linear score head on the last real token of each row."""

    backbone_class = DenseRetNetModel


__all__ = [
    "DenseRetNetForCausalLM",
    "DenseRetNetForSequenceClassification",
    "DenseRetNetModel",
    "DenseRetNetPreTrainedModel",
]
