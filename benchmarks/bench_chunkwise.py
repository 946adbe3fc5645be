"""Parallel vs chunkwise retention: training (forward + backward) and prefill throughput and peak memory.

Each (task, mode, length) point runs in a fresh child process so its peak RSS is its own. Writes
``<out>.json``, ``<out>.md`` (table) and ``<out>.png`` (plot).

    python benchmarks/bench_chunkwise.py --out docs/benchmarks/chunkwise
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from densessm import DenseRetNetConfig, DenseRetNetForCausalLM
from densessm.files import atomic_output_file, atomic_write_text
from densessm_lab.bench.results import refuse_existing

MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    query_key_dim=128,
    num_attention_heads=2,
    num_hidden_layers=4,
    dense_block_layers=1,
    k_gate_reduction=16,
    v_gate_reduction=16,
)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(task: str, mode: str, length: int, chunk_size: int, repeats: int, threads: int) -> dict:
    """One point, in this process: tokens/s and the peak RSS growth over the idle model."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(DenseRetNetConfig(**MODEL, chunk_size=chunk_size))
    tokens = torch.randint(0, MODEL["vocab_size"], (1, length))
    baseline = _current_rss_mib()

    def step():
        if task == "train":
            model.train()
            model(tokens, labels=tokens, mode=mode, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad():
                model(tokens, mode=mode, use_cache=True, logits_to_keep=1)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "task": task,
        "mode": mode,
        "length": length,
        "chunk_size": chunk_size,
        "seconds": best,
        "tokens_per_s": length / best,
        "peak_mib": _rss_mib() - baseline,
    }


def run_child(task, mode, length, chunk_size, repeats, threads, timeout) -> dict:
    cmd = [sys.executable, __file__, "--child", task, mode, str(length), str(chunk_size), str(repeats), str(threads)]
    point = {"task": task, "mode": mode, "length": length, "chunk_size": chunk_size}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return point | {"error": f"over {timeout} s"}
    if done.returncode != 0:
        reason = "killed (out of memory)" if done.returncode in (-9, 137) else done.stderr.strip().splitlines()[-1]
        return point | {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_report(results: list[dict], out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"command": command, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "model": MODEL}
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "results": results}, indent=2) + "\n", True)

    lines = [
        "| task | length | parallel tok/s | chunkwise tok/s | chunkwise / parallel | parallel peak MiB "
        "| chunkwise peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["task"], r["mode"], r["length"]): r for r in results}

    def cell(r, key, fmt):
        if r is None:
            return "—"
        return r.get("error", "failed") if "error" in r else fmt.format(r[key])

    for task in ("train", "prefill"):
        for length in sorted({r["length"] for r in results if r["task"] == task}):
            par, chk = by_key.get((task, "parallel", length)), by_key.get((task, "chunkwise", length))
            ratio = "—"
            if par and chk and "error" not in par and "error" not in chk:
                ratio = f"{chk['tokens_per_s'] / par['tokens_per_s']:.2f}×"
            speed = f"{cell(par, 'tokens_per_s', '{:,.0f}')} | {cell(chk, 'tokens_per_s', '{:,.0f}')}"
            memory = f"{cell(par, 'peak_mib', '{:,.0f}')} | {cell(chk, 'peak_mib', '{:,.0f}')}"
            lines.append(f"| {task} | {length:,} | {speed} | {ratio} | {memory} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n", overwrite=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for task, style in (("train", "-"), ("prefill", "--")):
        for mode, colour in (("parallel", "tab:red"), ("chunkwise", "tab:blue")):
            pts = sorted(
                (r["length"], r) for r in results if r["task"] == task and r["mode"] == mode and "error" not in r
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0].plot(
                xs, [p[1]["tokens_per_s"] for p in pts], style, color=colour, marker="o", label=f"{mode} {task}"
            )
            axes[1].plot(xs, [p[1]["peak_mib"] for p in pts], style, color=colour, marker="o", label=f"{mode} {task}")
    for ax, title in zip(axes, ("throughput (tokens/s)", "peak memory growth (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DenseRetNet retention: parallel vs chunkwise (CPU)")
    fig.tight_layout()
    with atomic_output_file(out.with_suffix(".png"), overwrite=True) as png:
        fig.savefig(png, dpi=120, format="png")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        task, mode, length, chunk, repeats, threads = sys.argv[2:8]
        print(json.dumps(measure(task, mode, int(length), int(chunk), int(repeats), int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tasks", nargs="+", default=["train", "prefill"])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel-max", type=int, default=8192, help="skip parallel above this length")
    parser.add_argument("--long", type=int, default=32768, help="extra chunkwise-only prefill length")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/chunkwise"))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    args = parser.parse_args()
    refuse_existing(args.out, args.overwrite)

    results = []
    for task in args.tasks:
        for length in args.lengths:
            for mode in ("parallel", "chunkwise"):
                if mode == "parallel" and length > args.parallel_max:
                    results.append({"task": task, "mode": mode, "length": length, "error": "skipped (quadratic)"})
                    continue
                point = run_child(task, mode, length, args.chunk_size, args.repeats, args.threads, args.timeout)
                print(json.dumps(point), flush=True)
                results.append(point)
    if args.long:
        point = run_child("prefill", "chunkwise", args.long, args.chunk_size, 1, args.threads, args.timeout)
        print(json.dumps(point), flush=True)
        results.append(point)
    write_report(results, args.out, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
