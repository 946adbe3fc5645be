"""DenseMamba: Mamba-1 blocks whose SSM read-out also sees the SSM states of the layers below.

Per layer: ``x + Mixer(RMSNorm(x))``, a final RMSNorm and an LM head (tied by default, as Mamba). The mixer
is Mamba-1's: ``[x, z] = in_proj(x̂)``, ``u = silu(causal_conv(x))``, input-dependent ``Δ, B, C`` from
``u``, the selective scan ``h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t ⊙ u_t) ⊗ B_t`` (see :mod:`densessm.ops.scan`),
``y_t = C_t · h_t + D ⊙ u_t``, output ``out_proj(y ⊙ silu(z))``. Parameter and config names are those of
``transformers``' Mamba, so its checkpoints load here unchanged.

**Dense hidden connection** (DenseSSM, He et al. 2024, Fig. 1). Layer ``l`` receives the SSM states
``h^{l-1} … h^{l-m}`` of the ``m = dense_block_layers`` layers below (fewer near the bottom; layer 0 and
``m = 0`` allocate nothing). The selective transition is the identity projection of each state times a gate
``g^l_t = SelectiveTransitionGate(x̂^l_t) ∈ R^D`` over the SSM channels; hidden fusion adds the selected
states to the layer's own before the read-out::

    y^l_t = C^l_t · (h^l_t + g^l_t ⊙ Σ_i h^{l-i}_t) + D ⊙ u^l_t

The state carried to ``t+1`` and handed up is the un-fused ``h^l_t``, so the recurrence of every layer is
unchanged and its parallel and recurrent forms stay equal.

*Parallel form.* The gate acts on channels ``d`` and the read-out contracts the state dimension ``n``, so
they commute: ``C_t · (g_t ⊙ h_t) = g_t ⊙ (C_t · h_t)``, and

    y^l = C^l·h^l + g^l ⊙ (C^l · Σ_i h^{l-i}) + D ⊙ u^l

Each ``C^l · h^{l-i}`` is layer ``l-i``'s scan read out with layer ``l``'s ``C``. That scan already formed
every state ``h^{l-i}_t`` (the blocked scan writes them all; autograd keeps them for its backward), so
layer ``l-i`` hands its state sequence up and layer ``l`` reads it out: no rescan, no chunk-boundary
recomputation. Cost per dense layer, on top of a Mamba layer: forward, ``m`` read passes over
``[b, L, D, N]`` (``m·L·D·N`` multiply-adds, batched matrix-vector products) and the gate MLP
(``L·H·(H/r) + L·(H/r)·D`` multiply-adds); backward, the gradient ``∂L/∂y ⊙ g ⊗ C`` -- the same for all ``m``
source layers, so formed once (``L·D·N`` writes) -- plus ``m`` read passes for ``∂C``, and autograd adds it
to each source's state gradient. Memory: without autograd, the states of ``m`` layers live while the layers
above read them (the plain-Mamba path forms no state sequence at all); under autograd they are saved anyway
for their own scan's backward, so the dense read-out saves nothing extra. Measured overhead:
``docs/benchmarks/mamba_scan.md``.

*Recurrent form.* At step ``t`` the lower layers' ``h^{l-i}_t`` are at hand (they are computed first), so
the cache needs nothing beyond each layer's own conv and SSM state: O(1) memory per token.

**Modes** (per call, default ``config.forward_mode``): ``parallel`` runs each layer's blocked scan over
the whole input; ``chunkwise`` passes ``chunk_size`` tokens at a time through the whole stack, each chunk
continuing from the states the previous one left (bounded activation memory for long prompts);
``recurrent`` runs every layer one token at a time (conv window and scan step: the decode path). All accept
a carried cache. With gradient checkpointing, a layer's checkpoint keeps its ``m`` input state sequences.

**Masks.** A padded position contributes nothing to any state: it is left out of every convolution window
(and of the conv state) and its ``Δ`` is 0, which makes its scan step the identity (no decay, no input).
Padding is removed by selection (``torch.where``), never by multiplying with 0, so whatever a padded
position holds (even NaN) cannot reach a real token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from densessm.cache import RecurrentCache
from densessm.models.dense import SelectiveTransitionGate
from densessm.models.mamba.configuration_dense_mamba import MAMBA_MODES, DenseMambaConfig
from densessm.models.norm import RMSNorm
from densessm.models.precision import at_least_fp32
from densessm.models.recurrent import (
    RecurrentBackbone,
    RecurrentGenerationMixin,
    check_chunk_size,
    check_embeds,
    check_inputs,
    frozen_linear,
    prepare_step,
)
from densessm.modes import check_mode
from densessm.ops.conv import causal_conv, causal_conv_step
from densessm.ops.scan import read_out_sum, selective_scan
from densessm.ops.scan.kernels import kernel_conv_scan, kernels_usable

LayerState = dict[str, torch.Tensor]


class DenseMambaMixer(nn.Module):
    """The Mamba-1 mixer, with the dense read-out of shallow states when ``dense`` is set."""

    def __init__(self, config: DenseMambaConfig, layer_idx: int, dense: bool):
        super().__init__()
        self.layer_idx = layer_idx
        inner, rank, size = config.intermediate_size, int(config.time_step_rank), config.state_size
        self.time_step_rank = rank
        self.state_size = size
        self.in_proj = nn.Linear(config.hidden_size, 2 * inner, bias=config.use_bias)
        self.conv1d = nn.Conv1d(inner, inner, config.conv_kernel, groups=inner, bias=config.use_conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * size, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, size))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=config.use_bias)
        self.dense_gate = None
        if dense:
            self.dense_gate = SelectiveTransitionGate(config.hidden_size, inner, config.dense_gate_reduction)
            self.dense_gate.fc2.zero_init = True  # the gate starts closed: see DenseMambaPreTrainedModel
        self.fused_projection: nn.Linear | None = None  # see fuse_projections()
        self._transition: tuple[tuple, torch.Tensor] | None = None  # see transition()

    def transition(self) -> torch.Tensor:
        """``A = -exp(A_log)`` in at least fp32. Without autograd it is kept between calls, since decoding would
        recompute it (an exp over ``[D, N]``) at every token; a change of ``A_log`` (training, loading,
        moving) changes its version or address and recomputes it."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return -torch.exp(at_least_fp32(self.A_log))
        key = (self.A_log.data_ptr(), self.A_log._version, self.A_log.device, self.A_log.dtype)
        if self._transition is None or self._transition[0] != key:
            self._transition = (key, -torch.exp(at_least_fp32(self.A_log)))
        return self._transition[1]

    def fuse_projections(self) -> None:
        """Inference only, irreversible: ``in_proj`` and the dense gate's first layer (both read ``x``) become
        one product, which saves a call per decode step, and the gate's final silu joins its second layer;
        the separate layers are removed."""
        if self.fused_projection is not None or self.dense_gate is None:
            return
        self.fused_projection = frozen_linear([self.in_proj, self.dense_gate.fc1])
        self.in_proj = self.dense_gate.fc1 = None
        self.dense_gate.fuse_output_activation()

    def ssm_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Δ`` (at least fp32, after softplus), ``B`` and ``C`` of the conv output ``u [b, L, D]``."""
        time_step, B, C = self.x_proj(u).split([self.time_step_rank, self.state_size, self.state_size], dim=-1)
        delta = F.softplus(at_least_fp32(self.dt_proj(time_step)))
        return delta, B, C

    def _conv_steps(self, x, state, mask):
        state = x.new_zeros(x.shape[0], self.conv1d.kernel_size[0] - 1, x.shape[2]) if state is None else state
        out = []
        for t, x_t in enumerate(x.unbind(1)):
            y_t, state = causal_conv_step(
                x_t, self.conv1d.weight, self.conv1d.bias, state, None if mask is None else mask[:, t]
            )
            out.append(y_t)
        return torch.stack(out, dim=1), state

    def forward(
        self,
        x: torch.Tensor,
        shallow: tuple[torch.Tensor, ...],
        mask: torch.Tensor | None,
        mode: str,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
        readers: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """``x [b, L, H]`` (normed) -> ``(out [b, L, H], its state sequence [b, L, D, N] once per reader
        above, conv state, SSM state)``. ``shallow`` holds the state sequences of the layers below (oldest
        first)."""
        dtype = x.dtype
        gate_hidden = None
        if self.fused_projection is not None:
            inner, total = self.D.shape[0], self.fused_projection.out_features
            xs, z, gate_hidden = self.fused_projection(x).split([inner, inner, total - 2 * inner], dim=-1)
        else:
            xs, z = self.in_proj(x).chunk(2, dim=-1)
        A = self.transition()
        fresh = conv_state is None and ssm_state is None
        if mode == "parallel" and fresh and mask is None and not readers and not shallow and kernels_usable(xs):
            y, ssm_state = kernel_conv_scan(xs, z, self.conv1d.weight, self.conv1d.bias, self.ssm_inputs, A, self.D)
            conv_state = torch.cat([xs.new_zeros(xs.shape[0], self.conv1d.kernel_size[0] - 1, xs.shape[2]), xs], 1)
            return self.out_proj(y.to(dtype)), (), conv_state[:, xs.shape[1] :], ssm_state

        if mode == "recurrent":
            xs, conv_state = self._conv_steps(xs, conv_state, mask)
        else:
            xs, conv_state = causal_conv(xs, self.conv1d.weight, self.conv1d.bias, conv_state, mask)
        u = F.silu(xs)
        if mask is not None:  # selections, not products: a padded u may be NaN, and 0 * NaN is NaN
            u = torch.where(mask[..., None], u, 0)
        delta, B, C = self.ssm_inputs(u)
        if mask is not None:
            delta = torch.where(mask[..., None], delta, 0)  # Δ = 0: the identity step, padding never touches the state
        u32, C = at_least_fp32(u), at_least_fp32(C)
        scan_mode = "recurrent" if mode == "recurrent" else "parallel"
        y, states, ssm_state = selective_scan(u32, delta, A, at_least_fp32(B), C, scan_mode, ssm_state, readers)
        if shallow:  # C·(h + g ⊙ Σ_i h^{l-i}) = C·h + g ⊙ C·Σ_i h^{l-i}: g acts on channels, C on the state
            gate = self.dense_gate(x) if gate_hidden is None else self.dense_gate.from_hidden(F.silu(gate_hidden))
            y = torch.addcmul(y, at_least_fp32(gate), read_out_sum(C, *shallow))
        y = (y + u32 * at_least_fp32(self.D)) * F.silu(at_least_fp32(z))
        return self.out_proj(y.to(dtype)), states, conv_state, ssm_state


class DenseMambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual mixer layer. Returns its un-fused state sequence for the layers above."""

    def __init__(self, config: DenseMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        dense = config.dense_block_layers > 0 and layer_idx > 0
        self.mixer = DenseMambaMixer(config, layer_idx, dense=dense)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *shallow: torch.Tensor,
        mask: torch.Tensor | None = None,
        mode: str = "parallel",
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        readers: int = 0,
    ):
        # shallow = (h_{l-n}, …, h_{l-1}), positional so that checkpointing sees every tensor
        residual = at_least_fp32(hidden_states) if self.residual_in_fp32 else hidden_states
        out, states, conv_state, ssm_state = self.mixer(
            self.norm(hidden_states.to(self.norm.weight.dtype)),
            shallow,
            mask,
            mode,
            conv_state,
            ssm_state,
            readers,
        )
        return residual + out, states, conv_state, ssm_state


class DenseMambaPreTrainedModel(PreTrainedModel):
    config_class = DenseMambaConfig
    config: DenseMambaConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DenseMambaBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Mamba's initialisation; the dense gates start closed.

        Closing the gates (``fc2 = 0``, so ``silu(0) = 0``) makes a fresh DenseMamba compute a Mamba function
        and a Mamba checkpoint loaded into one compute exactly what it computed before: continued
        pretraining starts from the checkpoint's loss, and ``fc2``'s gradient opens the gates from step one.
        """
        super()._init_weights(module)
        config = self.config
        if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            init.zeros_(module.weight)
        elif isinstance(module, DenseMambaMixer):
            inner, size = module.A_log.shape
            A = torch.arange(1, size + 1, dtype=torch.float32, device=module.A_log.device).expand(inner, size)
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)
            std = config.time_step_rank**-0.5 * config.time_step_scale
            if config.time_step_init_scheme == "constant":
                init.constant_(module.dt_proj.weight, std)
            else:
                init.uniform_(module.dt_proj.weight, -std, std)
            low, high = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(inner, device=module.dt_proj.bias.device) * (high - low) + low)
            dt = dt.clamp(min=config.time_step_floor)
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            if config.rescale_prenorm_residual:
                init.copy_(module.out_proj.weight, module.out_proj.weight / math.sqrt(config.num_hidden_layers))


class DenseMambaModel(RecurrentBackbone, DenseMambaPreTrainedModel):
    """Embeddings, the mixer stack and the final norm."""

    def __init__(self, config: DenseMambaConfig):
        super().__init__(config)
        config.validate()  # again: from_pretrained sets its keyword overrides after the config was validated
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DenseMambaBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def state_layout(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per layer: the conv window ``[K-1, D]`` (the last inputs) and the SSM state ``[D, N]`` (at least fp32)."""
        config = self.config
        stat = torch.promote_types(dtype, torch.float32)
        inner = config.intermediate_size
        return {"conv": ((config.conv_kernel - 1, inner), dtype), "ssm": ((inner, config.state_size), stat)}

    def set_input_embeddings(self, value):
        self.embeddings = value

    def _stack(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        mode: str,
        states: list[LayerState | None],
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, list[LayerState], list[torch.Tensor] | None]:
        """Run every layer once over ``hidden`` from ``states``; returns the new states."""
        m = self.config.dense_block_layers
        last = len(self.layers) - 1
        history: list[tuple[torch.Tensor, ...]] = []  # per layer below (oldest first): one handle per reader
        new_states: list[LayerState] = []
        inputs = [] if output_hidden_states else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                inputs.append(hidden)
            state = states[idx] or {}
            # this layer is the i-th reader of the layer i below it, so it takes that layer's handle i - 1
            shallow = [handles[i - 1] for i, handles in zip(range(len(history), 0, -1), history, strict=True)]
            hidden, handles, conv, ssm = layer(
                hidden,
                *shallow,
                mask=mask,
                mode=mode,
                conv_state=state.get("conv"),
                ssm_state=state.get("ssm"),
                readers=min(m, last - idx),
            )
            new_states.append({"conv": conv, "ssm": ssm})
            if m:
                history = (history + [handles])[-m:]
        return hidden, new_states, inputs

    def _chunkwise(self, hidden, mask, states, chunk_size, output_hidden_states):
        """``_stack`` over ``chunk_size`` tokens at a time, each piece starting from the states the last left."""
        size = self.config.chunk_size if chunk_size is None else int(chunk_size)
        pieces, piece_inputs = [], []
        for start in range(0, hidden.shape[1], size):
            piece_mask = None if mask is None else mask[:, start : start + size]
            if piece_mask is not None and bool(piece_mask.all()):
                piece_mask = None
            piece, states, inputs = self._stack(
                hidden[:, start : start + size], piece_mask, "parallel", states, output_hidden_states
            )
            pieces.append(piece)
            piece_inputs.append(inputs)
        inputs = None
        if output_hidden_states:
            inputs = [torch.cat(per_layer, dim=1) for per_layer in zip(*piece_inputs, strict=True)]
        return torch.cat(pieces, dim=1), states, inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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

        ``mode`` picks the schedule (``parallel``, ``chunkwise`` or ``recurrent``; default:
        ``config.forward_mode``, or ``recurrent`` when ``cache`` already holds a state); ``chunk_size``
        overrides ``config.chunk_size`` for ``chunkwise``. ``cache`` carries each layer's conv and SSM
        state across calls; it is created when ``use_cache`` is set. ``attention_mask`` may be longer than
        the input (as ``generate()`` passes it): its last ``length`` columns belong to this input.
        """
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        config = self.config
        input_ids, batch, length = check_inputs(
            input_ids, inputs_embeds, attention_mask, config.vocab_size, config.hidden_size
        )
        check_chunk_size(chunk_size)
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        step = prepare_step(self, batch, length, hidden, cache, use_cache, attention_mask, None)
        if inputs_embeds is not None:
            check_embeds(inputs_embeds, self.embeddings.weight.dtype, step.mask)
        hidden = step.hide_padding(hidden)
        cache = step.cache
        mode = check_mode(mode or ("recurrent" if step.carried else config.forward_mode), MAMBA_MODES)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict

        states = list(cache.layers) if step.carried else [None] * config.num_hidden_layers
        if mode == "chunkwise":
            hidden, states, inputs = self._chunkwise(hidden, step.mask, states, chunk_size, output_hidden_states)
        else:
            hidden, states, inputs = self._stack(hidden, step.mask, mode, states, output_hidden_states)
        hidden = self.norm_f(hidden)
        if cache is not None and step.carried and torch.compiler.is_compiling():
            for kept, new in zip(cache.layers, states, strict=True):  # a captured step keeps the addresses
                kept["conv"].copy_(new["conv"])
                kept["ssm"].copy_(new["ssm"])
        elif cache is not None:
            cache.layers = states
        step.finish(length)

        all_hidden = (*inputs, hidden) if output_hidden_states else None
        if not return_dict:
            return tuple(x for x in (hidden, cache if use_cache else None, all_hidden) if x is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, cache=cache if use_cache else None, hidden_states=all_hidden
        )


class DenseMambaForCausalLM(RecurrentGenerationMixin, DenseMambaPreTrainedModel, GenerationMixin):
    """DenseMamba with an LM head (tied to the embeddings unless ``tie_word_embeddings=False``);
    ``generate()`` decodes through the O(1) recurrent state."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: DenseMambaConfig):
        super().__init__(config)
        self.backbone = DenseMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.embeddings

    def set_input_embeddings(self, value):
        self.backbone.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
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


__all__ = ["DenseMambaForCausalLM", "DenseMambaModel", "DenseMambaPreTrainedModel"]
