"""int8 weights against float32: decode step speed at the real model sizes, and the perplexity they cost.

Speed: each preset is built once (random weights: a step's cost does not depend on their values) and copied;
one copy decodes as ``densessm generate`` runs it (fp32, prepacked, the fused decode step), the other as
``densessm generate --quantize int8`` does (int8, the layers left in float prepacked, the fused decode step):
both through :func:`~densessm.inference.decoding.prepare_for_decoding`, the commands' own preparation. Single
decode steps of the two alternate in one process (which goes first alternates too), so the drift of a shared
machine hits both alike; the ratio reported is the median of the per-round ratios, at each batch size and
intra-op thread count.

Perplexity: for each trained model directory, the trainer's validation split of the bundled corpus (the
same blocks ``densessm train`` evaluated on, rebuilt with the model's tokenizer), every block scored whole,
in float32 and with int8 weights.

    python benchmarks/bench_quantize.py --ppl-model outputs/retnet --ppl-model outputs/mamba \\
        --out docs/benchmarks/quantize
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from densessm.data import DataArguments, load_blocks
from densessm.evaluation.perplexity import score_carried
from densessm.inference import Int8Linear, PrepackedLinear, quantize_int8
from densessm.inference.decoding import prepare_for_decoding
from densessm.inference.fused_step import FusedStepMambaMixer, FusedStepRetention
from densessm.loading import load_causal_lm
from densessm_lab.bench.measure import WARMUP_ROUNDS, alternate, copy_bandwidth, decoder
from densessm_lab.bench.models import build
from densessm_lab.bench.results import refuse_existing, write_results

PRESETS = ("dense_retnet_350m", "dense_mamba_360m")
FUSED_STEP_MIXERS = (FusedStepMambaMixer, FusedStepRetention)
PRODUCT = (1536, 7776)  # DenseRetNet-350M's fused projection: q, k, v and its gate, the dense gates' first layers


def products(batches: list[int], threads: list[int], rounds: int) -> dict:
    """One decode-sized product in each form, single calls alternating round by round: fp32 as it comes and
    prepacked, our int8 layer, and torchao's two int8 schemes run eagerly when torchao is installed (why
    torchao is not the path: it is fast only compiled)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(*PRODUCT, bias=False).eval()
    forms = {"fp32": linear, "fp32 prepacked": PrepackedLinear(linear), "int8 (ours)": Int8Linear(linear)}
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        torchao = None
    if torchao is not None:
        for label, config in (
            ("torchao int8 weight-only", Int8WeightOnlyConfig()),
            ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig()),
        ):
            forms[label] = copy.deepcopy(linear)
            quantize_(forms[label], config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    records = []
    for count in threads:
        torch.set_num_threads(count)
        for batch in batches:
            x = torch.randn(batch, PRODUCT[0])
            times = {label: [] for label in forms}
            with torch.inference_mode():
                for round_ in range(rounds + 2):
                    for label, form in forms.items():
                        start = time.perf_counter()
                        form(x)
                        if round_ >= 2:  # the first two rounds warm up
                            times[label].append(time.perf_counter() - start)
            records.append({"threads": count, "batch": batch, **{k: statistics.median(v) for k, v in times.items()}})
    return {"shape": list(PRODUCT), "torchao": getattr(torchao, "__version__", None), "records": records}


def speed(name: str, batches: list[int], threads: list[int], rounds: int, context: int) -> list[dict]:
    """Alternating fp32 / int8 decode steps of preset ``name``: one record per (threads, batch)."""
    fp32 = build(name, torch.float32)
    int8 = copy.deepcopy(fp32)
    for model, quantize in ((fp32, None), (int8, "int8")):
        prepare_for_decoding(model, quantize, prepack=True, compiled=False)
    fused = any(isinstance(m, FUSED_STEP_MIXERS) for m in fp32.modules())
    records = []
    for count in threads:
        torch.set_num_threads(count)
        for batch in batches:
            bandwidth = copy_bandwidth()
            steppers = [decoder(model, batch, context, WARMUP_ROUNDS + rounds)[1] for model in (fp32, int8)]
            alternate(steppers, WARMUP_ROUNDS)
            times = alternate(steppers, rounds)
            records.append(
                {
                    "model": name,
                    "threads": count,
                    "batch": batch,
                    "context": context,
                    "rounds": rounds,
                    "copy_gb_s": bandwidth,
                    "fp32_step_s": statistics.median(times[0]),
                    "int8_step_s": statistics.median(times[1]),
                    "speedup": statistics.median(a / b for a, b in zip(*times, strict=True)),
                    "fused_step": fused,
                }
            )
            print(
                f"{name} threads {count} batch {batch}: fp32 {records[-1]['fp32_step_s'] * 1e3:.1f} ms, "
                f"int8 {records[-1]['int8_step_s'] * 1e3:.1f} ms, {records[-1]['speedup']:.2f}x",
                file=sys.stderr,
            )
            del steppers
    del fp32, int8
    gc.collect()
    return records


def perplexity(model_dir: Path, data_cache_dir: Path, block_size: int, batch_size: int) -> dict:
    """Validation perplexity of the model in ``model_dir`` in float32, with int8 weights as ``--quantize int8``
    gives them, and with every linear layer in int8 (``min_weight=0``: the small layers too, such as the
    selective scan's step-size projections, which the default leaves in float only in small models)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, validation = load_blocks(DataArguments(data_cache_dir=str(data_cache_dir)), tokenizer, block_size, seed=0)
    blocks = [list(ids) for ids in validation["input_ids"]]
    fp32 = load_causal_lm(model_dir, dtype=torch.float32)
    models = {
        "fp32": fp32,
        "int8": quantize_int8(copy.deepcopy(fp32)),
        "int8_all": quantize_int8(copy.deepcopy(fp32), min_weight=0),
    }
    scores = {kind: score_carried(model, blocks, block_size, batch_size) for kind, model in models.items()}

    def in_int8(model) -> int:
        return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int8Linear))

    trained = json.loads((model_dir / "run_arguments.json").read_text())
    return {
        "model": str(model_dir),
        "trained_as": {key: trained.get(key) for key in ("model_name_or_path", "config_overrides", "max_steps")},
        "trainer_validation_perplexity": json.loads((model_dir / "eval_results.json").read_text())["eval_perplexity"],
        "model_type": fp32.config.model_type,
        "parameters": sum(p.numel() for p in fp32.parameters()),
        "int8_weights": in_int8(models["int8"]),
        "int8_all_weights": in_int8(models["int8_all"]),
        "blocks": len(blocks),
        "block_size": block_size,
        "tokens": scores["fp32"].tokens,
        "fp32_perplexity": scores["fp32"].perplexity,
        "int8_perplexity": scores["int8"].perplexity,
        "change": scores["int8"].perplexity / scores["fp32"].perplexity - 1,
        "int8_all_perplexity": scores["int8_all"].perplexity,
        "change_all": scores["int8_all"].perplexity / scores["fp32"].perplexity - 1,
    }


def render(results: dict, png: str) -> str:
    lines = [
        "# int8 weights for CPU inference",
        "",
        "`densessm generate --quantize int8` (also `eval ppl`, `bench generate`; `densessm.inference.quantize_int8`): "
        "the linear layers of at least 32k weights, after the projections that share an input are fused, hold int8 "
        "weights per output channel and quantize their input at each call (PyTorch's dynamically quantized linear; "
        "why not torchao: the last table). The embedding stays float; the small layers stay float and prepacked.",
        "",
        f"`{results['command']}` — {results['date']}, {results['machine']}",
        "",
        "Decode step as the commands prepare it (`prepare_for_decoding`): float32 (prepacked) against int8 "
        "weights (the rest prepacked), both with the fused decode step where it builds; alternating single steps; "
        "the speed-up is the median of the per-round ratios.",
        "",
        "| model | threads | batch | fused step | copy GB/s | fp32 step (ms) | int8 step (ms) | speed-up |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['threads']} | {r['batch']} | {'yes' if r.get('fused_step') else 'no'} | "
        f"{r['copy_gb_s']:.0f} | {r['fp32_step_s'] * 1e3:.1f} | {r['int8_step_s'] * 1e3:.1f} | {r['speedup']:.2f}× |"
        for r in results["speed"]
    ]
    fewest = {(r["model"], r["batch"]): r for r in sorted(results["speed"], key=lambda r: -r["threads"])}
    slowed = [
        (r, r["fp32_step_s"] / fewest[r["model"], r["batch"]]["fp32_step_s"])
        for r in results["speed"]
        if r["fp32_step_s"] > 2 * fewest[r["model"], r["batch"]]["fp32_step_s"]
    ]
    if slowed:
        lines += [
            "",
            "Where a step with more threads took several times its time with fewer ("
            + ", ".join(f"{r['model']} batch {r['batch']} at {r['threads']} threads: {x:.0f}×" for r, x in slowed)
            + "), the cores were busy with other work and the threads waited on each other: those ratios measure "
            "the contention of that moment, not the kernels (on a shared machine, run with `OMP_NUM_THREADS=1`).",
        ]
    if results["perplexity"]:
        lines += [
            "",
            "Validation perplexity (the trainer's split of the bundled corpus, every block scored whole; the models "
            "were trained briefly with `densessm train`: "
            + "; ".join(
                f"`{p['model']}`: `{p['trained_as']['model_name_or_path']}` with "
                f"`{p['trained_as']['config_overrides']}`, {p['trained_as']['max_steps']} steps, its trainer's "
                f"validation perplexity {p['trainer_validation_perplexity']:.3f}"
                for p in results["perplexity"]
            )
            + "):",
            "",
            "| model | parameters | blocks × tokens | fp32 | int8 (default) | change | every linear int8 | change |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| `{p['model']}` ({p['model_type']}) | {p['parameters']:,d} | {p['blocks']} × {p['block_size']} | "
            f"{p['fp32_perplexity']:.3f} | {p['int8_perplexity']:.3f} ({p['int8_weights']:,d} weights) | "
            f"{p['change']:+.2%} | {p['int8_all_perplexity']:.3f} ({p['int8_all_weights']:,d} weights) | "
            f"{p['change_all']:+.2%} |"
            for p in results["perplexity"]
        ]
    product = results.get("products")
    if product:
        forms = [k for k in product["records"][0] if k not in ("threads", "batch")]
        installed = f"torchao {product['torchao']}" if product["torchao"] else "torchao not installed"
        lines += [
            "",
            f"One product of {product['shape'][0]} → {product['shape'][1]} (DenseRetNet-350M's fused projection), "
            f"median ms per call, calls alternating ({installed}; its schemes run eagerly, as `generate` runs):",
            "",
            "| threads | batch | " + " | ".join(forms) + " |",
            "|---:|---:|" + "---:|" * len(forms),
        ]
        lines += [
            f"| {r['threads']} | {r['batch']} | " + " | ".join(f"{r[k] * 1e3:.2f}" for k in forms) + " |"
            for r in product["records"]
        ]
    lines += ["", "Targets (decode ≥ 1.8× fp32 at batch 1; perplexity within 1% of fp32):", ""]
    for r in results["speed"]:
        if r["batch"] == 1:
            verdict = "met" if r["speedup"] >= 1.8 else "not met"
            lines.append(f"- {r['model']}, {r['threads']} thread(s), batch 1: {r['speedup']:.2f}× — {verdict}")
    for p in results["perplexity"]:
        verdict = "met" if abs(p["change"]) <= 0.01 else "not met"
        lines.append(f"- `{p['model']}` perplexity: {p['change']:+.2%} — {verdict}")
    lines += ["", f"![decode speed-up]({png})"]
    return "\n".join(lines) + "\n"


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    records = results["speed"]
    labels = [f"{r['model'].removeprefix('dense_')}\n{r['threads']} thr, b {r['batch']}" for r in records]
    ax.bar(range(len(records)), [r["speedup"] for r in records], color="tab:blue")
    ax.axhline(1, color="black", linewidth=0.5)
    ax.axhline(1.8, color="grey", linestyle="--", linewidth=1, label="target at batch 1: 1.8×")
    ax.set_xticks(range(len(records)), labels, fontsize=7)
    ax.set_ylabel("int8 speed-up over fp32 (median per-round ratio)")
    ax.set_title(f"int8 decode step, {results['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(PRESETS), help="presets timed (none: skip)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts timed")
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds per measurement")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--ppl-model", type=Path, action="append", default=[], help="a trained model directory")
    parser.add_argument("--data-cache-dir", type=Path, default=Path("outputs/data_cache"))
    parser.add_argument("--block-size", type=int, default=128, help="as the models were trained")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/quantize"))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    args = parser.parse_args()
    refuse_existing(args.out, args.overwrite)

    results = {
        "command": "python benchmarks/bench_quantize.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads by default, torch {torch.__version__}, "
        f"quantized engine {torch.backends.quantized.engine}",
        "perplexity": [
            perplexity(path, args.data_cache_dir, args.block_size, batch_size=16)
            for path in tqdm(args.ppl_model, desc="perplexity")
        ],
        "speed": [],
        "products": products(args.batches, args.threads, args.rounds),
    }
    for name in tqdm(args.models, desc="speed"):
        results["speed"] += speed(name, args.batches, args.threads, args.rounds, args.context)
    markdown = render(results, args.out.with_suffix(".png").name)
    write_results(args.out, results, markdown, plot(results), args.overwrite)
    print(markdown)


if __name__ == "__main__":
    main()
