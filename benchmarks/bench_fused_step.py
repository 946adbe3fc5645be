"""The fused CPU decode step against today's step and against a plain copy of the step's minimal bytes.

One model per preset and dtype, prepacked as ``densessm generate`` runs it, decodes from a synthetic
``--context``-token state. Three things alternate in one process, round after round (the order rotates),
so the machine's drift hits all alike: the fused step (:func:`densessm.inference.fused_step.fuse_decode_steps`),
today's step (the same modules, weights and cache with the fused mixers' classes switched back to their
PyTorch forward), and a probe: ``Tensor.copy_`` of as many bytes as the step must move at least (weights
read once, state read once and written once), capped at ``--probe-cap`` bytes and scaled linearly above it.
With ``--overhead``, each dense preset is also alternated with its plain twin (fused and today's step).

    python benchmarks/bench_fused_step.py --out docs/benchmarks/fused_step
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

import torch
from torch import nn

from densessm.files import atomic_output_file, atomic_write_text
from densessm.inference import prepack_for_cpu
from densessm.inference.fused_step import FusedStepMambaMixer, FusedStepRetention, StepMambaMixer, fuse_decode_steps
from densessm.inference.fusion import FusedMambaMixer, FusedRetention
from densessm.models.mamba.modeling_dense_mamba import DenseMambaMixer
from densessm_lab.bench.models import DTYPES, build, synthetic_cache

TODAY = {FusedStepRetention: FusedRetention, FusedStepMambaMixer: FusedMambaMixer, StepMambaMixer: DenseMambaMixer}
PLAIN = {
    "dense_retnet_350m": "retnet_350m",
    "dense_mamba_360m": "mamba_360m",
    "dense_retnet_tiny": "retnet_tiny",
    "dense_mamba_tiny": "mamba_tiny",
}


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


def alternate(runs: dict, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Each of ``runs`` once per round, the order rotating; seconds of the rounds after ``warmup``."""
    times = {name: [] for name in runs}
    names = list(runs)
    with torch.no_grad():
        for r in range(warmup + rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds = _timed(runs[name])
                if r >= warmup:
                    times[name].append(seconds)
    return times


def measure_batch(model: nn.Module, switch: Switch, preset: str, batch: int, args) -> dict:
    cache = synthetic_cache(model, batch, args.context, 1)
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
    times = alternate(runs, args.warmup, rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    medians["probe"] *= bytes_moved["minimal"] / (2 * (probe_bytes // 2))
    per_round = [t / f for t, f in zip(times["today"], times["fused"], strict=True)]
    row = {
        "preset": preset,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch": batch,
        "context": args.context,
        "rounds": rounds,
        "median_s": medians,
        "speedup": medians["today"] / medians["fused"],
        "median_round_speedup": statistics.median(per_round),
        "fused_over_probe": medians["fused"] / medians["probe"],
        "bytes": bytes_moved,
        "probe_bytes_copied": 2 * (probe_bytes // 2),
        "times_s": times,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
    return row


def measure(preset: str, dtype: torch.dtype, batches: list[int], args) -> list[dict]:
    model = prepack_for_cpu(build(preset, dtype))
    if not fuse_decode_steps(model):
        raise SystemExit("the fused step is unavailable here (see the notice above)")
    switch = Switch(model)
    return [measure_batch(model, switch, preset, batch, args) for batch in batches]


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
    labels = [f"{r['preset'].removeprefix('dense_')}\n{r['dtype']} b{r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["speedup"] for r in rows], 0.4, label="today's step / fused step")
    ax.bar([i + 0.2 for i in x], [r["fused_over_probe"] for r in rows], 0.4, label="fused step / copy probe")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.4, color="tab:red", lw=0.8, ls="--", label="target 1.4x (batch 6)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("ratio of medians (alternated)")
    ax.set_title(f"fused CPU decode step, {results['meta']['date']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output_file(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The report: method, the step table (medians, ratios, bytes), dense overhead, bf16 state and logits."""
    meta = results["meta"]
    gb = 1e9
    lines = [
        f"# Fused CPU decode step — {meta['date']}",
        "",
        f"`python benchmarks/bench_fused_step.py {meta.get('argv', '')}`".replace(" `", "`"),
        f"— torch {meta['torch']}, {meta['threads']} threads, context {meta['context']}, load average "
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
        "| preset | dtype | batch | fused (ms) | today (ms) | probe (ms) | today / fused | per-round | "
        "fused / probe | weights (GB) | state (GB) | today moves (GB) | fused moves (GB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["steps"]:
        m, b = r["median_s"], r["bytes"]
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['batch']} | {m['fused'] * 1e3:.0f} | {m['today'] * 1e3:.0f} | "
            f"{m['probe'] * 1e3:.0f} | {r['speedup']:.2f}x | {r['median_round_speedup']:.2f}x | "
            f"{r['fused_over_probe']:.2f} | {b['weights'] / gb:.2f} | {b['state'] / gb:.3f} | {b['today'] / gb:.2f} | "
            f"{b['fused'] / gb:.2f} |"
        )
    if meta.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in meta["notes"])]
    lines += ["", "## Against the targets", ""]
    for r in results["steps"]:
        if r["batch"] == 6 and r["preset"] == "dense_retnet_350m":
            met = "met" if r["median_round_speedup"] >= 1.4 else "not met"
            lines.append(
                f"- {r['preset']} {r['dtype']}, batch 6: fused step {r['median_round_speedup']:.2f}x today's "
                f"(median of per-round ratios; target >= 1.4x: {met})."
            )
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
