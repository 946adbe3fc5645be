"""Hugging Face integration: Auto classes, save/load, generate() through the recurrent cache, classification."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

import densessm
from densessm import DenseRetNetForCausalLM, DenseRetNetForSequenceClassification, DenseRetNetModel, RecurrentCache
from densessm.presets import list_presets, load_preset


def test_auto_classes_without_remote_code(tmp_path):
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "DenseRetNetConfig"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DenseRetNetForCausalLM)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DenseRetNetModel)
    assert isinstance(
        AutoModelForSequenceClassification.from_pretrained(tmp_path), DenseRetNetForSequenceClassification
    )


def test_from_config_builds_our_model():
    assert isinstance(AutoModelForCausalLM.from_config(tiny_config()), DenseRetNetForCausalLM)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("dense_retnet_350m", 367_630_080),
        ("dense_retnet_1p3b", 1_333_090_560),
        ("retnet_350m", 362_595_840),
        ("retnet_1p3b", 1_310_818_560),
    ],
)
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = DenseRetNetForCausalLM(load_preset(name))
    assert sum(p.numel() for p in model.parameters()) == count


def test_presets_match_the_reference_configs(golden_dir):
    import json

    for size in ("350m", "1p3b"):
        ref = json.loads((golden_dir.parents[1] / "reference" / f"dense_gau_retnet_{size}" / "config.json").read_text())
        ours = load_preset(f"dense_retnet_{size}")
        for field in (
            "hidden_size",
            "query_key_dim",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
            "v_factor",
            "dense_block_layers",
            "rms_norm_eps",
            "dropout",
            "max_position_embeddings",
        ):
            assert getattr(ours, field) == ref[field], (size, field)


def test_unknown_preset():
    assert "dense_retnet_tiny" in list_presets()
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_preset("nope")


def _no_cache_greedy(model, prompt, steps):
    tokens = prompt
    for _ in range(steps):
        nxt = model(tokens, mode="parallel", use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def test_greedy_generation_equals_full_forward():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, 97, (2, 6))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(out, _no_cache_greedy(model, prompt, 12))


def test_generation_state_is_constant_size():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, 97, (1, 4))
    sizes = []
    for new in (1, 8, 32):
        out = model.generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True
        )
        assert isinstance(out.cache, RecurrentCache)
        sizes.append(sum(t.numel() for layer in out.cache.layers for t in layer.values()))
    assert len(set(sizes)) == 1


def test_eos_stops_generation():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, 97, (1, 5))
    free = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    eos = int(free[0, prompt.shape[1] + 2])
    first = (free[0, prompt.shape[1] :] == eos).nonzero()[0].item()
    stopped = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert stopped.shape[1] == prompt.shape[1] + first + 1 and int(stopped[0, -1]) == eos


def test_seeded_sampling_is_reproducible_and_honours_top_k():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, 97, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    torch.manual_seed(1)
    a = model.generate(prompt, **kwargs)
    torch.manual_seed(1)
    b = model.generate(prompt, **kwargs)
    assert torch.equal(a, b)
    # with top_k=1 sampling is greedy
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=1), greedy)


def test_beam_search_matches_no_cache():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, 97, (2, 5))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    with_cache = model.generate(prompt, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_cache_continues_and_branches():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    tokens = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        full = model(tokens, mode="parallel", use_cache=False).logits
        first = model(tokens[:, :6], use_cache=True)
        branch = first.cache.clone()
        rest = model(tokens[:, 6:], cache=first.cache).logits
        again = model(tokens[:, 6:], cache=branch).logits
    torch.testing.assert_close(rest, full[:, 6:], atol=1e-5, rtol=1e-4)
    assert torch.equal(rest, again)
    assert first.cache.get_seq_length() == 10 and branch.get_seq_length() == 10


def test_parallel_mode_refuses_a_carried_state():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    tokens = torch.randint(3, 97, (1, 4))
    cache = model(tokens, use_cache=True).cache
    with pytest.raises(ValueError, match="continue from a recurrent state"):
        model(tokens, cache=cache, mode="parallel")


def test_sequence_classification_pools_last_real_token():
    config = tiny_config(num_labels=3)
    model = DenseRetNetForSequenceClassification(config).eval()
    rows = [torch.randint(3, 97, (n,)) for n in (6, 3)]
    tokens = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], mask[i, : len(row)] = row, 1
    labels = torch.tensor([0, 2])
    out = model(tokens, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    with torch.no_grad():
        for i, row in enumerate(rows):
            torch.testing.assert_close(out.logits[i], model(row[None]).logits[0], atol=1e-5, rtol=1e-4)
    # pad-token based pooling (no mask) finds the same tokens for right padding
    torch.testing.assert_close(model(tokens).logits, out.logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("num_labels", "labels", "problem"),
    [
        (1, torch.tensor([0.5, -1.0]), "regression"),
        (3, torch.tensor([1, 2]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
    ],
)
def test_sequence_classification_losses(num_labels, labels, problem):
    model = DenseRetNetForSequenceClassification(tiny_config(num_labels=num_labels))
    out = model(torch.randint(3, 97, (2, 5)), labels=labels)
    assert torch.isfinite(out.loss) and model.config.problem_type == problem
    out.loss.backward()


def test_gradient_checkpointing_gives_identical_gradients(monkeypatch):
    import densessm.models.retnet.modeling_dense_retnet as modeling

    model = DenseRetNetForCausalLM(tiny_config()).train()
    tokens = torch.randint(0, 97, (2, 7))

    def grads():
        model.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    original = modeling.retention
    monkeypatch.setattr(modeling, "retention", lambda *a, **k: calls.append(1) or original(*a, **k))
    layers = model.config.num_hidden_layers
    plain = grads()
    assert len(calls) == layers
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert len(calls) == 3 * layers  # forward, then recomputed in backward: every layer really is checkpointed
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_version():
    assert densessm.__version__


def test_from_pretrained_overrides_are_validated(tmp_path):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    DenseRetNetForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassClassValidationError, match="dense_block_layers must be >= 0"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dense_block_layers=-1)
