"""The matrix-product FLOPs of one training step, ours against the public reference's: the speed-up each
length allows when both run their products at the same rate.

The reference (see ``bench_train_reference.py``) trains in its parallel form, whose retention costs
``heads × L² × (key + value width)`` multiply-adds per layer; ours (the default ``auto`` mode) in chunks, linear
in ``L``. The projections and the LM head are the same products in both, and they dominate at the lengths
users train at, so they bound the ratio however fast the retention gets. This script counts, with
:class:`torch.utils.flop_counter.FlopCounterMode`, the FLOPs of every matrix product of a real step (forward of
the LM loss and its backward, fp32, batch 1) of each model with 2 and 3 layers; their difference is one
layer's FLOPs (every layer above the first is alike; the first has no layer below to take states from), the
rest the embedding, the LM head and what the first layer lacks. The full-depth count follows exactly, so
cases whose reference activations would not fit in memory at full depth are counted too.

    python benchmarks/count_train_flops.py --reference DenseSSM/modeling/dense_gau_retnet_350m \\
        --lengths 2048 8192 --out docs/benchmarks/train_flops
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from bench_train_reference import build, load_reference
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from densessm_lab.bench.results import refuse_existing, write_results

REFERENCE, OURS = "reference (parallel)", "densessm (auto)"


def step_flops(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """The FLOPs of the matrix products of one training step (a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def count(module, raw: dict, length: int) -> dict:
    """Per model: one layer's FLOPs and the rest (embedding, LM head, what the first layer
    lacks), from steps at 2 and 3 layers."""
    tokens = torch.randint(3, raw["vocab_size"], (1, length))
    totals = {}
    for layers in (2, 3):
        models = build(module, raw, layers)
        totals[layers] = {name: step_flops(model, tokens) for name, model in models.items()}
        del models
    return {
        "length": length,
        "flops": {
            name: {"per_layer": totals[3][name] - totals[2][name], "rest": 3 * totals[2][name] - 2 * totals[3][name]}
            for name in totals[2]
        },
    }


def at_depth(record: dict, name: str, layers: int) -> int:
    flops = record["flops"][name]
    return flops["rest"] + layers * flops["per_layer"]


def render(results: dict, png: str) -> str:
    depths = results["depths"]
    lines = [
        "# Training FLOPs: DenseRetNet-350M against the public reference",
        "",
        f"`{results['command']}` — {results['date']}, {results['machine']}",
        "",
        "Matrix-product FLOPs of one training step (forward of the LM loss and its backward, fp32, batch 1), "
        "counted with `torch.utils.flop_counter.FlopCounterMode` on real steps of each model at 2 and 3 layers "
        "(their difference is one layer; the rest is the embedding, the LM head and what the first layer "
        "lacks). The ratio is the speed-up "
        "a step can have if both models run their products at the same rate: elementwise work (norms, gates, "
        "the decay masks, the loss) is not counted, and it is what our chunked form spends more of per FLOP.",
        "",
        "| length | layers | reference TFLOP | densessm TFLOP | FLOPs ours saves | FLOP ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for record in results["records"]:
        for layers in depths:
            ref, ours = at_depth(record, REFERENCE, layers), at_depth(record, OURS, layers)
            lines.append(
                f"| {record['length']:,} | {layers} | {ref / 1e12:.2f} | {ours / 1e12:.2f} | "
                f"{1 - ours / ref:.0%} | {ref / ours:.2f}× |"
            )
    lines += ["", "## Notes", "", *(f"- {note}" for note in results.get("notes", [])), "", f"![FLOP ratio]({png})", ""]
    return "\n".join(lines)


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for layers in results["depths"]:
        points = [(r["length"], at_depth(r, REFERENCE, layers) / at_depth(r, OURS, layers)) for r in results["records"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{layers} layers")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("reference FLOPs / densessm FLOPs")
    ax.set_title(f"DenseRetNet-350M training step FLOPs, {results['date']}")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="folder of modeling_dense_gau_retnet.py")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16], help="layer counts reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/train_flops"))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    args = parser.parse_args()
    refuse_existing(args.out, args.overwrite)
    if min(args.lengths) < 2 or min(args.depths) < 1:
        parser.error("lengths must be >= 2 and depths >= 1")
    module = load_reference(args.reference)
    raw = json.loads((args.reference / "config.json").read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/count_train_flops.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "depths": args.depths,
        "records": [count(module, raw, length) for length in tqdm(args.lengths, desc="lengths")],
    }
    markdown = render(results, args.out.with_suffix(".png").name)
    write_results(args.out, results, markdown, plot(results), args.overwrite)
    print(markdown)


if __name__ == "__main__":
    main()
