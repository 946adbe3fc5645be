"""benchmarks/bench_fused_step.py with ``--llamas``: a LLaMA step joins the alternation from a fixed context.

What can silently go wrong is a cache that grows during the measurement (every step then sees one more token
than its row says), so the caches are checked step by step, and the report's verdicts on the targets are
checked on made-up ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from densessm_lab.bench.models import build

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fused_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fused_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured(bench) -> list[dict]:
    """The tiny DenseRetNet against the tiny LLaMAs at two contexts (2 rounds after 1 warm-up round)."""
    args = argparse.Namespace(contexts=[8, 12], rounds=2, warmup=1, probe_cap=2**31, llamas=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on busy shared cores, tiny steps on two threads wait for each other (10x slower)
    try:
        return bench.measure("dense_retnet_tiny", torch.float32, [2], args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dynamic", [True, False], ids=["stock-dynamic", "optimised-static"])
def test_llama_step_stays_at_its_context(bench, dynamic):
    """Every step sees the same context: the same logits each time, one slot written at the context, the
    cache back at the context after each reset (and without the reset the logits change: the check can fail)."""
    model = build("llama_tiny_stock" if dynamic else "llama_tiny", torch.float32)
    step = bench.LlamaStep(model, batch=2, context=8, dynamic=dynamic)
    before = [layer.keys[:, :, :8].clone() for layer in step.cache.layers]
    with torch.no_grad():
        first = step()
        step.reset()
        for _ in range(3):
            assert torch.equal(step(), first)
            if not dynamic:  # the step wrote at the context's slot, and only there
                assert all(layer.keys[:, :, 8].abs().sum() > 0 for layer in step.cache.layers)
                assert all(layer.keys[:, :, 9:].abs().sum() == 0 for layer in step.cache.layers)
            step.reset()
            assert step.layer_lengths() == [8] * len(step.cache.layers)
            assert int(step.cache.get_seq_length()) == 8
        assert step.lengths == {9}
        for layer, keys in zip(step.cache.layers, before, strict=True):
            assert torch.equal(layer.keys[:, :, :8], keys)  # the history itself is untouched
        step()
        assert not torch.equal(step(), first)  # no reset in between: a longer context, other logits


def test_a_drifting_cache_is_refused(bench):
    model = build("llama_tiny", torch.float32)
    step = bench.LlamaStep(model, batch=1, context=8, dynamic=False)
    with torch.no_grad():
        step()
        step()  # two steps before the reset: the cache grew to 10
        step.reset()
    times = {"fused": [1.0], "llama_optimised": [2.0]}
    with pytest.raises(RuntimeError, match="did not stay at 8 tokens"):
        bench.llama_results({"optimised": step}, {}, times, 1, 8)


def test_measure_records_llama_timings_and_ratios(measured):
    assert [(r["batch"], r["context"]) for r in measured] == [(2, 8), (2, 12)]
    for row in measured:
        assert row["llama"]["model"] == "llama_tiny"
        fused = row["times_s"]["fused"]
        for kind, key in (("stock", "llama_stock"), ("optimised", "llama_optimised")):
            entry, seconds = row["llama"][kind], row["times_s"][key]
            assert len(seconds) == len(fused) == row["rounds"] == 2
            assert entry["median_s"] == statistics.median(seconds) > 0
            assert entry["round_ratios"] == [t / f for t, f in zip(seconds, fused, strict=True)]
            assert entry["median_round_ratio"] == statistics.median(entry["round_ratios"])
            assert entry["ratio"] == pytest.approx(entry["median_s"] / row["median_s"]["fused"])
            assert entry["kv_bytes"] == 2 * row["context"] * 2 * 2 * 64 * 4  # batch, K and V, 2 layers, 2x32, fp32


def test_llama_skipped_where_its_kv_cache_does_not_fit(bench, monkeypatch):
    model = build("llama_tiny", torch.float32)
    monkeypatch.setattr(bench.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    steps, skipped = bench.llama_runs({"optimised": model}, 2, 8)
    assert steps == {}
    assert skipped["optimised"].startswith("its KV cache needs ~0.0 GB, 0.0 GB available")


def _rows(optimised: dict[int, float], stock: dict[int, float]) -> list[dict]:
    return [
        {
            "preset": "dense_retnet_350m",
            "dtype": "float32",
            "batch": 6,
            "context": context,
            "llama": {
                "model": "llama_350m",
                "optimised": {"median_round_ratio": optimised[context]}
                if context in optimised
                else {"skipped": "its KV cache needs ~13.0 GB, 8.0 GB available"},
                "stock": {"median_round_ratio": stock[context]} if context in stock else {"skipped": "no room"},
            },
        }
        for context in sorted({*optimised, *stock})
    ]


@pytest.mark.parametrize(
    ("optimised", "stock", "overtake_says", "reach_says"),
    [
        (
            {128: 0.9, 256: 1.1, 512: 1.6, 1024: 2.5},
            {1024: 4.5},
            "faster from 256 tokens (of those measured) (target: faster from <= 256 tokens: met)",
            "4.50x at 1024 (target >= 4x from 1024 tokens: met)",
        ),
        (
            {128: 0.8, 256: 0.95, 512: 1.2, 1024: 2.0},
            {1024: 3.9},
            "faster from 512 tokens (of those measured) (target: faster from <= 256 tokens: not met)",
            "3.90x at 1024 (target >= 4x from 1024 tokens: not met)",
        ),
        (
            {128: 0.9, 512: 1.2},
            {512: 5.0, 1024: 4.1, 2048: 3.9},
            "not shown: between 128 and 512 tokens measured",
            "4.10x at 1024, 3.90x at 2048 (target >= 4x from 1024 tokens: not met)",
        ),
        ({512: 1.2}, {}, "not shown: no context <= 256 measured", "not measured at >= 1024 tokens"),
    ],
)
def test_llama_targets(bench, optimised, stock, overtake_says, reach_says):
    overtake, reach = bench.llama_targets(_rows(optimised, stock))
    assert overtake.startswith("- dense_retnet_350m float32, batch 6: fused step against the optimised LLaMA")
    assert overtake_says in overtake
    assert reach_says in reach


def test_report_renders_the_llamas_and_old_results(bench, measured, tmp_path, monkeypatch):
    """--render of a --llamas run shows the LLaMA columns and targets; of an earlier run's JSON (no contexts,
    no LLaMA) it shows the earlier table."""
    meta = {
        "date": "2026-11-30 09:00 UTC",
        "torch": torch.__version__,
        "threads": 1,
        "load_average_start": [1.0, 1.0, 1.0],
        "load_average_end": [1.5, 1.0, 1.0],
        "context": 8,
        "argv": "--llamas",
        "probe": "copy",
    }
    new = {"meta": {**meta, "contexts": [8, 12]}, "steps": measured, "overhead": [], "logits": []}
    old_rows = [{k: v for k, v in r.items() if k != "llama"} for r in measured[:1]]
    old = {"meta": meta, "steps": old_rows, "overhead": [], "logits": []}
    for name, results in (("new", new), ("old", old)):
        (tmp_path / f"{name}.json").write_text(json.dumps(results))
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--render", "--out", str(tmp_path / name)])
        bench.main()
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    text = (tmp_path / "new.md").read_text()
    assert "context 8, 12" in text
    assert "| stock LLaMA (ms) | optimised LLaMA (ms) | stock / fused | optimised / fused | KV cache (GB) |" in text
    ratio = measured[1]["llama"]["stock"]["median_round_ratio"]
    assert "| dense_retnet_tiny | float32 | 2 | 12 | " in text and f"| {ratio:.2f}x |" in text
    assert "fused step against the optimised LLaMA" in text and "fused step against the stock LLaMA" not in text
    old_text = (tmp_path / "old.md").read_text()
    assert "| preset | dtype | batch | fused (ms) |" in old_text
    assert "LLaMA" not in old_text
