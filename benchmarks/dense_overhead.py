"""The dense decode overhead (m > 0 against m = 0) measured repeatedly, against this machine's memory speed.

``densessm bench generate`` measures the overhead once per pair: alternating single decode steps of the dense
model and its plain twin for a few seconds. On a shared machine whose memory bandwidth drifts by 2x within
the hour, one such block reads anywhere from about 0 to 7 % for the same code. This script repeats the
block: ``--blocks`` blocks, ``--gap`` idle seconds apart, each preceded by a copy-bandwidth probe, with the
models built once (prepacked, as ``densessm generate`` decodes). It reports every block and the median
over blocks, and plots the overhead against the bandwidth of its moment.

    python benchmarks/dense_overhead.py --dtype float32 --blocks 12 --out docs/benchmarks/dense_overhead
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from densessm.inference import prepack_for_cpu
from densessm_lab.bench.measure import WARMUP_ROUNDS, alternate, copy_bandwidth, decoder
from densessm_lab.bench.models import DTYPES, build

PAIRS = (("dense_retnet_350m", "retnet_350m"), ("dense_mamba_360m", "mamba_360m"))


def block(steppers, rounds: int) -> tuple[float, float, float]:
    """One alternating block: median dense and plain step seconds, and the median of the per-round ratios
    minus one."""
    dense, plain = alternate(steppers, rounds)
    ratios = [d / p for d, p in zip(dense, plain, strict=True)]
    return statistics.median(dense), statistics.median(plain), statistics.median(ratios) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds per block")
    parser.add_argument("--gap", type=float, default=20.0, help="idle seconds between blocks")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--pair", nargs=2, action="append", metavar=("DENSE", "PLAIN"), help="default: the 350m pairs")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/dense_overhead"))
    args = parser.parse_args()
    chosen = [tuple(p) for p in args.pair] if args.pair else PAIRS
    dtype = DTYPES[args.dtype]

    calls = args.blocks * args.rounds + WARMUP_ROUNDS
    pairs = []
    for names in tqdm(chosen, desc="build"):
        models = [prepack_for_cpu(build(name, dtype)) for name in names]
        steppers = [decoder(model, args.batch, args.context, calls)[1] for model in models]
        alternate(steppers, WARMUP_ROUNDS)
        pairs.append({"dense": names[0], "plain": names[1], "steppers": steppers, "blocks": []})
    for index in tqdm(range(args.blocks), desc="blocks"):
        if index:
            time.sleep(args.gap)
        bandwidth = copy_bandwidth()
        for pair in pairs:
            dense, plain, overhead = block(pair["steppers"], args.rounds)
            pair["blocks"].append(
                {"copy_gb_s": bandwidth, "dense_step_s": dense, "plain_step_s": plain, "overhead": overhead}
            )
    results = {
        "command": "python benchmarks/dense_overhead.py "
        + f"--dtype {args.dtype} --blocks {args.blocks} --rounds {args.rounds} --gap {args.gap:g} "
        + f"--batch {args.batch} --context {args.context} "
        + "".join(f"--pair {d} {p} " for d, p in chosen if args.pair)
        + f"--out {args.out}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "dtype": args.dtype,
        "pairs": [
            {
                "dense": p["dense"],
                "plain": p["plain"],
                "blocks": p["blocks"],
                "median_overhead": statistics.median(b["overhead"] for b in p["blocks"]),
            }
            for p in pairs
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(results, args.out.with_suffix(".png").name))
    plot(results, args.out.with_suffix(".png"))
    for p in results["pairs"]:
        print(f"{p['dense']} vs {p['plain']}: median overhead {p['median_overhead']:+.1%}")


def report(results: dict, png: str) -> str:
    lines = [f"`{results['command']}` — {results['machine']}, {results['dtype']}", ""]
    for p in results["pairs"]:
        values = [b["overhead"] for b in p["blocks"]]
        lines += [
            f"**{p['dense']} vs {p['plain']}**: median over {len(values)} blocks {p['median_overhead']:+.1%} "
            f"(range {min(values):+.1%} … {max(values):+.1%})",
            "",
            "| block | copy bandwidth (GB/s) | dense step (ms) | plain step (ms) | overhead (median per-round) |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {i} | {b['copy_gb_s']:.0f} | {b['dense_step_s'] * 1e3:.1f} | {b['plain_step_s'] * 1e3:.1f} | "
            f"{b['overhead']:+.1%} |"
            for i, b in enumerate(p["blocks"])
        ]
        lines.append("")
    lines.append(f"![overhead against bandwidth]({png})")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for p in results["pairs"]:
        ax.scatter(
            [b["copy_gb_s"] for b in p["blocks"]],
            [100 * b["overhead"] for b in p["blocks"]],
            label=f"{p['dense']} vs {p['plain']}",
        )
    ax.axhline(5, color="grey", linestyle="--", linewidth=1, label="target 5 %")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("copy bandwidth at the block's start (GB/s)")
    ax.set_ylabel("dense decode overhead (%)")
    ax.set_title(f"Dense overhead per block, batch 6, {results['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
