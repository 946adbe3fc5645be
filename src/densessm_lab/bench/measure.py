"""The timings of ``densessm bench generate`` (see :mod:`densessm_lab.bench`): decode-step latency after a
context, end-to-end ``generate()`` throughput, the dense overhead in alternating steps, and the run over every
requested model."""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import time
from collections.abc import Callable

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from tqdm import tqdm
from transformers import CompileConfig, PreTrainedModel

from densessm.inference import prepack_for_cpu, quantize_int8
from densessm_lab.bench.models import (
    DTYPES,
    LLAMAS,
    build,
    cache_bytes,
    is_recurrent,
    is_stock,
    kv_bytes,
    synthetic_cache,
)

WARMUP_ROUNDS = 3
"""Alternating rounds of the overhead measurement that are not timed."""
COMPILED_WARMUP_STEPS = 4
"""Decode steps not timed before a compiled step's timings: the 1st call compiles (and runs eagerly once under
CUDA graph trees), the 2nd records the CUDA graph, replays follow; one spare."""
WARMUP_TOKENS = 8
"""New tokens of the untimed ``generate()`` that precedes the timed ones."""
RECOMPILE_LIMIT = 64
"""Dynamo gives up compiling after 8 recompiles (its default): raised so that a recompile shows in the counts."""


def _now(device: torch.device) -> float:
    """The clock at either end of a timed region: on CUDA once the queued work is done (launches are async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a timed region that compiles is no steady state)."""
    return counters["stats"]["unique_graphs"]


def compile_config_for(backend: str) -> CompileConfig:
    """The ``CompileConfig`` of ``--compile``: whole graph, static shapes, mode ``reduce-overhead`` (CUDA graphs
    on a GPU; :class:`~densessm.compiled_decoding.CompiledDecoder` drops the mode elsewhere)."""
    return CompileConfig(fullgraph=True, dynamic=False, backend=backend)


def _available_bytes(device: torch.device) -> int:
    """Memory free for a new cache: on CUDA the GPU's free memory plus what PyTorch's allocator holds unused
    (an earlier context's freed cache), else the host's available memory."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def decoder(
    model: PreTrainedModel,
    batch: int,
    context: int,
    calls: int,
    dynamic: bool = False,
    compile_config: CompileConfig | None = None,
) -> tuple[object, Callable[[], float]]:
    """A synthetic ``context``-token cache and a function that runs one greedy decode step on it (``calls``
    at most) and returns its seconds; one step at a time, so that two models' steps can be interleaved
    (:func:`alternate`).

    With ``compile_config`` (recurrent models) the step runs through the model's compiled decoder
    (``get_compiled_call``, the one ``generate(compile_config=...)`` uses); its first calls compile.
    """
    device = model.device
    cache = synthetic_cache(model, batch, context, calls, dynamic=dynamic)
    mask = torch.ones(batch, context + calls, dtype=torch.long, device=device)
    token = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    forward = model if compile_config is None else model.get_compiled_call(compile_config)
    # a recurrent model gets no mask, as in generate() without padding (an all-ones mask would cost the eager
    # step a host read and the compiled one its masked path): its state is the history
    recurrent = is_recurrent(model)
    length = context

    def step() -> float:
        nonlocal token, length
        length += 1
        with torch.no_grad():
            start = _now(device)
            out = forward(token, cache=cache, use_cache=True, attention_mask=None if recurrent else mask[:, :length])
            token = out.logits[:, -1:].argmax(-1)
            return _now(device) - start

    return cache, step


def decode_latency(
    model: PreTrainedModel,
    batch: int,
    context: int,
    steps: int,
    dtype: torch.dtype,
    dynamic_cache: bool = False,
    compile_config: CompileConfig | None = None,
) -> dict:
    """Median seconds per decode step after ``context`` tokens, and the cache bytes per sequence.

    ``dynamic_cache``: a Transformer decodes with the growing ``DynamicCache`` instead of a ``StaticCache``.
    Its append copies one layer at a time, so the memory check needs no more room than the static one.
    ``compile_config``: the steps run compiled (see :func:`decoder`); the first ``COMPILED_WARMUP_STEPS``
    (compilation, CUDA graph recording) are not timed, where the eager path drops only the first.
    ``graphs_compiled_in_warmup`` and ``graphs_compiled_while_timed`` count the compilations among the
    untimed and the timed steps (the latter is 0 in a steady state).
    """
    warmup = 1 if compile_config is None else COMPILED_WARMUP_STEPS
    needed = 1.1 * kv_bytes(model, batch, context + warmup + steps, dtype)
    if needed > _available_bytes(model.device):
        return {"context": context, "skipped": f"needs ~{needed / 2**30:.0f} GiB for the KV cache"}
    cache, step = decoder(model, batch, context, warmup + steps, dynamic=dynamic_cache, compile_config=compile_config)
    per_sequence = cache_bytes(cache, context) / batch
    graphs = _graphs_compiled()
    for _ in range(warmup):
        step()
    warmup_graphs, graphs = _graphs_compiled() - graphs, _graphs_compiled()
    times = [step() for _ in range(steps)]
    return {
        "context": context,
        "step_s": _median(times),
        "cache_bytes_per_sequence": per_sequence,
        "warmup_steps": warmup,
        "graphs_compiled_in_warmup": warmup_graphs,
        "graphs_compiled_while_timed": _graphs_compiled() - graphs,
    }


def _generate(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, compile_config: CompileConfig | None = None
) -> torch.Tensor:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens; compiled decode steps with ``compile_config``."""
    kwargs = {} if compile_config is None else {"compile_config": compile_config}
    with torch.no_grad():
        return model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
        )


def warm_up_generate(
    model: PreTrainedModel, batch: int, prompt_length: int = 16, compile_config: CompileConfig | None = None
) -> None:
    """An untimed ``generate()`` of ``WARMUP_TOKENS`` tokens with the timed runs' settings: it takes the
    compilation of the decode step (and, on a GPU, the first kernel launches) out of the timings."""
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_length), device=model.device)
    _generate(model, prompt, WARMUP_TOKENS, compile_config)


def generation_throughput(
    model: PreTrainedModel,
    batch: int,
    new_tokens: int,
    prompt_length: int = 16,
    compile_config: CompileConfig | None = None,
) -> dict:
    """End-to-end ``generate()`` tokens/s (all rows) for ``new_tokens`` greedy tokens (decode steps compiled
    with ``compile_config``; run :func:`warm_up_generate` first so that the compilation is not timed)."""
    device = model.device
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_length), device=device)
    graphs = _graphs_compiled()
    start = _now(device)
    out = _generate(model, prompt, new_tokens, compile_config)
    seconds = _now(device) - start
    generated = out.shape[1] - prompt_length
    return {
        "new_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": batch * generated / seconds,
        "graphs_compiled_while_timed": _graphs_compiled() - graphs,
    }


def alternate(steppers: list[Callable[[], float]], rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of one step of each of two models (steppers from :func:`decoder`), the first model
    going first in even rounds: the seconds of each model's steps. Alternating single steps lets the
    machine's drift hit both models alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(rounds):
        for i in (0, 1) if round_ % 2 == 0 else (1, 0):
            times[i].append(steppers[i]())
    return times


def copy_bandwidth(repeats: int = 5) -> float:
    """GB/s of a 256 MiB fp32 copy (read + write), best of ``repeats``: this machine's memory speed now (on a
    shared machine it drifts by 2x within the hour, so a bound from another moment means little)."""
    source = torch.ones(2**26)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best / 1e9


def dense_overhead(
    dense_name: str,
    plain_name: str,
    batch: int,
    context: int,
    steps: int,
    dtype: torch.dtype,
    prepack: bool,
    device: str | torch.device = "cpu",
    compile_config: CompileConfig | None = None,
    quantize: bool = False,
) -> dict:
    """How much slower a decode step of ``dense_name`` is than one of its plain twin ``plain_name`` (both with
    int8 weights if ``quantize``).

    Both models decode from a synthetic ``context``-token state, alternating single steps (which model goes
    first alternates too), so that the machine's drift hits both alike; ``steps`` rounds are timed after
    ``WARMUP_ROUNDS`` untimed ones (``COMPILED_WARMUP_STEPS`` with ``compile_config``, whose steps run
    compiled). ``overhead`` compares the two medians; ``median_round_overhead`` is the median of the
    per-round ratios, which also cancels drift within the run.
    """
    models = [build(name, dtype, device) for name in (dense_name, plain_name)]
    for model in models:
        if quantize:
            quantize_int8(model)
        if prepack:
            prepack_for_cpu(model)
    warmup = WARMUP_ROUNDS if compile_config is None else max(WARMUP_ROUNDS, COMPILED_WARMUP_STEPS)
    steppers = [decoder(model, batch, context, warmup + steps, compile_config=compile_config)[1] for model in models]
    alternate(steppers, warmup)
    times = alternate(steppers, steps)
    del steppers, models
    gc.collect()
    dense, plain = _median(times[0]), _median(times[1])
    return {
        "dense": dense_name,
        "plain": plain_name,
        "batch": batch,
        "context": context,
        "rounds": steps,
        "warmup_rounds": warmup,
        "prepacked_weights": prepack,
        "int8_weights": quantize,
        "compiled": compile_config is not None,
        "dense_step_s": dense,
        "plain_step_s": plain,
        "overhead": dense / plain - 1,
        "median_round_overhead": _median([d / p for d, p in zip(*times, strict=True)]) - 1,
    }


def dense_pairs(models: list[str]) -> list[tuple[str, str]]:
    """(``dense_X``, ``X``) for every dense model whose plain twin is also requested, in ``models`` order."""
    return [
        (name, name.removeprefix("dense_"))
        for name in models
        if name.startswith("dense_") and name.removeprefix("dense_") in models
    ]


def _machine(device: torch.device) -> str:
    """The machine, for the report: the host's processor and threads, and the GPU's name on CUDA."""
    host = f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {host}"
    return host


def _release(device: torch.device, compiled: bool) -> None:
    """Free what the last model held: dynamo's compiled steps (they reference its weights and, on CUDA, the
    caches marked static and the CUDA graphs' memory pool), then the allocator's cached blocks."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Measure every model of ``args`` (the flags of ``densessm bench generate``; see :mod:`densessm_lab.bench`);
    ``checkpoint`` gets the results so far after each model and each dense/plain pair."""
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    compile_config = compile_config_for(args.compile_backend) if args.compile else None
    compiled = {name: args.compile and name not in LLAMAS for name in args.models}
    prepack = not args.no_prepack and device.type == "cpu"
    notes = []
    if not args.no_prepack and not prepack:
        notes.append(f"weights not prepacked: prepacking is CPU-only (device {device})")
    if args.compile:
        mode = compile_config.mode if args.compile_backend == "inductor" else None
        if mode == "reduce-overhead" and device.type != "cuda":
            mode = None  # what CompiledDecoder does: CUDA graphs need a GPU
        notes.append(
            f"compiled decode steps (recurrent models): torch.compile backend {args.compile_backend}, "
            f"mode {mode or 'default'}{' (CUDA graphs)' if mode == 'reduce-overhead' else ''}, fullgraph, static "
            f"shapes; the first {COMPILED_WARMUP_STEPS} decode steps and a {WARMUP_TOKENS}-token generate() are "
            "untimed warm-up"
        )
        if prepack:
            notes.append("compiled models are not prepacked (the compiled path takes only default linear layers)")
        notes.append("the LLaMAs run eagerly under --compile: transformers' own compilation is not measured here")
    results = {
        "meta": {
            "command": "densessm bench generate " + " ".join(args.argv),
            "machine": _machine(device),
            "device": str(device),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "batch": args.batch,
            "compile": args.compile,
            "compile_config": compile_config.to_dict() if compile_config is not None else None,
            "compiled": compiled,
            "prepacked_weights": prepack,
            "prepacked": {name: prepack and not is_stock(name) and not compiled[name] for name in args.models},
            "quantize": args.quantize,
            "quantized": {name: args.quantize is not None and not is_stock(name) for name in args.models},
            "dynamo_recompile_limit": RECOMPILE_LIMIT if args.compile else None,
            "notes": notes,
            "complete": False,
        },
        "models": {},
        "overhead": [],
    }
    # on CUDA, CompiledDecoder marks each new cache's tensors static, guarded by identity: one recompilation per
    # cache (each context, each generate()), which can pass dynamo's default limit of 8 per function, past
    # which it runs the step eagerly with only a warning; graphs_compiled_while_timed shows any in a timing
    limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if args.compile else contextlib.nullcontext()
    with limit:
        for name in tqdm(args.models, desc="models"):
            config = compile_config if compiled[name] else None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            graphs = _graphs_compiled()
            model = build(name, dtype, device)
            entry = {
                "parameters": sum(p.numel() for p in model.parameters()),  # before a transform stores them elsewhere
                "compiled": config is not None,
            }
            if results["meta"]["quantized"][name]:
                quantize_int8(model)  # before prepacking, which then packs the layers left in float
            if results["meta"]["prepacked"][name]:
                prepack_for_cpu(model)
            entry["decode"] = [
                decode_latency(
                    model, args.batch, c, args.steps, dtype, dynamic_cache=is_stock(name), compile_config=config
                )
                for c in tqdm(args.contexts, desc=name, leave=False)
            ]
            warm_up_generate(model, args.batch, compile_config=config)
            entry["generate"] = [
                generation_throughput(model, args.batch, n, compile_config=config) for n in args.new_tokens
            ]
            entry["graphs_compiled"] = _graphs_compiled() - graphs
            if device.type == "cuda":
                entry["cuda_bytes_before"] = before
                entry["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            results["models"][name] = entry
            del model
            _release(device, args.compile)
            if checkpoint is not None:
                checkpoint(results)
        if args.overhead_steps > 0:
            for dense, plain in tqdm(dense_pairs(args.models), desc="dense overhead"):
                results["overhead"].append(
                    dense_overhead(
                        dense,
                        plain,
                        args.batch,
                        args.overhead_context,
                        args.overhead_steps,
                        dtype,
                        prepack and not args.compile,
                        device,
                        compile_config,
                        quantize=args.quantize is not None,
                    )
                )
                _release(device, args.compile)
                if checkpoint is not None:
                    checkpoint(results)
    results["meta"]["complete"] = True
    return results
