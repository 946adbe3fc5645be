"""transformers' pipelines and Auto classes on every family, with the bundled tokenizer: what a pipeline
returns is what the model computes (greedy text, class probabilities, features), batched or alone, from a
model object or a saved directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from densessm.models import FAMILIES
from densessm.presets import load_preset

TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "densessm" / "resources" / "tokenizer"
NAMES = [family.name for family in FAMILIES]
PROMPTS = ["The quick brown fox", "Once"]


def _family(name: str):
    return next(family for family in FAMILIES if family.name == name)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def _config(name: str, tokenizer, **overrides):
    return load_preset(f"dense_{name}_tiny", vocab_size=len(tokenizer), **overrides)


def _open_gates(model: torch.nn.Module) -> torch.nn.Module:
    """The dense gates start closed; open them so the dense connection shapes every output checked here."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.5)
    return model.eval()


def _causal_lm(name: str, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    return _open_gates(_family(name).causal_lm(_config(name, tokenizer)))


@pytest.mark.parametrize("name", NAMES)
def test_text_generation_pipeline_returns_the_model_s_greedy_text(name, tokenizer):
    model = _causal_lm(name, tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        continuation = tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
        [full] = generator(prompt, max_new_tokens=5, do_sample=False)
        [new] = generator(prompt, max_new_tokens=5, do_sample=False, return_full_text=False)
        assert full["generated_text"] == prompt + continuation
        assert new["generated_text"] == continuation


@pytest.mark.parametrize("name", NAMES)
def test_text_generation_pipeline_batches_prompts_of_different_lengths(name, tokenizer):
    generator = pipeline("text-generation", model=_causal_lm(name, tokenizer), tokenizer=tokenizer)
    alone = [generator(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"] for prompt in PROMPTS]
    batched = generator(PROMPTS, max_new_tokens=4, do_sample=False, batch_size=len(PROMPTS))
    assert [rows[0]["generated_text"] for rows in batched] == alone


@pytest.mark.parametrize("name", NAMES)
def test_pipelines_load_a_saved_directory_by_path(name, tokenizer, tmp_path):
    """As a user runs one: ``pipeline(task, model="DIR")`` through the Auto classes, no remote code."""
    model = _causal_lm(name, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert type(generator.model) is _family(name).causal_lm
    direct = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert generator(PROMPTS[0], **kwargs) == direct(PROMPTS[0], **kwargs)

    classifier = pipeline("text-classification", model=str(tmp_path))  # an LM checkpoint: a fresh score head
    assert type(classifier.model) is _family(name).sequence_classification
    assert {row["label"] for row in classifier(PROMPTS[0], top_k=None)} == {"LABEL_0", "LABEL_1"}


@pytest.mark.parametrize("name", NAMES)
def test_text_classification_pipeline_scores_the_last_real_token(name, tokenizer):
    torch.manual_seed(0)
    config = _config(name, tokenizer, num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"})
    model = _open_gates(_family(name).sequence_classification(config))
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    batched = classifier(PROMPTS, top_k=None, batch_size=len(PROMPTS))  # padded: the pooled token must be real
    for prompt, rows in zip(PROMPTS, batched, strict=True):
        with torch.no_grad():
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0]
        expected = dict(zip(("neg", "neutral", "pos"), logits.softmax(-1).tolist(), strict=True))
        assert {row["label"]: row["score"] for row in rows} == pytest.approx(expected, abs=1e-5)
        alone = classifier(prompt, top_k=None)
        assert {row["label"]: row["score"] for row in alone} == pytest.approx(expected, abs=1e-5)
        [best] = classifier(prompt)  # the default: the most likely label only
        assert best["label"] == max(expected, key=expected.get)


@pytest.mark.parametrize("name", NAMES)
def test_auto_model_gives_the_base_model_with_the_causal_lm_s_weights(name, tokenizer, tmp_path):
    model = _causal_lm(name, tokenizer)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is _family(name).model
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.base_model(ids).last_hidden_state
        assert torch.equal(base(ids).last_hidden_state, expected)
    features = pipeline("feature-extraction", model=base, tokenizer=tokenizer)
    assert torch.allclose(torch.tensor(features(PROMPTS[0])[0]), expected[0], atol=1e-5)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is _family(name).causal_lm
    assert type(AutoModelForSequenceClassification.from_config(model.config)) is _family(name).sequence_classification
