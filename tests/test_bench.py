"""`densessm bench generate` runs end to end (tiny models) and writes its table, JSON and plot."""

from __future__ import annotations

import json

from densessm.cli import main


def test_bench_generate_writes_report(tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["bench", "generate", "--models", "dense_retnet_tiny", "mamba_tiny", "llama_tiny", "--batch", "2"]
    args += ["--new-tokens", "4", "--contexts", "8", "32", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results["models"]) == {"dense_retnet_tiny", "mamba_tiny", "llama_tiny"}
    states = [d["cache_bytes_per_sequence"] for d in results["models"]["dense_retnet_tiny"]["decode"]]
    kv = [d["cache_bytes_per_sequence"] for d in results["models"]["llama_tiny"]["decode"]]
    assert states[0] == states[1] and kv[1] == 4 * kv[0]  # a fixed state vs a cache that grows with context
    assert out.with_suffix(".png").stat().st_size > 0 and "decode step" in capsys.readouterr().out


def test_bench_rejects_unknown_models(tmp_path, capsys):
    assert main(["bench", "generate", "--models", "gpt5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'gpt5'" in capsys.readouterr().err
