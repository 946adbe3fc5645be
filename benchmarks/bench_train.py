"""Training throughput (tokens/s) of DenseRetNet against plain RetNet (m = 0), through ``densessm train``.

Each measurement is a real ``densessm train`` run (HF Trainer, bundled corpus and tokenizer, AdamW, the
NaN guard) timed from the end of its warm-up steps to its last step. The dense and plain variants of a size
alternate in rounds (dense, plain, dense, plain, ...), so on a shared CPU both see the same load; the report
gives each round's ratio, their median, and the ratio of each variant's best round (the least disturbed).
Writes ``docs/benchmarks/train_throughput.{md,json,png}``.

    python benchmarks/bench_train.py                # the full run (about 10 minutes on 2 cores)
    python benchmarks/bench_train.py --quick        # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from densessm.presets import load_preset
from densessm.train import main as train
from densessm_lab.bench.results import suffixed

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "train_throughput"
SIZES = {
    # name: (dense preset, plain preset, config overrides, block size, batch, steps)
    "tiny": ("dense_retnet_tiny", "retnet_tiny", "", 128, 16, 40),
    "30m": (
        "dense_retnet_350m",
        "retnet_350m",
        "hidden_size=640,query_key_dim=320,num_hidden_layers=8",
        256,
        4,
        6,
    ),
}
WARMUP_STEPS = 2


class StepClock(TrainerCallback):
    """Wall time of each optimizer step's end, to time the steps after warm-up only."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def measure(preset: str, overrides: str, block: int, batch: int, steps: int, workdir: Path) -> dict:
    clock = StepClock()
    argv = [
        "--model_name_or_path", preset,
        "--block_size", str(block),
        "--per_device_train_batch_size", str(batch),
        "--max_steps", str(steps + WARMUP_STEPS),
        "--learning_rate", "1e-3",
        "--output_dir", str(workdir / preset),
        "--overwrite_output_dir",
        "--data_cache_dir", str(workdir / "cache"),
        "--validation_split_percentage", "0",
        "--save_strategy", "no",
        "--report_to", "none",
        "--logging_steps", str(steps + WARMUP_STEPS),
        "--sample_max_new_tokens", "0",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    if overrides:
        argv += ["--config_overrides", overrides]
    summary = train(argv, callbacks=[clock])
    seconds = clock.times[-1] - clock.times[WARMUP_STEPS - 1]
    return {
        "preset": preset,
        "parameters": summary["parameters"],
        "tokens_per_second": steps * block * batch / seconds,
        "seconds": seconds,
        "final_loss": summary["train"]["train_loss"],
    }


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, len(results))
    for ax, (size, res) in zip(axes, results.items(), strict=True):
        dense = [r["dense"]["tokens_per_second"] for r in res["rounds"]]
        plain = [r["plain"]["tokens_per_second"] for r in res["rounds"]]
        rounds = range(1, len(dense) + 1)
        ax.plot(rounds, dense, "o-", label=f"DenseRetNet (m = {res['m']})")
        ax.plot(rounds, plain, "s--", label="RetNet (m = 0)")
        ax.set_title(
            f"{size} ({res['dense_parameters'] / 1e6:.2f}M parameters)\nmedian dense / plain {res['median_ratio']:.3f}"
        )
        ax.set_xticks(list(rounds))
        ax.set_xlabel("round (dense and plain side by side)")
        ax.set_ylabel("training tokens / s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)


def write_report(results: dict, meta: dict, path: Path) -> None:
    lines = [
        "# Training throughput: DenseRetNet vs RetNet (m = 0) on CPU",
        "",
        f"Made by `{meta['command']}` on {meta['date']}: {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} intra-op thread(s). **The CPU was shared with other jobs** (load average "
        f"{meta['load_before']} before, {meta['load_after']} after), so absolute numbers are noisy and low; the "
        "dense and plain runs of a size alternate round by round, and the ratios compare runs made side by side. "
        "(On these shared cores two intra-op threads made the tiny model's steps over 50x slower than one: "
        "oversubscribed OpenMP threads wait on each other.)",
        "",
        "Each number is a real `densessm train` run (HF Trainer, AdamW, bundled corpus and tokenizer, fp32) timed "
        f"over its steps after {WARMUP_STEPS} warm-up steps.",
        "",
        "| size | model | parameters | block x batch | median tokens/s | per round |",
        "|---|---|---:|---|---:|---|",
    ]
    for size, res in results.items():
        for key, name in (("dense", f"DenseRetNet (m = {res['m']})"), ("plain", "RetNet (m = 0)")):
            per_round = [r[key]["tokens_per_second"] for r in res["rounds"]]
            lines.append(
                f"| {size} | {name} | {res[f'{key}_parameters']:,d} | {res['block']} x {res['batch']} | "
                f"{statistics.median(per_round):,.0f} | {', '.join(f'{v:,.0f}' for v in per_round)} |"
            )
    lines += [
        "",
        "| size | dense / plain tokens/s, per round | median | best / best | dense extra time per token (median) |",
        "|---|---|---:|---:|---:|",
    ]
    for size, res in results.items():
        ratios = ", ".join(f"{r['ratio']:.3f}" for r in res["rounds"])
        extra = (1 / res["median_ratio"] - 1) * 100
        lines.append(f"| {size} | {ratios} | {res['median_ratio']:.3f} | {res['best_ratio']:.3f} | {extra:+.1f}% |")
    lines += ["", f"![throughput per round]({path.stem}.png)", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round of a few steps (checks the script)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_train")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results = {}
    for size, (dense, plain, overrides, block, batch, steps) in SIZES.items():
        steps = 2 if args.quick else steps
        res = {"block": block, "batch": batch, "steps": steps, "rounds": []}
        for _ in range(rounds):
            one = {
                key: measure(p, overrides, block, batch, steps, args.workdir)
                for key, p in (("dense", dense), ("plain", plain))
            }
            one["ratio"] = one["dense"]["tokens_per_second"] / one["plain"]["tokens_per_second"]
            res["rounds"].append(one)
            dense_speed, plain_speed = (one[k]["tokens_per_second"] for k in ("dense", "plain"))
            print(f"{size}: dense {dense_speed:,.0f}, plain {plain_speed:,.0f} tokens/s, ratio {one['ratio']:.3f}")
        res["m"] = load_preset(dense).dense_block_layers
        res["dense_parameters"] = res["rounds"][0]["dense"]["parameters"]
        res["plain_parameters"] = res["rounds"][0]["plain"]["parameters"]
        res["median_ratio"] = statistics.median(r["ratio"] for r in res["rounds"])
        best = {k: max(r[k]["tokens_per_second"] for r in res["rounds"]) for k in ("dense", "plain")}
        res["best_ratio"] = best["dense"] / best["plain"]
        results[size] = res

    meta = {
        "command": "python benchmarks/bench_train.py"
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    suffixed(args.out, ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, suffixed(args.out, ".png"))
    write_report(results, meta, suffixed(args.out, ".md"))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
