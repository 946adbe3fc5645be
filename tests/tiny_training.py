"""Shared by the training tests: a learnable fixture corpus and the flags of a tiny, fast training job."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# ~135k parameters, nearly all in the 4096-token embedding and head of the bundled tokenizer.
TINY = "hidden_size=16,query_key_dim=8,num_attention_heads=2,num_hidden_layers=2,k_gate_reduction=4,v_gate_reduction=4"

SENTENCES = [
    "The state of the Union is strong, and the people of this nation are free.",
    "We give thanks for peace, for plenty, and for the blessings of liberty.",
    "The revenue of the year exceeded the estimates, and the public debt was reduced.",
]

# One thread each: the test processes share two cores with the rest of the suite, and oversubscribed
# OpenMP threads slow these tiny steps down a hundredfold without changing a single number.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_corpus(root: Path, copies: int = 30) -> Path:
    corpus = root / "corpus"
    if corpus.is_dir():
        return corpus  # unchanged, so its cached blocks are reused
    corpus.mkdir(parents=True)
    with open(corpus / "docs.jsonl", "w") as f:
        for i in range(copies):
            f.write(json.dumps({"text": " ".join(SENTENCES[i % 3 :] + SENTENCES[: i % 3])}) + "\n")
    return corpus


def train_argv(root: Path, output: str = "out", **flags) -> list[str]:
    """Flags of a tiny job on the fixture corpus; ``flags`` override or add (``None`` drops a flag)."""
    options = {
        "dataset_dir": str(write_corpus(root)),
        "data_cache_dir": str(root / "cache"),
        "output_dir": str(root / output),
        "config_overrides": TINY,
        "block_size": 16,
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
        "preprocessing_num_workers": 1,
        "validation_split_percentage": 10,
        "sample_max_new_tokens": 4,
        "seed": 7,
    }
    options.update(flags)
    argv = []
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def losses(output_dir: Path) -> dict[int, float]:
    """Training loss per optimizer step, from the saved trainer state."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "model.safetensors")


PYTHON = sys.executable
