"""The report of ``densessm bench generate``: ``OUT.json`` (also saved while the run goes on), the Markdown
tables of ``OUT.md`` and the three plots of ``OUT.png``."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from densessm.files import atomic_output_file, atomic_write_text
from densessm_lab.bench.measure import WARMUP_ROUNDS
from densessm_lab.bench.models import LLAMAS, is_stock
from densessm_lab.bench.results import suffixed


def treatment(
    name: str, prepacked: bool, compiled: bool = False, compile_run: bool = False, quantized: bool = False
) -> str:
    """One line on how model ``name`` is run, for the report: the two LLaMAs differ only in this.

    ``compiled``: its decode steps run compiled; ``compile_run``: the run was asked to compile (the LLaMAs
    stay eager then, which the line says); ``quantized``: int8 weights (the layers left in float prepacked
    if ``prepacked``).
    """
    if is_stock(name):
        line = "stock transformers: default linear layers, growing DynamicCache"
    else:
        weights = "prepacked weights" if prepacked else "default linear layers"
        if quantized:
            weights = "int8 weights" + (" (the rest prepacked)" if prepacked else "")
        line = weights
        if name in LLAMAS:
            line = f"optimised: {weights}, preallocated StaticCache in decode (generate(): DynamicCache)"
    if compiled:
        line += ", compiled decode steps"
    elif compile_run:
        line += ", eager (not compiled)"
    return line


def write_json(results: dict, out: Path) -> None:
    """The results as ``out.json``: at the end, and after each model (``meta.complete`` false until done), so a
    run cut short (a GPU machine's time limit) leaves what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(suffixed(out, ".json"), json.dumps(results, indent=2) + "\n", overwrite=True)


def render_markdown(results: dict) -> str:
    """The tables of the report: generation throughput, decode steps by context, the dense overhead."""
    meta, models = results["meta"], results["models"]
    batch = meta["batch"]
    notes = _treatments(meta, models)
    compile_run = meta.get("compile", False)
    lines = [
        f"`{meta['command']}` — {meta['machine']}, torch {meta['torch']}; device {meta.get('device', 'cpu')}, "
        f"{meta['dtype']}, compile {'on' if compile_run else 'off'}, batch {batch}",
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
    return "\n".join(lines) + "\n"


def plot(results: dict) -> Figure:
    """Three panels against the tokens generated or the context: generate() tokens/s, decode tokens/s and the
    cache each sequence keeps."""
    meta, models = results["meta"], results["models"]
    batch = meta["batch"]
    notes = _treatments(meta, models)
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
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
        f"generation speed, batch {batch}, {meta.get('device', 'cpu')}, {meta['dtype']}, compile "
        f"{'on' if meta.get('compile', False) else 'off'} ({meta['machine']})"
    )
    if any(name in LLAMAS for name in models):  # spell out the two LLaMA treatments once, under the plots
        fig.text(0.5, 0.01, "; ".join(f"{name}: {notes[name]}" for name in models if name in LLAMAS), ha="center")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    return fig


def write_report(results: dict, out: Path) -> None:
    """``out.json``, ``out.md`` and ``out.png``, each written atomically."""
    write_json(results, out)
    atomic_write_text(suffixed(out, ".md"), render_markdown(results), overwrite=True)
    with atomic_output_file(suffixed(out, ".png"), overwrite=True) as png:
        plot(results).savefig(png, dpi=110, format="png")


def _treatments(meta: dict, models: dict) -> dict[str, str]:
    prepacked = meta.get("prepacked", {})
    compiled = meta.get("compiled", {})
    compile_run = meta.get("compile", False)
    quantized = meta.get("quantized", {})
    return {
        name: treatment(
            name,
            prepacked.get(name, meta["prepacked_weights"]),
            compiled.get(name, False),
            compile_run,
            quantized.get(name, False),
        )
        for name in models
    }
