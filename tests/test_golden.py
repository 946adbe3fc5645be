"""Our DenseRetNet is the public reference's function: its own outputs, reproduced from a converted checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from densessm.cli import main


@pytest.fixture(params=["m1", "m2"])
def case(request, golden_dir, tmp_path):
    src = golden_dir / request.param
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst)]) == 0
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    return model, load_file(src / "expected.safetensors")


def test_parallel_logits(case):
    model, expected = case
    with torch.no_grad():
        logits = model(expected["input_ids"], mode="parallel").logits
    assert (logits - expected["parallel_logits"]).abs().max() <= 1e-4


def test_recurrent_logits(case):
    model, expected = case
    with torch.no_grad():
        logits = model(expected["input_ids"], mode="recurrent").logits
    assert (logits - expected["recurrent_logits"]).abs().max() <= 1e-4


def test_greedy_generation(case):
    model, expected = case
    prompt = expected["prompt_ids"]
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(out[:, prompt.shape[1] :], expected["greedy_new_tokens"])


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 200])
def test_chunkwise_reproduces_recurrent_logits(case, chunk):
    model, expected = case
    with torch.no_grad():
        logits = model(expected["input_ids"], mode="chunkwise", chunk_size=chunk).logits
    assert (logits - expected["recurrent_logits"]).abs().max() <= 1e-5
