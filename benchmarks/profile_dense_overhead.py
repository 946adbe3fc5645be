"""Where a dense model's decode step spends the time its plain twin does not: operator self-times per step.

Each dense preset and its plain twin, prepacked and with the fused steps as ``densessm generate`` runs them,
decode from a synthetic ``--context``-token state at batch ``--batch``; one step of each alternates (the order
rotates) under ``torch.profiler``, and each operator's self-time (per input shape) is the median over the
rounds, so that a busy moment of the shared machine spoils a round, not the table. The table lists the operators
whose time differs most between the two: the dense layers' extra products, the fused kernels' extra work, and
the rest. The step totals are profiled times (the profiler adds a little to each operator call);
``benchmarks/bench_fused_step.py --overhead`` measures the overhead itself.

    python benchmarks/profile_dense_overhead.py --out docs/benchmarks/dense_overhead_profile
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from densessm.files import atomic_write_text
from densessm.inference import prepack_for_cpu
from densessm.inference.fused_step import fuse_decode_steps
from densessm_lab.bench.models import build, synthetic_cache

PAIRS = {"dense_retnet_350m": "retnet_350m", "dense_mamba_360m": "mamba_360m"}


def _step_profile(model, cache, token) -> tuple[collections.Counter, collections.Counter]:
    """Self-time in microseconds and calls of one decode step, per operator and input shapes."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, torch.no_grad():
        model(token, cache=cache, use_cache=True)
    times, calls = collections.Counter(), collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        op = f"{event.key} {[s for s in event.input_shapes if s]}"
        times[op] += event.self_cpu_time_total
        calls[op] += event.count
    return times, calls


def _medians(counters: list[collections.Counter]) -> dict[str, float]:
    ops = set().union(*counters)
    return {op: statistics.median(c.get(op, 0) for c in counters) for op in ops}


def profile_pair(dense: str, plain: str, batch: int, context: int, rounds: int) -> dict:
    models = {}
    for name in (dense, plain):
        model = prepack_for_cpu(build(name, torch.float32))
        fuse_decode_steps(model)
        models[name] = (model, synthetic_cache(model, batch, context, 2 * rounds + 4))
    token = torch.randint(3, 1000, (batch, 1))
    rounds_seen: dict[str, list[tuple[collections.Counter, collections.Counter]]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        for name in (dense, plain) if round_ % 2 == 0 else (plain, dense):
            profiled = _step_profile(*models[name], token)
            if round_:  # the first round warms up
                rounds_seen[name].append(profiled)
    # medians over the rounds, per operator: a busy moment of the shared machine hits a round, not the result
    times = {name: _medians([t for t, _ in seen]) for name, seen in rounds_seen.items()}
    calls = {name: _medians([c for _, c in seen]) for name, seen in rounds_seen.items()}
    config = models[dense][0].config
    return {
        "dense": dense,
        "plain": plain,
        "dense_layers": config.num_hidden_layers - 1 if config.dense_block_layers else 0,
        "step_us": {name: statistics.median(sum(t.values()) for t, _ in seen) for name, seen in rounds_seen.items()},
        "ops_us": times,
        "calls": calls,
    }


def render(results: list[dict], args, started: str) -> str:
    lines = [
        f"# Where the dense decode overhead goes — {started}",
        "",
        f"`python benchmarks/profile_dense_overhead.py --batch {args.batch} --context {args.context} "
        f"--rounds {args.rounds} --rows {args.rows}` — torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        "fp32, prepacked "
        "weights and fused steps: profiled self-times per step, medians over the alternating rounds.",
        "",
    ]
    for r in results:
        dense, plain = r["step_us"][r["dense"]], r["step_us"][r["plain"]]
        lines += [
            f"## {r['dense']} over {r['plain']}",
            "",
            f"Profiled step (median): {dense / 1e3:.1f} ms against {plain / 1e3:.1f} ms ({dense / plain - 1:+.1%}); "
            f"{r['dense_layers']} dense layers.",
            "",
            "An operator whose shapes differ between the two models (the fused projection is wider in a dense "
            "layer) is listed once per shape: compare the time per call.",
            "",
            "| operator [input shapes] | calls per step (dense / plain) | us per call (dense / plain) "
            "| difference (us per step) |",
            "|---|---:|---:|---:|",
        ]
        ops_d, ops_p = r["ops_us"][r["dense"]], r["ops_us"][r["plain"]]
        calls_d, calls_p = r["calls"][r["dense"]], r["calls"][r["plain"]]
        names = sorted(set(ops_d) | set(ops_p), key=lambda op: -abs(ops_d.get(op, 0) - ops_p.get(op, 0)))
        for op in names[: args.rows]:
            d, p = ops_d.get(op, 0.0), ops_p.get(op, 0.0)
            cd, cp = calls_d.get(op, 0.0), calls_p.get(op, 0.0)
            per_call = " / ".join(f"{t / c:,.0f}" if c else "–" for t, c in ((d, cd), (p, cp)))
            label = op.replace("|", "/")[:110]
            lines.append(f"| `{label}` | {cd:g} / {cp:g} | {per_call} | {d - p:+,.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per pair")
    parser.add_argument("--out", default="dense_overhead_profile", help="writes OUT.md")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = [profile_pair(p, PAIRS[p], args.batch, args.context, args.rounds) for p in args.presets]
    path = atomic_write_text(f"{args.out}.md", render(results, args, started) + "\n", overwrite=args.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
