"""The fused CPU decode step against today's step and against a plain copy of the step's minimal bytes.

One model per preset and dtype, prepacked as ``densessm generate`` runs it, decodes from a synthetic
``--context``-token state. Three things alternate in one process, round after round (the order rotates),
so the machine's drift hits all alike: the fused step (:func:`densessm.inference.fused_step.fuse_decode_steps`),
today's step (the same modules, weights and cache with the fused mixers' classes switched back to their
PyTorch forward), and a probe: ``Tensor.copy_`` of as many bytes as the step must move at least (weights
read once, state read once and written once), capped at ``--probe-cap`` bytes and scaled linearly above it.
With ``--overhead``, each dense preset is also alternated with its plain twin (fused and today's step).
With ``--llamas``, one decode step of a LLaMA of the preset's size joins the same alternation twice: as users
run it (not prepacked, a growing ``DynamicCache``) and optimised (prepacked, a preallocated ``StaticCache``), each
from ``context`` tokens at every step (``--contexts`` sweeps it), where its KV cache fits in memory.

    python benchmarks/bench_fused_step.py --out docs/benchmarks/fused_step
    python benchmarks/bench_fused_step.py --presets dense_retnet_350m --dtypes float32 --batches 1 6 --llamas \
        --contexts 128 256 512 1024 --out docs/benchmarks/fused_step_llama
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from densessm.files import atomic_output_file, atomic_write_text
from densessm.inference import prepack_for_cpu
from densessm.inference.fused_step import FusedStepMambaMixer, FusedStepRetention, StepMambaMixer, fuse_decode_steps
from densessm.inference.fusion import FusedMambaMixer, FusedRetention
from densessm.models.mamba.modeling_dense_mamba import DenseMambaMixer
from densessm_lab.bench.models import DTYPES, LLAMAS, STOCK, build, kv_bytes, synthetic_cache

TODAY = {FusedStepRetention: FusedRetention, FusedStepMambaMixer: FusedMambaMixer, StepMambaMixer: DenseMambaMixer}
PLAIN = {
    "dense_retnet_350m": "retnet_350m",
    "dense_mamba_360m": "mamba_360m",
    "dense_retnet_tiny": "retnet_tiny",
    "dense_mamba_tiny": "mamba_tiny",
}
LLAMA_SIZES = {"_tiny": "llama_tiny", "_350m": "llama_350m", "_360m": "llama_350m", "_370m": "llama_350m"}
"""The LLaMA a preset is compared with (``--llamas``), by the preset's size suffix."""
LLAMA_KINDS = {"stock": "llama_stock", "optimised": "llama_optimised"}
"""The two LLaMA runs of an alternation: their keys in a row's ``llama`` and in its ``times_s``."""
TARGET_OVERTAKE_CONTEXT = 256
"""The fused DenseRetNet step is to overtake the optimised LLaMA from at most this context..."""
TARGET_STOCK_RATIO, TARGET_STOCK_CONTEXT = 4.0, 1024
"""...and be at least 4x faster than the stock LLaMA from 1,024 tokens of context."""


class Switch:
    """Flip a fused model's mixers between the fused step and today's (their PyTorch forward)."""

    def __init__(self, model: nn.Module):
        self.fused = {m: type(m) for m in model.modules() if type(m) in TODAY}

    def __call__(self, fused: bool) -> None:
        for module, cls in self.fused.items():
            module.__class__ = cls if fused else TODAY[cls]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer once, but of the input embedding only
    the looked-up rows (nothing, to this precision) unless the LM head shares it."""

    def key(tensor: torch.Tensor) -> int:
        return id(tensor) if tensor.is_mkldnn else tensor.data_ptr()  # a prepacked weight has no plain storage

    embedding = key(model.get_input_embeddings().weight)
    tied = key(model.get_output_embeddings().weight) == embedding
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if key(tensor) in seen or (key(tensor) == embedding and not tied):
            continue
        seen.add(key(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def state_bytes(cache) -> tuple[int, int]:
    """Bytes of the cache (every layer's state) and of the scan states alone (what a DenseMamba layer also
    reads from the ``m`` layers below)."""
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.values())
    scan = sum(layer["ssm"].numel() * layer["ssm"].element_size() for layer in cache.layers if "ssm" in layer)
    return total, scan


def traffic(model: nn.Module, cache) -> dict:
    """Bytes one step moves, counted from the operators each path runs over state-sized memory.

    Retention, today: scale in place (read + write), rank-1 update in place (read + write), read-out (read):
    5 passes; fused: 2. Selective scan, today (per layer, ``[b, D, N]``): ``Δ⊗A`` (write), its exp (read +
    write), ``(Δu)⊗B`` (write), the update (3 reads, 1 write), the read-out (read), the shallow read-outs
    (``m`` reads): 10 + m; fused: read + write + m reads. The conv window (``K-1`` rows) is small beside them.
    """
    weights = weight_bytes(model)
    total, scan = state_bytes(cache)
    config = model.config
    m = config.dense_block_layers
    layers = config.num_hidden_layers
    shallow = sum(min(m, layer) for layer in range(layers)) / layers * scan  # reads of the layers below
    if scan:
        rest = total - scan
        today = weights + 2 * rest + 10 * scan + shallow
        fused = weights + 2 * rest + 2 * scan + shallow
    else:
        today, fused = weights + 5 * total, weights + 2 * total
    minimal = weights + 2 * total
    return {"weights": weights, "state": total, "today": int(today), "fused": int(fused), "minimal": minimal}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runs: dict, warmup: int, rounds: int, after: dict | None = None) -> dict[str, list[float]]:
    """Each of ``runs`` once per round, the order rotating; seconds of the rounds after ``warmup``. ``after``
    holds, for some runs, what to do untimed after each of their calls (put a cache back)."""
    after = after or {}
    times = {name: [] for name in runs}
    names = list(runs)
    with torch.no_grad():
        for r in range(warmup + rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds = _timed(runs[name])
                if name in after:
                    after[name]()
                if r >= warmup:
                    times[name].append(seconds)
    return times


def llama_for(preset: str) -> str:
    """The LLaMA of ``preset``'s size, for ``--llamas``."""
    for suffix, llama in LLAMA_SIZES.items():
        if preset.endswith(suffix):
            return llama
    sizes = ", ".join(f"*{suffix}" for suffix in LLAMA_SIZES)
    raise SystemExit(f"--llamas: no LLaMA of the size of {preset} (there is one for the presets {sizes})")


def kv_room(model: nn.Module, batch: int, context: int) -> str | None:
    """Why a LLaMA's KV cache of ``context`` tokens (and the step's one more) would not fit in memory now, or
    None if it fits with a 10% margin (a stock step's ``torch.cat`` holds one layer twice)."""
    needed = 1.1 * kv_bytes(model, batch, context + 2, next(model.parameters()).dtype)
    available = psutil.virtual_memory().available
    if needed > available:
        return f"its KV cache needs ~{needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    return None


class LlamaStep:
    """One decode step of a LLaMA from ``context`` tokens, always the same context: after each step
    :meth:`reset` puts the cache back (untimed), so the cache cannot grow during a measurement.

    ``dynamic`` (the stock LLaMA): the step appends to a ``DynamicCache`` (``torch.cat``, a copy of the history)
    and ``crop`` removes that token. Otherwise the step writes into a preallocated ``StaticCache`` at each
    layer's ``cumulative_length`` (which it then advances, and which gives the step its position); setting it
    back to ``context`` makes the next step overwrite the same slot. Each layer's length after every step is
    kept in ``lengths``: one value, ``context + 1``, when every step saw the context.
    """

    def __init__(self, model: nn.Module, batch: int, context: int, dynamic: bool):
        self.model, self.context, self.dynamic = model, context, dynamic
        self.cache = synthetic_cache(model, batch, context, 1, dynamic=dynamic)
        self.token = torch.randint(3, model.config.vocab_size, (batch, 1))
        self.mask = torch.ones(batch, context + 1, dtype=torch.long)  # what generate() passes without padding
        self.lengths: set[int] = set()

    def __call__(self) -> torch.Tensor:
        return self.model(self.token, cache=self.cache, use_cache=True, attention_mask=self.mask).logits

    def layer_lengths(self) -> list[int]:
        if self.dynamic:
            return [layer.keys.shape[-2] for layer in self.cache.layers]
        return [int(layer.cumulative_length) for layer in self.cache.layers]

    def reset(self) -> None:
        lengths = self.layer_lengths()
        self.lengths.update(lengths)
        if self.dynamic:
            self.cache.crop(self.context - lengths[0])  # a negative count: the tokens to remove
        else:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.context)  # in place: the address is static


def llama_runs(llamas: dict[str, nn.Module], batch: int, context: int) -> tuple[dict, dict[str, str]]:
    """The LLaMA steps (by kind) whose KV cache fits, and why the others were skipped."""
    steps, skipped = {}, {}
    for kind, model in llamas.items():
        reason = kv_room(model, batch, context)
        if reason is None:
            steps[kind] = LlamaStep(model, batch, context, dynamic=kind == "stock")
        else:
            skipped[kind] = reason
    return steps, skipped


def llama_results(steps: dict, skipped: dict[str, str], times: dict, batch: int, context: int) -> dict:
    """Per LLaMA kind: its median step, its ratios to the fused step (per round, their median, the ratio of the
    medians) and its KV cache bytes; or why it was skipped. Refuses a measurement whose cache drifted."""
    result = {}
    for kind, step in steps.items():
        if step.lengths != {context + 1}:
            raise RuntimeError(
                f"the {kind} LLaMA's cache did not stay at {context} tokens (lengths after a step: "
                f"{sorted(step.lengths)}): its timings are not those of one context"
            )
        seconds = times[LLAMA_KINDS[kind]]
        ratios = [t / f for t, f in zip(seconds, times["fused"], strict=True)]
        result[kind] = {
            "median_s": statistics.median(seconds),
            "ratio": statistics.median(seconds) / statistics.median(times["fused"]),
            "median_round_ratio": statistics.median(ratios),
            "round_ratios": ratios,
            "kv_bytes": kv_bytes(step.model, batch, context, next(step.model.parameters()).dtype),
        }
    result.update({kind: {"skipped": reason} for kind, reason in skipped.items()})
    return result


def measure_batch(
    model: nn.Module, switch: Switch, preset: str, batch: int, context: int, args, llamas: dict | None = None
) -> dict:
    """One alternation at ``batch`` and ``context``: the fused step, today's, the probe and the ``llamas`` (by
    kind: ``stock``, ``optimised``) whose KV cache fits."""
    cache = synthetic_cache(model, batch, context, 1)
    bytes_moved = traffic(model, cache)
    probe_bytes = min(bytes_moved["minimal"], args.probe_cap)
    source = torch.empty(probe_bytes // 2, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source)
    token = torch.randint(3, model.config.vocab_size, (batch, 1))

    def step(fused: bool) -> None:
        switch(fused)
        model(token, cache=cache, use_cache=True)

    rounds = args.rounds if batch < 64 else max(3, args.rounds // 2)
    runs = {"fused": lambda: step(True), "today": lambda: step(False), "probe": lambda: target.copy_(source)}
    steps, skipped = llama_runs(llamas or {}, batch, context)
    runs.update({LLAMA_KINDS[kind]: llama for kind, llama in steps.items()})
    times = alternate(runs, args.warmup, rounds, after={LLAMA_KINDS[kind]: s.reset for kind, s in steps.items()})
    medians = {name: statistics.median(times[name]) for name in ("fused", "today", "probe")}
    medians["probe"] *= bytes_moved["minimal"] / (2 * (probe_bytes // 2))
    per_round = [t / f for t, f in zip(times["today"], times["fused"], strict=True)]
    row = {
        "preset": preset,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch": batch,
        "context": context,
        "rounds": rounds,
        "median_s": medians,
        "speedup": medians["today"] / medians["fused"],
        "median_round_speedup": statistics.median(per_round),
        "fused_over_probe": medians["fused"] / medians["probe"],
        "bytes": bytes_moved,
        "probe_bytes_copied": 2 * (probe_bytes // 2),
        "times_s": times,
    }
    if llamas:
        row["llama"] = {"model": llama_for(preset)}
        row["llama"].update(llama_results(steps, skipped, times, batch, context))
    print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
    return row


def measure(preset: str, dtype: torch.dtype, batches: list[int], args) -> list[dict]:
    """Every batch at every context (``args.contexts``); with ``args.llamas``, against the LLaMA of the
    preset's size, stock and optimised."""
    model = prepack_for_cpu(build(preset, dtype))
    if not fuse_decode_steps(model):
        raise SystemExit("the fused step is unavailable here (see the notice above)")
    switch = Switch(model)
    llamas = None
    if args.llamas:
        name = llama_for(preset)
        llamas = {"stock": build(name + STOCK, dtype), "optimised": prepack_for_cpu(build(name, dtype))}
    return [
        measure_batch(model, switch, preset, batch, context, args, llamas)
        for batch in batches
        for context in args.contexts
    ]


def overhead(preset: str, dtype: torch.dtype, batch: int, args) -> dict:
    """Dense over plain: both fused, both today's step, alternated (median of per-round ratios)."""
    models, switches, caches = {}, {}, {}
    for name in (preset, PLAIN[preset]):
        model = prepack_for_cpu(build(name, dtype))
        fuse_decode_steps(model)
        models[name], switches[name] = model, Switch(model)
        caches[name] = synthetic_cache(model, batch, args.context, 1)
    token = torch.randint(3, min(m.config.vocab_size for m in models.values()), (batch, 1))

    def step(name: str, fused: bool) -> None:
        switches[name](fused)
        models[name](token, cache=caches[name], use_cache=True)

    runs = {(name, fused): functools.partial(step, name, fused) for name in models for fused in (True, False)}
    times = alternate(runs, args.warmup, args.overhead_rounds)
    result = {"dense": preset, "plain": PLAIN[preset], "dtype": str(dtype).removeprefix("torch."), "batch": batch}
    for fused in (True, False):
        ratios = [d / p for d, p in zip(times[(preset, fused)], times[(PLAIN[preset], fused)], strict=True)]
        result["fused" if fused else "today"] = {
            "dense_s": statistics.median(times[(preset, fused)]),
            "plain_s": statistics.median(times[(PLAIN[preset], fused)]),
            "overhead": statistics.median(ratios) - 1,
        }
    print(json.dumps(result), flush=True)
    return result


def logit_effect(preset: str, args) -> dict:
    """What the state's dtype does to the logits: a bf16 model decoding with the fused step and with today's,
    against the same weights in fp32 (fused), teacher-forced over ``--logit-steps`` tokens after a prompt."""
    tokens = None
    runs = {}
    for label, dtype, fused in (
        ("fp32", torch.float32, True),
        ("bf16_fused", torch.bfloat16, True),
        ("bf16_today", torch.bfloat16, False),
    ):
        model = build(preset, dtype)
        fuse_decode_steps(model)
        Switch(model)(fused)
        if tokens is None:
            tokens = torch.randint(3, model.config.vocab_size, (1, 16 + args.logit_steps))
        with torch.no_grad():
            out = model(tokens[:, :16], use_cache=True)
            steps = []
            for t in range(16, tokens.shape[1]):
                out = model(tokens[:, t : t + 1], cache=out.cache, use_cache=True)
                steps.append(out.logits[:, -1].float().log_softmax(-1))
        runs[label] = torch.cat(steps)
    result = {"preset": preset, "steps": args.logit_steps}
    for label in ("bf16_fused", "bf16_today"):
        diff = (runs[label] - runs["fp32"]).abs()
        top1 = (runs[label].argmax(-1) == runs["fp32"].argmax(-1)).float().mean().item()
        result[label] = {
            "max_abs_logprob_diff": diff.max().item(),
            "mean_abs_logprob_diff": diff.mean().item(),
            "top1_agreement": top1,
        }
    print(json.dumps(result), flush=True)
    return result


def plot(results: dict, path: Path, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["steps"]
    if not rows:
        return
    sweep = len({r["context"] for r in rows}) > 1
    labels = [f"{r['preset'].removeprefix('dense_')}\n{r['dtype']} b{r['batch']}" for r in rows]
    if sweep:
        labels = [f"{label}\nc{r['context']}" for label, r in zip(labels, rows, strict=True)]
    llama = [r for r in rows if "llama" in r]
    fig, axes = plt.subplots(1, 2 if llama else 1, figsize=(max(6, 1.1 * len(rows)) + 6 * bool(llama), 4))
    ax = axes[0] if llama else axes
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["speedup"] for r in rows], 0.4, label="today's step / fused step")
    ax.bar([i + 0.2 for i in x], [r["fused_over_probe"] for r in rows], 0.4, label="fused step / copy probe")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.4, color="tab:red", lw=0.8, ls="--", label="target 1.4x (batch 6)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("ratio of medians (alternated)")
    ax.set_title(f"fused CPU decode step, {results['meta']['date']}")
    ax.legend(fontsize=7)
    if llama:
        plot_llamas(axes[1], llama)
    fig.tight_layout()
    with atomic_output_file(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def llama_targets(rows: list[dict]) -> list[str]:
    """The two LLaMA targets per preset, dtype and batch: the fused step overtakes the optimised LLaMA from at
    most 256 tokens (the smallest measured context from which it is faster at every measured context), and is
    at least 4x the stock LLaMA from 1,024 tokens (at every measured context from there)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "llama" in r:
            groups.setdefault((r["preset"], r["dtype"], r["batch"]), []).append(r)
    lines = []
    for (preset, dtype, batch), group in groups.items():
        ratios = {kind: {} for kind in LLAMA_KINDS}
        for r in sorted(group, key=lambda r: r["context"]):
            for kind in LLAMA_KINDS:
                if "median_round_ratio" in r["llama"][kind]:
                    ratios[kind][r["context"]] = r["llama"][kind]["median_round_ratio"]
        name = f"{preset} {dtype}, batch {batch}"
        optimised = ratios["optimised"]
        if not optimised:
            lines.append(f"- {name}: the optimised LLaMA was not measured (see the skipped runs).")
        else:
            slower = max((c for c, x in optimised.items() if x < 1), default=0)
            faster = min((c for c in optimised if c > slower), default=None)
            shown = ", ".join(f"{x:.2f}x at {c}" for c, x in optimised.items())
            where = f"faster from {faster} tokens (of those measured)" if faster else "never faster"
            if faster is not None and faster <= TARGET_OVERTAKE_CONTEXT:
                verdict = "met"
            elif slower >= TARGET_OVERTAKE_CONTEXT:
                verdict = "not met"
            else:
                gap = f"between {slower} and {faster} tokens" if slower else f"no context <= {TARGET_OVERTAKE_CONTEXT}"
                verdict = f"not shown: {gap} measured"
            lines.append(
                f"- {name}: fused step against the optimised LLaMA {shown}; {where} "
                f"(target: faster from <= {TARGET_OVERTAKE_CONTEXT} tokens: {verdict})."
            )
        stock = {c: x for c, x in ratios["stock"].items() if c >= TARGET_STOCK_CONTEXT}
        if not stock:
            lines.append(
                f"- {name}: the stock LLaMA was not measured at >= {TARGET_STOCK_CONTEXT} tokens "
                f"(target >= {TARGET_STOCK_RATIO:.0f}x there: not shown)."
            )
        else:
            verdict = "met" if min(stock.values()) >= TARGET_STOCK_RATIO else "not met"
            shown = ", ".join(f"{x:.2f}x at {c}" for c, x in stock.items())
            lines.append(
                f"- {name}: fused step against the stock LLaMA {shown} "
                f"(target >= {TARGET_STOCK_RATIO:.0f}x from {TARGET_STOCK_CONTEXT} tokens: {verdict})."
            )
    return lines


def plot_llamas(ax, rows: list[dict]) -> None:
    """LLaMA step / fused step against the context, one line per LLaMA kind, dtype and batch, with the targets."""
    curves: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        for kind, x in r["llama"].items():
            if isinstance(x, dict) and "median_round_ratio" in x:
                curves.setdefault((kind, r["dtype"], r["batch"]), []).append((r["context"], x["median_round_ratio"]))
    for (kind, dtype, batch), points in curves.items():
        points.sort()
        style = "-o" if kind == "stock" else "--s"
        ax.plot(*zip(*points, strict=True), style, label=f"{kind} LLaMA / fused, {dtype} b{batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(TARGET_STOCK_RATIO, color="tab:red", lw=0.8, ls="--", label=f"target {TARGET_STOCK_RATIO:.0f}x (stock)")
    ax.axvline(TARGET_OVERTAKE_CONTEXT, color="tab:red", lw=0.8, ls=":", label="overtake target (optimised)")
    ax.set_xscale("log", base=2)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("median of per-round ratios")
    ax.set_title("LLaMA step / fused step")
    ax.legend(fontsize=7)


def markdown(results: dict) -> str:
    """The report: method, the step table (medians, ratios, bytes; with ``--llamas`` the LLaMAs beside them),
    dense overhead, bf16 state and logits. Results of earlier runs (no ``contexts``, no ``llama``) render as
    they did."""
    meta = results["meta"]
    gb = 1e9
    rows = results["steps"]
    contexts = meta.get("contexts", [meta["context"]])
    sweep = len({r["context"] for r in rows}) > 1 or any("llama" in r for r in rows)
    llama = any("llama" in r for r in rows)
    lines = [
        f"# Fused CPU decode step — {meta['date']}",
        "",
        f"`python benchmarks/bench_fused_step.py {meta.get('argv', '')}`".replace(" `", "`"),
        f"— torch {meta['torch']}, {meta['threads']} threads, context {', '.join(map(str, contexts))}, load average "
        f"{meta['load_average_start'][0]:.1f} at the start and {meta['load_average_end'][0]:.1f} at the end.",
        "",
        "The machine has 2 cores shared with other jobs: the absolute times below are noisy (a busy phase makes "
        "a step several times slower; compare the load averages). What counts are the ratios, measured by "
        "alternating the fused step, today's step and the copy probe round after round in one process "
        "(same model, same weights, same cache; the order rotates each round).",
        "",
        f"Probe: {meta['probe']}. This CPU's last-level cache can hold part of a step's bytes, so a step can "
        "come close to (or beat) a naive copy; the probe is the bandwidth of the same moment, not a hard bound.",
        "",
        "Bytes per step are counted from the operators each path runs over state-sized memory: retention, today "
        "5 passes over the state (scale in place, rank-1 update in place, read-out), fused 2 (read once, write "
        "once); the selective scan, today 10 passes plus `m` shallow reads per layer, fused 2 plus the `m` "
        "shallow reads. Weights are read once by both.",
        "",
    ]
    if llama:
        names = sorted({r["llama"]["model"] for r in rows if "llama" in r})
        shapes = [
            f"`{name}` (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} "
            f"heads, SwiGLU {c['intermediate_size']})"
            for name, c in zip(names, map(LLAMAS.get, names), strict=True)
        ]
        lines += [
            f"LLaMA: {', '.join(shapes)}, in the preset's dtype, joins the same alternation twice. Stock: as "
            "users run it, weights not prepacked, a growing "
            "`DynamicCache` (each step's `torch.cat` copies the whole history). Optimised: weights prepacked like "
            "ours, a preallocated `StaticCache` (the step writes one slot). Each step starts from exactly the "
            "context of its row: after each timed step the cache is put back, untimed (the stock one cropped, the "
            "optimised one's write position set back), and a run whose cache length drifted is refused. "
            "LLaMA / fused is the median of the per-round ratios (above 1: the fused step is faster).",
            "",
        ]
    head = ["preset", "dtype", "batch", *(["context"] if sweep else [])]
    head += ["fused (ms)", "today (ms)", "probe (ms)", "today / fused", "per-round", "fused / probe"]
    head += ["weights (GB)", "state (GB)", "today moves (GB)", "fused moves (GB)"]
    if llama:
        head += ["stock LLaMA (ms)", "optimised LLaMA (ms)", "stock / fused", "optimised / fused", "KV cache (GB)"]
    if rows:  # none with --skip-steps
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    skips = []
    for r in rows:
        m, b = r["median_s"], r["bytes"]
        cells = [r["preset"], r["dtype"], str(r["batch"]), *([str(r["context"])] if sweep else [])]
        cells += [f"{m['fused'] * 1e3:.0f}", f"{m['today'] * 1e3:.0f}", f"{m['probe'] * 1e3:.0f}"]
        cells += [f"{r['speedup']:.2f}x", f"{r['median_round_speedup']:.2f}x", f"{r['fused_over_probe']:.2f}"]
        cells += [f"{b[key] / gb:.{3 if key == 'state' else 2}f}" for key in ("weights", "state", "today", "fused")]
        if llama:
            runs = [r.get("llama", {}).get(kind, {"skipped": "not measured"}) for kind in LLAMA_KINDS]
            cells += ["—" if "skipped" in x else f"{x['median_s'] * 1e3:.0f}" for x in runs]
            cells += ["skipped" if "skipped" in x else f"{x['median_round_ratio']:.2f}x" for x in runs]
            cells.append(next((f"{x['kv_bytes'] / gb:.3f}" for x in runs if "kv_bytes" in x), "—"))
            skips += [
                f"- {kind} LLaMA, {r['dtype']} batch {r['batch']}, context {r['context']}: skipped, {x['skipped']}."
                for kind, x in zip(LLAMA_KINDS, runs, strict=True)
                if "skipped" in x
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if skips:
        lines += ["", *skips]
    if meta.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in meta["notes"])]
    lines += ["", "## Against the targets", ""]
    for r in rows:
        if r["batch"] == 6 and r["preset"] == "dense_retnet_350m":
            met = "met" if r["median_round_speedup"] >= 1.4 else "not met"
            where = f", context {r['context']}" if sweep else ""
            lines.append(
                f"- {r['preset']} {r['dtype']}, batch 6{where}: fused step {r['median_round_speedup']:.2f}x today's "
                f"(median of per-round ratios; target >= 1.4x: {met})."
            )
    lines += llama_targets(rows)
    for o in results["overhead"]:
        target = 0.03 if "retnet" in o["dense"] else 0.07
        met = "met" if o["fused"]["overhead"] <= target else "not met"
        lines.append(
            f"- dense overhead {o['dense']}: {o['fused']['overhead'] * 100:+.1f}% fused, "
            f"{o['today']['overhead'] * 100:+.1f}% today (target <= {target * 100:.0f}%: {met}"
            f"{'; noisy, see the notes' if meta.get('notes') else ''})."
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from densessm.inference import fuse_decode_steps, prepack_for_cpu",
        "",
        "prepack_for_cpu(model)  # the weights, as `densessm generate` stores them",
        "fuse_decode_steps(model)  # the steps: False (with a one-line notice) where no C++ compiler is found",
        "```",
        "",
        "The first call builds the kernels (`src/densessm/ops/fused/step.cpp`, g++ with OpenMP through "
        "`torch.utils.cpp_extension`, 9-66 s measured on this shared 2-core machine) into "
        "`~/.cache/densessm/extensions` (or `$DENSESSM_EXTENSIONS_DIR`); later processes load that build in "
        "about 0.01 s. The build is "
        "tuned for the CPU it runs on (`-march=native`) and keyed by it.",
    ]
    if results["overhead"]:
        lines += [
            "",
            "## Dense decode overhead (dense over plain twin, median of per-round ratios, batch 6, fp32)",
            "",
            "| dense | plain | step | dense (ms) | plain (ms) | overhead |",
            "|---|---|---|---:|---:|---:|",
        ]
        for o in results["overhead"]:
            for kind in ("fused", "today"):
                d = o[kind]
                lines.append(
                    f"| {o['dense']} | {o['plain']} | {kind} | {d['dense_s'] * 1e3:.0f} | {d['plain_s'] * 1e3:.0f} | "
                    f"{d['overhead'] * 100:+.1f}% |"
                )
    if results.get("logits"):
        lines += [
            "",
            "## bf16: what the state's dtype does to the logits",
            "",
            "A bf16 model keeps its retention state in bf16 (the cache layout: half the bytes of the largest "
            "tensor of a step) and its scan state in fp32. Teacher-forced decoding against the same weights in "
            "fp32; log-probability differences (randomly initialised presets: the figures show the rounding, not "
            "a trained model's sensitivity to it):",
            "",
            "| preset | steps | path | max abs | mean abs | top-1 agreement |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for e in results["logits"]:
            for label in ("bf16_fused", "bf16_today"):
                d = e[label]
                lines.append(
                    f"| {e['preset']} | {e['steps']} | {label.removeprefix('bf16_')} | "
                    f"{d['max_abs_logprob_diff']:.4f} | {d['mean_abs_logprob_diff']:.4f} | {d['top1_agreement']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["dense_retnet_350m", "dense_mamba_360m"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 6, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--contexts", nargs="+", type=int, help="contexts to sweep (default: --context)")
    parser.add_argument("--llamas", action="store_true", help="also a LLaMA of the preset's size, 2 ways")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--probe-cap", type=int, default=2**31, help="most bytes the copy probe moves")
    parser.add_argument("--overhead", action="store_true", help="also dense vs plain at batch 6 (fp32)")
    parser.add_argument("--overhead-rounds", type=int, default=15)
    parser.add_argument("--logits", nargs="*", default=[], help="presets whose bf16 logits are compared with fp32")
    parser.add_argument("--logit-steps", type=int, default=32)
    parser.add_argument("--skip-steps", action="store_true", help="only the overhead and logit measurements")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/fused_step"))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.json, OUT.md and OUT.png")
    parser.add_argument("--render", action="store_true", help="only write OUT.md and OUT.png from OUT.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.out.with_suffix(".json").read_text())
        atomic_write_text(args.out.with_suffix(".md"), markdown(results), overwrite=args.overwrite)
        plot(results, args.out.with_suffix(".png"), args.overwrite)
        return
    args.contexts = args.contexts or [args.context]
    if min(args.contexts) < 1:
        raise SystemExit(f"--contexts must be >= 1, got {min(args.contexts)}")
    if args.llamas and not args.skip_steps:
        for preset in args.presets:
            llama_for(preset)
    existing = [path for path in (args.out.with_suffix(s) for s in (".json", ".md", ".png")) if path.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{', '.join(map(str, existing))} already exist(s); nothing was measured (--overwrite)")
    load = os.getloadavg()
    results = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "load_average_start": load,
            "context": args.context,
            "contexts": args.contexts,
            "argv": " ".join(sys.argv[1:]),
            "probe": f"Tensor.copy_ of min(minimal bytes, {args.probe_cap}) bytes (half read, half written), "
            "time scaled linearly to the minimal bytes",
        },
        "steps": [],
        "overhead": [],
        "logits": [],
    }
    for preset in [] if args.skip_steps else args.presets:
        for name in args.dtypes:
            results["steps"] += measure(preset, DTYPES[name], args.batches, args)
    if args.overhead:
        for preset in args.presets:
            if preset in PLAIN:
                results["overhead"].append(overhead(preset, torch.float32, 6, args))
    results["logits"] = [logit_effect(preset, args) for preset in args.logits]
    results["meta"]["load_average_end"] = os.getloadavg()
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=1), overwrite=args.overwrite)
    atomic_write_text(args.out.with_suffix(".md"), markdown(results), overwrite=args.overwrite)
    plot(results, args.out.with_suffix(".png"), args.overwrite)


if __name__ == "__main__":
    main()
