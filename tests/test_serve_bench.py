"""The load benchmark script end to end at toy sizes: it runs, and its report holds what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config
from transformers import AutoTokenizer

from densessm import DenseRetNetForCausalLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_serve_smoke(tmp_path):
    model_dir = tmp_path / "tiny"
    DenseRetNetForCausalLM(tiny_config(vocab_size=4096)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(ROOT / "src" / "densessm" / "resources" / "tokenizer").save_pretrained(model_dir)
    out = tmp_path / "serve"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_serve.py"),
            "--model-dir",
            str(model_dir),
            "--clients",
            "1",
            "2",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "4",
            "--system-tokens",
            "40",
            "--repeats",
            "1",
            "--rounds",
            "2",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
    )
    result = json.loads(out.with_suffix(".json").read_text())
    assert [row["requests"] for row in result["server"]] == [1, 2]
    assert result["baseline"]["requests"] == 2 and len(result["baseline"]["rounds_tokens_per_s"]) == 2
    assert result["prefix_cache"]["cached_tokens"] > 0 and result["prefix_cache"]["uncached_cached_tokens"] == 0
    assert "Cached / uncached TTFT" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
