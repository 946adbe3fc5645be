"""The converter on other shapes and weight layouts, and its errors on damaged or foreign checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, tiny_mamba_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.convert import _BLOCK_NAMES, CheckpointError, convert_reference_checkpoint
from densessm.ops.retention import head_log_decays, rotation_angles

OURS_TO_REF = {ours: ref for ref, ours in _BLOCK_NAMES.items()}


def _reference_layout(model: DenseRetNetForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under the reference's names, with the reference's dead layer-0 tensors and buffers."""
    config = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if ".retention." in name:
            prefix, rest = name.split(".retention.")
            name = f"{prefix}.self_attn.{OURS_TO_REF[rest]}"
        state[name] = tensor.clone()
    donor = model.model.layers[1].retention.dense
    for ours, tensor in donor.state_dict().items():
        state[f"model.layers.0.self_attn.{OURS_TO_REF['dense.' + ours]}"] = torch.randn_like(tensor)
    state["model.retnet_rel_pos.decay"] = head_log_decays(config.num_attention_heads)
    state["model.retnet_rel_pos.angle"] = rotation_angles(config.query_key_dim // config.num_attention_heads)
    return state


def _write_reference(tmp_path, model, layout="safetensors"):
    config = model.config
    ref_config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": config.hidden_size,
        "query_key_dim": config.query_key_dim,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "v_factor": config.v_factor,
        "dense_block_layers": config.dense_block_layers,
        "rms_norm_eps": config.rms_norm_eps,
        "deepnorm": False,
        "dropout": 0.1,
    }
    src = tmp_path / "ref"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(ref_config))
    (src / "tokenizer_config.json").write_text("{}")
    state = _reference_layout(model)
    names = sorted(state)
    if layout == "safetensors":
        save_file(state, src / "model.safetensors")
    elif layout == "bin":
        torch.save(state, src / "pytorch_model.bin")
    else:  # two shards plus an index
        half = len(names) // 2
        shards = {"a": names[:half], "b": names[half:]}
        ext = "safetensors" if layout == "sharded-safetensors" else "bin"
        weight_map = {}
        for tag, part in shards.items():
            file = f"model-{tag}.{ext}"
            chunk = {n: state[n] for n in part}
            save_file(chunk, src / file) if ext == "safetensors" else torch.save(chunk, src / file)
            weight_map.update(dict.fromkeys(part, file))
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (src / index).write_text(json.dumps({"weight_map": weight_map}))
    return src


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded-safetensors", "sharded-bin"])
@pytest.mark.parametrize(
    "shape",
    [
        dict(num_attention_heads=4, query_key_dim=32, num_hidden_layers=3, dense_block_layers=1, vocab_size=53),
        dict(num_attention_heads=1, query_key_dim=8, num_hidden_layers=4, dense_block_layers=3, k_gate_reduction=8),
    ],
)
def test_other_shapes_and_layouts_round_trip(tmp_path, layout, shape):
    model = DenseRetNetForCausalLM(tiny_config(**shape)).eval()
    src = _write_reference(tmp_path, model, layout)
    dst = convert_reference_checkpoint(src, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert loaded.config.k_gate_reduction == model.config.k_gate_reduction
    assert loaded.config.dropout == 0.1
    assert (dst / "tokenizer_config.json").is_file()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)
    assert list(dst.glob("*.bin")) == [] and (dst / "model.safetensors").is_file()


@pytest.mark.parametrize("stored_head", [True, False])
def test_a_reference_with_tied_embeddings_converts_to_a_tied_model(tmp_path, stored_head):
    """The reference ties its head to the embeddings at load when its config says so: a stored lm_head (another
    tensor) was converted as the head, so the converted logits differed from the reference's; without a stored
    head the conversion failed blaming a missing tensor."""
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    src = _write_reference(tmp_path, model)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    state = load_file(src / "model.safetensors")
    if not stored_head:
        del state["lm_head.weight"]
    save_file(state, src / "model.safetensors")
    dst = convert_reference_checkpoint(src, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, state["model.embed_tokens.weight"])
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    model.lm_head.weight = model.model.embed_tokens.weight  # what the reference computes with
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)


def test_a_tie_word_embeddings_that_is_not_a_boolean_is_named(tmp_path):
    _error(
        tmp_path, "tie_word_embeddings must be true or false", mutate_config=lambda c: c.update(tie_word_embeddings=1)
    )


def test_dtype_option(tmp_path):
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    dst = convert_reference_checkpoint(_write_reference(tmp_path, model), tmp_path / "out", dtype=torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(dst).dtype == torch.bfloat16


def _error(tmp_path, match, mutate_state=None, mutate_config=None, corrupt=None):
    model = DenseRetNetForCausalLM(tiny_config())
    src = _write_reference(tmp_path, model)
    if mutate_state or corrupt:
        state = load_file(src / "model.safetensors")
        if mutate_state:
            mutate_state(state)
            save_file(state, src / "model.safetensors")
        if corrupt:
            corrupt(src)
    if mutate_config:
        config = json.loads((src / "config.json").read_text())
        mutate_config(config)
        (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        convert_reference_checkpoint(src, tmp_path / "out")


def test_missing_tensor_is_named(tmp_path):
    _error(
        tmp_path,
        "missing tensors: model.layers.1.retention.q_proj.weight",
        mutate_state=lambda s: s.pop("model.layers.1.self_attn.q_proj.weight"),
    )


def test_unexpected_tensor_is_named(tmp_path):
    _error(
        tmp_path,
        "unexpected tensors: model.layers.2.mlp.up_proj.weight",
        mutate_state=lambda s: s.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(2)),
    )


def test_wrong_shape_is_named(tmp_path):
    _error(
        tmp_path, "lm_head.weight has shape", mutate_state=lambda s: s.__setitem__("lm_head.weight", torch.zeros(3, 32))
    )


def test_truncated_safetensors(tmp_path):
    def truncate(src):
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])

    _error(tmp_path, "corrupt or truncated safetensors file", corrupt=truncate)


def test_garbage_bin_is_rejected(tmp_path):
    def garbage(src):
        (src / "model.safetensors").unlink()
        (src / "pytorch_model.bin").write_bytes(b"not a pickle at all")

    _error(tmp_path, "cannot read .*pytorch_model.bin safely", corrupt=garbage)


def test_unsafe_pickle_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    def evil(src):
        (src / "model.safetensors").unlink()
        torch.save({"x": Evil()}, src / "pytorch_model.bin")

    _error(
        tmp_path,
        r"^cannot read .*pytorch_model.bin safely \(weights_only=True\): it holds what a weights-only load refuses "
        r"\(.+\); it was not loaded \(no code in it ran\)$",  # one line, and not torch's advice to load unsafely
        corrupt=evil,
    )
    assert not (tmp_path / "PWNED").exists()


def test_no_config(tmp_path):
    (tmp_path / "ref").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")


def test_no_weights(tmp_path):
    _error(tmp_path, "no weights in", corrupt=lambda src: (src / "model.safetensors").unlink())


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_reference_checkpoint(tmp_path / "nowhere", tmp_path / "out")


def test_not_a_dense_retnet_config(tmp_path):
    _error(tmp_path, "missing query_key_dim", mutate_config=lambda c: c.pop("query_key_dim"))


@pytest.mark.parametrize("make", [DenseRetNetForCausalLM, DenseMambaForCausalLM])
def test_a_directory_already_converted_is_named_so(tmp_path, make):
    """Converting our own save_pretrained output was blamed on a missing reference tensor."""
    config = tiny_config() if make is DenseRetNetForCausalLM else tiny_mamba_config()
    make(config).save_pretrained(tmp_path / "ours")
    with pytest.raises(CheckpointError) as error:
        convert_reference_checkpoint(tmp_path / "ours", tmp_path / "out")
    assert str(error.value) == (
        f"{tmp_path / 'ours'} already holds a densessm model ({config.model_type}): it loads as it is; convert "
        "reads only the public reference's checkpoints (model_type llama)"
    )
    assert not (tmp_path / "out").exists()


def test_reference_m0_is_refused(tmp_path):
    _error(tmp_path, "dense_block_layers=0", mutate_config=lambda c: c.__setitem__("dense_block_layers", 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_reference_saved_in_half_precision_converts(tmp_path, dtype):
    """``model.half().save_pretrained()`` rounds the fixed decays and angles too: they were refused as "not the
    standard RetNet constants" under a tolerance meant for fp32."""
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    src = _write_reference(tmp_path, model)
    state = {name: tensor.to(dtype) for name, tensor in load_file(src / "model.safetensors").items()}
    save_file(state, src / "model.safetensors")
    dst = convert_reference_checkpoint(src, tmp_path / "out")
    converted = AutoModelForCausalLM.from_pretrained(dst)
    assert converted.dtype == dtype
    ours = converted.state_dict()["model.layers.1.retention.q_proj.weight"]
    assert torch.equal(ours, model.state_dict()["model.layers.1.retention.q_proj.weight"].to(dtype))


def test_nonstandard_decay_is_refused(tmp_path):
    _error(
        tmp_path,
        "model.retnet_rel_pos.decay differs",
        mutate_state=lambda s: s.__setitem__("model.retnet_rel_pos.decay", torch.zeros(2)),
    )


def test_cli_reports_errors(tmp_path, capsys):
    from densessm.cli import main

    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, dtype",
    [("model.layers.1.input_layernorm.weight", torch.int8), ("model.layers.1.self_attn.q_proj.weight", torch.int32)],
)
def test_an_integer_tensor_is_named_with_its_dtype_and_nothing_is_written(tmp_path, capsys, name, dtype):
    """Integer values would be cast into floating-point weights (or fail deep in load_state_dict): named instead,
    under the reference's own tensor name."""
    from densessm.cli import main

    src = _write_reference(tmp_path, DenseRetNetForCausalLM(tiny_config()))
    state = load_file(src / "model.safetensors")
    state[name] = state[name].to(dtype)
    save_file(state, src / "model.safetensors")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    stored = str(dtype).removeprefix("torch.")
    assert f"{name} stored as {stored} (the model holds floating-point values there)" in err, err
    assert "\n" not in err and "internal error" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named_and_nothing_is_written(tmp_path, capsys, value):
    """generate and eval stop at a NaN weight; convert used to copy it silently into a new model directory."""
    from densessm.cli import main

    src = _write_reference(tmp_path, DenseRetNetForCausalLM(tiny_config()))
    state = load_file(src / "model.safetensors")
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] = value
    save_file(state, src / "model.safetensors")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "the weights of model.layers.1.retention.q_proj.weight hold NaN or inf values" in err, err
    assert "\n" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_destination_that_is_a_broken_symlink_is_a_usage_error_naming_it(tmp_path, capsys, kind):
    from densessm.cli import main

    src = _write_reference(tmp_path, DenseRetNetForCausalLM(tiny_config()))
    dst = tmp_path / "dst"
    if kind == "loop":
        (tmp_path / "other").symlink_to(dst)
        dst.symlink_to(tmp_path / "other")
        reason = "is a symlink loop"
    else:
        dst.symlink_to(tmp_path / "missing" / "deeper")
        reason = f"is a symlink to a missing target ({tmp_path / 'missing' / 'deeper'})"
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{dst} {reason}" in err and "\n" not in err, err
    assert dst.is_symlink() and not (tmp_path / "missing").exists()


def test_the_same_weights_in_two_layouts_convert_and_different_ones_are_named(tmp_path):
    """A published checkpoint often holds model.safetensors beside pytorch_model.bin; a stale .bin with other
    weights was passed over without a word (the safetensors file was converted)."""
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    src = _write_reference(tmp_path, model)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    loaded = AutoModelForCausalLM.from_pretrained(convert_reference_checkpoint(src, tmp_path / "same")).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)
    state = load_file(src / "model.safetensors")
    state["model.layers.1.self_attn.q_proj.weight"] *= 2
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as refused:
        convert_reference_checkpoint(src, tmp_path / "different")
    assert str(refused.value) == (
        f"{src} holds two sets of weights that differ (model.safetensors and pytorch_model.bin: "
        "model.layers.1.self_attn.q_proj.weight first): remove the stale one"
    )
    assert not (tmp_path / "different").exists()
