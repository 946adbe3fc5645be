"""`densessm bench generate` runs end to end (tiny models) and writes its table, JSON and plot."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, StaticCache

from densessm.cache import RecurrentCache
from densessm.cli import main
from densessm_lab.bench import measure, models, report
from densessm_lab.bench.measure import decoder, dense_pairs
from densessm_lab.bench.models import build


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
    cache, step = decoder(model, batch=2, context=8, calls=2, dynamic=True)
    assert type(cache) is DynamicCache and cache.get_seq_length() == 8
    assert cache.layers[0].keys.shape == (2, 2, 8, 32)
    step()
    assert cache.get_seq_length() == 9 and cache.layers[0].keys.shape[2] == 9
    static, step = decoder(build("llama_tiny", torch.float32), batch=2, context=8, calls=2)
    assert isinstance(static, StaticCache)


def test_dense_pairs_match_twins_that_were_requested():
    models = ["dense_retnet_350m", "retnet_350m", "dense_mamba_360m", "llama_350m", "llama_350m_stock"]
    assert dense_pairs(models) == [("dense_retnet_350m", "retnet_350m")]
    assert dense_pairs(models + ["mamba_360m"])[1] == ("dense_mamba_360m", "mamba_360m")


def test_bench_rejects_unknown_models(tmp_path, capsys):
    assert main(["bench", "generate", "--models", "gpt5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'gpt5'" in capsys.readouterr().err


def test_bench_compile_decodes_recurrent_models_compiled_and_unprepacked(tmp_path, capsys, monkeypatch):
    """``--compile`` (aot_eager here: inductor's code generation is slow on a CPU): the recurrent models decode
    through the compiled step, never prepacked (the compiled path refuses prepacked weights); the LLaMA stays
    eager and prepacked; the compilation happens in the untimed warm-up, never in a timed region."""
    prepacked = []
    prepack = measure.prepack_for_cpu
    monkeypatch.setattr(
        measure, "prepack_for_cpu", lambda model: prepacked.append(type(model).__name__) or prepack(model)
    )
    out = tmp_path / "gen"
    models = ["dense_retnet_tiny", "retnet_tiny", "llama_tiny"]
    args = ["bench", "generate", "--compile", "--compile-backend", "aot_eager", "--models", *models, "--batch", "2"]
    args += ["--new-tokens", "4", "--contexts", "8", "--steps", "2", "--overhead-steps", "2", "--overhead-context", "8"]
    assert main(args + ["--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    meta = results["meta"]
    assert meta["compiled"] == {"dense_retnet_tiny": True, "retnet_tiny": True, "llama_tiny": False}
    assert meta["prepacked"] == {"dense_retnet_tiny": False, "retnet_tiny": False, "llama_tiny": True}
    assert prepacked == ["LlamaForCausalLM"]  # the overhead pair is compiled too: not prepacked either
    assert meta["device"] == "cpu" and meta["compile_config"]["backend"] == "aot_eager"
    for name, entry in results["models"].items():
        assert entry["compiled"] == (name != "llama_tiny")
        assert (entry["graphs_compiled"] > 0) == (name != "llama_tiny")  # the decode step really was compiled
        [decode] = entry["decode"]
        assert decode["step_s"] > 0 and decode["warmup_steps"] == (1 if name == "llama_tiny" else 4)
        assert (decode["graphs_compiled_in_warmup"] > 0) == (name != "llama_tiny")  # the timed step's own path
        [gen] = entry["generate"]
        assert gen["new_tokens"] == 4 and gen["tokens_per_s"] > 0
        assert decode["graphs_compiled_while_timed"] == 0 and gen["graphs_compiled_while_timed"] == 0
    [overhead] = results["overhead"]
    assert overhead["compiled"] and not overhead["prepacked_weights"] and overhead["warmup_rounds"] == 4
    assert overhead["dense_step_s"] > 0 and overhead["plain_step_s"] > 0

    report = capsys.readouterr().out
    assert "device cpu, float32, compile on" in report
    assert "| dense_retnet_tiny | " in report and "default linear layers, compiled decode steps |" in report
    assert "`llama_tiny`: optimised: prepacked weights" in report and "eager (not compiled)" in report
    assert "WARNING" not in report


def test_eager_run_reports_compile_off_and_saves_each_model(tmp_path, capsys, monkeypatch):
    saved = []
    write_json = report.write_json
    monkeypatch.setattr(report, "write_json", lambda r, out: saved.append(json.dumps(r)) or write_json(r, out))
    out = tmp_path / "gen"
    models = ["retnet_tiny", "mamba_tiny"]
    args = ["bench", "generate", "--models", *models, "--batch", "1", "--new-tokens", "2", "--contexts", "8"]
    assert main(args + ["--steps", "1", "--overhead-steps", "0", "--out", str(out)]) == 0
    # after each model (a run cut short keeps what it measured), then the finished results
    progress = [(list(r["models"]), r["meta"]["complete"]) for r in map(json.loads, saved)]
    assert progress == [(models[:1], False), (models, False), (models, True)]
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert meta["compile"] is False and meta["compiled"] == {"retnet_tiny": False, "mamba_tiny": False}
    assert meta["prepacked"]["retnet_tiny"] and meta["complete"]
    assert "device cpu, float32, compile off" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["dense_retnet_tiny", "dense_mamba_tiny", "llama_tiny", "llama_tiny_stock"])
def test_synthetic_cache_lives_on_the_models_device(name):
    """Every tensor the synthetic context is made of is made on the model's device. On a CPU-only machine the
    default device is made "meta" while the context is filled in, so a tensor made without the model's device
    would show up as a meta tensor here."""
    model = build(name, torch.bfloat16)
    param = next(model.parameters())
    cache = models.synthetic_cache(model, batch=2, context=4, steps=12, dynamic=models.is_stock(name))
    with torch.device("meta"):
        cache = models.fill_context(cache, 16, model.device)
    if isinstance(cache, RecurrentCache):
        assert cache.positions.device == param.device and cache.positions.dtype == torch.long
        assert cache.positions.tolist() == [16, 16] and cache.get_seq_length() == 16
        tensors = [layer[n] for layer, n in cache._tensors()]
        assert any(t.is_floating_point() for t in tensors)
    else:
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        assert all(t.dtype == param.dtype and t.shape[0] == 2 for t in tensors)
        assert cache.get_seq_length() == 16 or isinstance(cache, StaticCache)
    assert all(t.device == param.device for t in tensors)
    step = decoder(model, batch=2, context=8, calls=1, dynamic=models.is_stock(name))[1]
    assert step() > 0  # and a decode step runs on what was made


def test_decode_inputs_follow_the_model_device(monkeypatch):
    """decoder makes its mask and tokens on the model's device (a stub model on the CPU, default device meta)."""
    calls = []

    class Stub:
        device = torch.device("cpu")
        config = SimpleNamespace(vocab_size=50, model_type="llama")

        def __call__(self, token, cache, use_cache, attention_mask):
            calls.append((token, attention_mask))
            return SimpleNamespace(logits=torch.zeros(2, 1, 50, device=self.device))

    monkeypatch.setattr(measure, "synthetic_cache", lambda *args, **kwargs: None)
    with torch.device("meta"):
        step = decoder(Stub(), batch=2, context=8, calls=3)[1]
        step()
        step()
    assert [tuple(mask.shape) for _, mask in calls] == [(2, 9), (2, 10)]
    assert all(t.device.type == "cpu" for call in calls for t in call)


def test_cuda_helpers_synchronise_and_read_the_gpu(monkeypatch):
    """The CUDA branches of the clock, the memory guard and the machine line (stubbed: no GPU here)."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123 * 2**20, 141 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    measure._now(torch.device("cpu"))
    assert synced == []
    measure._now(cuda)
    assert synced == [cuda]
    assert measure._available_bytes(cuda) == (123 + 3) * 2**20  # free + reserved but unallocated
    assert measure._available_bytes(torch.device("cpu")) > 2**20  # /proc/meminfo
    assert measure._machine(cuda).startswith("NVIDIA H200")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_refuses_a_device_it_cannot_use(tmp_path, capsys):
    assert main(["bench", "generate", "--models", "retnet_tiny", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "no CUDA GPU is available on this machine" in capsys.readouterr().err
    assert main(["bench", "generate", "--models", "retnet_tiny", "--device", "mps", "--out", str(tmp_path / "x")]) == 2
    assert "MPS is not available on this machine" in capsys.readouterr().err


def test_a_compilation_inside_a_timed_generate_is_flagged(tmp_path, capsys, monkeypatch):
    """A timed region that compiles is no steady state (on CUDA a decoder recompiles for a new cache): the
    count is kept and the report warns. Here dynamo forgets the warm-up's graph before the timed generate()."""
    generate = measure._generate

    def forgetful(model, prompt, new_tokens, compile_config=None):
        if new_tokens != measure.WARMUP_TOKENS:
            torch._dynamo.reset()
        return generate(model, prompt, new_tokens, compile_config)

    monkeypatch.setattr(measure, "_generate", forgetful)
    out = tmp_path / "gen"
    args = ["bench", "generate", "--compile", "--compile-backend", "aot_eager", "--models", "retnet_tiny"]
    args += ["--batch", "2", "--new-tokens", "3", "--contexts", "8", "--steps", "1", "--overhead-steps", "0"]
    assert main(args + ["--out", str(out)]) == 0
    entry = json.loads(out.with_suffix(".json").read_text())["models"]["retnet_tiny"]
    assert entry["generate"][0]["graphs_compiled_while_timed"] > 0
    assert entry["decode"][0]["graphs_compiled_while_timed"] == 0
    assert "WARNING: compilation inside a timed region (not a steady state): retnet_tiny (generate 3)" in (
        capsys.readouterr().out
    )


def test_dense_overhead_benchmark_script_writes_its_report(tmp_path, monkeypatch):
    """benchmarks/dense_overhead.py on tiny pairs: every block reported, the median of the blocks, a plot."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_overhead.py"
    out = tmp_path / "overhead"
    argv = [str(script), "--blocks", "3", "--rounds", "2", "--gap", "0", "--batch", "2", "--context", "8"]
    argv += ["--pair", "dense_retnet_tiny", "retnet_tiny", "--pair", "dense_mamba_tiny", "mamba_tiny"]
    monkeypatch.setattr("sys.argv", argv + ["--out", str(out)])
    monkeypatch.setattr(measure, "WARMUP_ROUNDS", 1)
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads(out.with_suffix(".json").read_text())
    assert [(p["dense"], p["plain"]) for p in results["pairs"]] == [
        ("dense_retnet_tiny", "retnet_tiny"),
        ("dense_mamba_tiny", "mamba_tiny"),
    ]
    for pair in results["pairs"]:
        assert len(pair["blocks"]) == 3
        assert all(b["dense_step_s"] > 0 and b["plain_step_s"] > 0 and b["copy_gb_s"] > 0 for b in pair["blocks"])
        overheads = sorted(b["overhead"] for b in pair["blocks"])
        assert pair["median_overhead"] == overheads[1]
    assert "--pair dense_retnet_tiny retnet_tiny" in results["command"]
    assert "| block | copy bandwidth" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_ctrl_c_during_the_second_batch_size_says_what_each_file_holds(tmp_path, capsys, monkeypatch):
    """Stopped between batch sizes, the run left a complete report for one and a partial JSON for the other
    without saying which was which."""
    run = measure.run

    def interrupted_at_batch_2(args, checkpoint):
        if args.batch == 2:
            checkpoint({"meta": {"complete": False}, "models": {}})
            raise KeyboardInterrupt
        return run(args, checkpoint)

    monkeypatch.setattr(measure, "run", interrupted_at_batch_2)
    out = tmp_path / "gen"
    args = ["bench", "generate", "--models", "retnet_tiny", "--batch", "1", "2", "--new-tokens", "2"]
    assert main(args + ["--contexts", "8", "--steps", "1", "--overhead-steps", "0", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"densessm bench: interrupted: {tmp_path}/gen_batch1.json/.md/.png complete; {tmp_path}/gen_batch2.json "
        "holds what was measured so far (meta.complete false) (pass --overwrite to measure again into the same files)"
    )
    assert json.loads((tmp_path / "gen_batch1.json").read_text())["meta"]["complete"]
    assert not (tmp_path / "gen_batch2.md").exists()


def test_rms_norm_benchmark_script_writes_its_report(tmp_path, monkeypatch):
    """benchmarks/bench_rms_norm.py at a short length: every norm of the presets timed in both forms, the median
    of the per-round ratios as its speed-up, a table and a plot."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rms_norm.py"
    out = tmp_path / "norms"
    monkeypatch.setattr("sys.argv", [str(script), "--length", "8", "--rounds", "3", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads(out.with_suffix(".json").read_text())
    assert [row["shape"][1] for row in results["rows"]] == [8] * 5
    assert any(row["transposed"] for row in results["rows"])
    for row in results["rows"]:
        assert all(len(times) == 3 and min(times) > 0 for times in row["seconds"].values())
        assert row["speedup"] == sorted(row["ratios"])[1]
    table = out.with_suffix(".md").read_text()
    assert table.count("| DenseRetNet-350M") == 4 and "(transposed view)" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_alternate_revisions_runs_each_side_from_its_own_tree(tmp_path):
    """``benchmarks/alternate_revisions.sh``: the baseline imports densessm from a worktree of the revision, the
    working tree from this checkout, pair after pair, with {side} and {pair} filled in; the worktree is removed."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: the script compares git revisions")
    probe = "import densessm, pathlib; pathlib.Path('{out}/{side}_{pair}').write_text(densessm.__file__)"
    script = root / "benchmarks" / "alternate_revisions.sh"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    run = subprocess.run(
        ["bash", str(script), "HEAD", "2", "--", "-c", probe.replace("{out}", str(tmp_path))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    files = {p.name: p.read_text() for p in tmp_path.glob("*_*")}
    assert sorted(files) == ["base_1", "base_2", "work_1", "work_2"]
    assert all(files[f"work_{i}"] == str(root / "src" / "densessm" / "__init__.py") for i in (1, 2))
    bases = {Path(files[f"base_{i}"]).parents[2] for i in (1, 2)}
    assert len(bases) == 1 and root not in bases.pop().parents and "== pair 2, work" in run.stdout
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True).stdout
    assert len(worktrees.strip().splitlines()) == 1  # the baseline's worktree is gone
