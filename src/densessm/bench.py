"""``densessm bench generate``: generation speed of recurrent models against a Transformer with a KV cache.

Four measurements, all models in one run, same dtype, same machine, same batch:

1. end-to-end tokens/s while generating ``N`` new tokens from a short prompt (``generate()``, greedy);
2. the latency of one decode step after a context of ``C`` tokens;
3. the memory each sequence keeps between steps (recurrent state vs KV cache) at that context;
4. the dense overhead: each dense model (``dense_X``) whose plain twin (``X``) is also in ``--models`` decodes
   in alternation with it, one step each per round, so that the machine's minute-to-minute noise (±30%) hits
   both alike; two models measured minutes apart could not resolve an overhead of a few percent.

For (2) to (4) the context's cache is *synthesised*: filled with random tensors of exactly the shape a real
prefill of ``C`` tokens leaves (a decode step's cost does not depend on the values), so long contexts are
measured without minutes of prefill. A recurrent model's state has the same size after any context.

Two LLaMA baselines of the same configuration:

* ``llama_350m`` (``llama_tiny``), optimised: its weights are prepacked like ours and (2) uses a preallocated
  ``StaticCache``, transformers' fastest eager form, so our models are not compared against a handicapped
  Transformer;
* ``llama_350m_stock`` (``llama_tiny_stock``), as users run it: ``LlamaForCausalLM`` out of the box, never
  prepacked, and (2) uses the default growing ``DynamicCache`` (each decode step ``torch.cat``-s every layer's
  keys and values onto its history). The issue's speed targets are stated against this one.

``generate()`` in (1) uses transformers' default ``DynamicCache`` for both.

``--device cuda`` runs everything on a GPU (prepacking is CPU-only and is skipped there; each timed region
synchronises the GPU at both ends). ``--compile`` runs the recurrent models' decode steps through
:class:`~densessm.compiled_decoding.CompiledDecoder` (``torch.compile``; on CUDA with ``reduce-overhead``: CUDA
graphs) in (1) to (4), untimed warm-up steps taking the compilation; the LLaMAs stay eager (their own
compilation is transformers' business, not the path measured here).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from densessm.argtypes import nonnegative_int, path_name, positive_int
from densessm.cache import RecurrentCache
from densessm.errors import UsageError
from densessm.files import atomic_output_file, atomic_write_text
from densessm.inference import prepack_for_cpu
from densessm.presets import list_presets, load_preset
from densessm.runtime import resolve_device

# a LLaMA with about the parameters of the 350m presets (hidden 1024, 24 layers, SwiGLU 2816)
LLAMA_350M = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=16384,
)
LLAMA_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
# ``*_stock``: the same LLaMA run as users run it (no prepacking, growing DynamicCache); see the module docstring
STOCK = "_stock"
LLAMAS = {
    "llama_350m": LLAMA_350M,
    "llama_350m" + STOCK: LLAMA_350M,
    "llama_tiny": LLAMA_TINY,
    "llama_tiny" + STOCK: LLAMA_TINY,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP_ROUNDS = 3  # alternating rounds of the overhead measurement that are not timed
# decode steps not timed before a compiled step's timings: the 1st call compiles (and runs eagerly once under
# CUDA graph trees), the 2nd records the CUDA graph, replays follow; one spare
COMPILED_WARMUP_STEPS = 4
WARMUP_TOKENS = 8  # new tokens of the untimed generate() that precedes the timed ones
RECOMPILE_LIMIT = 64  # dynamo gives up compiling after 8 recompiles (default): a recompile must show in the counts


def _now(device: torch.device) -> float:
    """The clock at either end of a timed region: on CUDA once the queued work is done (launches are async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a timed region that compiles is no steady state)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_config_for(backend: str):
    """The ``CompileConfig`` of ``--compile``: whole graph, static shapes, mode ``reduce-overhead`` (CUDA graphs
    on a GPU; :class:`~densessm.compiled_decoding.CompiledDecoder` drops the mode elsewhere)."""
    from transformers import CompileConfig

    return CompileConfig(fullgraph=True, dynamic=False, backend=backend)


def is_stock(name: str) -> bool:
    """Whether ``name`` is a LLaMA measured as users run it: never prepacked, with a growing ``DynamicCache``."""
    return name in LLAMAS and name.endswith(STOCK)


def treatment(name: str, prepacked: bool, compiled: bool = False, compile_run: bool = False) -> str:
    """One line on how model ``name`` is run, for the report: the two LLaMAs differ only in this.

    ``compiled``: its decode steps run compiled; ``compile_run``: the run was asked to compile (the LLaMAs
    stay eager then, which the line says).
    """
    if is_stock(name):
        line = "stock transformers: default linear layers, growing DynamicCache"
    else:
        weights = "prepacked weights" if prepacked else "default linear layers"
        line = weights
        if name in LLAMAS:
            line = f"optimised: {weights}, preallocated StaticCache in decode (generate(): DynamicCache)"
    if compiled:
        line += ", compiled decode steps"
    elif compile_run:
        line += ", eager (not compiled)"
    return line


def build(name: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A randomly initialised model by preset name, or a LLaMA (``llama_350m``, ``llama_tiny``, ``*_stock``),
    on ``device`` (initialised on the CPU, so its weights do not depend on the device)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name in LLAMAS:
        model = LlamaForCausalLM(LlamaConfig(**LLAMAS[name]))
    else:
        model = AutoModelForCausalLM.from_config(load_preset(name))
    return model.to(device=device, dtype=dtype).eval()


def _synthetic_cache(model, batch: int, context: int, steps: int, dynamic: bool = False):
    """The cache a ``context``-token prefill leaves, with random contents (room for ``steps`` more tokens),
    on the model's device.

    A Transformer gets a ``StaticCache``: preallocated, so a decode step does not copy the whole history the
    way the growing ``DynamicCache`` does. That is its fastest form on this path, so the comparison is fair
    to it. With ``dynamic`` it gets the default ``DynamicCache`` instead (the stock baseline), whose decode
    steps then append with its normal ``torch.cat``.
    """
    from transformers import DynamicCache, StaticCache

    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    prompt = torch.randint(3, model.config.vocab_size, (batch, 1), device=model.device)
    recurrent = getattr(model, "_is_stateful", False)
    if recurrent:
        cache = None
    elif dynamic:
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    with torch.no_grad():
        cache = model(prompt, cache=cache, use_cache=True).cache  # the right structure, one real step
    return _fill_context(cache, context, model.device)


def _fill_context(cache, context: int, device: torch.device):
    """Turn the cache of one real step into that of ``context`` tokens with random contents; every tensor
    made here is made on ``device``."""
    from transformers import DynamicCache

    if isinstance(cache, RecurrentCache):
        for layer in cache.layers:
            for name, tensor in layer.items():
                layer[name] = torch.rand_like(tensor, device=device) if tensor.is_floating_point() else tensor
        cache.steps = context
        cache.positions = torch.full((cache.batch_size,), context, dtype=torch.long, device=device)
        return cache
    if isinstance(cache, DynamicCache):
        for layer in cache.layers:  # [batch, kv_heads, 1, head_dim] after the real step: widen it to the context
            shape = (*layer.keys.shape[:2], context, layer.keys.shape[-1])
            layer.keys = torch.randn(shape, dtype=layer.keys.dtype, device=device)
            layer.values = torch.randn(shape, dtype=layer.values.dtype, device=device)
        return cache
    for layer in cache.layers:
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)
    return cache


def cache_bytes(cache, context: int) -> int:
    """Bytes a cache holds for the whole batch after ``context`` tokens (a KV cache: ``context`` entries)."""
    if isinstance(cache, RecurrentCache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.values())
    return sum(
        t[:, :, :context].numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )


def _available_bytes(device: torch.device) -> int:
    """Memory free for a new cache: on CUDA the GPU's free memory plus what PyTorch's allocator holds unused
    (an earlier context's freed cache), else the host's available memory."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _kv_bytes(model, batch: int, context: int, dtype: torch.dtype) -> int:
    config = model.config
    if not hasattr(config, "num_key_value_heads"):
        return 0  # a recurrent model: its state does not grow
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return batch * context * per_token * torch.finfo(dtype).bits // 8


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _decoder(model, batch: int, context: int, calls: int, dynamic: bool = False, compile_config=None):
    """A synthetic ``context``-token cache and a function that runs one greedy decode step on it (``calls``
    at most) and returns its seconds; one step at a time, so that two models' steps can be interleaved.

    With ``compile_config`` (recurrent models) the step runs through the model's compiled decoder
    (``get_compiled_call``, the one ``generate(compile_config=...)`` uses); its first calls compile.
    """
    device = model.device
    cache = _synthetic_cache(model, batch, context, calls, dynamic=dynamic)
    mask = torch.ones(batch, context + calls, dtype=torch.long, device=device)
    token = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    forward = model if compile_config is None else model.get_compiled_call(compile_config)
    # a recurrent model gets no mask, as in generate() without padding (an all-ones mask would cost the eager
    # step a host read and the compiled one its masked path): its state is the history
    recurrent = getattr(model, "_is_stateful", False)
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
    model,
    batch: int,
    context: int,
    steps: int,
    dtype: torch.dtype,
    dynamic_cache: bool = False,
    compile_config=None,
) -> dict:
    """Median seconds per decode step after ``context`` tokens, and the cache bytes per sequence.

    ``dynamic_cache``: a Transformer decodes with the growing ``DynamicCache`` instead of a ``StaticCache``.
    Its append copies one layer at a time, so the memory check needs no more room than the static one.
    ``compile_config``: the steps run compiled (see :func:`_decoder`); the first ``COMPILED_WARMUP_STEPS``
    (compilation, CUDA graph recording) are not timed, where the eager path drops only the first.
    ``graphs_compiled_in_warmup`` and ``graphs_compiled_while_timed`` count the compilations among the
    untimed and the timed steps (the latter is 0 in a steady state).
    """
    warmup = 1 if compile_config is None else COMPILED_WARMUP_STEPS
    needed = 1.1 * _kv_bytes(model, batch, context + warmup + steps, dtype)
    if needed > _available_bytes(model.device):
        return {"context": context, "skipped": f"needs ~{needed / 2**30:.0f} GiB for the KV cache"}
    cache, step = _decoder(model, batch, context, warmup + steps, dynamic=dynamic_cache, compile_config=compile_config)
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


def _generate(model, prompt: torch.Tensor, new_tokens: int, compile_config=None) -> torch.Tensor:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens; compiled decode steps with ``compile_config``."""
    kwargs = {} if compile_config is None else {"compile_config": compile_config}
    with torch.no_grad():
        return model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
        )


def warm_up_generate(model, batch: int, prompt_length: int = 16, compile_config=None) -> None:
    """An untimed ``generate()`` of ``WARMUP_TOKENS`` tokens with the timed runs' settings: it takes the
    compilation of the decode step (and, on a GPU, the first kernel launches) out of the timings."""
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_length), device=model.device)
    _generate(model, prompt, WARMUP_TOKENS, compile_config)


def generation_throughput(model, batch: int, new_tokens: int, prompt_length: int = 16, compile_config=None) -> dict:
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


def alternate(steppers, rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of one step of each of two models (steppers from :func:`_decoder`), the first model
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
    compile_config=None,
) -> dict:
    """How much slower a decode step of ``dense_name`` is than one of its plain twin ``plain_name``.

    Both models decode from a synthetic ``context``-token state, alternating single steps (which model goes
    first alternates too), so that the machine's drift hits both alike; ``steps`` rounds are timed after
    ``WARMUP_ROUNDS`` untimed ones (``COMPILED_WARMUP_STEPS`` with ``compile_config``, whose steps run
    compiled). ``overhead`` compares the two medians; ``median_round_overhead`` is the median of the
    per-round ratios, which also cancels drift within the run.
    """
    models = [build(name, dtype, device) for name in (dense_name, plain_name)]
    if prepack:
        for model in models:
            prepack_for_cpu(model)
    warmup = WARMUP_ROUNDS if compile_config is None else max(WARMUP_ROUNDS, COMPILED_WARMUP_STEPS)
    steppers = [_decoder(model, batch, context, warmup + steps, compile_config=compile_config)[1] for model in models]
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
        from torch import _dynamo

        _dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_json(results: dict, out: Path) -> None:
    """The results as ``out.json``: at the end, and after each model (``meta.complete`` false until done), so a
    run cut short (a GPU session's time limit) leaves what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n", overwrite=True)


def run(args: argparse.Namespace, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Measure every model of ``args`` (see the module docstring); ``checkpoint`` gets the results so far after
    each model and each dense/plain pair."""
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
    limit = contextlib.nullcontext()
    if args.compile:
        from torch import _dynamo

        limit = _dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
    with limit:
        for name in tqdm(args.models, desc="models"):
            config = compile_config if compiled[name] else None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            graphs = _graphs_compiled()
            model = build(name, dtype, device)
            if results["meta"]["prepacked"][name]:
                prepack_for_cpu(model)
            entry = {
                "parameters": sum(p.numel() for p in model.parameters())
                + sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight")),
                "compiled": config is not None,
            }
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
                    )
                )
                _release(device, args.compile)
                if checkpoint is not None:
                    checkpoint(results)
    results["meta"]["complete"] = True
    return results


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(results, out)
    meta, models = results["meta"], results["models"]
    batch = meta["batch"]
    prepacked = meta.get("prepacked", {})
    compiled = meta.get("compiled", {})
    compile_run = meta.get("compile", False)
    notes = {
        name: treatment(name, prepacked.get(name, meta["prepacked_weights"]), compiled.get(name, False), compile_run)
        for name in models
    }
    device = meta.get("device", "cpu")
    lines = [
        f"`{meta['command']}` — {meta['machine']}, torch {meta['torch']}; device {device}, {meta['dtype']}, "
        f"compile {'on' if compile_run else 'off'}, batch {batch}",
        "",
    ]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    polluted = [
        f"{name} ({'generate' if 'tokens_per_s' in m else 'decode'} {m.get('new_tokens', m.get('context'))})"
        for name, entry in models.items()
        for m in entry["decode"] + entry["generate"]
        if m.get("graphs_compiled_while_timed")
    ]
    if polluted:
        lines.append("- WARNING: compilation inside a timed region (not a steady state): " + ", ".join(polluted))
    if lines[-1] != "":
        lines.append("")
    gens = next(iter(models.values()))["generate"]
    cuda_memory = all("cuda_peak_bytes" in entry for entry in models.values())
    lines += [
        "| model | parameters | notes | "
        + " | ".join(f"gen {g['new_tokens']} tok/s" for g in gens)
        + (" | peak GPU memory (GiB)" if cuda_memory else "")
        + " |"
    ]
    lines += ["|---|---:|---|" + "---:|" * (len(gens) + cuda_memory)]
    for name, entry in models.items():
        cells = " | ".join(f"{g['tokens_per_s']:.1f}" for g in entry["generate"])
        if cuda_memory:
            cells += f" | {entry['cuda_peak_bytes'] / 2**30:.2f}"
        lines.append(f"| {name} | {entry['parameters'] / 1e6:.0f}M | {notes[name]} | {cells} |")
    lines += [
        "",
        "| model | context | decode step (ms) | tokens/s (batch) | cache per sequence (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in models.items():
        for d in entry["decode"]:
            if "skipped" in d:
                lines.append(f"| {name} | {d['context']:,} | {d['skipped']} | | |")
                continue
            lines.append(
                f"| {name} | {d['context']:,} | {d['step_s'] * 1000:.1f} | {batch / d['step_s']:.1f} | "
                f"{d['cache_bytes_per_sequence'] / 2**20:.1f} |"
            )
    llamas = [name for name in models if name in LLAMAS]
    if llamas:
        lines += ["", "LLaMA baselines: " + "; ".join(f"`{name}`: {notes[name]}" for name in llamas) + "."]
    overhead = results.get("overhead", [])
    if overhead:
        o = overhead[0]
        lines += [
            "",
            f"Dense overhead: single decode steps alternated between the two models after a context of "
            f"{o['context']:,}, {o['rounds']} rounds (+{o.get('warmup_rounds', WARMUP_ROUNDS)} warm-up), "
            f"batch {o['batch']}{', compiled decode steps' if o.get('compiled') else ''}. One block measures one "
            "moment of the machine: on a shared CPU it moves by several points from run to run "
            "(`benchmarks/dense_overhead.py` repeats it in blocks and gives the median).",
            "",
            "| dense | plain | dense step (ms) | plain step (ms) | overhead | median per-round overhead |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {o['dense']} | {o['plain']} | {o['dense_step_s'] * 1000:.2f} | {o['plain_step_s'] * 1000:.2f} | "
            f"{o['overhead']:+.1%} | {o['median_round_overhead']:+.1%} |"
            for o in overhead
        ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n", overwrite=True)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, entry in models.items():
        label = name
        if name in LLAMAS:
            label += " (stock)" if is_stock(name) else " (optimised)"
        gens = entry["generate"]
        axes[0].plot([g["new_tokens"] for g in gens], [g["tokens_per_s"] for g in gens], marker="o", label=label)
        done = [d for d in entry["decode"] if "skipped" not in d]
        ctx = [d["context"] for d in done]
        axes[1].plot(ctx, [batch / d["step_s"] for d in done], marker="o", label=label)
        axes[2].plot(ctx, [d["cache_bytes_per_sequence"] / 2**20 for d in done], marker="o", label=label)
    titles = ("generate(): tokens/s vs tokens generated", "decode tokens/s vs context", "cache per sequence (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.suptitle(
        f"generation speed, batch {batch}, {device}, {meta['dtype']}, compile {'on' if compile_run else 'off'} "
        f"({meta['machine']})"
    )
    if any(name in LLAMAS for name in models):  # spell out the two LLaMA treatments once, under the plots
        fig.text(0.5, 0.01, "; ".join(f"{name}: {notes[name]}" for name in models if name in LLAMAS), ha="center")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    with atomic_output_file(out.with_suffix(".png"), overwrite=True) as png:
        fig.savefig(png, dpi=110, format="png")


def add_bench_parser(sub) -> None:
    """Register ``densessm bench generate``."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    gen = bench.add_parser("generate", help="generation speed vs a LLaMA with a KV cache")
    default_models = [
        m for m in ("dense_retnet_350m", "retnet_350m", "dense_mamba_360m", "mamba_360m") if m in list_presets()
    ] + ["llama_350m", "llama_350m" + STOCK]
    gen.add_argument("--models", nargs="+", default=default_models)
    gen.add_argument("--batch", type=positive_int, default=6)
    gen.add_argument("--new-tokens", type=positive_int, nargs="+", default=[128, 512, 1024], help="GPU: 2048 ... 10240")
    gen.add_argument("--contexts", type=positive_int, nargs="+", default=[128, 1024, 4096, 8192])
    gen.add_argument("--steps", type=positive_int, default=6, help="decode steps timed per context")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--no-prepack", action="store_true", help="keep PyTorch's default linear layers")
    gen.add_argument("--device", default="cpu", help="cpu or cuda[:N]; prepacking is CPU-only")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="recurrent models decode through the compiled step (CUDA graphs on a GPU); the LLaMAs stay eager",
    )
    gen.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    gen.add_argument(
        "--overhead-steps", type=nonnegative_int, default=40, help="alternating rounds per dense/plain pair (0: skip)"
    )
    gen.add_argument(
        "--overhead-context", type=positive_int, default=1024, help="context of the dense-overhead measurement"
    )
    gen.add_argument("--out", type=lambda text: Path(path_name(text)), default=Path("docs/benchmarks/generation"))
    gen.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    gen.set_defaults(func=_bench_generate)


def _bench_generate(args: argparse.Namespace) -> None:
    import sys

    args.argv = sys.argv[3:]
    device = resolve_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    existing = [out for out in (args.out.with_suffix(s) for s in (".json", ".md", ".png")) if out.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist(s); nothing was measured (pass --overwrite to replace)"
        )
    for name in args.models:
        if name not in LLAMAS and name not in list_presets():
            raise UsageError(f"unknown model {name!r}: use a preset name or one of {', '.join(LLAMAS)}")
    results = run(args, checkpoint=lambda partial: write_json(partial, args.out))
    write_report(results, args.out)
    print(args.out.with_suffix(".md").read_text())
