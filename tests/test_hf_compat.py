"""The rest of the Hugging Face ecosystem on every family: LoRA through PEFT on each family's projections,
``from_pretrained`` with ``device_map`` and ``dtype``, and a saved directory that is a complete Hub model
repository (``docs/hf-compatibility.md`` lists which test proves which row)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from densessm.models import FAMILIES
from densessm.presets import load_preset

NAMES = [family.name for family in FAMILIES]
LORA_TARGETS = {
    "retnet": ["q_proj", "k_proj", "vg_proj", "o_proj"],
    "mamba": ["in_proj", "x_proj", "out_proj"],
    "mamba2": ["in_proj", "out_proj"],
}
"""Each family's projections: PEFT has no defaults for model types it does not know, so they are named."""


def _family(name: str):
    return next(family for family in FAMILIES if family.name == name)


@pytest.fixture(params=NAMES)
def saved(request, tmp_path):
    """A tiny causal LM of the family with its dense gates open, saved; and a batch of tokens."""
    torch.manual_seed(0)
    model = _family(request.param).causal_lm(load_preset(f"dense_{request.param}_tiny"))
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.5)
    model.save_pretrained(tmp_path / "base")
    return request.param, tmp_path, model.eval(), torch.randint(3, model.config.vocab_size, (2, 9))


def test_lora_trains_saves_reloads_and_merges(saved):
    name, tmp_path, model, ids = saved
    with torch.no_grad():
        before = model(ids).logits
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[name], task_type="CAUSAL_LM")
    )
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(LORA_TARGETS[name])
    with torch.no_grad():
        assert torch.equal(lora(ids).logits, before)  # LoRA's B starts at zero: the base function

    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    lora.eval()
    with torch.no_grad():
        after = lora(ids).logits
        generated = lora.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert not torch.allclose(after, before)
    assert generated.shape == (1, 12) and torch.equal(generated[0, :9], ids[0])
    assert generated[0, 9] == after[0, -1].argmax()  # generate() decodes through the adapted model

    lora.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, after, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert type(merged) is _family(name).causal_lm
        assert torch.allclose(merged(ids).logits, after, atol=1e-4)


def test_from_pretrained_takes_device_map_and_dtype(saved):
    _, tmp_path, model, ids = saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", dtype=torch.bfloat16).eval()
    assert {(p.device.type, p.dtype) for p in loaded.parameters()} == {("cpu", torch.bfloat16)}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.to(torch.bfloat16)(ids).logits)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="auto", dtype="auto")
    assert auto.dtype == torch.float32 and auto.device.type == "cpu"


def test_a_saved_directory_is_a_complete_hub_repository(saved):
    """``save_pretrained`` writes what ``push_to_hub`` uploads, and the Auto classes load it back once
    ``densessm`` is imported (no remote code: the config names no ``auto_map``)."""
    name, tmp_path, model, ids = saved
    files = {path.name for path in (tmp_path / "base").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    assert config["architectures"] == [_family(name).causal_lm.__name__]
    assert "auto_map" not in config  # nothing to trust: the classes come from the installed package
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert type(reloaded) is _family(name).causal_lm
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
