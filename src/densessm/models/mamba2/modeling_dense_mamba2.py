"""DenseMamba2: Mamba-2 blocks whose SSM read-out also sees the SSM states of the layers below.

Per layer: ``x + Mixer(RMSNorm(x))``, a final RMSNorm and an LM head (untied by default, as Mamba-2). The mixer
is Mamba-2's: ``[z, xBC, dt] = in_proj(x̂)``, ``[x, B, C] = silu(causal_conv(xBC))`` (``x`` split into ``H``
heads of ``P`` channels, ``B, C`` into ``G`` groups), ``Δ = clamp(softplus(dt + dt_bias))`` per head, the SSD
recurrence ``h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t`` with a scalar ``A`` per head and a ``[H, P, N]`` state
(see :mod:`densessm.ops.ssd`), ``y_t = C_t · h_t + D ⊙ x_t``, then ``out_proj(GatedRMSNorm(y, z))``. Parameter
and config names are those of ``transformers``' Mamba-2, so its checkpoints load here unchanged.

**Dense hidden connection** (DenseSSM, He et al. 2024), as in DenseMamba. Layer ``l`` receives the SSM states
``h^{l-1} … h^{l-m}`` of the ``m = dense_block_layers`` layers below (fewer near the bottom; layer 0 and
``m = 0`` allocate nothing). The selective transition is the identity projection of each state times a gate
``g^l_t = SelectiveTransitionGate(x̂^l_t) ∈ R^{H·P}`` over the inner channels; hidden fusion adds the selected
states to the layer's own before the read-out, and the result goes through the gated norm::

    y^l_t = C^l_t · (h^l_t + g^l_t ⊙ Σ_i h^{l-i}_t) + D ⊙ x^l_t

The state carried to ``t+1`` is the un-fused ``h^l_t``, so every layer's recurrence is Mamba-2's. The gate acts
on the channels ``(H, P)`` and the read-out contracts the state dimension ``N``, so they commute::

    y^l_t = C^l_t · h^l_t + g^l_t ⊙ Σ_i C^l_t · h^{l-i}_t + D ⊙ x^l_t

*What a layer hands up.* ``C^l · h^{l-i}`` is the SSM of layer ``l-i`` -- its ``x, Δ, B, A`` and the state it
started the call from -- read out with layer ``l``'s ``C``. The blocked SSD never forms the per-position states
(``[b, L, H, P, N]``: ``N`` times the size of ``x``, 128 for the reference models), so in ``parallel`` mode a
layer hands up ``(x, Δ, B, A, start state)`` and the reader runs the blocked SSD once over the ``m`` layers
below, stacked as ``m·H`` heads (``m·G`` groups, its own ``C`` repeated per layer), and sums the ``m`` head
blocks. In ``recurrent`` mode the steps form every state anyway, so a layer hands up
``(x, Δ, B, A, states [b, L, H, P, N])`` and the reader reads them out with its ``C`` (one pass each): a decode
step recomputes nothing. Both are exact, so the modes agree in value and gradient (autograd reaches the lower
layers through the re-run SSD or through the states).

*Cost per dense layer* on top of a Mamba-2 layer: the gate MLP (``L·H_model·(H_model/r) + L·(H_model/r)·H·P``
multiply-adds); in ``parallel`` mode one blocked SSD over ``m·H`` heads -- ``m`` times the layer's own SSD, i.e.
per token about ``m·(Q·(G·N + H·P) + 2·H·P·N)`` multiply-adds for chunk length ``Q`` -- and its activations
under autograd (``m`` times the own SSD's ``[b, L, H, Q]`` chunk matrices); the handed-up tensors are what the
lower layer computed anyway (``H·P + H + G·N`` numbers per token and a ``[H, P, N]`` state). In ``recurrent``
mode ``m`` read passes over ``[b, L, H, P, N]``, and the lower layers' states live until the layers above have
read them (one state each when decoding a token; ``L`` of them for an ``L``-token recurrent call, which is
why ``auto`` runs longer calls in parallel).

**Modes** (``auto`` resolved by the stack): ``parallel`` runs the blocked SSD (chunks of ``chunk_size``) over
the call from the carried state; ``recurrent`` steps the SSM one token at a time (the decode path; a one-token
call also takes the conv's step form); ``chunkwise`` is the stack's, ``chunk_size`` tokens of the whole stack
at a time.

**Masks.** A padded position contributes nothing to any state: it is left out of every convolution window
(and of the conv state), its ``x, B, C`` are 0 and its ``Δ`` is 0, which makes its SSM step the identity (no
decay, no input). All by selection (``torch.where``), never a product with 0, so whatever a padded position
holds (even NaN) cannot reach a real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densessm.models.dense.gate import SelectiveTransitionGate
from densessm.models.dense.heads import DenseSSMForCausalLM, DenseSSMForSequenceClassification
from densessm.models.dense.mixer import Handoff, LayerState, Mixer, MixerCall
from densessm.models.dense.stack import DenseSSMModel, DenseSSMPreTrainedModel, ModuleNames
from densessm.models.mamba2.configuration_dense_mamba2 import DenseMamba2Config
from densessm.models.precision import at_least_fp32
from densessm.models.ssm_init import init_selective_ssm
from densessm.ops.conv import causal_conv, causal_conv_step
from densessm.ops.ssd import ssd, time_step


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``RMSNorm(y ⊙ silu(z))`` with its statistic taken per group of channels (one per
    ``B, C`` group), in at least fp32."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = at_least_fp32(y) * F.silu(at_least_fp32(z))
        grouped = gated.unflatten(-1, (self.groups, -1))
        normed = F.rms_norm(grouped, grouped.shape[-1:], eps=self.eps).flatten(-2)
        return normed * self.weight.to(normed.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.groups}, eps={self.eps}"


class DenseMamba2Mixer(Mixer):
    """The Mamba-2 mixer, with the dense read-out of the shallow states when ``dense`` is set. It hands up
    ``(x, Δ, B, A, start state)`` in parallel mode and ``(x, Δ, B, A, states)`` in recurrent mode (see the
    module docstring)."""

    handoff_arity = 5

    def __init__(self, config: DenseMamba2Config, layer_idx: int, dense: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.n_groups, self.ssm_state_size = config.n_groups, config.state_size
        self.intermediate_size = config.num_heads * config.head_dim
        self.conv_dim = self.intermediate_size + 2 * config.n_groups * config.state_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.in_proj = nn.Linear(
            config.hidden_size, self.intermediate_size + self.conv_dim + config.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim, bias=config.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(config.num_heads))
        self.A_log = nn.Parameter(torch.empty(config.num_heads))
        self.D = nn.Parameter(torch.empty(config.num_heads))
        self.norm = GatedRMSNorm(self.intermediate_size, config.n_groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.dense_gate = None
        if dense:
            self.dense_gate = SelectiveTransitionGate(
                config.hidden_size, self.intermediate_size, config.dense_gate_reduction
            )
            self.dense_gate.fc2.zero_init = True  # the gate starts closed: see DenseMamba2PreTrainedModel

    def _conv(self, xBC: torch.Tensor, state: torch.Tensor | None, call: MixerCall):
        """``silu(causal_conv(xBC))`` with padded positions selected to 0, and the new conv state."""
        weight, bias, mask = self.conv1d.weight, self.conv1d.bias, call.mask
        if call.mode == "recurrent" and xBC.shape[1] == 1 and state is not None:  # a decode step
            y, state = causal_conv_step(xBC[:, 0], weight, bias, state, None if mask is None else mask[:, 0])
            y = y[:, None]
        else:
            y, state = causal_conv(xBC, weight, bias, state, mask)
        y = F.silu(y)
        return (y if mask is None else torch.where(mask[..., None], y, 0)), state

    def _read_shallow(self, shallow: list[Handoff], C: torch.Tensor, call: MixerCall) -> torch.Tensor:
        """``Σ_i C^l · h^{l-i}`` ``[b, L, H, P]`` from what the layers below handed up (see the module docstring)."""
        if call.mode == "recurrent":
            batch, length, groups, size = C.shape
            rows = C[..., None]  # [b, L, G, N, 1]: one product per group reads all of its heads' states
            total = None
            for *_, states in shallow:
                part = torch.matmul(states.reshape(batch, length, groups, -1, size), rows)
                total = part if total is None else total + part
            return total.view(batch, length, self.num_heads, self.head_dim)
        columns = zip(*shallow, strict=True)  # the x's, Δ's, B's, A's and start states of the layers below
        x, dt, B, A, start = (torch.cat(c, dim) for c, dim in zip(columns, (2, 2, 2, 0, 1), strict=True))
        C = C.repeat(1, 1, len(shallow), 1)  # the layers below as m·H heads in m·G groups, all read with this C
        y, _, _ = ssd(x, dt, A, B, C, "parallel", start, call.chunk_size)
        return y.unflatten(2, (len(shallow), self.num_heads)).sum(2)

    def forward(
        self, x: torch.Tensor, shallow: list[Handoff], call: MixerCall, state: LayerState | None
    ) -> tuple[torch.Tensor, list[Handoff], LayerState | None]:
        """``x [b, L, H_model]`` (normed) -> ``(out [b, L, H_model], one item per reader above, {conv, ssm})``."""
        dtype, mode = x.dtype, call.mode
        conv_state, ssm_state = (None, None) if state is None else (state["conv"], state["ssm"])
        heads, width, groups, size = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        z, xBC, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, heads], dim=-1)
        xBC, conv_state = self._conv(xBC, conv_state, call)
        xs, B, C = at_least_fp32(xBC).split([self.intermediate_size, groups * size, groups * size], dim=-1)
        xs, B, C = xs.unflatten(-1, (heads, width)), B.unflatten(-1, (groups, size)), C.unflatten(-1, (groups, size))
        delta = time_step(at_least_fp32(dt), at_least_fp32(self.dt_bias), self.time_step_limit, call.mask)
        A = -torch.exp(at_least_fp32(self.A_log))
        if ssm_state is None and self.readers and mode == "parallel":
            ssm_state = xs.new_zeros(xs.shape[0], heads, width, size)  # the start the readers re-run from
        start = ssm_state
        keep = mode == "recurrent" and self.readers > 0
        y, states, ssm_state = ssd(
            xs, delta, A, B, C, mode, ssm_state, call.chunk_size, D=at_least_fp32(self.D), keep_states=keep
        )
        if shallow:  # C·(h + g ⊙ Σ_i h^{l-i}) = C·h + g ⊙ Σ_i C·h^{l-i}: g acts on channels, C on the state
            gate = at_least_fp32(self.dense_gate(x)).unflatten(-1, (heads, width))
            y = torch.addcmul(y, gate, self._read_shallow(shallow, C, call))
        out = self.out_proj(self.norm(y.flatten(-2), z).to(dtype))
        handoff = [(xs, delta, B, A, states if keep else start)] * self.readers
        new_state = {"conv": conv_state, "ssm": ssm_state} if call.output_state else None
        return out, handoff, new_state


class DenseMamba2PreTrainedModel(DenseSSMPreTrainedModel):
    config_class = DenseMamba2Config
    config: DenseMamba2Config
    base_model_prefix = "backbone"

    @torch.no_grad()
    def _init_weights(self, module):
        """Mamba-2's initialisation; the dense gates start closed.

        Closing the gates (``fc2 = 0``, so ``silu(0) = 0``) makes a fresh DenseMamba2 compute a Mamba-2 function
        and a Mamba-2 checkpoint loaded into one compute exactly what it computed before: continued
        pretraining starts from the checkpoint's loss, and ``fc2``'s gradient opens the gates from step one.
        """
        super()._init_weights(module)
        if isinstance(module, DenseMamba2Mixer):
            init_selective_ssm(module, module.dt_bias, self.config)


class DenseMamba2Model(DenseSSMModel, DenseMamba2PreTrainedModel):
    """Embeddings, the Mamba-2 mixer stack and the final norm."""

    module_names = ModuleNames(embeddings="embeddings", block_norm="norm", mixer="mixer", final_norm="norm_f")
    mixer_class = DenseMamba2Mixer
    mixer_modes = ("parallel", "recurrent")  # chunkwise: the stack, a chunk of tokens at a time
    auto_carried_mode = "parallel"  # the blocked SSD continues from a carried state
    norm_epsilon = "layer_norm_epsilon"

    def state_layout(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per layer: the conv window ``[K-1, conv_dim]`` (the last inputs of ``x, B, C``) and the SSM state
        ``[H, P, N]`` (at least fp32)."""
        config = self.config
        stat = torch.promote_types(dtype, torch.float32)
        conv_dim = config.num_heads * config.head_dim + 2 * config.n_groups * config.state_size
        return {
            "conv": ((config.conv_kernel - 1, conv_dim), dtype),
            "ssm": ((config.num_heads, config.head_dim, config.state_size), stat),
        }


class DenseMamba2ForCausalLM(DenseSSMForCausalLM, DenseMamba2PreTrainedModel):
    """DenseMamba2 with an LM head (tied to the embeddings when ``tie_word_embeddings``); ``generate()`` decodes
    through the O(1) recurrent state."""

    backbone_class = DenseMamba2Model


class DenseMamba2ForSequenceClassification(DenseSSMForSequenceClassification, DenseMamba2PreTrainedModel):
    """DenseMamba2 with a linear score head on the last real token of each row."""

    backbone_class = DenseMamba2Model


__all__ = [
    "DenseMamba2ForCausalLM",
    "DenseMamba2ForSequenceClassification",
    "DenseMamba2Mixer",
    "DenseMamba2Model",
    "DenseMamba2PreTrainedModel",
]
