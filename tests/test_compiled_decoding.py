"""The compiled decode step (torch.compile; CUDA graphs on a GPU) computes what the eager step computes.

``aot_eager`` traces and functionalises the step exactly as inductor's front end does (whole graph, no
breaks, in-place state updates as graph-input mutations) in a second, so it runs by default; inductor's
code generation on CPU is the slow test. Recompiling at any decode step is an error: a step that
recompiles per token (a host read, a growing shape) could never be a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import tiny_config, tiny_mamba_config
from transformers import CompileConfig

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.compiled_decoding import CompiledDecoder
from densessm.inference import prepack_for_cpu


def _model(family: str):
    torch.manual_seed(0)
    if family == "retnet":
        return DenseRetNetForCausalLM(tiny_config()).eval()
    model = DenseMambaForCausalLM(tiny_mamba_config()).eval()
    for layer in model.backbone.layers[1:]:  # open the dense gates, which start closed
        torch.nn.init.normal_(layer.mixer.dense_gate.fc2.weight, std=0.5)
    return model


def _left_padded(batch: int = 3):
    tokens = torch.randint(3, 97, (batch, 7))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[-1, :1] = 0
    return tokens, mask


def _compare(family: str, backend: str, batch: int = 3, **generate_kwargs):
    model = _model(family)
    tokens, mask = _left_padded(batch)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    kwargs.update(generate_kwargs)
    torch.manual_seed(1)
    eager = model.generate(tokens, **kwargs)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.manual_seed(1)
        config = CompileConfig(fullgraph=True, dynamic=False, backend=backend)
        compiled = model.generate(tokens, compile_config=config, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return model


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_compiled_greedy_decoding_matches_eager(family):
    model = _compare(family, "aot_eager", do_sample=False)
    assert isinstance(model.__dict__["_compiled_decoder"], CompiledDecoder)
    assert "_compiled_decoder" not in dict(model.named_modules())  # not a submodule: no state_dict entry


def test_a_single_row_compiles_once():
    _compare("retnet", "aot_eager", batch=1, do_sample=False)  # a [1, 1] view must not recompile per token


def test_a_second_generate_call_reuses_the_compiled_step():
    model = _model("retnet")
    tokens, mask = _left_padded()
    config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    model.generate(tokens, attention_mask=mask, max_new_tokens=3, do_sample=False, compile_config=config)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new cache: same graph
        model.generate(tokens, attention_mask=mask, max_new_tokens=3, do_sample=False, compile_config=config)


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_compiled_seeded_sampling_matches_eager(family):
    _compare(family, "aot_eager", do_sample=True, top_k=20, temperature=0.8)


def test_compiled_beam_search_matches_eager():
    _compare("retnet", "aot_eager", do_sample=False, num_beams=2)


def test_only_single_token_steps_from_a_state_are_compiled():
    model = _model("retnet")
    decoder = CompiledDecoder(model, CompileConfig(backend="aot_eager"))
    tokens = torch.randint(3, 97, (2, 5))
    with torch.no_grad():
        cache = model(tokens, use_cache=True).cache
        assert not decoder.is_decode_step(tokens, cache, {})  # a prompt: eager
        assert decoder.is_decode_step(tokens[:, :1], cache, {"use_cache": True})
        assert not decoder.is_decode_step(tokens[:, :1], cache, {"output_hidden_states": True})
        assert not decoder.is_decode_step(tokens[:, :1], cache, {"position_ids": torch.zeros(2, 1)})
    assert not decoder.is_decode_step(tokens[:, :1], cache, {})  # gradients on: eager


def test_compiling_prepacked_weights_is_refused_with_a_reason():
    model = prepack_for_cpu(_model("retnet"), min_weight=0)
    with pytest.raises(ValueError, match="prepacked"):
        CompiledDecoder(model, CompileConfig())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_inductor_compiled_decoding_matches_eager(family):
    _compare(family, "inductor", do_sample=False)


def test_a_compiled_step_that_moves_the_state_is_an_error(monkeypatch):
    """A captured graph reads and writes the state where it was at capture: a step that puts new tensors into
    the cache instead of updating them in place would leave the next replay working on memory nobody reads."""
    from densessm.models.dense.stack import DenseSSMModel

    def replace(cache, step, states):
        if not step.carried:  # the prompt, run eagerly: the cache takes its first state as always
            cache.layers = states
            return
        for kept, new in zip(cache.layers, states, strict=True):
            for name, tensor in new.items():
                kept[name] = tensor + 0  # a new tensor where the old one was

    monkeypatch.setattr(DenseSSMModel, "_advance", staticmethod(replace))
    model = _model("retnet")
    decoder = CompiledDecoder(model, CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager"))
    torch._dynamo.reset()
    with torch.no_grad():
        cache = model(torch.randint(3, 97, (2, 5)), use_cache=True).cache
        with pytest.raises(RuntimeError, match="replaced a state tensor instead of updating it in place"):
            decoder(torch.randint(3, 97, (2, 1)), cache=cache, use_cache=True)
