"""RMSNorm in training (forward and backward) at the shapes of the presets' norms: torch's ``rms_norm``, which
autograd differentiates operator by operator, against densessm's hand-written backward
(:mod:`densessm.ops.rms_norm`), alternated in one process. The evidence for that op.

    python benchmarks/bench_rms_norm.py --out docs/benchmarks/rms_norm
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

from densessm.ops.rms_norm import naive_rms_norm, rms_norm
from densessm.presets import load_preset
from densessm_lab.bench.results import output_stem, refuse_existing, write_results

FORMS = {"torch's rms_norm": naive_rms_norm, "densessm": rms_norm}


def norm_shapes(length: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """``(name, input shape, transposed)`` of each norm a training step of the 350M presets runs, at batch 1:
    the heads' output norm takes a transposed view (``[B, L, H, D]`` of ``[B, H, L, D]`` memory)."""
    retnet, mamba = load_preset("dense_retnet_350m"), load_preset("dense_mamba_360m")
    heads = retnet.num_attention_heads
    return [
        ("DenseRetNet-350M block input", (1, length, retnet.hidden_size), False),
        ("DenseRetNet-350M dense k", (1, length, retnet.query_key_dim), False),
        ("DenseRetNet-350M dense v", (1, length, retnet.value_dim), False),
        ("DenseRetNet-350M heads' output", (1, length, heads, retnet.value_dim // heads), True),
        ("DenseMamba-360M block input", (1, length, mamba.hidden_size), False),
    ]


def measure(shape: tuple[int, ...], transposed: bool, rounds: int) -> dict:
    """Seconds of one forward and backward per form, alternated per round, and the per-round ratios."""
    torch.manual_seed(0)
    if transposed:
        x = torch.randn(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(shape).requires_grad_()
    weight = torch.ones(shape[-1]).requires_grad_()
    grad = torch.randn(shape)

    def step(form) -> float:
        start = time.perf_counter()
        form(x, weight, 1e-6).backward(grad)
        x.grad = weight.grad = None
        return time.perf_counter() - start

    for form in FORMS.values():  # warm-up
        step(form)
    seconds = {name: [] for name in FORMS}
    for _ in range(rounds):
        for name, form in FORMS.items():
            seconds[name].append(step(form))
    ratios = [a / b for a, b in zip(*seconds.values(), strict=True)]
    return {"seconds": seconds, "ratios": ratios, "speedup": statistics.median(ratios)}


def render(results: dict, png: str) -> str:
    lines = [
        "# RMSNorm in training: torch's rms_norm against densessm's backward",
        "",
        f"`{results['command']}` — {results['date']}, {results['machine']}",
        "",
        "One call = the norm's forward and backward, fp32, batch 1, at the presets' widths. The two forms alternate in "
        "every round; the speed-up is the median of the per-round ratios (torch's time / ours). Values are "
        "bit-identical; gradients equal to rounding (tests/test_rms_norm.py).",
        "",
        "| norm | input | torch's rms_norm ms | densessm ms | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        torch_ms, ours_ms = (statistics.median(v) * 1e3 for v in row["seconds"].values())
        shape = " × ".join(map(str, row["shape"])) + (" (transposed view)" if row["transposed"] else "")
        lines.append(f"| {row['name']} | {shape} | {torch_ms:.1f} | {ours_ms:.1f} | {row['speedup']:.2f}× |")
    lines += ["", f"![forward and backward time]({png})", ""]
    return "\n".join(lines)


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [row["name"].replace(" ", "\n", 1) for row in results["rows"]]
    width = 0.4
    for offset, form in ((-width / 2, "torch's rms_norm"), (width / 2, "densessm")):
        values = [statistics.median(row["seconds"][form]) * 1e3 for row in results["rows"]]
        ax.bar([i + offset for i in range(len(names))], values, width, label=form)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_title(f"RMSNorm in training, fp32 CPU, {results['length']:,} tokens, {results['date']}")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048, help="tokens of the batch-1 input")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=output_stem, default=Path("docs/benchmarks/rms_norm"))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    args = parser.parse_args()
    refuse_existing(args.out, args.overwrite)
    torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/bench_rms_norm.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "length": args.length,
        "rows": [],
    }
    for name, shape, transposed in tqdm(norm_shapes(args.length), desc="norms"):
        results["rows"].append(
            {"name": name, "shape": list(shape), "transposed": transposed, **measure(shape, transposed, args.rounds)}
        )
    markdown = render(results, args.out.with_suffix(".png").name)
    write_results(args.out, results, markdown, plot(results), args.overwrite)
    print(markdown)


if __name__ == "__main__":
    main()
