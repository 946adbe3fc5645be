"""`densessm bench generate` runs end to end (tiny models) and writes its table, JSON and plot."""

from __future__ import annotations

import json

import torch
from transformers import DynamicCache, StaticCache

from densessm.bench import _decoder, build, dense_pairs
from densessm.cli import main


def test_bench_generate_writes_report(tmp_path, capsys):
    out = tmp_path / "gen"
    models = ["dense_retnet_tiny", "retnet_tiny", "mamba_tiny", "llama_tiny", "llama_tiny_stock"]
    args = ["bench", "generate", "--models", *models, "--batch", "2", "--new-tokens", "4", "--contexts", "8", "32"]
    args += ["--steps", "2", "--overhead-steps", "4", "--overhead-context", "16", "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["models"]) == models
    states = [d["cache_bytes_per_sequence"] for d in results["models"]["dense_retnet_tiny"]["decode"]]
    assert states[0] == states[1]  # a fixed state...
    for llama in ("llama_tiny", "llama_tiny_stock"):  # ...vs a cache that grows with context, static or dynamic
        kv = [d["cache_bytes_per_sequence"] for d in results["models"][llama]["decode"]]
        assert kv[1] == 4 * kv[0] and all(d["step_s"] > 0 for d in results["models"][llama]["decode"])
    prepacked = results["meta"]["prepacked"]
    assert prepacked["llama_tiny"] and prepacked["dense_retnet_tiny"] and not prepacked["llama_tiny_stock"]

    # one pair: dense_retnet_tiny with retnet_tiny (mamba_tiny has no dense twin in this run)
    [overhead] = results["overhead"]
    assert (overhead["dense"], overhead["plain"], overhead["context"], overhead["rounds"]) == (
        "dense_retnet_tiny",
        "retnet_tiny",
        16,
        4,
    )
    assert overhead["dense_step_s"] > 0 and overhead["plain_step_s"] > 0
    assert abs(overhead["overhead"] - (overhead["dense_step_s"] / overhead["plain_step_s"] - 1)) < 1e-12

    report = capsys.readouterr().out
    assert "decode step" in report and "| dense_retnet_tiny | retnet_tiny |" in report
    assert "`llama_tiny_stock`: stock transformers" in report and "`llama_tiny`: optimised" in report
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_overhead_steps_zero_skips_it(tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["bench", "generate", "--models", "dense_retnet_tiny", "retnet_tiny", "--batch", "1"]
    args += ["--new-tokens", "2", "--contexts", "8", "--steps", "1", "--overhead-steps", "0", "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.with_suffix(".json").read_text())["overhead"] == []
    assert "| dense | plain |" not in capsys.readouterr().out


def test_stock_llama_decodes_with_a_growing_dynamic_cache():
    """The stock baseline's step really appends to a DynamicCache (the optimised one writes into a StaticCache)."""
    model = build("llama_tiny_stock", torch.float32)
    cache, step = _decoder(model, batch=2, context=8, calls=2, dynamic=True)
    assert type(cache) is DynamicCache and cache.get_seq_length() == 8
    assert cache.layers[0].keys.shape == (2, 2, 8, 32)
    step()
    assert cache.get_seq_length() == 9 and cache.layers[0].keys.shape[2] == 9
    static, step = _decoder(build("llama_tiny", torch.float32), batch=2, context=8, calls=2)
    assert isinstance(static, StaticCache)


def test_dense_pairs_match_twins_that_were_requested():
    models = ["dense_retnet_350m", "retnet_350m", "dense_mamba_360m", "llama_350m", "llama_350m_stock"]
    assert dense_pairs(models) == [("dense_retnet_350m", "retnet_350m")]
    assert dense_pairs(models + ["mamba_360m"])[1] == ("dense_mamba_360m", "mamba_360m")


def test_bench_rejects_unknown_models(tmp_path, capsys):
    assert main(["bench", "generate", "--models", "gpt5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'gpt5'" in capsys.readouterr().err
