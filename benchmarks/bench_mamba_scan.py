"""Training throughput (forward + backward, tokens/s) of the Mamba scan forms, side by side in one process.

On the same weights of a small Mamba (m = 0):

- ``ours``: DenseMamba's ``parallel`` mode (the blocked scan of ``densessm.ops.scan.blocked``);
- ``sequential``: the same model with the step-by-step reference scan (``densessm.ops.scan.sequential``);
- ``transformers``: ``transformers``' ``MambaForCausalLM`` slow path (no CUDA kernels);

and ``dense``: the same model with ``m = 2`` dense connections (the shared weights copied over, gates
opened), for the dense overhead. The variants run round-robin at each length so they share the machine's
conditions. Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``::

    python benchmarks/bench_mamba_scan.py --out docs/benchmarks/mamba_scan
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch
from transformers import MambaConfig, MambaForCausalLM
from transformers.utils import logging

import densessm.models.mamba.modeling_dense_mamba as modeling
from densessm import DenseMambaConfig, DenseMambaForCausalLM
from densessm.ops.scan import sequential_scan

VARIANTS = ("ours", "sequential", "transformers", "dense")


def step_by_step_scan(u, delta, A, B, C, mode, state=None, readers=0):
    """``selective_scan`` with the step-by-step form whatever the mode."""
    return sequential_scan(u, delta, A, B, C, state, readers)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def build(args) -> dict[str, torch.nn.Module]:
    shape = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        state_size=args.state,
        num_hidden_layers=args.layers,
    )
    torch.manual_seed(0)
    reference = MambaForCausalLM(MambaConfig(**shape))
    weights = reference.state_dict()
    plain = DenseMambaForCausalLM(DenseMambaConfig(**shape, dense_block_layers=0))
    plain.load_state_dict(weights)
    dense = DenseMambaForCausalLM(DenseMambaConfig(**shape, dense_block_layers=2, dense_gate_reduction=16))
    dense.load_state_dict(weights, strict=False)
    with torch.no_grad():  # open the gates (they start closed) so the dense path does real work
        for name, param in dense.named_parameters():
            if "dense_gate.fc2" in name:
                param.normal_(0.0, 0.02)
    return {"ours": plain, "sequential": plain, "transformers": reference, "dense": dense}


def step(name: str, model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Seconds for one forward + backward of the LM loss."""
    model.zero_grad(set_to_none=True)
    original = modeling.selective_scan
    if name == "sequential":
        modeling.selective_scan = step_by_step_scan
    try:
        start = time.perf_counter()
        model(tokens, labels=tokens).loss.backward()
        return time.perf_counter() - start
    finally:
        modeling.selective_scan = original


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    models = build(args)
    for model in models.values():
        model.train()
    warm = torch.randint(0, args.vocab, (1, 64))
    for name, model in models.items():
        step(name, model, warm)
    results = {name: {} for name in VARIANTS}
    for length in args.lengths:
        tokens = torch.randint(0, args.vocab, (1, length))
        active = [n for n in VARIANTS if n != "transformers" or length <= args.transformers_max_length]
        repeats = {n: args.transformers_repeats if n == "transformers" else args.repeats for n in active}
        times = {n: [] for n in active}
        for round_ in range(max(repeats.values())):
            for name in active:
                if round_ < repeats[name]:
                    times[name].append(step(name, models[name], tokens))
        for name in active:
            seconds = statistics.median(times[name])
            results[name][length] = {"seconds": seconds, "tokens_per_s": length / seconds, "runs": times[name]}
        print(
            f"L={length}: " + ", ".join(f"{n} {length / results[n][length]['seconds']:,.0f} tok/s" for n in active),
            flush=True,
        )
    return results


def write(args, results: dict, wall: float) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    argv, skip = [], False  # the command without --note, which only annotates the output
    for arg in args.argv:
        if arg == "--note" or skip:
            skip = not skip
        elif not arg.startswith("--note="):
            argv.append(arg)
    command = "python benchmarks/bench_mamba_scan.py " + shlex.join(argv)
    payload = {"command": command.strip(), "machine": machine, "wall_seconds": wall, "config": vars(args)}
    payload["config"].pop("argv")
    payload["results"] = {n: {str(k): v for k, v in r.items()} for n, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")

    def cell(name, length):
        return f"{results[name][length]['tokens_per_s']:,.0f}" if length in results[name] else "not run"

    def ratio(a, b, length):
        if length not in results[a] or length not in results[b]:
            return "–"
        return f"{results[b][length]['seconds'] / results[a][length]['seconds']:.1f}×"

    lines = [
        "| L | ours (tok/s) | sequential reference | transformers slow path | ours vs sequential | ours vs transformers"
        " | dense m=2 (tok/s) | dense overhead |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length in args.lengths:
        overhead = results["dense"][length]["seconds"] / results["ours"][length]["seconds"] - 1
        lines.append(
            f"| {length:,} | {cell('ours', length)} | {cell('sequential', length)} | {cell('transformers', length)}"
            f" | {ratio('ours', 'sequential', length)} | {ratio('ours', 'transformers', length)}"
            f" | {cell('dense', length)} | {overhead:+.1%} |"
        )
    table = "\n".join(lines)
    limit = args.transformers_max_length
    reference_runs = (
        f"{args.transformers_repeats} run per point, only up to L = {limit:,}: its backward slices the "
        "`[b, D, L, N]` tensors once per step, so a step grows ~quadratically with L"
        if results["transformers"]
        else "not run here"
    )
    setup = (
        f"Forward + backward of the LM loss, batch 1, median of {args.repeats} runs per point; a Mamba with hidden "
        f"size {args.hidden}, {args.layers} layers, state size {args.state}, vocabulary {args.vocab}, float32. "
        "*ours*: `parallel` mode (blocked scan with hand-written backward); *sequential reference*: the same "
        "model with the step-by-step scan of `densessm.ops.scan.sequential` (autograd through the loop); "
        f"*transformers slow path*: `MambaForCausalLM` without CUDA kernels, same weights ({reference_runs}); "
        "*dense m=2*: DenseMamba with `dense_block_layers=2` on the same shared weights, gates open. "
        "*dense overhead*: time of dense m=2 over time of ours, minus 1."
    )
    note = f" {args.note}" if args.note else ""
    out.with_suffix(".md").write_text(
        f"Command: `{payload['command']}`\n\nMachine: {machine}; total wall time {wall:.0f} s.{note}\n\n"
        f"{setup}\n\n{table}\n"
    )
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {
        "ours": "ours (blocked scan)",
        "sequential": "sequential reference",
        "transformers": "transformers slow path",
        "dense": "ours, DenseMamba m=2",
    }
    for name in VARIANTS:
        lengths = sorted(results[name])
        ax.plot(lengths, [results[name][n]["tokens_per_s"] for n in lengths], marker="o", label=labels[name])
    ax.set(yscale="log", xlabel="sequence length L", ylabel="forward+backward tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.lengths, [str(n) for n in args.lengths])
    ax.minorticks_off()
    ax.set_title(f"Mamba training throughput, hidden {args.hidden}, {args.layers} layers, CPU", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument("--transformers-repeats", type=int, default=1)
    parser.add_argument(
        "--transformers-max-length",
        type=int,
        default=1024,
        help="longest L for the transformers slow path (its backward grows ~quadratically)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/benchmarks/mamba_scan")
    parser.add_argument("--note", default="", help="a line on the run's conditions, written under the table's header")
    args = parser.parse_args(argv)
    args.argv = argv
    logging.set_verbosity_error()
    start = time.perf_counter()
    results = run(args)
    write(args, results, time.perf_counter() - start)


if __name__ == "__main__":
    main()
