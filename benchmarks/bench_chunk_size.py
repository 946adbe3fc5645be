"""Retention alone at the preset head shapes, forward and backward (training) and forward alone (prefill,
evaluation): the parallel form against chunkwise at several chunk sizes, alternated in one process. The
evidence for ``default_chunk_size`` and ``auto_parallel_max_length`` (densessm.ops.retention): which chunk is
fastest for a head of ``Dk × Dv``, and from which length chunkwise beats the parallel form.

    python benchmarks/bench_chunk_size.py --out docs/benchmarks/chunk_size
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from densessm.ops.retention import auto_parallel_max_length, chunkwise_retention, default_chunk_size
from densessm.ops.retention.forms import parallel_retention
from densessm.presets import load_preset
from densessm_lab.bench.results import refuse_existing, write_results

PRESETS = ("dense_retnet_tiny", "dense_retnet_350m", "dense_retnet_1p3b")
CHUNKS = (32, 64, 128, 256, 512)


def head_shape(preset: str) -> tuple[int, int, int]:
    config = load_preset(preset)
    heads = config.num_attention_heads
    return heads, config.query_key_dim // heads, config.value_dim // heads


TASKS = {"train": "forward and backward", "prefill": "forward alone, keeping the final state"}


def measure(heads: int, key_dim: int, value_dim: int, length: int, rounds: int, task: str) -> dict[str, float]:
    """Median seconds of one call per form (``parallel``, ``chunk C``), alternated per round; ``task`` "train"
    differentiates the output's sum, "prefill" runs the forward alone under no_grad."""
    torch.manual_seed(0)
    train = task == "train"
    q, k = (torch.randn(1, heads, length, key_dim, requires_grad=train) for _ in range(2))
    v = torch.randn(1, heads, length, value_dim, requires_grad=train)
    log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float)))

    def finish(out: torch.Tensor) -> None:
        if train:
            out.sum().backward()

    def parallel():
        finish(parallel_retention(q, k, v, log_decay, normalize_rows=train, output_state=not train)[0])

    def chunked(chunk: int):
        return lambda: finish(chunkwise_retention(q, k, v, log_decay, chunk)[0])

    forms = {"parallel": parallel, **{f"chunk {c}": chunked(c) for c in CHUNKS if c < length}}
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.set_grad_enabled(train):
        for form in forms.values():  # warm-up
            form()
        for _ in range(rounds):
            for name, form in forms.items():
                start = time.perf_counter()
                form()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def render(results: dict, png: str) -> str:
    lines = [
        "# Chunk size and the auto crossover at the preset head shapes",
        "",
        f"`{results['command']}` — {results['date']}, {results['machine']}",
        "",
        "Retention alone (batch 1, fp32): *train* = forward and backward of the output's sum, *prefill* = the "
        "forward alone under no_grad, keeping the final state. Each cell is the parallel form's median time over "
        "the form's (> 1: faster than parallel), forms alternated round by round. The rules "
        "(densessm.ops.retention): chunk = the power of two nearest `sqrt(80·Dk·Dv/(Dk+Dv))` within [64, 1024]; "
        "`auto` runs the parallel form up to `C + 3·Dk·Dv/(Dk+Dv)` tokens.",
        "",
    ]
    chunks = [f"chunk {c}" for c in CHUNKS]
    for shape in results["shapes"]:
        lines += [f"## {shape['preset']}: {shape['heads']} heads of {shape['key_dim']} × {shape['value_dim']}", ""]
        for task, rule in shape["rules"].items():
            lines += [
                f"{task} ({TASKS[task]}) — rule: chunk {rule['chunk']}, parallel up to {rule['parallel_max']:,} tokens",
                "",
                "| length | parallel s | " + " | ".join(chunks) + " | fastest |",
                "|---:|---:|" + "---:|" * len(chunks) + "---|",
            ]
            for row in shape["rows"][task]:
                seconds = row["seconds"]
                cells = [f"{seconds['parallel'] / seconds[c]:.2f}" if c in seconds else "—" for c in chunks]
                fastest = min(seconds, key=seconds.get)
                lines.append(
                    f"| {row['length']:,} | {seconds['parallel']:.3f} | " + " | ".join(cells) + f" | {fastest} |"
                )
            lines.append("")
    lines += [f"![speed over parallel]({png})", ""]
    return "\n".join(lines)


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    fig, axes = plt.subplots(len(TASKS), len(shapes), figsize=(5 * len(shapes), 4 * len(TASKS)), squeeze=False)
    for row_axes, task in zip(axes, TASKS, strict=True):
        for ax, shape in zip(row_axes, shapes, strict=True):
            rule = shape["rules"][task]
            for chunk in CHUNKS:
                rows = [r for r in shape["rows"][task] if f"chunk {chunk}" in r["seconds"]]
                speed = [r["seconds"]["parallel"] / r["seconds"][f"chunk {chunk}"] for r in rows]
                style = "-" if chunk == rule["chunk"] else ":"
                ax.plot([r["length"] for r in rows], speed, style, marker="o", label=f"chunk {chunk}")
            ax.axhline(1, color="black", linewidth=0.6)
            ax.axvline(rule["parallel_max"], color="grey", linestyle="--", linewidth=1, label="auto crossover")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("length")
            ax.set_ylabel("speed over the parallel form")
            ax.set_title(f"{task}: {shape['preset']} ({shape['key_dim']}×{shape['value_dim']})")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/chunk_size"))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    args = parser.parse_args()
    refuse_existing(args.out, args.overwrite)
    torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/bench_chunk_size.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "shapes": [],
    }
    for preset in tqdm(args.presets, desc="shapes"):
        heads, key_dim, value_dim = head_shape(preset)
        rules, rows = {}, {}
        for task in TASKS:
            chunk = default_chunk_size(key_dim, value_dim)
            rules[task] = {"chunk": chunk, "parallel_max": auto_parallel_max_length(chunk, key_dim, value_dim)}
            rows[task] = [
                {"length": length, "seconds": measure(heads, key_dim, value_dim, length, args.rounds, task)}
                for length in tqdm(args.lengths, desc=f"{preset} {task}", leave=False)
            ]
        results["shapes"].append(
            {"preset": preset, "heads": heads, "key_dim": key_dim, "value_dim": value_dim, "rules": rules, "rows": rows}
        )
    markdown = render(results, args.out.with_suffix(".png").name)
    write_results(args.out, results, markdown, plot(results), args.overwrite)
    print(markdown)


if __name__ == "__main__":
    main()
