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
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from densessm.cache import RecurrentCache
from densessm.inference import prepack_for_cpu
from densessm.presets import list_presets, load_preset

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


def is_stock(name: str) -> bool:
    """Whether ``name`` is a LLaMA measured as users run it: never prepacked, with a growing ``DynamicCache``."""
    return name in LLAMAS and name.endswith(STOCK)


def treatment(name: str, prepacked: bool) -> str:
    """One line on how model ``name`` is run, for the report: the two LLaMAs differ only in this."""
    if is_stock(name):
        return "stock transformers: default linear layers, growing DynamicCache"
    weights = "prepacked weights" if prepacked else "default linear layers"
    if name in LLAMAS:
        return f"optimised: {weights}, preallocated StaticCache in decode (generate(): DynamicCache)"
    return weights


def build(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised model by preset name, or a LLaMA (``llama_350m``, ``llama_tiny``, ``*_stock``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name in LLAMAS:
        model = LlamaForCausalLM(LlamaConfig(**LLAMAS[name]))
    else:
        model = AutoModelForCausalLM.from_config(load_preset(name))
    return model.to(dtype).eval()


def _synthetic_cache(model, batch: int, context: int, steps: int, dynamic: bool = False):
    """The cache a ``context``-token prefill leaves, with random contents (room for ``steps`` more tokens).

    A Transformer gets a ``StaticCache``: preallocated, so a decode step does not copy the whole history the
    way the growing ``DynamicCache`` does. That is its fastest form on this path, so the comparison is fair
    to it. With ``dynamic`` it gets the default ``DynamicCache`` instead (the stock baseline), whose decode
    steps then append with its normal ``torch.cat``.
    """
    from transformers import DynamicCache, StaticCache

    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    prompt = torch.randint(3, model.config.vocab_size, (batch, 1))
    recurrent = getattr(model, "_is_stateful", False)
    if recurrent:
        cache = None
    elif dynamic:
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    with torch.no_grad():
        cache = model(prompt, cache=cache, use_cache=True).cache  # the right structure, one real step
    if isinstance(cache, RecurrentCache):
        for layer in cache.layers:
            for name, tensor in layer.items():
                layer[name] = torch.rand_like(tensor) if tensor.is_floating_point() else tensor
        cache.steps = context
        cache.positions = torch.full((batch,), context, dtype=torch.long)
        return cache
    if isinstance(cache, DynamicCache):
        for layer in cache.layers:  # [batch, kv_heads, 1, head_dim] after the real step: widen it to the context
            shape = (*layer.keys.shape[:2], context, layer.keys.shape[-1])
            layer.keys = torch.randn(shape, dtype=layer.keys.dtype)
            layer.values = torch.randn(shape, dtype=layer.values.dtype)
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


def _available_bytes() -> int:
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


def _decoder(model, batch: int, context: int, calls: int, dynamic: bool = False):
    """A synthetic ``context``-token cache and a function that runs one greedy decode step on it (``calls``
    at most) and returns its seconds; one step at a time, so that two models' steps can be interleaved."""
    cache = _synthetic_cache(model, batch, context, calls, dynamic=dynamic)
    mask = torch.ones(batch, context + calls, dtype=torch.long)
    token = torch.randint(3, model.config.vocab_size, (batch, 1))
    length = context

    def step() -> float:
        nonlocal token, length
        length += 1
        with torch.no_grad():
            start = time.perf_counter()
            out = model(token, cache=cache, use_cache=True, attention_mask=mask[:, :length])
            token = out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - start

    return cache, step


def decode_latency(
    model, batch: int, context: int, steps: int, dtype: torch.dtype, dynamic_cache: bool = False
) -> dict:
    """Median seconds per decode step after ``context`` tokens, and the cache bytes per sequence.

    ``dynamic_cache``: a Transformer decodes with the growing ``DynamicCache`` instead of a ``StaticCache``.
    Its append copies one layer at a time, so the memory check needs no more room than the static one.
    """
    needed = 1.1 * _kv_bytes(model, batch, context + steps + 1, dtype)
    if needed > _available_bytes():
        return {"context": context, "skipped": f"needs ~{needed / 2**30:.0f} GiB for the KV cache"}
    cache, step = _decoder(model, batch, context, steps + 1, dynamic=dynamic_cache)
    per_sequence = cache_bytes(cache, context) / batch
    times = [step() for _ in range(steps + 1)]
    return {"context": context, "step_s": _median(times[1:]), "cache_bytes_per_sequence": per_sequence}


def generation_throughput(model, batch: int, new_tokens: int, prompt_length: int = 16) -> dict:
    """End-to-end ``generate()`` tokens/s (all rows) for ``new_tokens`` greedy tokens."""
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_length))
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
        seconds = time.perf_counter() - start
    generated = out.shape[1] - prompt_length
    return {"new_tokens": generated, "seconds": seconds, "tokens_per_s": batch * generated / seconds}


def dense_overhead(
    dense_name: str, plain_name: str, batch: int, context: int, steps: int, dtype: torch.dtype, prepack: bool
) -> dict:
    """How much slower a decode step of ``dense_name`` is than one of its plain twin ``plain_name``.

    Both models decode from a synthetic ``context``-token state, alternating single steps (which model goes
    first alternates too), so that the machine's drift hits both alike; ``steps`` rounds are timed after
    ``WARMUP_ROUNDS`` untimed ones. ``overhead`` compares the two medians; ``median_round_overhead`` is the
    median of the per-round ratios, which also cancels drift within the run.
    """
    models = [build(name, dtype) for name in (dense_name, plain_name)]
    if prepack:
        for model in models:
            prepack_for_cpu(model)
    steppers = [_decoder(model, batch, context, WARMUP_ROUNDS + steps)[1] for model in models]
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(WARMUP_ROUNDS + steps):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for i in order:
            seconds = steppers[i]()
            if round_ >= WARMUP_ROUNDS:
                times[i].append(seconds)
    del steppers, models
    gc.collect()
    dense, plain = _median(times[0]), _median(times[1])
    return {
        "dense": dense_name,
        "plain": plain_name,
        "batch": batch,
        "context": context,
        "rounds": steps,
        "prepacked_weights": prepack,
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


def run(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    results = {
        "meta": {
            "command": "densessm bench generate " + " ".join(args.argv),
            "machine": f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "dtype": args.dtype,
            "batch": args.batch,
            "prepacked_weights": not args.no_prepack,
            "prepacked": {name: not args.no_prepack and not is_stock(name) for name in args.models},
        },
        "models": {},
        "overhead": [],
    }
    for name in tqdm(args.models, desc="models"):
        model = build(name, dtype)
        if results["meta"]["prepacked"][name]:
            prepack_for_cpu(model)
        entry = {
            "parameters": sum(p.numel() for p in model.parameters())
            + sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight"))
        }
        entry["decode"] = [
            decode_latency(model, args.batch, c, args.steps, dtype, dynamic_cache=is_stock(name))
            for c in tqdm(args.contexts, desc=name, leave=False)
        ]
        entry["generate"] = [generation_throughput(model, args.batch, n) for n in args.new_tokens]
        results["models"][name] = entry
        del model
        gc.collect()
    if args.overhead_steps > 0:
        for dense, plain in tqdm(dense_pairs(args.models), desc="dense overhead"):
            results["overhead"].append(
                dense_overhead(
                    dense, plain, args.batch, args.overhead_context, args.overhead_steps, dtype, not args.no_prepack
                )
            )
    return results


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    meta, models = results["meta"], results["models"]
    batch = meta["batch"]
    prepacked = meta.get("prepacked", {})
    notes = {name: treatment(name, prepacked.get(name, meta["prepacked_weights"])) for name in models}
    lines = [f"`{meta['command']}` — {meta['machine']}, torch {meta['torch']}, {meta['dtype']}, batch {batch}", ""]
    lines += [
        "| model | parameters | notes | "
        + " | ".join(f"gen {g['new_tokens']} tok/s" for g in next(iter(models.values()))["generate"])
        + " |"
    ]
    lines += ["|---|---:|---|" + "---:|" * len(next(iter(models.values()))["generate"])]
    for name, entry in models.items():
        cells = " | ".join(f"{g['tokens_per_s']:.1f}" for g in entry["generate"])
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
            f"{o['context']:,}, {o['rounds']} rounds (+{WARMUP_ROUNDS} warm-up), batch {o['batch']}.",
            "",
            "| dense | plain | dense step (ms) | plain step (ms) | overhead | median per-round overhead |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {o['dense']} | {o['plain']} | {o['dense_step_s'] * 1000:.2f} | {o['plain_step_s'] * 1000:.2f} | "
            f"{o['overhead']:+.1%} | {o['median_round_overhead']:+.1%} |"
            for o in overhead
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

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
    fig.suptitle(f"generation speed, batch {batch}, {meta['dtype']} ({meta['machine']})")
    if any(name in LLAMAS for name in models):  # spell out the two LLaMA treatments once, under the plots
        fig.text(0.5, 0.01, "; ".join(f"{name}: {notes[name]}" for name in models if name in LLAMAS), ha="center")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def add_bench_parser(sub) -> None:
    """Register ``densessm bench generate``."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    gen = bench.add_parser("generate", help="generation speed vs a LLaMA with a KV cache")
    default_models = [
        m for m in ("dense_retnet_350m", "retnet_350m", "dense_mamba_360m", "mamba_360m") if m in list_presets()
    ] + ["llama_350m", "llama_350m" + STOCK]
    gen.add_argument("--models", nargs="+", default=default_models)
    gen.add_argument("--batch", type=int, default=6)
    gen.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512, 1024], help="GPU: 2048 ... 10240")
    gen.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 8192])
    gen.add_argument("--steps", type=int, default=6, help="decode steps timed per context")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--no-prepack", action="store_true", help="keep PyTorch's default linear layers")
    gen.add_argument("--overhead-steps", type=int, default=40, help="alternating rounds per dense/plain pair (0: skip)")
    gen.add_argument("--overhead-context", type=int, default=1024, help="context of the dense-overhead measurement")
    gen.add_argument("--out", type=Path, default=Path("docs/benchmarks/generation"))
    gen.set_defaults(func=_bench_generate)


def _bench_generate(args: argparse.Namespace) -> None:
    import sys

    args.argv = sys.argv[3:]
    for name in args.models:
        if name not in LLAMAS and name not in list_presets():
            raise ValueError(f"unknown model {name!r}: use a preset name or one of {', '.join(LLAMAS)}")
    results = run(args)
    write_report(results, args.out)
    print(args.out.with_suffix(".md").read_text())
