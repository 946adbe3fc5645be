"""DenseMamba2: parity with transformers' Mamba-2 (mixer and model, full sequence and decoding), modes agree
(forward and gradients, from a carried state, dense m = 1 and 2), the dense read-out is the formula, padding,
generation through the recurrent cache, presets and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from densessm.models.dense.mixer import MixerCall
from densessm.models.mamba2 import (
    DenseMamba2Config,
    DenseMamba2ForCausalLM,
    DenseMamba2ForSequenceClassification,
    DenseMamba2Mixer,
    DenseMamba2Model,
)
from densessm.ops.ssd import ssd_reference
from densessm.presets import load_preset

VOCAB = 61
MODES = ("parallel", "chunkwise", "recurrent")
SHAPE = dict(hidden_size=16, num_heads=8, head_dim=4, state_size=4, n_groups=2, num_hidden_layers=3, chunk_size=4)


def tiny_config(**overrides) -> DenseMamba2Config:
    fields = dict(SHAPE, vocab_size=VOCAB, dense_gate_reduction=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return DenseMamba2Config(**{**fields, **overrides})


def open_gates(model: torch.nn.Module) -> None:
    """The dense gates start closed; open them so the dense path really contributes."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dense_gate" in name:
                param.normal_(0.0, 0.5)


def tiny_model(**overrides) -> DenseMamba2ForCausalLM:
    model = DenseMamba2ForCausalLM(tiny_config(**overrides))
    open_gates(model)
    return model.eval()


def _perturb(model: torch.nn.Module) -> None:
    """Move D, dt_bias, A_log, the norms and the conv bias off their constant init, so parity checks them too."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".D", "dt_bias", "A_log", "norm.weight", "norm_f.weight", "conv1d.bias")):
                param.add_(torch.randn_like(param) * 0.3)


def _hf_mamba2(tmp_path, **overrides) -> Mamba2ForCausalLM:
    model = Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, **SHAPE, **overrides)).eval()
    _perturb(model)
    model.save_pretrained(tmp_path)
    return model


def _call(mode: str, length: int, output_state: bool = False, mask: torch.Tensor | None = None) -> MixerCall:
    positions = torch.arange(length).expand(2, length)
    return MixerCall(mask=mask, position_ids=positions, mode=mode, chunk_size=3, output_state=output_state)


def test_mixer_equals_transformers_mamba2_mixer():
    """m = 0: the mixer computes transformers' Mamba2Mixer on the same weights, over a whole sequence and token
    by token from a prefill (transformers with its DynamicCache, ours with the state it returns)."""
    hf = Mamba2Mixer(Mamba2Config(**SHAPE), layer_idx=0).eval()
    _perturb(hf)
    ours = DenseMamba2Mixer(tiny_config(dense_block_layers=0), 0, dense=False).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        full = hf(x)
        for mode in ("parallel", "recurrent"):
            torch.testing.assert_close(ours(x, [], _call(mode, 9), None)[0], full, atol=1e-4, rtol=1e-4, msg=mode)
        cache = DynamicCache(config=Mamba2Config(**SHAPE))
        expected = [hf(x[:, :5], cache=cache)] + [hf(x[:, t : t + 1], cache=cache) for t in range(5, 9)]
        out, _, state = ours(x[:, :5], [], _call("parallel", 5, output_state=True), None)
        steps = [out]
        for t in range(5, 9):
            out, _, state = ours(x[:, t : t + 1], [], _call("recurrent", 1, output_state=True), state)
            steps.append(out)
    for ours_t, hf_t in zip(steps, expected, strict=True):
        torch.testing.assert_close(ours_t, hf_t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(expected, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_mamba2_checkpoint_loads_with_identical_logits(tmp_path, tie):
    hf = _hf_mamba2(tmp_path, tie_word_embeddings=tie)
    ours = DenseMamba2ForCausalLM.from_pretrained(tmp_path, dense_block_layers=0).eval()
    assert dict(ours.named_parameters()).keys() == dict(hf.named_parameters()).keys()
    assert (ours.lm_head.weight is ours.backbone.embeddings.weight) == tie
    tokens = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ref = hf(tokens).logits
        for mode in (*MODES, "auto"):
            torch.testing.assert_close(ours(tokens, mode=mode).logits, ref, atol=1e-4, rtol=1e-4, msg=mode)


def test_decoding_equals_transformers_decoding_with_its_cache(tmp_path):
    hf = _hf_mamba2(tmp_path)
    ours = DenseMamba2ForCausalLM.from_pretrained(tmp_path, dense_block_layers=0).eval()
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        hf_out, out = hf(tokens[:, :6], use_cache=True), ours(tokens[:, :6], use_cache=True)
        torch.testing.assert_close(out.logits, hf_out.logits, atol=1e-4, rtol=1e-4)
        hf_cache, cache = hf_out.cache, out.cache
        for t in range(6, 10):
            expected = hf(tokens[:, t : t + 1], cache=hf_cache, use_cache=True).logits
            torch.testing.assert_close(ours(tokens[:, t : t + 1], cache=cache).logits, expected, atol=1e-4, rtol=1e-4)


def test_mamba2_checkpoint_into_dense_model_initialises_only_the_dense_parts(tmp_path):
    hf = _hf_mamba2(tmp_path)
    dense, info = DenseMamba2ForCausalLM.from_pretrained(
        tmp_path, dense_block_layers=2, dense_gate_reduction=4, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == sorted(
        f"backbone.layers.{i}.mixer.dense_gate.{fc}.weight" for i in (1, 2) for fc in ("fc1", "fc2")
    )
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, param in hf.named_parameters():
        assert torch.equal(dense.get_parameter(name), param), name
    for layer in dense.backbone.layers[1:]:
        gate = layer.mixer.dense_gate
        assert gate.fc1.weight.abs().sum() > 0
        assert torch.equal(gate.fc2.weight, torch.zeros_like(gate.fc2.weight))
    tokens = torch.randint(0, VOCAB, (2, 9))  # closed gates: exactly the checkpoint's function
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(tokens).logits, hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_plain_model_has_transformers_parameters_and_no_dense_ones():
    ours = DenseMamba2ForCausalLM(tiny_config(dense_block_layers=0))
    hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, **SHAPE))
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}
    dense = DenseMamba2Model(tiny_config(num_hidden_layers=4, dense_block_layers=2))
    assert dense.layers[0].mixer.dense_gate is None
    assert all(layer.mixer.dense_gate is not None for layer in dense.layers[1:])


def test_fresh_initialisation_follows_mamba2():
    mixer = DenseMamba2Model(tiny_config(time_step_min=0.01, time_step_max=0.05)).layers[1].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 9.0)))
    assert torch.equal(mixer.D, torch.ones(8))
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    assert torch.equal(mixer.norm.weight, torch.ones(32))
    assert torch.equal(mixer.dense_gate.fc2.weight, torch.zeros_like(mixer.dense_gate.fc2.weight))


def _run(model, tokens, mode, chunk_size, cache):
    model.zero_grad()
    out = model(tokens, labels=tokens, mode=mode, chunk_size=chunk_size, cache=None if cache is None else cache.clone())
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(0, 2),
    layers=st.integers(1, 3),
    length=st.integers(1, 9),
    chunk=st.integers(1, 5),
    batch=st.integers(1, 2),
    carried=st.booleans(),
)
def test_modes_agree_forward_and_backward(m, layers, length, chunk, batch, carried):
    # float64 all through, so a random draw cannot fail on rounding; gates open, so the dense path counts
    model = tiny_model(dense_block_layers=min(m, layers - 1), num_hidden_layers=layers).double().train()
    tokens = torch.randint(0, VOCAB, (batch, length))
    cache = None
    if carried:  # continue from a state: the parallel form re-runs the layers below from their start states
        with torch.no_grad():
            cache = model(torch.randint(0, VOCAB, (batch, 3)), use_cache=True).cache
    logits_p, grads_p = _run(model, tokens, "parallel", None, cache)
    assert logits_p.dtype == torch.float64
    names = {n for n, _ in model.named_parameters()}
    assert grads_p.keys() == names
    for mode, size in (("parallel", chunk), ("chunkwise", chunk), ("recurrent", None)):
        logits, grads = _run(model, tokens, mode, size, cache)
        torch.testing.assert_close(logits, logits_p, atol=1e-10, rtol=1e-10, msg=mode)
        assert grads.keys() == names
        for name in names:
            scale = grads_p[name].abs().max().clamp_min(1e-12)
            assert (grads[name] - grads_p[name]).abs().max() <= 1e-8 * scale, (mode, name)


def test_m_layers_feed_each_layer():
    """Layer l receives the items of layers l-m .. l-1 (and no others), five tensors each."""
    model = DenseMamba2Model(tiny_config(num_hidden_layers=4, dense_block_layers=2)).eval()
    seen = {}
    for layer in model.layers:
        layer.mixer.register_forward_pre_hook(
            lambda module, args: seen.__setitem__(module.layer_idx, [len(item) for item in args[1]])
        )
    model(torch.randint(0, VOCAB, (1, 3)))
    assert seen == {0: [], 1: [5], 2: [5, 5], 3: [5, 5]}
    assert [layer.mixer.readers for layer in model.layers] == [2, 2, 1, 0]


def _by_hand(mixer: DenseMamba2Mixer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One mixer's SSM pieces from the definitions: a plain padded conv and the step-by-step reference."""
    heads, width, groups, size = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    z, xBC, dt = mixer.in_proj(x).split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
    kernel = mixer.conv1d.weight.shape[-1]
    conv = F.conv1d(
        xBC.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=kernel - 1, groups=xBC.shape[-1]
    )
    xs, B, C = F.silu(conv[..., : x.shape[1]].transpose(1, 2)).split([heads * width, groups * size, groups * size], -1)
    xs, B, C = xs.unflatten(-1, (heads, width)), B.unflatten(-1, (groups, size)), C.unflatten(-1, (groups, size))
    delta = F.softplus(dt + mixer.dt_bias)
    _, states, _ = ssd_reference(xs, delta, -torch.exp(mixer.A_log), B, C)
    return dict(z=z, x=xs, C=C, states=states)


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_dense_read_out_is_the_formula(mode):
    """y_t = C_t·(h_t + g_t ⊙ Σ_i h^{l-i}_t) + D ⊙ x_t, checked on the top layer against the states of the
    step-by-step reference (whatever a layer hands up, this is what it must amount to)."""
    model = tiny_model(num_hidden_layers=3, dense_block_layers=2).double()
    inputs, outputs = {}, {}

    def record(module, args, out):
        inputs[module.layer_idx], outputs[module.layer_idx] = args[0], out[0]

    for layer in model.backbone.layers:
        layer.mixer.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 7)), mode=mode, chunk_size=3)
        top = model.backbone.layers[2].mixer
        pieces = [_by_hand(layer.mixer, inputs[i]) for i, layer in enumerate(model.backbone.layers)]
        own = pieces[2]
        gate = top.dense_gate(inputs[2]).unflatten(-1, (8, 4))[..., None]
        fused = own["states"] + gate * (pieces[0]["states"] + pieces[1]["states"])
        y = torch.einsum("blhpn,blhn->blhp", fused, own["C"].repeat_interleave(4, dim=2)) + top.D[:, None] * own["x"]
        expected = top.out_proj(top.norm(y.flatten(-2), own["z"]))
    torch.testing.assert_close(outputs[2], expected, atol=1e-10, rtol=1e-9)


def test_closed_gates_compute_the_plain_model_and_open_ones_do_not():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        opened = model(tokens).logits
        for layer in model.backbone.layers[1:]:
            layer.mixer.dense_gate.fc2.weight.zero_()
        closed = model(tokens).logits
        plain = DenseMamba2ForCausalLM(tiny_config(dense_block_layers=0)).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        torch.testing.assert_close(closed, plain(tokens).logits)
    assert not torch.allclose(opened, closed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("m", [0, 2])
def test_padded_batch_equals_rows_alone(mode, side, m):
    model = tiny_model(dense_block_layers=m, chunk_size=3)
    rows = [torch.randint(3, VOCAB, (n,)) for n in (7, 4, 1)]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    spans = [slice(width - len(r), width) if side == "left" else slice(0, len(r)) for r in rows]
    for i, (row, span) in enumerate(zip(rows, spans, strict=True)):
        tokens[i, span], mask[i, span] = row, 1
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask, mode=mode).logits
        for i, (row, span) in enumerate(zip(rows, spans, strict=True)):
            torch.testing.assert_close(batched[i, span], model(row[None], mode=mode).logits[0], atol=1e-5, rtol=1e-4)


def test_padding_anywhere_leaves_the_states_untouched_even_if_it_holds_nan():
    """A padded step changes neither the conv nor the SSM state, whatever its embedding holds."""
    model = tiny_model()
    row = torch.randint(3, VOCAB, (1, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
    embeds = model.get_input_embeddings()(torch.cat([row[:, :3], row[:, :2], row[:, 3:]], dim=1)).detach()
    embeds[0, 3:5] = float("nan")
    with torch.no_grad():
        alone = model(row, use_cache=True)
        for mode in MODES:
            padded = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, mode=mode)
            torch.testing.assert_close(padded.logits[:, mask[0].bool()], alone.logits, atol=1e-5, rtol=1e-4)
            for ours, ref in zip(padded.cache.layers, alone.cache.layers, strict=True):
                for name in ("conv", "ssm"):
                    torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-4, msg=(mode, name))


@pytest.mark.parametrize("prefill", ["auto", "chunkwise", "recurrent"])
@pytest.mark.parametrize("m", [0, 2])
def test_greedy_generation_equals_full_forward(prefill, m):
    model = tiny_model(dense_block_layers=m, forward_mode=prefill)
    prompt = torch.randint(3, VOCAB, (2, 6))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)  # no stop, no suppression
    tokens = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = model(tokens, mode="parallel", use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(out, tokens)


@pytest.mark.parametrize("mode", MODES)
def test_cache_continues_in_every_mode(mode):
    model = tiny_model()
    tokens = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        full = model(tokens, mode="parallel", use_cache=False).logits
        first = model(tokens[:, :6], use_cache=True, mode=mode)
        assert first.cache.layers[0]["conv"].shape == (2, 3, 48)
        assert first.cache.layers[0]["ssm"].shape == (2, 8, 4, 4)
        rest = model(tokens[:, 6:], cache=first.cache, mode=mode).logits
    torch.testing.assert_close(rest, full[:, 6:], atol=1e-5, rtol=1e-4)
    assert first.cache.get_seq_length() == 11


def test_gradient_checkpointing_gives_identical_gradients():
    model = tiny_model().train()
    tokens = torch.randint(0, VOCAB, (2, 7))

    def grads():
        model.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_training_step_under_bf16_autocast():
    model = tiny_model().train()
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sequence_classification_scores_the_last_real_token():
    config = tiny_config(num_labels=3)
    model = DenseMamba2ForSequenceClassification(config).eval()
    tokens = torch.randint(3, VOCAB, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        pooled = model(tokens, attention_mask=mask).logits
        hidden = model.backbone(tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(pooled, model.score(hidden[[0, 1], [4, 2]]))


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_through_auto_classes(tmp_path, tie):
    model = tiny_model(tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is DenseMamba2Config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DenseMamba2ForCausalLM)
    assert (loaded.lm_head.weight is loaded.backbone.embeddings.weight) == tie
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DenseMamba2Model)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dense_block_layers": -1}, "dense_block_layers must be >= 0"),
        ({"dense_block_layers": 2.0}, "dense_block_layers must be an integer >= 0, got 2.0: a float, not a Python int"),
        ({"use_conv_bias": "no"}, "use_conv_bias must be true or false, got 'no'"),
        ({"dense_block_layers": 3}, "dense_block_layers=3 exceeds the 2 layer"),
        ({"num_heads": 0}, "num_heads must be a positive integer"),
        ({"head_dim": 3}, "hidden_size \\* expand \\(32\\) must equal num_heads \\* head_dim \\(24\\)"),
        ({"n_groups": 3}, "num_heads=8 does not split into n_groups=3"),
        ({"state_size": 0}, "state_size must be a positive integer"),
        ({"conv_kernel": 0}, "conv_kernel must be a positive integer"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"forward_mode": "fast"}, "unknown forward_mode 'fast'"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"time_step_min": 0.5}, "time_step_min <= time_step_max"),
        ({"time_step_limit": (0.5, 0.1)}, "time_step_limit must be \\(min, max\\)"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon must be a finite number > 0"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message) as error:
        tiny_config(**overrides)
    assert isinstance(error.value.__cause__, ValueError)


def test_a_mamba2_config_reads_as_a_dense_mamba2_config():
    fields = Mamba2Config(vocab_size=VOCAB, **SHAPE).to_dict()
    fields.pop("model_type")
    config = DenseMamba2Config(**fields, dense_block_layers=0)
    assert (config.num_heads, config.n_groups, list(config.time_step_limit)) == (8, 2, [0.0, float("inf")])


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("mamba2_370m", 349_619_712),
        ("dense_mamba2_370m", 354_240_000),
        ("mamba2_1p3b", 1_306_303_488),
        ("dense_mamba2_1p3b", 1_324_784_640),
    ],
)
def test_preset_parameter_counts(name, count):
    config = load_preset(name)
    with torch.device("meta"):
        assert DenseMamba2ForCausalLM(config).num_parameters() == count
        if config.dense_block_layers == 0:
            fields = {k: v for k, v in config.to_dict().items() if k in Mamba2Config.__dataclass_fields__}
            assert Mamba2ForCausalLM(Mamba2Config(**fields)).num_parameters() == count


def test_tiny_presets_run():
    for name in ("mamba2_tiny", "dense_mamba2_tiny"):
        model = AutoModelForCausalLM.from_config(load_preset(name)).eval()
        assert isinstance(model, DenseMamba2ForCausalLM)
        assert model(torch.randint(0, 512, (1, 5))).logits.shape == (1, 5, 512)
