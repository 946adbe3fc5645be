"""One training step of DenseRetNet-350M against the public reference's, alternated in one process.

The reference is the DenseSSM repository's ``modeling_dense_gau_retnet.py`` (its ``LlamaForCausalLM``), which
trains in its parallel (quadratic) form. It is not part of this package: pass the folder of a checkout that
holds it and its ``config.json`` (``git clone https://github.com/WailordHe/DenseSSM`` then
``--reference DenseSSM/modeling/dense_gau_retnet_350m``). Both models are built from that configuration with
random weights (speed does not depend on their values), fp32, in training mode (dropout on), batch 1; a step
is the forward of the LM loss and its backward. The models alternate step by step in every round, so each
per-round ratio compares steps taken moments apart on the same machine state.

A case ``LENGTH`` runs the full depth; ``LENGTH:LAYERS`` builds both models with ``LAYERS`` layers (for lengths
whose reference activations, three ``heads × L × L`` matrices per layer, would not fit in memory).

    python benchmarks/bench_train_reference.py --reference DenseSSM/modeling/dense_gau_retnet_350m \\
        --cases 2048 4096 8192:4 16384:4 32768:4 --out docs/benchmarks/train_reference
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.models.llama.configuration_llama import LlamaConfig

from densessm import DenseRetNetForCausalLM
from densessm.convert import map_reference_state, reference_config
from densessm.files import atomic_write_text
from densessm.ops.retention import auto_parallel_max_length, default_chunk_size
from densessm_lab.bench.results import refuse_existing, suffixed, write_results


def load_reference(folder: Path):
    """The reference's module, imported from ``folder``. It imports ``top_k_top_p_filtering``, which newer
    transformers releases dropped; its generation code uses it, training does not, so a placeholder stands in."""
    path = folder / "modeling_dense_gau_retnet.py"
    if not path.is_file() or not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} must hold modeling_dense_gau_retnet.py and config.json (see --help)")
    vars(sys.modules["transformers"]).setdefault("top_k_top_p_filtering", None)  # the module imports resolve
    spec = importlib.util.spec_from_file_location("modeling_dense_gau_retnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_case(text: str) -> tuple[int, int | None]:
    length, _, layers = text.partition(":")
    try:
        case = int(length), int(layers) if layers else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is LENGTH or LENGTH:LAYERS, got {text!r}") from None
    if case[0] < 2 or (case[1] is not None and case[1] < 1):
        raise argparse.ArgumentTypeError(f"a case needs a length >= 2 and layers >= 1, got {text!r}")
    return case


def build(module, raw: dict, layers: int | None) -> dict[str, torch.nn.Module]:
    """The models of one case: the reference and ours holding the same weights (through the converter's
    mapping), ``layers`` layers deep."""
    raw = dict(raw, num_hidden_layers=layers or raw["num_hidden_layers"])
    torch.manual_seed(0)
    reference = module.LlamaForCausalLM(LlamaConfig(**raw)).train()
    state = reference.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "config.json").write_text(json.dumps(raw))
        config = reference_config(folder, state)
    ours = DenseRetNetForCausalLM(config)
    ours.load_state_dict(map_reference_state(state, config)[0], strict=True)
    return {"reference (parallel)": reference, "densessm (auto)": ours.train()}


LOSS_ALONE = {"densessm (auto)": {"skip_logits": True}}
"""Ours is asked for its loss without logits, as ``densessm train``'s Trainer asks it (the reference has no such
switch and always makes every logit)."""


def train_step(name: str, model: torch.nn.Module, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=tokens, labels=tokens, **LOSS_ALONE.get(name, {})).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(module, raw: dict, length: int, layers: int | None, rounds: int, skip_reference: bool) -> dict:
    models = build(module, raw, layers)
    if skip_reference:
        del models["reference (parallel)"]
    tokens = torch.randint(3, raw["vocab_size"], (1, length))
    ours = models["densessm (auto)"]
    heads = ours.config.num_attention_heads
    key_dim, value_dim = ours.config.query_key_dim // heads, ours.config.value_dim // heads
    chunk = default_chunk_size(key_dim, value_dim)
    mode = "parallel" if length <= auto_parallel_max_length(chunk, key_dim, value_dim) else "chunkwise"
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        train_step(name, model, tokens)
    for _ in tqdm(range(rounds), desc=f"L={length}", leave=False):
        for name, model in models.items():
            times[name].append(train_step(name, model, tokens))
    record = {
        "length": length,
        "layers": ours.config.num_hidden_layers,
        "auto_mode": mode,
        "chunk_size": chunk,
        "seconds": times,
        "tokens_per_s": {name: length / statistics.median(values) for name, values in times.items()},
    }
    if not skip_reference:
        ratios = [r / o for r, o in zip(times["reference (parallel)"], times["densessm (auto)"], strict=True)]
        record["ratios"] = ratios
        record["speedup"] = statistics.median(ratios)
    return record


def render(results: dict, png: str) -> str:
    lines = [
        "# Training step: DenseRetNet-350M against the public reference",
        "",
        f"`{results['command']}` — {results['date']}, {results['machine']}",
        "",
        "One step = forward of the LM loss and its backward, fp32, batch 1, training mode; the reference in its "
        "parallel form, ours with the default `auto` mode (its choice and chunk size in the table) and its loss "
        "without logits (`skip_logits=True`, as `densessm train` asks it). Steps alternate within each round; the "
        "speed-up is the median of the per-round ratios (reference time / ours).",
        "",
        "| length | layers | auto picks (chunk) | reference s/step | densessm s/step | reference tok/s "
        "| densessm tok/s | per-round ratios | speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results["records"]:
        ref = r["seconds"].get("reference (parallel)")
        ours = r["seconds"]["densessm (auto)"]
        ref_s = f"{statistics.median(ref):.2f}" if ref else "not run"
        ref_tps = f"{r['tokens_per_s']['reference (parallel)']:,.0f}" if ref else "—"
        ratios = ", ".join(f"{x:.2f}" for x in r.get("ratios", [])) or "—"
        speedup = f"{r['speedup']:.2f}×" if "speedup" in r else "—"
        lines.append(
            f"| {r['length']:,} | {r['layers']} | {r['auto_mode']} ({r['chunk_size']}) | {ref_s} | "
            f"{statistics.median(ours):.2f} | {ref_tps} | {r['tokens_per_s']['densessm (auto)']:,.0f} | {ratios} | "
            f"{speedup} |"
        )
    if results.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in results["notes"])]
    lines += ["", "## Against the targets", "", *targets(results["records"]), "", f"![tokens per second]({png})", ""]
    return "\n".join(lines)


def targets(records: list[dict]) -> list[str]:
    """The training targets: at 2,048 tokens (full depth) >= 1.2x the reference's step, at 8,192 >= 3x, and
    tokens/s at 16k and 32k within 25% of the 2k figure at the same depth."""
    lines = []
    for length, goal in ((2048, 1.2), (8192, 3.0)):
        for r in (r for r in records if r["length"] == length and "speedup" in r):
            met = "met" if r["speedup"] >= goal else "not met"
            lines.append(
                f"- {length:,} tokens, {r['layers']} layers: {r['speedup']:.3f}× the reference (>= {goal}×: {met})"
            )
    for r in records:
        if r["length"] <= 2048:
            continue
        base = [b for b in records if b["length"] == 2048 and b["layers"] == r["layers"]]
        if r["length"] >= 16384 and base:
            share = r["tokens_per_s"]["densessm (auto)"] / base[0]["tokens_per_s"]["densessm (auto)"]
            met = "met" if share >= 0.75 else "not met"
            lines.append(
                f"- {r['length']:,} tokens, {r['layers']} layers: {share:.0%} of the 2,048-token tokens/s "
                f"(>= 75%: {met})"
            )
    return lines or ["- no case measured a target"]


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, marker in (("reference (parallel)", "o"), ("densessm (auto)", "s")):
        points = [
            (f"{r['length']}\n{r['layers']} layers", r["tokens_per_s"][name])
            for r in results["records"]
            if name in r["tokens_per_s"]
        ]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=name)
    ax.set_ylabel("training tokens / s (median)")
    ax.set_title(f"DenseRetNet-350M training step, fp32 CPU, {results['date']}")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, help="folder of modeling_dense_gau_retnet.py (required to measure)")
    parser.add_argument("--cases", type=parse_case, nargs="+", default=[parse_case("2048"), parse_case("8192:4")])
    parser.add_argument("--ours-only-from", type=int, default=None, help="run only ours from this length on")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/train_reference"))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    parser.add_argument("--render", action="store_true", help="only write OUT.md and OUT.png again from OUT.json")
    args = parser.parse_args()
    if args.render:  # e.g. after adding notes to OUT.json
        results = json.loads(suffixed(args.out, ".json").read_text())
        write_results(args.out, results, render(results, suffixed(args.out, ".png").name), plot(results), True)
        return
    refuse_existing(args.out, args.overwrite)
    if args.reference is None:
        parser.error("--reference is required to measure (see the description)")
    module = load_reference(args.reference)
    raw = json.loads((args.reference / "config.json").read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/bench_train_reference.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "records": [],
    }
    for length, layers in tqdm(args.cases, desc="cases"):
        skip = args.ours_only_from is not None and length >= args.ours_only_from
        results["records"].append(measure(module, raw, length, layers, args.rounds, skip))
        # what is measured so far, in case a later case is killed (the reference's L x L activations grow fast)
        atomic_write_text(suffixed(args.out, ".partial.json"), json.dumps(results, indent=2) + "\n", True)
    markdown = render(results, suffixed(args.out, ".png").name)
    write_results(args.out, results, markdown, plot(results), args.overwrite)
    suffixed(args.out, ".partial.json").unlink()
    print(markdown)


if __name__ == "__main__":
    main()
