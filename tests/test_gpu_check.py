"""The GPU check (`scripts/gpu_check.sh`, `densessm_lab.bench.gpu`) known to work before a GPU is at hand: its dry
run on the CPU writes every section with finite numbers, its report and plot; stages refuse what would mix or lose
results; a stage past its time box records what it skipped and the report still renders; the targets are judged
right; training that runs out of memory checkpoints activations before it halves the batch; the script's own
argument checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from densessm.errors import UsageError
from densessm_lab.bench import gpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _numbers(value, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON value, with where it is."""
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}[{i}]")]
    return [(path, value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def _dry_run(out: Path, *stages: str) -> dict:
    for stage in stages:
        extra = ["--pytest-rc", "not run (dry run)"] if stage == "tests" else []
        assert gpu.main([stage, "--out", str(out), "--dry-run", *extra]) == 0, stage
    return json.loads((out / "gpu_check.json").read_text())


def _check_results(results: dict, plan: gpu.Plan) -> None:
    numbers = _numbers(results)
    assert numbers and all(math.isfinite(v) for _, v in numbers), [n for n in numbers if not math.isfinite(n[1])]
    assert results["meta"]["dry_run"] and all(s["complete"] for s in results["meta"]["stages"].values())
    assert results["machine"]["copy_gb_s"] > 0 and results["machine"]["matmul_bf16_tflop_s"] > 0

    train = results["train"]
    assert set(train["models"]) == set(plan.models)
    for entry in train["models"].values():
        assert entry["length"] == plan.train_length and entry["batch"] == plan.train_batch
        assert entry["tokens_per_s"] == pytest.approx(entry["batch"] * entry["length"] / entry["step_s"])
    assert [(o["dense"], o["plain"]) for o in train["overhead"]] == list(plan.pairs)
    assert all(o["rounds"] == plan.train_rounds and o["overhead"] > -1 for o in train["overhead"])

    for name in plan.models:
        assert [e["length"] for e in results["prefill"]["models"][name]] == list(plan.prefill_lengths)
        assert all(e["tokens_per_s"] > 0 for e in results["prefill"]["models"][name])

    decode = results["decode"]
    for name in plan.models:
        entry = decode["models"][name]
        assert [b["batch"] for b in entry["batches"]] == list(plan.decode_batches)
        for b in entry["batches"]:
            assert [p["position"] for p in b["positions"]] == list(plan.decode_positions)
            assert b["slowest_over_fastest_position"] >= 1
            bytes_ = 2 * entry["state_bytes_per_sequence"] * b["batch"] + entry["weight_bytes"]
            assert b["memory_bound_step_s"] == pytest.approx(bytes_ / (results["machine"]["copy_gb_s"] * 1e9))
            assert b["graphs_compiled_while_timed"] == 0
            dense = name in {d for d, _ in plan.pairs}
            assert ("generate" in b) == (dense and b["batch"] == plan.generate_batch)
        assert entry["state_bytes_per_sequence"] > 0
    assert [(o["dense"], o["batch"]) for o in decode["overhead"]] == [
        (dense, batch) for dense, _ in plan.pairs for batch in plan.decode_batches
    ]
    assert [row["met"] for row in results["targets"]] == [None] * len(gpu.TARGETS)  # no 350m model in a dry run
    # each path is logged once per process: which stage logs it depends on what ran before in this one
    assert all(isinstance(results[stage]["kernels"], list) for stage in ("train", "prefill", "decode"))


def _check_report(out: Path) -> None:
    markdown = (out / "gpu_check.md").read_text()
    for heading in (
        "# GPU check: dry run",
        "## Training, L = 64",
        "## Prefill",
        "## Decode, eager step",
        "## Targets",
        "Kernel paths (train): ",
    ):
        assert heading in markdown, heading
    assert "dense_retnet_tiny vs retnet_tiny" in markdown and "![training, prefill and decode speed](gpu_check.png)"
    png = (out / "gpu_check.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 20_000  # three panels drawn, not an empty canvas


def test_the_dry_run_writes_every_section_with_finite_numbers_and_the_report(tmp_path):
    results = _dry_run(tmp_path, "machine", "tests", "train", "prefill", "decode", "report")
    _check_results(results, gpu.DRY_RUN)
    _check_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check.png"]


def test_a_stage_past_its_time_box_records_what_it_skipped_and_the_report_still_renders(tmp_path):
    _dry_run(tmp_path, "machine")
    for stage in ("train", "prefill", "decode"):
        assert gpu.main([stage, "--out", str(tmp_path), "--dry-run", "--budget", "1e-9"]) == 0
    assert gpu.main(["report", "--out", str(tmp_path), "--dry-run"]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {o["skipped"] for o in results["train"]["overhead"]} == {"time box reached"}
    assert {e["skipped"] for entries in results["prefill"]["models"].values() for e in entries} == {"time box reached"}
    skipped = {b["skipped"] for m in results["decode"]["models"].values() for b in m["batches"]}
    assert skipped == {"time box reached"}
    assert "time box reached" in (tmp_path / "gpu_check.md").read_text()


def test_stages_refuse_what_would_mix_or_lose_results(tmp_path):
    with pytest.raises(UsageError, match="does not exist: run the machine stage first"):
        gpu.main(["train", "--out", str(tmp_path), "--dry-run"])
    _dry_run(tmp_path, "machine")
    before = (tmp_path / "gpu_check.json").read_bytes()
    with pytest.raises(UsageError, match="already exists; nothing was measured"):
        gpu.main(["machine", "--out", str(tmp_path), "--dry-run"])
    assert (tmp_path / "gpu_check.json").read_bytes() == before
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU is visible"):
            gpu.main(["train", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        gpu.main(["train", "--out", str(tmp_path), "--dry-run", "--budget", "-1"])


def test_the_tests_stage_reads_pytests_summary_and_fails_on_failures(tmp_path):
    _dry_run(tmp_path, "machine")
    log = tmp_path / "gpu_tests.log"
    log.write_text(
        "....F\n=== short test summary info ===\nFAILED tests/test_x.py::test_y\n"
        "1 failed, 4 passed, 2 skipped in 12.3s\n"
    )
    assert gpu.main(["tests", "--out", str(tmp_path), "--dry-run", "--pytest-log", str(log), "--pytest-rc", "1"]) == 1
    tests = json.loads((tmp_path / "gpu_check.json").read_text())["tests"]
    assert tests == {"exit_status": "1", "summary": "1 failed, 4 passed, 2 skipped in 12.3s", "log": "gpu_tests.log"}


def _measured(train_dense: float, overhead: float, decode6: float, decode64: float, over_bound: float) -> dict:
    pairs = ("dense_retnet_350m", "dense_mamba_360m")
    return {
        "train": {
            "models": {name: {"tokens_per_s": train_dense} for name in pairs},
            "overhead": [{"dense": name, "median_round_overhead": overhead} for name in pairs],
        },
        "decode": {
            "models": {
                "dense_retnet_350m": {
                    "batches": [
                        {"batch": 6, "tokens_per_s": decode6},
                        {"batch": 64, "tokens_per_s": decode64, "step_over_bound": over_bound},
                    ]
                }
            }
        },
    }


def test_targets_are_judged_against_the_issues_numbers():
    met = [row["met"] for row in gpu.check_targets(_measured(70_000, 0.05, 6_000, 25_000, 1.2))]
    assert met == [True] * 7
    rows = gpu.check_targets(_measured(50_000, 0.09, 4_000, 19_000, 1.6))
    assert [row["met"] for row in rows] == [False, True, False, False, False, False, False]  # mamba: 50k >= 40k
    assert rows[0] == {
        "section": "train",
        "model": "dense_retnet_350m",
        "what": "tokens/s",
        "batch": None,
        "min": 60_000,
        "measured": 50_000,
        "met": False,
    }


def _script(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_script_refuses_an_unknown_argument_and_results_already_there(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    run = _script("--fast", out=tmp_path)
    assert run.returncode == 2 and "unknown argument --fast" in run.stderr
    (tmp_path / "gpu_check.json").write_text("{}")
    run = _script("--dry-run", out=tmp_path)
    assert run.returncode == 2 and "gpu_check.json already exists; nothing was measured" in run.stderr
    assert (tmp_path / "gpu_check.json").read_text() == "{}"


def test_the_script_refuses_an_unknown_compile_backend_before_any_stage_and_keeps_the_results(tmp_path):
    (tmp_path / "gpu_check.json").write_text("{}")
    run = _script("--dry-run", "--overwrite", "--compile-backend", "bogus", out=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    line = run.stderr.strip()
    assert line.startswith("gpu_check.sh: argument --compile-backend: unknown torch.compile backend 'bogus'"), line
    assert "inductor" in line and line.endswith("or none for the eager decode step") and "\n" not in line
    assert "== stage" not in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json"]
    assert (tmp_path / "gpu_check.json").read_text() == "{}"


@pytest.mark.slow
def test_the_script_dry_run_end_to_end_with_the_compiled_decode_step(tmp_path):
    """The script as the device runs it, every stage in its own time-boxed process, with the decode step traced by
    dynamo as on the GPU (the `eager` backend: inductor's CPU build would take minutes): no recompile while timed."""
    run = _script("--dry-run", "--compile-backend", "eager", out=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["decode"]["compile"]["backend"] == "eager"
    for entry in results["decode"]["models"].values():
        for b in entry["batches"]:
            assert b["graphs_compiled_in_warmup"] > 0 and b["graphs_compiled_while_timed"] == 0
    assert (tmp_path / "gpu_check.png").read_bytes().startswith(PNG)
    assert "== done in" in (tmp_path / "gpu_check.log").read_text()


def test_training_out_of_memory_checkpoints_activations_first_then_halves_the_batch(monkeypatch):
    calls = []
    step = gpu._train_step

    def step_running_out_twice(model, optimizer, tokens, clock, into):
        calls.append(tokens.shape[0])
        if len(calls) <= 2:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        step(model, optimizer, tokens, clock, into)

    monkeypatch.setattr(gpu, "_train_step", step_running_out_twice)
    run = gpu._warm("dense_retnet_tiny", gpu.DRY_RUN, torch.device("cpu"), batch=2)
    assert calls[:3] == [2, 2, 1]  # plain, then checkpointed at the same batch, then checkpointed at half of it
    assert run.checkpointed and run.tokens.shape == (1, gpu.DRY_RUN.train_length)
    assert all(layer.gradient_checkpointing for layer in run.model.model.layers)
