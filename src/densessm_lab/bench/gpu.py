"""The GPU check's measurements (``scripts/gpu_check.sh``; docs/benchmarks/gpu.md): one stage per call, each
time-boxed and each adding its results to ``OUT/gpu_check.json`` as it goes, so that a stage cut short keeps
what it finished and cannot eat the others' time.

Stages, in the script's order:

``machine``  the device, the versions, and the two ceilings measured now: device copy bandwidth and the bf16
             matrix-product rate (a new results file);
``tests``    the outcome of ``pytest -m gpu`` (run by the script), read from its log;
``train``    training tokens/s and peak memory at L = 2,048 as ``densessm train`` trains on CUDA (bf16 autocast over
             fp32 master weights, fused AdamW, gradient clipping); each dense model alternates its steps with its
             plain twin's, which gives the dense training overhead;
``prefill``  tokens/s of one forward pass over a long prompt (batch 1, bf16 weights);
``decode``   decode tokens/s at several batch sizes through the compiled step ``generate()`` uses
             (``torch.compile``, CUDA graphs on a GPU), at positions from 2k to 10k tokens (a recurrent model's step
             does not grow with the position: this shows it), dense and plain alternating step by step; the step
             against its memory bound (state read and written, weights read, at the measured copy bandwidth);
``report``   ``gpu_check.md`` and ``gpu_check.png`` from the JSON, with the targets of docs/benchmarks/gpu.md checked.

``--dry-run`` runs the same code on the CPU with the tiny presets and small sizes, in seconds.
Everything goes through the public API: presets, ``AutoModelForCausalLM``, the compiled decode step, the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, CompileConfig, PreTrainedModel

import densessm
from densessm.errors import UsageError
from densessm.files import atomic_output_file, atomic_write_text
from densessm.presets import load_preset
from densessm_lab.bench.cli import compile_backend
from densessm_lab.bench.measure import (
    COMPILED_WARMUP_STEPS,
    alternate,
    decoder,
    generation_throughput,
    warm_up_generate,
)
from densessm_lab.bench.models import cache_bytes

NAME = "gpu_check"
STAGES = ("machine", "tests", "train", "prefill", "decode", "report")


@dataclass(frozen=True)
class Plan:
    """What a run measures. ``pairs``: (dense, plain) preset names, the dense model first."""

    pairs: tuple[tuple[str, str], ...]
    device: str
    train_length: int
    train_batch: int
    train_warmup: int
    train_rounds: int
    prefill_lengths: tuple[int, ...]
    prefill_repeats: int
    decode_batches: tuple[int, ...]
    decode_positions: tuple[int, ...]
    decode_steps: int
    generate_batch: int
    generate_tokens: int
    compile_backend: str | None
    copy_bytes: int
    matmul_size: int

    @property
    def models(self) -> list[str]:
        return [name for pair in self.pairs for name in pair]


GPU = Plan(
    pairs=(("dense_retnet_350m", "retnet_350m"), ("dense_mamba_360m", "mamba_360m")),
    device="cuda",
    train_length=2048,
    train_batch=8,
    train_warmup=3,
    train_rounds=8,
    prefill_lengths=(8192, 32768),
    prefill_repeats=3,
    decode_batches=(6, 64, 1),  # the targets' batches first: a stage cut short keeps them
    decode_positions=(2048, 4096, 6144, 8192, 10240),
    decode_steps=24,
    generate_batch=6,
    generate_tokens=2048,
    compile_backend="inductor",
    copy_bytes=2**31,
    matmul_size=8192,
)
DRY_RUN = Plan(
    pairs=(("dense_retnet_tiny", "retnet_tiny"), ("dense_mamba_tiny", "mamba_tiny")),
    device="cpu",
    train_length=64,
    train_batch=2,
    train_warmup=1,
    train_rounds=2,
    prefill_lengths=(128, 256),
    prefill_repeats=1,
    decode_batches=(1, 2),
    decode_positions=(64, 128),
    decode_steps=2,
    generate_batch=2,
    generate_tokens=8,
    compile_backend=None,  # eager steps: seconds; --compile-backend eager traces the compiled step (slower)
    copy_bytes=2**24,
    matmul_size=256,
)

# The GPU path's targets (one H200, bf16): (section, model, what, at, minimum or maximum, value).
TARGETS = (
    ("train", "dense_retnet_350m", "tokens/s", None, "min", 60_000),
    ("train", "dense_mamba_360m", "tokens/s", None, "min", 40_000),
    ("train", "dense_retnet_350m", "dense overhead", None, "max", 0.08),
    ("train", "dense_mamba_360m", "dense overhead", None, "max", 0.08),
    ("decode", "dense_retnet_350m", "tokens/s", 6, "min", 5_000),
    ("decode", "dense_retnet_350m", "tokens/s", 64, "min", 20_000),
    ("decode", "dense_retnet_350m", "step / memory bound", 64, "max", 1.5),
)


class Clock:
    """Seconds of device work: CUDA events on a GPU (no host wait inside the timed region), else the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextmanager
    def time(self, into: list[float]) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            yield
            into.append(time.perf_counter() - start)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        into.append(start.elapsed_time(end) / 1e3)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _has_error(value) -> bool:
    """Whether a results section records an error anywhere."""
    if isinstance(value, dict):
        return "error" in value or any(_has_error(v) for v in value.values())
    return isinstance(value, list) and any(_has_error(v) for v in value)


def _release(device: torch.device, compiled: bool = False) -> None:
    """Free what the last model held: its compiled steps (they hold its weights and, with CUDA graphs, their
    memory pool), then the allocator's cached blocks."""
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_above(device: torch.device, base: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


class KernelLog(logging.Handler):
    """The kernel paths the ops chose in this stage (logger ``densessm.kernels``, one line per op and path):
    which of PyTorch, Triton or flash-linear-attention a number was measured with."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @contextmanager
    def attached(self) -> Iterator[KernelLog]:
        kernels = logging.getLogger("densessm.kernels")
        level = kernels.level
        kernels.setLevel(logging.INFO)
        kernels.addHandler(self)
        try:
            yield self
        finally:
            kernels.removeHandler(self)
            kernels.setLevel(level)


# ---- machine ----


def machine(plan: Plan) -> dict:
    """The device and the two ceilings every later number is compared with, measured now."""
    device = torch.device(plan.device)
    clock = Clock(device)
    source = torch.rand(plan.copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copies: list[float] = []
    for _ in range(12):
        with clock.time(copies):
            target.copy_(source)
    del source, target
    n = plan.matmul_size
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    products: list[float] = []
    for i in range(13):
        with clock.time(products if i >= 3 else []):
            a @ b
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "host": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "densessm": densessm.__version__,
            "triton": _version("triton"),
        },
        "kernels_forced": os.environ.get("DENSESSM_KERNELS") or None,
        "copy_bytes": 2 * plan.copy_bytes,
        "copy_gb_s": 2 * plan.copy_bytes / _median(copies[2:]) / 1e9,
        "matmul_size": n,
        "matmul_bf16_tflop_s": 2 * n**3 / _median(products) / 1e12,
    }
    _release(device)
    return result


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


# ---- tests ----


_PYTEST_SUMMARY = re.compile(r"\b\d+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b.* in [\d.]+s")


def tests(log: Path, rc: str) -> dict:
    """``pytest -m gpu``'s outcome: its exit status (or why it did not run) and its summary line."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    summary = next((line.strip("= ") for line in reversed(lines) if _PYTEST_SUMMARY.search(line)), None)
    return {"exit_status": rc, "summary": summary, "log": log.name if log.is_file() else None}


def _tests_passed(exit_status: str) -> bool:
    """pytest passed, found no gpu test (5), or was not run by design (the dry run)."""
    return exit_status in ("0", "5") or exit_status.startswith("not run")


# ---- train ----


def build(name: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A preset's model initialised on ``device`` itself: initialising 350M parameters on the host would take
    seconds of the stage's time box per model (the values do not matter to a timing)."""
    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(load_preset(name), dtype=dtype)


def _train_model(name: str, device: torch.device) -> tuple[PreTrainedModel, torch.optim.Optimizer]:
    """A fresh model in fp32 (the master weights) with fused AdamW, as ``densessm train`` builds them."""
    model = build(name, torch.float32, device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _train_step(model, optimizer, tokens: torch.Tensor, clock: Clock, into: list[float]) -> None:
    """One optimizer step as the Trainer takes it under ``--bf16``: autocast forward, backward, clipping to the
    default ``--max_grad_norm`` 1, fused AdamW."""
    with clock.time(into):
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class _Run:
    """A model warmed up for training: what its timed steps use, and what the report says of it."""

    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor
    peak_memory_bytes: int | None
    checkpointed: bool


def _warm(name: str, plan: Plan, device: torch.device, batch: int) -> _Run:
    """Build and warm up one model for training at ``batch``. On running out of memory, per-layer activation
    checkpointing first (``--gradient_checkpointing``: same batch, so dense and plain stay comparable), then half
    the batch. The peak memory is counted above what was allocated before the model."""
    checkpointed = False
    while True:
        base = _allocated(device)
        _reset_peak(device)
        model = optimizer = None
        try:
            model, optimizer = _train_model(name, device)
            if checkpointed:
                model.activation_checkpointing_enable()
            tokens = torch.randint(3, model.config.vocab_size, (batch, plan.train_length), device=device)
            for _ in range(plan.train_warmup):
                _train_step(model, optimizer, tokens, Clock(device), [])
            return _Run(model, optimizer, tokens, _peak_above(device, base), checkpointed)
        except torch.OutOfMemoryError:
            del model, optimizer
            _release(device)
            if checkpointed and batch == 1:
                raise
            if checkpointed:
                batch //= 2
            checkpointed = True


def train(plan: Plan, deadline: float, save: Callable[[dict], None]) -> dict:
    """Per (dense, plain) pair: both models warmed up, then ``train_rounds`` rounds of one step each, which model
    goes first alternating, so that drift hits both alike."""
    device = torch.device(plan.device)
    clock = Clock(device)
    result = {"length": plan.train_length, "models": {}, "overhead": []}
    for dense, plain in plan.pairs:
        if time.monotonic() > deadline:
            result["overhead"].append({"dense": dense, "plain": plain, "skipped": "time box reached"})
            continue
        try:
            runs = [_warm(name, plan, device, plan.train_batch) for name in (dense, plain)]
            times: tuple[list[float], list[float]] = ([], [])
            for round_ in range(plan.train_rounds):
                for i in (0, 1) if round_ % 2 == 0 else (1, 0):
                    _train_step(runs[i].model, runs[i].optimizer, runs[i].tokens, clock, times[i])
            # seconds per token: the two batches differ if one was halved on running out of memory
            per_token = [[t / run.tokens.numel() for t in ts] for run, ts in zip(runs, times, strict=True)]
            for run, name, seconds in zip(runs, (dense, plain), times, strict=True):
                parameters = sum(p.numel() for p in run.model.parameters())
                tokens_per_s = run.tokens.numel() / _median(seconds)
                result["models"][name] = {
                    "batch": run.tokens.shape[0],
                    "length": run.tokens.shape[1],
                    "activation_checkpointing": run.checkpointed,
                    "parameters": parameters,
                    "step_s": _median(seconds),
                    "tokens_per_s": tokens_per_s,
                    "peak_memory_bytes": run.peak_memory_bytes,
                    "model_tflop_s": 6 * parameters * tokens_per_s / 1e12,  # 6 N FLOPs per token, as usual
                }
            result["overhead"].append(
                {
                    "dense": dense,
                    "plain": plain,
                    "rounds": plan.train_rounds,
                    "overhead": _median(per_token[0]) / _median(per_token[1]) - 1,
                    "median_round_overhead": _median([d / p for d, p in zip(*per_token, strict=True)]) - 1,
                }
            )
        except Exception as err:  # noqa: BLE001 (recorded in the report; the next pair still runs)
            result["overhead"].append({"dense": dense, "plain": plain, "error": _error(err)})
        runs = None
        _release(device)
        save(result)
    return result


# ---- prefill ----


def prefill(plan: Plan, deadline: float, save: Callable[[dict], None]) -> dict:
    """One forward pass over a ``length``-token prompt at batch 1 that leaves the cache for decoding (the
    last position's logits only, as ``generate()`` asks), bf16 weights; median of ``prefill_repeats``."""
    device = torch.device(plan.device)
    clock = Clock(device)
    result: dict = {"models": {}}
    for name in plan.models:
        entries = result["models"].setdefault(name, [])
        model = None
        for length in plan.prefill_lengths:
            if time.monotonic() > deadline:
                entries.append({"length": length, "skipped": "time box reached"})
                continue
            try:
                model = model or build(name, torch.bfloat16, device).eval()
                tokens = torch.randint(3, model.config.vocab_size, (1, length), device=device)
                seconds: list[float] = []
                with torch.no_grad():
                    for i in range(plan.prefill_repeats + 1):
                        with clock.time(seconds if i else []):
                            model(input_ids=tokens, use_cache=True, logits_to_keep=1)
                entries.append(
                    {"length": length, "seconds": _median(seconds), "tokens_per_s": length / _median(seconds)}
                )
            except Exception as err:  # noqa: BLE001 (recorded in the report; the next length still runs)
                entries.append({"length": length, "error": _error(err)})
            save(result)
        model = None
        _release(device)
    return result


# ---- decode ----


def _move(cache, position: int) -> None:
    """The cache as after ``position`` tokens: a recurrent state has the same size at every position, so only
    the counters change (in place: the compiled step reads them where they are)."""
    cache.steps = position
    cache.positions.fill_(position)


def _bound(state_bytes: int, weight_bytes: int, copy_gb_s: float | None) -> float | None:
    """Seconds a decode step needs at least: the state read and written once, the weights read once."""
    return None if not copy_gb_s else (2 * state_bytes + weight_bytes) / (copy_gb_s * 1e9)


def decode(plan: Plan, deadline: float, save: Callable[[dict], None], copy_gb_s: float | None) -> dict:
    """Per (dense, plain) pair and batch: both models' compiled decode steps (CUDA graphs on a GPU; eager without
    a compile backend) from one synthetic cache each, warmed up, then ``decode_steps`` alternating rounds at each
    position."""
    device = torch.device(plan.device)
    config = (
        None
        if plan.compile_backend is None
        else CompileConfig(fullgraph=True, dynamic=False, backend=plan.compile_backend)
    )
    result: dict = {"compile": None if config is None else config.to_dict(), "models": {}, "overhead": []}
    for pair in plan.pairs:
        models, failure = [], None
        try:
            models = [build(name, torch.bfloat16, device).eval() for name in pair]
        except Exception as err:  # noqa: BLE001 (recorded in the report; the next pair still runs)
            failure = {"error": _error(err)}
        for i, name in enumerate(pair):
            weights = sum(p.numel() * p.element_size() for p in models[i].parameters()) if models else None
            result["models"][name] = {"weight_bytes": weights, "batches": []}
        for batch in plan.decode_batches:
            if failure or time.monotonic() > deadline:
                for name in pair:
                    result["models"][name]["batches"].append(
                        {"batch": batch, **(failure or {"skipped": "time box reached"})}
                    )
                continue
            try:
                _decode_batch(plan, pair, models, batch, config, copy_gb_s, result)
            except Exception as err:  # noqa: BLE001 (recorded in the report; the next batch still runs)
                for name in pair:
                    batches = result["models"][name]["batches"]
                    if not batches or batches[-1]["batch"] != batch:  # else it failed after its timings
                        batches.append({"batch": batch})
                    batches[-1]["error"] = _error(err)
            _release(device, compiled=config is not None)
            save(result)
        models = None
        _release(device, compiled=config is not None)
    return result


def _decode_batch(plan: Plan, pair, models, batch: int, config, copy_gb_s, result: dict) -> None:
    calls = COMPILED_WARMUP_STEPS + 2 * plan.decode_steps * len(plan.decode_positions)
    made = [decoder(model, batch, plan.decode_positions[0], calls, compile_config=config) for model in models]
    caches, steppers = [m[0] for m in made], [m[1] for m in made]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    alternate(steppers, COMPILED_WARMUP_STEPS)
    warm = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    per_position: list[tuple[list[float], list[float]]] = []
    for position in plan.decode_positions:
        for cache in caches:
            _move(cache, position)
        per_position.append(alternate(steppers, plan.decode_steps))
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - warm
    for i, (name, cache) in enumerate(zip(pair, caches, strict=True)):
        state = cache_bytes(cache, plan.decode_positions[0]) // batch
        entry = result["models"][name]
        entry["state_bytes_per_sequence"] = state
        positions = [
            {"position": p, "step_s": _median(t[i]), "tokens_per_s": batch / _median(t[i])}
            for p, t in zip(plan.decode_positions, per_position, strict=True)
        ]
        step = _median([s for t in per_position for s in t[i]])
        bound = _bound(state * batch, entry["weight_bytes"], copy_gb_s)
        speeds = [p["tokens_per_s"] for p in positions]
        entry["batches"].append(
            {
                "batch": batch,
                "step_s": step,
                "tokens_per_s": batch / step,
                "positions": positions,
                "slowest_over_fastest_position": max(speeds) / min(speeds),
                "memory_bound_step_s": bound,
                "step_over_bound": None if bound is None else step / bound,
                "graphs_compiled_in_warmup": warm - graphs,
                "graphs_compiled_while_timed": recompiled,
            }
        )
    if batch == plan.generate_batch:  # real generated tokens, end to end: a check on the moved positions
        warm_up_generate(models[0], batch, compile_config=config)
        run = generation_throughput(models[0], batch, plan.generate_tokens, compile_config=config)
        result["models"][pair[0]]["batches"][-1]["generate"] = run
    dense = [s for t in per_position for s in t[0]]
    plain = [s for t in per_position for s in t[1]]
    result["overhead"].append(
        {
            "dense": pair[0],
            "plain": pair[1],
            "batch": batch,
            "rounds": len(dense),
            "overhead": _median(dense) / _median(plain) - 1,
            "median_round_overhead": _median([d / p for d, p in zip(dense, plain, strict=True)]) - 1,
        }
    )


# ---- report ----


def check_targets(results: dict) -> list[dict]:
    """The GPU path's targets against what was measured (``met`` is None where nothing was)."""
    rows = []
    for section, model, what, at, kind, value in TARGETS:
        measured = None
        if section == "train" and what == "tokens/s":
            measured = results.get("train", {}).get("models", {}).get(model, {}).get("tokens_per_s")
        elif section == "train":
            measured = next(
                (
                    o.get("median_round_overhead")
                    for o in results.get("train", {}).get("overhead", [])
                    if o["dense"] == model
                ),
                None,
            )
        else:
            batches = results.get("decode", {}).get("models", {}).get(model, {}).get("batches", [])
            entry = next((b for b in batches if b["batch"] == at), {})
            measured = entry.get("tokens_per_s" if what == "tokens/s" else "step_over_bound")
        met = None if measured is None else (measured >= value if kind == "min" else measured <= value)
        rows.append(
            {
                "section": section,
                "model": model,
                "what": what,
                "batch": at,
                kind: value,
                "measured": measured,
                "met": met,
            }
        )
    return rows


def _fmt(value, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def _outcome(entry: dict) -> str | None:
    return entry.get("error") or entry.get("skipped")


def render_markdown(results: dict) -> str:
    meta, m = results["meta"], results.get("machine", {})
    kind = "dry run on the CPU, tiny presets (checks the script, measures nothing of note)" if meta["dry_run"] else ""
    lines = [
        f"# GPU check{': ' + kind if kind else ''}",
        "",
        f"`{meta['command']}` on {m.get('device', '?')} ({m.get('host', '?')}), started {meta['started']}; "
        + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v),
        "",
        f"Ceilings measured now: device copy {_fmt(m.get('copy_gb_s'))} GB/s (bytes read + written), bf16 matrix "
        f"product ({m.get('matmul_size')}³) {_fmt(m.get('matmul_bf16_tflop_s'), ',.1f')} TFLOP/s.",
        "",
        "Stages: "
        + ", ".join(
            f"{s} {'done' if v['complete'] else 'cut short'} in {v['seconds']:.0f} s" for s, v in meta["stages"].items()
        ),
        "",
    ]
    t = results.get("tests")
    if t:
        lines += [
            f"**GPU tests** (`pytest -m gpu`): exit status {t['exit_status']}; {t['summary'] or 'no summary'}",
            "",
        ]
    train_ = results.get("train")
    if train_:
        lines += [
            f"## Training, L = {train_['length']:,d}, bf16 autocast, fp32 master weights, fused AdamW",
            "",
            "| model | parameters | batch | activation checkpointing | step (ms) | tokens/s | model TFLOP/s (6N) "
            "| peak memory (GiB) |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for name, e in train_["models"].items():
            peak = None if e["peak_memory_bytes"] is None else e["peak_memory_bytes"] / 2**30
            checkpointed = "yes" if e["activation_checkpointing"] else "no"
            lines.append(
                f"| {name} | {e['parameters']:,d} | {e['batch']} | {checkpointed} | {e['step_s'] * 1e3:,.1f} | "
                f"{e['tokens_per_s']:,.0f} | {e['model_tflop_s']:,.1f} | {_fmt(peak, '.1f')} |"
            )
        lines += [
            "",
            "| dense vs plain | alternating rounds | overhead (medians) | median per-round overhead |",
            "|---|---:|---:|---:|",
        ]
        for o in train_["overhead"]:
            if _outcome(o):
                lines.append(f"| {o['dense']} vs {o['plain']} | {_outcome(o)} | | |")
            else:
                lines.append(
                    f"| {o['dense']} vs {o['plain']} | {o['rounds']} | {o['overhead']:+.1%} | "
                    f"{o['median_round_overhead']:+.1%} |"
                )
        lines.append("")
    pre = results.get("prefill", {}).get("models")
    if pre:
        lengths = sorted({e["length"] for entries in pre.values() for e in entries})
        lines += [
            "## Prefill, batch 1, bf16 weights (tokens/s)",
            "",
            "| model | " + " | ".join(f"{n:,d} tokens" for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for name, entries in pre.items():
            cells = {e["length"]: _outcome(e) or f"{e['tokens_per_s']:,.0f}" for e in entries}
            lines.append(f"| {name} | " + " | ".join(cells.get(n, "–") for n in lengths) + " |")
        lines.append("")
    dec = results.get("decode")
    if dec:
        how = "eager step" if dec["compile"] is None else f"compiled step, backend {dec['compile'].get('backend')}"
        lines += [
            f"## Decode, {how} (CUDA graphs with inductor on a GPU), bf16 weights",
            "",
            "| model | batch | tokens/s | step (ms) | per position (tokens/s) | slowest / fastest | memory bound (ms) "
            "| step / bound | recompiles while timed |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for name, e in dec["models"].items():
            for b in e["batches"]:
                if _outcome(b):
                    lines.append(f"| {name} | {b['batch']} | {_outcome(b)} | | | | | | |")
                    continue
                per = ", ".join(f"{p['position']:,d}: {p['tokens_per_s']:,.0f}" for p in b["positions"])
                bound = None if b["memory_bound_step_s"] is None else b["memory_bound_step_s"] * 1e3
                lines.append(
                    f"| {name} | {b['batch']} | {b['tokens_per_s']:,.0f} | {b['step_s'] * 1e3:,.2f} | {per} | "
                    f"{b['slowest_over_fastest_position']:.2f} | {_fmt(bound, ',.2f')} | "
                    f"{_fmt(b['step_over_bound'], '.2f')} | {b['graphs_compiled_while_timed']} |"
                )
        lines += [
            "",
            "| dense vs plain | batch | rounds | overhead (medians) | median per-round overhead |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {o['dense']} vs {o['plain']} | {o['batch']} | {o['rounds']} | {o['overhead']:+.1%} | "
            f"{o['median_round_overhead']:+.1%} |"
            for o in dec["overhead"]
        ]
        state = {n: e.get("state_bytes_per_sequence") for n, e in dec["models"].items()}
        lines += ["", "Decode state per sequence: " + ", ".join(f"{n} {_fmt(s)} bytes" for n, s in state.items())]
        runs = [(n, b) for n, e in dec["models"].items() for b in e["batches"] if "generate" in b]
        lines += [
            "",
            *(
                f"`generate()` end to end, {n}, batch {b['batch']}, 16-token prompt, "
                f"{b['generate']['new_tokens']:,d} new tokens: {b['generate']['tokens_per_s']:,.0f} tokens/s "
                f"({b['generate']['graphs_compiled_while_timed']} compilations while timed)"
                for n, b in runs
            ),
            "",
        ]
    for stage in ("train", "prefill", "decode"):
        if stage in results:
            paths = "; ".join(results[stage].get("kernels", [])) or "none logged"
            lines.append(f"Kernel paths ({stage}): {paths}.  ")
    forced = m.get("kernels_forced")
    lines += [f"Kernel path forced by DENSESSM_KERNELS={forced}." if forced else "", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for row in results.get("targets", []):
        at = f" at batch {row['batch']}" if row["batch"] else ""
        spec = ".0%" if row["what"] == "dense overhead" else ".2f" if "bound" in row["what"] else ",.0f"
        bound = f"≥ {row['min']:{spec}}" if "min" in row else f"≤ {row['max']:{spec}}"
        spec = ".1%" if spec == ".0%" else spec
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(
            f"| {row['model']} {row['section']} {row['what']}{at} {bound} | {_fmt(row['measured'], spec)} | {met} |"
        )
    lines += ["", f"![training, prefill and decode speed]({NAME}.png)", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Training tokens/s, prefill tokens/s, and decode tokens/s against the position for each batch (flat lines
    are the point: a recurrent step does not grow with the context)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    train_ax, prefill_ax, decode_ax = fig.subplots(1, 3)
    train_ = results.get("train", {}).get("models", {})
    train_ax.bar(list(train_), [e["tokens_per_s"] for e in train_.values()], color="tab:blue")
    train_ax.set_title(f"training, L = {results.get('train', {}).get('length', '?')}, bf16")
    train_ax.set_ylabel("tokens / s")
    train_ax.tick_params(axis="x", labelrotation=20)
    for name, entries in results.get("prefill", {}).get("models", {}).items():
        done = [e for e in entries if "tokens_per_s" in e]
        prefill_ax.plot([e["length"] for e in done], [e["tokens_per_s"] for e in done], "o-", label=name)
    prefill_ax.set_title("prefill, batch 1")
    prefill_ax.set_xlabel("prompt tokens")
    prefill_ax.set_ylabel("tokens / s")
    for name, e in results.get("decode", {}).get("models", {}).items():
        for b in e["batches"]:
            if "positions" in b:
                decode_ax.plot(
                    [p["position"] for p in b["positions"]],
                    [p["tokens_per_s"] for p in b["positions"]],
                    "o-" if name.startswith("dense_") else "s--",
                    label=f"{name}, batch {b['batch']}",
                )
    decode_ax.set_yscale("log")
    compiled = (results.get("decode") or {}).get("compile")
    decode_ax.set_title(
        "decode, " + ("eager step" if compiled is None else f"compiled step ({compiled.get('backend')})")
    )
    decode_ax.set_xlabel("tokens already generated")
    decode_ax.set_ylabel("tokens / s (all rows)")
    for ax in (train_ax, prefill_ax, decode_ax):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0) if ax is not decode_ax else None
    for ax in (prefill_ax, decode_ax):
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(
        f"GPU check: {results.get('machine', {}).get('device', '?')}"
        + (" (dry run)" if results["meta"]["dry_run"] else "")
    )
    with atomic_output_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# ---- the command ----


def _json_path(out: Path) -> Path:
    return out / f"{NAME}.json"


def _write(results: dict, out: Path) -> None:
    atomic_write_text(_json_path(out), json.dumps(results, indent=2, allow_nan=False) + "\n", overwrite=True)


def decode_backend(name: str) -> str:
    """``none`` (the eager decode step) or a ``torch.compile`` backend this PyTorch has, checked when the flags are
    read: the script checks it before its first stage, not after minutes of measurements that all fail on it."""
    if name == "none":
        return name
    try:
        return compile_backend(name)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err}; or none for the eager decode step") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m densessm_lab.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--out", type=Path, required=True, help="folder of gpu_check.json/.md/.png")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny presets, small sizes (seconds)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds after which the stage starts no more work")
    parser.add_argument("--overwrite", action="store_true", help="machine: replace an existing gpu_check.json")
    parser.add_argument("--pytest-log", type=Path, help="tests: the log of `pytest -m gpu`")
    parser.add_argument("--pytest-rc", default="not run", help="tests: its exit status, or why it did not run")
    parser.add_argument("--command", default="scripts/gpu_check.sh", help="the command line the report names")
    parser.add_argument(
        "--compile-backend",
        type=decode_backend,
        help="decode: torch.compile backend of the decode step (default: inductor, or none in the dry run)",
    )
    parser.add_argument("--check-args", action="store_true", help="check the flags, measure nothing (the script)")
    args = parser.parse_args(argv)
    if args.budget <= 0 or not math.isfinite(args.budget):
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one stage; 1 if something in it failed (recorded in the results), else 0."""
    args = parse_args(argv)
    if args.check_args:
        return 0
    plan = DRY_RUN if args.dry_run else GPU
    if args.compile_backend:
        plan = dataclasses.replace(
            plan, compile_backend=None if args.compile_backend == "none" else args.compile_backend
        )
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA GPU is visible to this Python's torch: run on a GPU machine, or pass --dry-run")
    started = time.monotonic()
    deadline = started + args.budget
    path = _json_path(args.out)
    if args.stage == "machine":
        if path.exists() and not args.overwrite:
            raise UsageError(f"{path} already exists; nothing was measured (pass --overwrite to start a new one)")
        args.out.mkdir(parents=True, exist_ok=True)
        results = {
            "meta": {
                "command": args.command,
                "dry_run": args.dry_run,
                "plan": dataclasses.asdict(plan),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "stages": {},
            }
        }
    else:
        if not path.is_file():
            raise UsageError(f"{path} does not exist: run the machine stage first (scripts/gpu_check.sh runs them all)")
        results = json.loads(path.read_text())
        if results["meta"]["dry_run"] != args.dry_run:
            raise UsageError(f"{path} was started {'with' if results['meta']['dry_run'] else 'without'} --dry-run")

    def save(section: dict, complete: bool = False) -> None:
        results[args.stage] = section
        results["meta"]["stages"][args.stage] = {"seconds": time.monotonic() - started, "complete": complete}
        _write(results, args.out)

    torch.manual_seed(0)
    if args.stage == "machine":
        section = machine(plan)
    elif args.stage == "tests":
        section = tests(args.pytest_log or args.out / "gpu_tests.log", args.pytest_rc)
    elif args.stage in ("train", "prefill", "decode"):
        with KernelLog().attached() as kernels:
            if args.stage == "train":
                section = train(plan, deadline, save)
            elif args.stage == "prefill":
                section = prefill(plan, deadline, save)
            else:
                section = decode(plan, deadline, save, results.get("machine", {}).get("copy_gb_s"))
        section["kernels"] = sorted(set(kernels.lines))
    else:
        results["targets"] = check_targets(results)
        _write(results, args.out)
        atomic_write_text(args.out / f"{NAME}.md", render_markdown(results), overwrite=True)
        plot(results, args.out / f"{NAME}.png")
        print((args.out / f"{NAME}.md").read_text())
        return 0
    if args.stage != "report":
        save(section, complete=True)
    failed = _has_error(section) or (args.stage == "tests" and not _tests_passed(section["exit_status"]))
    print(f"{args.stage}: {'done' if not failed else 'done, with failures recorded in'} {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
