"""int8 weights (``quantize_int8``, ``--quantize int8``): close to float32 in every family, decoding and
generating, refused where the kernels cannot run, and never trained or saved.

Tolerances: one int8 product (8-bit weights per output channel, each input row rounded to 8 bits on its own
scale, 7 on a CPU without VNNI) is within 2% RMS of float32. Through the layers of a tiny random model (its dense gates
opened wide) the errors compound: the logits stay within 10% of their RMS (15% with 7-bit inputs) and pick
the same next token at 80% of positions or more.
A trained model's perplexity moves far less (docs/benchmarks/quantize.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from torch import nn

from densessm import DenseRetNetForCausalLM, RecurrentCache
from densessm.cli import main
from densessm.inference import (
    InferenceOnlyError,
    Int8Linear,
    PrepackedLinear,
    SiLULinear,
    int8_problem,
    prepack_for_cpu,
    quantize_int8,
)
from densessm.inference.fusion import FusedMambaMixer, FusedRetention
from densessm.inference.quantize import REDUCE_RANGE
from densessm.models import FAMILIES
from densessm.presets import load_preset

NAMES = [family.name for family in FAMILIES]


def relative_rms(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def family_model(name: str) -> nn.Module:
    """A tiny model of family ``name`` with its dense gates opened (some start closed), as tests/test_families."""
    torch.manual_seed(0)
    family = next(family for family in FAMILIES if family.name == name)
    model = family.causal_lm(load_preset(f"dense_{name}_tiny", chunk_size=3)).eval()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                nn.init.normal_(module.weight, std=0.5)
    return model


@pytest.mark.parametrize("silu", [False, True])
def test_one_int8_product_is_close_to_float32(silu):
    torch.manual_seed(0)
    linear = (SiLULinear if silu else nn.Linear)(96, 80)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        reference = linear(x)
        quantized = Int8Linear(linear)
        out = quantized(x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert 0 < relative_rms(out, reference) < 0.02
    assert quantized.weight.shape == linear.weight.shape and quantized.weight.is_meta  # no float copy is kept


def test_a_row_of_an_int8_product_does_not_depend_on_the_other_rows():
    """One scale for a whole call made a row's result depend on its batch-mates (a server's other requests):
    each row is rounded on its own scale, so a row equals itself computed alone, bit for bit."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    quantized = Int8Linear(linear)
    x = torch.randn(1, 64)
    mates = torch.cat([x, 100 * torch.randn(1, 64), torch.zeros(1, 64), -0.01 * x.abs()])
    with torch.no_grad():
        alone, together = quantized(x), quantized(mates)
        assert torch.equal(together[:1], alone)
        assert torch.equal(together[2], linear.bias)  # a zero row (padding) gives the bias, no NaN
        assert torch.equal(quantized(mates.view(2, 2, 64)).view(4, 48), together)
        assert relative_rms(together[1:2], linear(mates[1:2])) < 0.02  # the large row keeps its resolution
        assert relative_rms(together[3:], linear(mates[3:])) < 0.02  # and so does the small one
        # a non-finite row gives non-finite values (the models' checks name the cause), not a kernel error
        assert torch.isnan(quantized(torch.full((1, 64), float("nan")))).all()
        assert not torch.isfinite(quantized(torch.cat([x, torch.full((1, 64), float("inf"))]))[1]).any()


@pytest.mark.parametrize("name", NAMES)
def test_a_quantized_batch_row_equals_the_row_alone(name):
    """Greedy answers of a quantized model do not depend on what else is in the batch (a server batches
    requests): its logits for a row are bit for bit those of the row alone."""
    model = quantize_int8(family_model(name), min_weight=0)
    tokens = torch.randint(3, model.config.vocab_size, (3, 7))
    tokens[1:] = torch.randint(3, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        batched = model(tokens).logits
        for row in range(3):
            assert torch.equal(model(tokens[row : row + 1]).logits, batched[row : row + 1])
    assert torch.equal(model(tokens).logits.detach(), batched)  # with gradients on (the embedding requires them)


@pytest.mark.parametrize("name", NAMES)
def test_every_family_keeps_its_logits_and_decodes(name):
    model = family_model(name)
    tokens = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        reference = model(tokens).logits
        cache = model(tokens[:, :6], use_cache=True).cache
        reference_step = model(tokens[:, 6:7], cache=cache).logits
        quantize_int8(model, min_weight=0)
        logits = model(tokens).logits
        cache = model(tokens[:, :6], use_cache=True).cache
        step = model(tokens[:, 6:7], cache=cache).logits
        generated = model.generate(tokens[:, :4], max_new_tokens=5, do_sample=False)
    tolerance = 0.15 if REDUCE_RANGE else 0.1
    assert 0 < relative_rms(logits, reference) < tolerance
    assert 0 < relative_rms(step, reference_step) < tolerance
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
    # every linear layer is int8 (min_weight=0); the embedding stays a float lookup
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert generated.shape == (2, 9) and torch.equal(generated[:, :4], tokens[:, :4])


@pytest.mark.parametrize("name", ["retnet", "mamba"])
def test_fused_products_are_quantized_whole_and_the_float_rest_prepacks(name):
    model = family_model(name)
    tokens = torch.randint(3, model.config.vocab_size, (2, 7))
    quantize_int8(model, min_weight=2**13)
    mixer = model.model.layers[1].retention if name == "retnet" else model.backbone.layers[1].mixer
    assert isinstance(mixer, FusedRetention if name == "retnet" else FusedMambaMixer)
    assert isinstance(mixer.projection, Int8Linear) and mixer.projection.silu == (name == "retnet")
    small = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(m.weight.numel() < 2**13 for m in small)  # under min_weight: left in float
    if name == "retnet":  # no small linear left: the gates' second layers stay float, packed for the fused step
        assert not small and mixer.k_gate_weight.dtype == mixer.v_gate_weight.dtype == torch.float32
    else:
        assert small and mixer.gate_weight.dtype == torch.float32
    with torch.no_grad():
        unpacked = model(tokens).logits
        prepack_for_cpu(model, min_weight=0)
        packed = model(tokens).logits
    assert any(isinstance(m, PrepackedLinear) for m in model.modules()) == bool(small)
    assert isinstance(mixer.projection, Int8Linear)  # prepacking leaves the int8 layers alone
    torch.testing.assert_close(packed, unpacked, atol=1e-4, rtol=1e-4)


def test_a_quantized_model_refuses_to_be_saved_or_trained(tmp_path):
    model = family_model("retnet")
    quantize_int8(model, min_weight=0)
    with pytest.raises(InferenceOnlyError, match="quantized for inference .* save the original model"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(InferenceOnlyError, match="cannot train .*quantized for inference"):
        model.train()
    assert model.eval() is model and not model.training


def test_what_cannot_be_quantized_is_named():
    model = family_model("retnet")
    with pytest.raises(ValueError, match="compute in float32, not in bfloat16"):
        quantize_int8(family_model("retnet").to(torch.bfloat16))
    with pytest.raises(ValueError, match="no linear layer of this model has 1000000 weights or more"):
        quantize_int8(model, min_weight=10**6)
    prepack_for_cpu(model, min_weight=0)
    with pytest.raises(ValueError, match="already prepacked .* quantize it first"):
        quantize_int8(model, min_weight=0)
    assert int8_problem(torch.device("cuda"), torch.float32) == "int8 weights run on the CPU only, not on cuda"
    assert int8_problem("cpu", torch.float32) is None


def test_quantizing_twice_is_harmless_and_caches_stay_valid():
    model = family_model("retnet")
    tokens = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        cache = model(tokens[:, :5], use_cache=True).cache  # made in float32
        quantize_int8(model, min_weight=0)
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
        quantize_int8(model, min_weight=0)
        assert [m for m in model.modules() if isinstance(m, Int8Linear)] == layers
        # the same model in another precision: its caches carry over, as a bf16 copy's do
        assert isinstance(cache, RecurrentCache)
        assert torch.isfinite(model(tokens[:, 5:6], cache=cache).logits).all()


# --- the command line ------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, word_tokenizer):
    """A model whose largest products (the fused projections, lm_head) pass the default min_weight."""
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config(hidden_size=128, query_key_dim=64, max_position_embeddings=32))
    model.save_pretrained(tmp_path / "model")
    word_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_generate_quantize_int8(model_dir, capsys, monkeypatch):
    from densessm.inference import decoding

    quantized = []
    real = decoding.quantize_int8
    monkeypatch.setattr(decoding, "quantize_int8", lambda model: quantized.append(model) or real(model))
    args = ["generate", str(model_dir), "--prompt", "w1 w2", "--prompt", "w3", "--max-new-tokens", "4"]
    assert main([*args, "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- w1 w2\n") and all(word.startswith(("w", "---")) for word in out.split())
    [model] = quantized
    assert isinstance(model.model.layers[0].retention.projection, Int8Linear)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "bfloat16"], "--quantize int8: int8 weights compute in float32, not in bfloat16"),
        (["--compile"], "--quantize int8 cannot be compiled: drop --compile or --quantize"),
        (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
    ],
)
def test_generate_refuses_quantize_where_it_cannot_apply(model_dir, capsys, extra, message):
    assert main(["generate", str(model_dir), "--prompt", "w1", "--quantize", "int8", *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_quantize_on_a_gpu(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["generate", str(model_dir), "--prompt", "w1", "--quantize", "int8", "--device", "cuda"]) == 2
    assert "--quantize int8: int8 weights run on the CPU only, not on cuda" in capsys.readouterr().err


def test_a_model_too_small_to_quantize_is_named(tmp_path, word_tokenizer, capsys):
    DenseRetNetForCausalLM(tiny_config()).save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "w1", "--quantize", "int8"]) == 1
    assert "no linear layer of this model has 32768 weights or more: nothing to quantize" in capsys.readouterr().err


def test_eval_ppl_quantize_int8(model_dir, tmp_path, capsys):
    (tmp_path / "data.txt").write_text(" ".join(f"w{i % 90 + 4}" for i in range(60)))
    argv = ["eval", "ppl", str(model_dir), "--data", str(tmp_path / "data.txt"), "--window", "16", "--device", "cpu"]
    reports = {}
    for flag in ([], ["--quantize", "int8"]):
        stem = tmp_path / f"ppl{len(flag)}"
        assert main([*argv, *flag, "--output", str(stem)]) == 0
        reports[len(flag)] = json.loads(stem.with_suffix(".json").read_text())
    assert (reports[0]["quantize"], reports[2]["quantize"]) == (None, "int8")
    assert "--quantize int8" in reports[2]["command"]
    for fp32, int8 in zip(reports[0]["results"], reports[2]["results"], strict=True):
        assert int8["tokens"] == fp32["tokens"]
        assert int8["perplexity"] != fp32["perplexity"]
        assert int8["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.05)
    capsys.readouterr()
    assert main([*argv, "--quantize", "int8", "--dtype", "float16"]) == 2
    assert "--quantize int8: int8 weights compute in float32, not in float16" in capsys.readouterr().err


def test_bench_generate_quantize_int8(tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["bench", "generate", "--models", "dense_retnet_tiny", "llama_tiny_stock", "--batch", "1"]
    args += ["--new-tokens", "2", "--contexts", "8", "--steps", "1", "--overhead-steps", "0", "--out", str(out)]
    assert main([*args, "--quantize", "int8"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert meta["quantize"] == "int8"
    assert meta["quantized"] == {"dense_retnet_tiny": True, "llama_tiny_stock": False}
    assert "| int8 weights (the rest prepacked) |" in capsys.readouterr().out
    assert main([*args, "--quantize", "int8", "--compile", "--overwrite"]) == 2
    assert "--quantize int8 cannot be compiled" in capsys.readouterr().err


def test_a_refused_quantization_leaves_the_model_as_it_was(tmp_path):
    """Nothing large enough to quantize: refused before anything changes, so the model still trains and saves."""
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config()).train()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="nothing to quantize$"):
        quantize_int8(model)
    assert [type(m) for m in model.modules()] == before and model.training
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.mark.parametrize("asked", ["int4", "fp8", "INT8", True, ""])
def test_prepare_for_decoding_names_a_quantization_it_does_not_have(asked):
    """Any truthy value ("int4", "fp8", True) gave int8 weights without a word."""
    from densessm.inference import prepare_for_decoding

    model = DenseRetNetForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"quantize must be None or one of int8, got "):
        prepare_for_decoding(model, asked, prepack=False, compiled=False)
    assert not any(type(m).__name__ == "Int8Linear" for m in model.modules())


@pytest.mark.parametrize("switch", ["prepack", "compiled"])
def test_prepare_for_decoding_takes_its_switches_only_as_true_or_false(switch):
    """``prepack="no"`` (a truthy string) prepacked."""
    from densessm.inference import prepare_for_decoding

    model = DenseRetNetForCausalLM(tiny_config()).eval()
    before = [type(m) for m in model.modules()]
    switches = {"prepack": False, "compiled": False} | {switch: "no"}
    with pytest.raises(TypeError, match=f"^{switch} must be True or False, got 'no'$"):
        prepare_for_decoding(model, None, **switches)
    assert [type(m) for m in model.modules()] == before
