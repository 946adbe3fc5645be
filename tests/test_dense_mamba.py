"""DenseMamba: parity with transformers' Mamba, modes agree (forward and gradients), dense wiring, padding,
generation through the recurrent cache, save/load, presets and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_mamba_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, MambaConfig, MambaForCausalLM

from densessm import DenseMambaConfig, DenseMambaForCausalLM, DenseMambaModel, RecurrentCache
from densessm.models.dense.mixer import MixerCall
from densessm.presets import load_preset

VOCAB = 61
MODES = ("parallel", "chunkwise", "recurrent")


def tiny_config(**overrides) -> DenseMambaConfig:
    return tiny_mamba_config(**{"vocab_size": VOCAB, **overrides})


def tiny_model(**overrides) -> DenseMambaForCausalLM:
    """A tiny model with open gates (they start closed) so the dense path really contributes."""
    model = DenseMambaForCausalLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dense_gate" in name:
                param.normal_(0.0, 0.5)
    return model.eval()


def _hf_mamba(tmp_path, **overrides):
    config = MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=3, **overrides)
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():  # move D and the norms off their constant init, so parity checks them too
        for name, param in model.named_parameters():
            if name.endswith((".D", "norm.weight", "norm_f.weight", "conv1d.bias")):
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_mamba_checkpoint_loads_with_identical_logits(tmp_path, tie):
    hf = _hf_mamba(tmp_path, tie_word_embeddings=tie)
    ours = DenseMambaForCausalLM.from_pretrained(tmp_path, dense_block_layers=0).eval()
    hf_params = dict(hf.named_parameters())
    assert dict(ours.named_parameters()).keys() == hf_params.keys()
    assert (ours.lm_head.weight is ours.backbone.embeddings.weight) == tie
    tokens = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        ref = hf(tokens).logits
        for mode in MODES:
            torch.testing.assert_close(ours(tokens, mode=mode).logits, ref, atol=1e-4, rtol=1e-4, msg=mode)


def test_mamba_checkpoint_into_dense_model_initialises_only_the_dense_parts(tmp_path):
    hf = _hf_mamba(tmp_path)
    dense, info = DenseMambaForCausalLM.from_pretrained(
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
        assert gate.fc1.weight.abs().sum() > 0 and torch.isfinite(gate.fc1.weight).all()
        assert torch.equal(gate.fc2.weight, torch.zeros_like(gate.fc2.weight))
    # closed gates: continued pretraining starts from exactly the checkpoint's function
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(tokens).logits, hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_plain_mamba_has_transformers_parameter_names_and_no_dense_parameters():
    ours = DenseMambaForCausalLM(tiny_config(dense_block_layers=0))
    hf = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=3))
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}
    assert ours.num_parameters() == hf.num_parameters()


def test_fresh_initialisation_follows_mamba():
    config = tiny_config(time_step_min=0.01, time_step_max=0.05)
    mixer = DenseMambaModel(config).layers[1].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 5.0)).expand(32, 4))
    assert torch.equal(mixer.D, torch.ones(32))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    assert torch.equal(mixer.dense_gate.fc2.weight, torch.zeros_like(mixer.dense_gate.fc2.weight))


def _run(model, tokens, mode, chunk_size=None):
    model.zero_grad()
    out = model(tokens, labels=tokens, mode=mode, chunk_size=chunk_size)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(0, 2),
    layers=st.integers(1, 4),
    length=st.integers(1, 14),
    chunk=st.integers(1, 6),
    batch=st.integers(1, 2),
)
def test_modes_agree_forward_and_backward(m, layers, length, chunk, batch):
    # float64 all through: the scan, the norms and the residual stream widen narrow dtypes to fp32 but keep
    # float64 (they once cast it down to fp32, and the modes then agreed only to ~1e-7), so a random draw
    # cannot fail on rounding
    model = tiny_model(dense_block_layers=min(m, layers - 1), num_hidden_layers=layers).double().train()
    for layer in model.backbone.layers[1:]:  # open the dense gates (they start closed)
        if layer.mixer.dense_gate is not None:
            torch.nn.init.normal_(layer.mixer.dense_gate.fc2.weight, std=0.5)
    tokens = torch.randint(0, VOCAB, (batch, length))
    logits_p, grads_p = _run(model, tokens, "parallel")
    assert logits_p.dtype == torch.float64
    names = {n for n, _ in model.named_parameters()}
    assert grads_p.keys() == names
    for mode, size in (("chunkwise", chunk), ("recurrent", None)):
        logits, grads = _run(model, tokens, mode, size)
        torch.testing.assert_close(logits, logits_p, atol=1e-10, rtol=1e-10, msg=mode)
        assert grads.keys() == names
        for name in names:
            scale = grads_p[name].abs().max().clamp_min(1e-12)
            assert (grads[name] - grads_p[name]).abs().max() <= 1e-8 * scale, (mode, name)


def test_dense_parameters_only_where_used():
    dense = DenseMambaModel(tiny_config(num_hidden_layers=4, dense_block_layers=2))
    assert dense.layers[0].mixer.dense_gate is None
    assert all(layer.mixer.dense_gate is not None for layer in dense.layers[1:])
    plain = DenseMambaModel(tiny_config(num_hidden_layers=4, dense_block_layers=0))
    assert not any("dense" in n for n, _ in plain.named_parameters())


def test_m_layers_feed_each_layer():
    """Layer l receives the state sequences of layers l-m .. l-1 (and no others)."""
    model = DenseMambaModel(tiny_config(num_hidden_layers=4, dense_block_layers=2)).eval()
    seen = {}

    def hook(module, args, kwargs):
        seen[module.layer_idx] = [tuple(a.shape) for a in args[1:]]

    for layer in model.layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    model(torch.randint(0, VOCAB, (1, 3)))
    state = (1, 3, 32, 4)
    assert seen == {0: [], 1: [state], 2: [state, state], 3: [state, state]}


def test_dense_read_out_is_the_formula():
    """y_t = C_t·(h_t + g_t ⊙ Σ_i h^{l-i}_t) + D ⊙ u_t, checked on one layer against a hand computation."""
    model = tiny_model(num_hidden_layers=3, dense_block_layers=2)
    mixer = model.backbone.layers[2].mixer
    x = torch.randn(2, 5, 16)
    shallow = (torch.randn(2, 5, 32, 4), torch.randn(2, 5, 32, 4))
    call = MixerCall(mask=None, position_ids=torch.arange(5)[None], mode="parallel", chunk_size=8, output_state=False)
    mixer.readers = 1
    with torch.no_grad():
        out, [(states,)], _ = mixer(x, [(h,) for h in shallow], call, None)
        xs, z = mixer.in_proj(x).chunk(2, dim=-1)
        u = torch.nn.functional.silu(mixer._conv_steps(xs, None, None)[0])
        _, _, C = mixer.ssm_inputs(u)
        fused = states + mixer.dense_gate(x)[..., None] * (shallow[0] + shallow[1])
        y = (fused * C[:, :, None, :]).sum(-1) + mixer.D * u
        expected = mixer.out_proj(y * torch.nn.functional.silu(z))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_dense_connection_changes_the_function():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        before = model(tokens).logits
        for layer in model.backbone.layers[1:]:
            layer.mixer.dense_gate.fc2.weight.zero_()
        closed = model(tokens).logits
        plain = DenseMambaForCausalLM(tiny_config(dense_block_layers=0)).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        torch.testing.assert_close(closed, plain(tokens).logits)
    assert not torch.allclose(before, closed)


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
            torch.testing.assert_close(batched[i, span], model(row[None], mode=mode).logits[0], atol=1e-4, rtol=1e-4)


def test_padding_in_the_middle_leaves_states_untouched():
    """Masks at the source: a padded step changes neither the conv nor the SSM state."""
    model = tiny_model()
    row = torch.randint(3, VOCAB, (1, 6))
    tokens = torch.cat([row[:, :3], torch.zeros(1, 2, dtype=torch.long), row[:, 3:]], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        alone = model(row, use_cache=True)
        for mode in MODES:
            padded = model(tokens, attention_mask=mask, use_cache=True, mode=mode)
            keep = mask[0].bool()
            torch.testing.assert_close(padded.logits[:, keep], alone.logits, atol=1e-4, rtol=1e-4)
            for ours, ref in zip(padded.cache.layers, alone.cache.layers, strict=True):
                for name in ("conv", "ssm"):
                    torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-4)


def _no_cache_greedy(model, prompt, steps):
    tokens = prompt
    for _ in range(steps):
        nxt = model(tokens, mode="parallel", use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


@pytest.mark.parametrize("prefill", ["parallel", "chunkwise"])
@pytest.mark.parametrize("m", [0, 2])
def test_greedy_generation_equals_full_forward(prefill, m):
    model = tiny_model(dense_block_layers=m, forward_mode=prefill)
    prompt = torch.randint(3, VOCAB, (2, 6))
    out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        assert torch.equal(out, _no_cache_greedy(model, prompt, 10))


def test_left_padded_generation_equals_rows_alone():
    model = tiny_model()
    rows = [torch.randint(3, VOCAB, (n,)) for n in (5, 2)]
    tokens = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, 5 - len(row) :], mask[i, 5 - len(row) :] = row, 1
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batched = model.generate(tokens, attention_mask=mask, **kwargs)[:, 5:]
    for i, row in enumerate(rows):
        assert torch.equal(batched[i], model.generate(row[None], **kwargs)[0, len(row) :])


@pytest.mark.parametrize("mode", MODES)
def test_cache_continues_in_every_mode(mode):
    model = tiny_model()
    tokens = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        full = model(tokens, mode="parallel", use_cache=False).logits
        first = model(tokens[:, :6], use_cache=True, mode=mode)
        branch = first.cache.clone()
        rest = model(tokens[:, 6:], cache=first.cache, mode=mode).logits
        again = model(tokens[:, 6:], cache=branch, mode=mode).logits
    torch.testing.assert_close(rest, full[:, 6:], atol=1e-4, rtol=1e-4)
    assert torch.equal(rest, again)
    assert first.cache.get_seq_length() == 11


def test_cache_saves_and_loads(tmp_path):
    model = tiny_model()
    tokens = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(tokens).logits
        model(tokens[:, :5], use_cache=True).cache.save(tmp_path / "state.safetensors")
        cache = RecurrentCache.load(tmp_path / "state.safetensors")
        torch.testing.assert_close(model(tokens[:, 5:], cache=cache).logits, full[:, 5:], atol=1e-4, rtol=1e-4)


def test_generation_state_is_constant_size():
    model = tiny_model()
    prompt = torch.randint(3, VOCAB, (1, 4))
    sizes = []
    for new in (1, 8, 24):
        out = model.generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True
        )
        assert isinstance(out.cache, RecurrentCache)
        assert out.cache.layers[0]["conv"].shape == (1, 3, 32) and out.cache.layers[0]["ssm"].shape == (1, 32, 4)
        sizes.append(sum(t.numel() for layer in out.cache.layers for t in layer.values()))
    assert len(set(sizes)) == 1


def test_beam_search_matches_no_cache():
    model = tiny_model()
    prompt = torch.randint(3, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_through_auto_classes(tmp_path, tie):
    model = tiny_model(tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))
    assert type(AutoConfig.from_pretrained(tmp_path)) is DenseMambaConfig
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DenseMambaForCausalLM)
    assert (loaded.lm_head.weight is loaded.backbone.embeddings.weight) == tie
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DenseMambaModel)


def test_labels_give_the_shifted_cross_entropy():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 6))
    out = model(tokens, labels=tokens)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_inputs_embeds_and_hidden_states():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 5))
    embeds = model.get_input_embeddings()(tokens)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(tokens).logits)
    for mode in ("parallel", "chunkwise"):
        hidden = model(tokens, output_hidden_states=True, mode=mode).hidden_states
        assert len(hidden) == 4 and torch.equal(hidden[0], embeds)


def test_config_default_mode_and_chunk_size_are_used(monkeypatch):
    import densessm.models.mamba.modeling_dense_mamba as modeling

    calls = []
    original = modeling.selective_scan
    monkeypatch.setattr(modeling, "selective_scan", lambda *a: calls.append((a[5], a[0].shape[1])) or original(*a))
    model = tiny_model(forward_mode="chunkwise", chunk_size=3, num_hidden_layers=1, dense_block_layers=0)
    model(torch.randint(0, VOCAB, (1, 7)))
    assert calls == [("parallel", 3), ("parallel", 3), ("parallel", 1)]
    calls.clear()
    model(torch.randint(0, VOCAB, (1, 7)), chunk_size=5)
    assert calls == [("parallel", 5), ("parallel", 2)]
    calls.clear()
    model(torch.randint(0, VOCAB, (1, 2)), mode="recurrent")
    assert calls == [("recurrent", 2)]


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_ids": torch.tensor([[1, 2, VOCAB]])}, f"token id {VOCAB} is out of range"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "empty input"),
        ({"input_ids": torch.tensor([1, 2, 3])}, "shape \\[batch, length\\]"),
        ({"input_ids": torch.tensor([[1.0, 2.0]])}, "integer token ids"),
        ({"input_ids": torch.tensor([[1, 2]]), "mode": "chunky"}, "unknown mode 'chunky'"),
        ({"input_ids": torch.tensor([[1, 2]]), "mode": "chunkwise", "chunk_size": 0}, "chunk_size must be"),
        ({"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(2, 2)}, "attention_mask must have shape"),
        ({"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[1]])}, "labels must have shape"),
        ({}, "exactly one of input_ids or inputs_embeds"),
        ({"inputs_embeds": torch.zeros(1, 2, 5)}, "inputs_embeds must have shape"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(**kwargs)


def test_cache_of_another_batch_is_refused():
    model = tiny_model()
    cache = model(torch.randint(0, VOCAB, (2, 3)), use_cache=True).cache
    with pytest.raises(ValueError, match="cache holds 2 rows but the input has 1"):
        model(torch.randint(0, VOCAB, (1, 1)), cache=cache)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dense_block_layers": -1}, "dense_block_layers must be >= 0"),
        ({"dense_block_layers": 2.0}, "dense_block_layers must be an integer >= 0, got 2.0: a float, not a Python int"),
        ({"use_bias": "false"}, "use_bias must be true or false, got 'false'"),
        ({"residual_in_fp32": 1}, "residual_in_fp32 must be true or false, got 1"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"state_size": -4}, "state_size must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"conv_kernel": 0}, "conv_kernel must be a positive integer"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"forward_mode": "fast"}, "unknown forward_mode 'fast'"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"time_step_min": 0.5}, "time_step_min <= time_step_max"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message) as error:
        tiny_config(**overrides)
    assert isinstance(error.value.__cause__, ValueError)


def test_bad_values_are_refused_when_the_model_is_built(tmp_path):
    with pytest.raises(ValueError, match="gate bottleneck width 16 // 64 is 0"):
        DenseMambaForCausalLM(tiny_config(dense_gate_reduction=64))
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassClassValidationError, match="dense_block_layers must be >= 0"):
        DenseMambaForCausalLM.from_pretrained(tmp_path, dense_block_layers=-1)


@pytest.mark.parametrize(
    ("name", "count"),
    [("mamba_360m", 352_797_696), ("mamba_1p3b", 1_334_740_992), ("dense_mamba_360m", 357_417_984)],
)
def test_preset_parameter_counts(name, count):
    config = load_preset(name)
    with torch.device("meta"):
        ours = DenseMambaForCausalLM(config)
        assert ours.num_parameters() == count
        if config.dense_block_layers == 0:
            fields = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers")}
            assert MambaForCausalLM(MambaConfig(**fields)).num_parameters() == count


def test_tiny_presets_run():
    for name in ("mamba_tiny", "dense_mamba_tiny"):
        model = AutoModelForCausalLM.from_config(load_preset(name)).eval()
        assert isinstance(model, DenseMambaForCausalLM)
        assert model(torch.randint(0, 512, (1, 5))).logits.shape == (1, 5, 512)


@pytest.mark.parametrize("model_cls", ["mamba", "retnet"])
def test_training_step_under_bf16_autocast(model_cls):
    """bf16 autocast (what `densessm train --bf16` does on CPU) runs forward and backward."""
    from conftest import tiny_config as retnet_config

    from densessm import DenseRetNetForCausalLM

    if model_cls == "mamba":
        model = DenseMambaForCausalLM(tiny_config(vocab_size=97))
    else:
        model = DenseRetNetForCausalLM(retnet_config())
    tokens = torch.randint(0, 97, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_kept_transition_matrix_follows_changes_of_a_log():
    torch.manual_seed(0)
    model = DenseMambaForCausalLM(tiny_mamba_config()).eval()
    tokens = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        model(tokens)  # keeps A = -exp(A_log) in every mixer
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(0.7)  # an optimizer step or a load changes A_log in place
        kept = model(tokens).logits
    fresh = model(tokens).logits  # with autograd: recomputed from A_log
    torch.testing.assert_close(kept, fresh.detach())
