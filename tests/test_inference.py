"""Inference-only weight transforms (fused projections, prepacked weights) must not change what is computed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_mamba_config

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.inference import (
    InferenceOnlyError,
    PrepackedLinear,
    SiLULinear,
    frozen_linear,
    fuse_projections,
    prepack_for_cpu,
    prepacking_available,
)
from densessm.inference.fusion import GATE_PANEL, FusedMambaMixer, FusedRetention, pack_gate_weight, packed_silu_gate

needs_onednn = pytest.mark.skipif(not prepacking_available(), reason="this PyTorch build has no oneDNN linear kernels")


def _transform(name: str):
    """The inference transform under test, and the tolerance it is held to against the untransformed model
    (oneDNN's products sum in another order than PyTorch's default kernel)."""
    if name == "fuse":
        return fuse_projections, 1e-5
    if not prepacking_available():
        pytest.skip("this PyTorch build has no oneDNN linear kernels")
    return (lambda model: prepack_for_cpu(model, min_weight=0)), 1e-4


@pytest.mark.parametrize("transform", ["fuse", "prepack"])
@pytest.mark.parametrize("dense_block_layers", [0, 1, 2])
def test_fused_projections_match_the_separate_ones(dense_block_layers, transform):
    apply, tolerance = _transform(transform)
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config(dense_block_layers=dense_block_layers)).eval()
    tokens = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        reference = model(tokens).logits
        cache = model(tokens[:, :5], use_cache=True).cache
        reference_step = model(tokens[:, 5:6], cache=cache).logits
        apply(model)
        fused = model(tokens).logits
        cache = model(tokens[:, :5], use_cache=True).cache
        fused_step = model(tokens[:, 5:6], cache=cache).logits
    torch.testing.assert_close(fused, reference, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(fused_step, reference_step, atol=tolerance, rtol=tolerance)
    retention = model.model.layers[1].retention
    assert isinstance(retention, FusedRetention) and "q_proj" not in dict(retention.named_children())
    if dense_block_layers:
        assert retention.dense.k_gate is None and retention.k_gate_weight is not None
    else:
        assert retention.k_gate_weight is None and retention.v_gate_weight is None
    if transform == "prepack":  # the silu after each fused product runs inside it
        assert retention.projection.activation == "swish"
        return
    # every weight is kept once: the gates' second layers as packed buffers, the rest as parameters
    fresh = DenseRetNetForCausalLM(model.config)
    gate_weights = sum(p.numel() for name, p in fresh.named_parameters() if ".fc2." in name)
    assert sum(p.numel() for p in model.parameters()) + gate_weights == sum(p.numel() for p in fresh.parameters())


def test_fusing_twice_is_harmless():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    fuse_projections(model)
    weights = [layer.retention.projection.weight for layer in model.model.layers]
    fuse_projections(model)
    assert all(a is layer.retention.projection.weight for a, layer in zip(weights, model.model.layers, strict=True))


@pytest.mark.parametrize("transform", ["fuse", "prepack"])
@pytest.mark.parametrize("dense_block_layers, use_bias", [(0, False), (2, False), (2, True)])
def test_fused_mamba_projection_matches_the_separate_ones(dense_block_layers, use_bias, transform):
    apply, tolerance = _transform(transform)
    torch.manual_seed(0)
    config = tiny_mamba_config(dense_block_layers=dense_block_layers, use_bias=use_bias)
    model = DenseMambaForCausalLM(config).eval()
    if use_bias:
        for layer in model.backbone.layers:
            torch.nn.init.normal_(layer.mixer.in_proj.bias)
    for layer in model.backbone.layers[1:]:  # open the gates (they start closed), so the test can see them
        if layer.mixer.dense_gate is not None:
            torch.nn.init.normal_(layer.mixer.dense_gate.fc2.weight, std=0.5)
    tokens = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        reference = model(tokens).logits
        reference_steps = model.generate(
            tokens, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        apply(model)
        fused = model(tokens).logits
        fused_steps = model.generate(
            tokens, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    torch.testing.assert_close(fused, reference, atol=tolerance, rtol=tolerance)
    assert torch.equal(fused_steps.sequences, reference_steps.sequences)
    for a, b in zip(fused_steps.scores, reference_steps.scores, strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    mixer = model.backbone.layers[1].mixer
    assert isinstance(mixer, FusedMambaMixer) == bool(dense_block_layers)
    if dense_block_layers:
        assert "in_proj" not in dict(mixer.named_children()) and mixer.dense_gate is None
        units, channels = config.hidden_size // config.dense_gate_reduction, mixer.D.shape[0]
        assert mixer.gate_weight.shape == (-(-channels // GATE_PANEL), units, GATE_PANEL)


@pytest.mark.parametrize("transform", ["fuse", "prepack"])
def test_a_transformed_model_refuses_to_be_saved_or_trained(tmp_path, transform):
    from densessm.inference import prepack_for_cpu

    model = DenseRetNetForCausalLM(tiny_config()).eval()
    (fuse_projections if transform == "fuse" else lambda m: prepack_for_cpu(m, min_weight=0))(model)
    with pytest.raises(InferenceOnlyError, match="save the original model"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(InferenceOnlyError, match="train the original model"):
        model.train()
    assert model.eval() is model and not model.training
    # the modules refuse by themselves: no method of the model was replaced
    assert "save_pretrained" not in vars(model) and "train" not in vars(model)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_prepacked_silu_linear_computes_silu_of_the_product(dtype, bias):
    torch.manual_seed(0)
    parts = [torch.nn.Linear(24, n, bias=bias, dtype=dtype) for n in (40, 8)]
    x = torch.randn(3, 2, 24, dtype=dtype)
    fused = frozen_linear(parts, silu=True)
    assert isinstance(fused, SiLULinear)
    reference = torch.cat([torch.nn.functional.silu(p(x)) for p in parts], dim=-1)
    packed = PrepackedLinear(fused)
    assert packed.activation == "swish" and "silu" in repr(packed)
    # the kernel applies silu in fp32 before rounding; one bf16 rounding step apart at most
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(packed(x), reference, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(fused(x), reference, atol=tolerance, rtol=tolerance)
    assert PrepackedLinear(parts[0]).activation == "none"


@pytest.mark.parametrize("transform", ["fuse_projections", "prepack_for_cpu"])
def test_loading_weights_into_a_transformed_model_is_refused_with_the_fix(transform):
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config())
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if transform == "fuse_projections":
        fuse_projections(model)
    else:
        prepack_for_cpu(model, min_weight=1)
    with pytest.raises(InferenceOnlyError, match="^cannot load weights into .*load them into the original model"):
        model.load_state_dict(weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 31, 32, 70])
def test_a_packed_gate_weight_computes_the_gate(width, dtype):
    """The packed layout (panels of 32 output columns, the last zero-padded) keeps every weight where the
    fused step and the PyTorch path read it: both give silu(hidden @ W^T) of the unpacked weight."""
    torch.manual_seed(0)
    weight = torch.randn(width, 5, dtype=dtype)
    panels = pack_gate_weight(weight)
    assert panels.shape == (-(-width // GATE_PANEL), 5, GATE_PANEL) and panels.is_contiguous()
    unpacked = panels.transpose(1, 2).reshape(-1, 5)
    assert torch.equal(unpacked[:width], weight) and not unpacked[width:].any()
    hidden = torch.randn(3, 2, 5, dtype=dtype)
    expected = torch.nn.functional.silu(hidden @ weight.T)
    torch.testing.assert_close(packed_silu_gate(hidden, panels, width), expected, rtol=1e-6, atol=1e-6)
