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

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from densessm.models.dense.gate import SelectiveTransitionGate
from densessm.models.dense.heads import DenseSSMForCausalLM, DenseSSMForSequenceClassification
from densessm.models.dense.mixer import Handoff, LayerState, Mixer, MixerCall
from densessm.models.dense.stack import DenseSSMModel, DenseSSMPreTrainedModel, ModuleNames
from densessm.models.mamba.configuration_dense_mamba import DenseMambaConfig
from densessm.models.precision import at_least_fp32
from densessm.models.ssm_init import init_selective_ssm
from densessm.ops.conv import causal_conv, causal_conv_step
from densessm.ops.scan import read_out_sum, selective_scan
from densessm.ops.scan.kernels import kernel_conv_scan, kernels_usable


class DenseMambaMixer(Mixer):
    """The Mamba-1 mixer, with the dense read-out of shallow states when ``dense`` is set. It hands up its
    state sequence ``[b, L, D, N]``, one handle per reader above (see :func:`~densessm.ops.scan.selective_scan`)."""

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

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every product of the layer input: ``x`` and ``z`` of ``in_proj``, and in a dense layer the gate over the
        SSM channels (else None). One method, so that an inference transform can compute them in one product
        (:mod:`densessm.inference.fusion`)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        return xs, z, (self.dense_gate(x) if self.dense_gate is not None else None)

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
        self, x: torch.Tensor, shallow: list[Handoff], call: MixerCall, state: LayerState | None
    ) -> tuple[torch.Tensor, list[Handoff], LayerState | None]:
        """``x [b, L, H]`` (normed) -> ``(out [b, L, H], its state sequence [b, L, D, N] once per reader
        above, {conv, ssm} state)``. ``shallow`` holds the state sequences of the layers below (oldest first)."""
        dtype, mask, mode, readers = x.dtype, call.mask, call.mode, self.readers
        conv_state, ssm_state = (None, None) if state is None else (state["conv"], state["ssm"])
        xs, z, gate = self.project(x)
        A = self.transition()
        fresh = conv_state is None and ssm_state is None
        if mode == "parallel" and fresh and mask is None and not readers and not shallow and kernels_usable(xs):
            y, ssm_state = kernel_conv_scan(xs, z, self.conv1d.weight, self.conv1d.bias, self.ssm_inputs, A, self.D)
            conv_state = torch.cat([xs.new_zeros(xs.shape[0], self.conv1d.kernel_size[0] - 1, xs.shape[2]), xs], 1)
            return self.out_proj(y.to(dtype)), [], {"conv": conv_state[:, xs.shape[1] :], "ssm": ssm_state}

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
        y, states, ssm_state = selective_scan(u32, delta, A, at_least_fp32(B), C, mode, ssm_state, readers)
        if shallow:  # C·(h + g ⊙ Σ_i h^{l-i}) = C·h + g ⊙ C·Σ_i h^{l-i}: g acts on channels, C on the state
            y = torch.addcmul(y, at_least_fp32(gate), read_out_sum(C, *(item[0] for item in shallow)))
        y = (y + u32 * at_least_fp32(self.D)) * F.silu(at_least_fp32(z))
        new_state = {"conv": conv_state, "ssm": ssm_state} if call.output_state else None
        return self.out_proj(y.to(dtype)), [(h,) for h in states], new_state


class DenseMambaPreTrainedModel(DenseSSMPreTrainedModel):
    config_class = DenseMambaConfig
    config: DenseMambaConfig
    base_model_prefix = "backbone"

    @torch.no_grad()
    def _init_weights(self, module):
        """Mamba's initialisation; the dense gates start closed.

        Closing the gates (``fc2 = 0``, so ``silu(0) = 0``) makes a fresh DenseMamba compute a Mamba function
        and a Mamba checkpoint loaded into one compute exactly what it computed before: continued
        pretraining starts from the checkpoint's loss, and ``fc2``'s gradient opens the gates from step one.
        """
        super()._init_weights(module)
        if isinstance(module, DenseMambaMixer):
            config = self.config
            std = config.time_step_rank**-0.5 * config.time_step_scale
            if config.time_step_init_scheme == "constant":
                init.constant_(module.dt_proj.weight, std)
            else:
                init.uniform_(module.dt_proj.weight, -std, std)
            init_selective_ssm(module, module.dt_proj.bias, config)


class DenseMambaModel(DenseSSMModel, DenseMambaPreTrainedModel):
    """Embeddings, the mixer stack and the final norm."""

    module_names = ModuleNames(embeddings="embeddings", block_norm="norm", mixer="mixer", final_norm="norm_f")
    mixer_class = DenseMambaMixer
    mixer_modes = ("parallel", "recurrent")  # chunkwise: the stack, a chunk of tokens at a time
    auto_carried_mode = "parallel"  # the blocked scan continues from a carried state
    norm_epsilon = "layer_norm_epsilon"

    def state_layout(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per layer: the conv window ``[K-1, D]`` (the last inputs) and the SSM state ``[D, N]`` (at least fp32)."""
        config = self.config
        stat = torch.promote_types(dtype, torch.float32)
        inner = config.intermediate_size
        return {"conv": ((config.conv_kernel - 1, inner), dtype), "ssm": ((inner, config.state_size), stat)}


class DenseMambaForCausalLM(DenseSSMForCausalLM, DenseMambaPreTrainedModel):
    """DenseMamba with an LM head (tied to the embeddings unless ``tie_word_embeddings=False``);
    ``generate()`` decodes through the O(1) recurrent state."""

    backbone_class = DenseMambaModel


class DenseMambaForSequenceClassification(DenseSSMForSequenceClassification, DenseMambaPreTrainedModel):
    """DenseMamba with a linear score head on the last real token of each row."""

    backbone_class = DenseMambaModel


__all__ = [
    "DenseMambaForCausalLM",
    "DenseMambaForSequenceClassification",
    "DenseMambaModel",
    "DenseMambaPreTrainedModel",
]
