"""The dense-vs-plain report: per-model statistics over seeds, the paired comparison, curves, a markdown page.

Everything here is computed from the grid's folder (``plan.json``, each run's ``result.json`` and
``trainer_state.json``), so the report can be rebuilt at any time without training again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from matplotlib.figure import Figure

from densessm.files import atomic_output_file, atomic_write_text
from densessm.models import FAMILIES, Family
from densessm_lab.experiments.dense_vs_plain import model_names


def dense_label(family: Family) -> str:
    """The dense model's name in the report: its class's (``DenseMamba2ForCausalLM`` -> DenseMamba2), the name
    the documentation uses."""
    return family.causal_lm.__name__.removesuffix("ForCausalLM")


LABELS = {
    name: label
    for family in FAMILIES
    for name, label in zip(model_names(family), (dense_label(family), f"{family.title} (m = 0)"), strict=True)
}
"""Model name in a grid -> its name in the report."""
REGISTERED = {family.name: family for family in FAMILIES}


def grid_families(plan: dict) -> list[Family]:
    """The families of a grid, in registry order: those whose models its plan holds."""
    return [family for family in FAMILIES if all(name in plan["models"] for name in model_names(family))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _curve(run_dir: Path, tokens_per_step: int) -> dict[str, list]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    val = [(e["step"] * tokens_per_step, e["eval_loss"]) for e in history if "eval_loss" in e]
    train = [(e["step"] * tokens_per_step, e["loss"]) for e in history if "loss" in e]
    grad_norm = [e["grad_norm"] for e in history if "grad_norm" in e]
    return {"validation": val, "train": train, "max_grad_norm": max(grad_norm, default=math.nan)}


def collect(out: Path, seeds: tuple[int, ...] | list[int], jobs: int = 1) -> dict:
    """Every finished run of the grid in ``out`` (the given seeds, run ``jobs`` at a time), with per-model and
    per-family statistics."""
    plan = json.loads((out / "plan.json").read_text())
    scale = plan["scale"]
    tokens_per_step = scale["block_size"] * scale["batch_size"]
    models: dict[str, dict] = {}
    families = grid_families(plan)
    for family in families:
        for name in model_names(family):
            runs = []
            for seed in seeds:
                run_dir = out / "runs" / name / f"seed{seed}"
                if not (run_dir / "result.json").is_file():
                    continue
                result = json.loads((run_dir / "result.json").read_text())
                result["curve"] = _curve(run_dir, tokens_per_step)
                result["test_loss"] = result["test"]["nll"] / result["test"]["tokens"]
                runs.append(result)
            if not runs:
                continue
            entry = dict(plan["models"][name])
            entry["runs"] = runs
            for key, get in {
                "test_perplexity": lambda r: r["test"]["perplexity"],
                "test_loss": lambda r: r["test_loss"],
                "test_bits_per_byte": lambda r: r["test"]["bits_per_byte"],
                "validation_perplexity": lambda r: r["validation"]["perplexity"],
                "train_minutes": lambda r: r["train_seconds"] / 60,
                "train_tokens_per_second": lambda r: r["train"]["train_tokens_per_second"],
                "final_train_loss": lambda r: r["curve"]["train"][-1][1],
                "max_grad_norm": lambda r: r["curve"]["max_grad_norm"],
            }.items():
                entry[key] = _mean_std([get(r) for r in runs])
            entry["tasks"] = _task_means(runs)
            models[name] = entry
    comparisons = {}
    for family in families:
        dense, plain = model_names(family)
        if dense in models and plain in models:
            comparisons[family.name] = compare(models[dense], models[plain])
    sizing = out / "throughput.json"
    return {
        "plan": plan,
        "throughput": json.loads(sizing.read_text()) if sizing.is_file() else None,
        "seeds": list(seeds),
        "jobs": jobs,
        "models": models,
        "comparisons": comparisons,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": platform.python_version(),
            "torch": version("torch"),
            "transformers": version("transformers"),
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _task_means(runs: list[dict]) -> dict[str, dict]:
    """Mean accuracy (``acc``, and ``acc_norm`` where the task has it) per task over the runs that have tasks."""
    with_tasks = [r["tasks"] for r in runs if "tasks" in r]
    if not with_tasks:
        return {}
    means = {}
    for task, first in with_tasks[0].items():
        row = {"examples": first["examples"], "random_guess": first["random_guess"]}
        for metric in ("acc", "acc_norm"):
            values = [t[task]["metrics"][metric]["value"] for t in with_tasks if metric in t[task]["metrics"]]
            if values:
                row[metric] = _mean_std(values)
        means[task] = row
    return means


def compare(dense: dict, plain: dict) -> dict:
    """Plain minus dense test perplexity and loss, against two yardsticks of noise.

    ``sigma_diff`` is the standard error of the difference of the two means (``sqrt(s_d²/n_d + s_p²/n_p)``);
    ``sigma_seed`` the larger of the two seed-to-seed standard deviations. Seed ``k`` of both models saw the same
    batches, so the per-seed (paired) differences are listed too.
    """
    out = {"runs": [len(dense["runs"]), len(plain["runs"])]}
    measurable = min(out["runs"]) >= 2  # one run per model says nothing about the noise
    for key in ("test_perplexity", "test_loss"):
        (d_mean, d_std), (p_mean, p_std) = dense[key], plain[key]
        diff = p_mean - d_mean
        sigma_diff = math.sqrt(d_std**2 / len(dense["runs"]) + p_std**2 / len(plain["runs"]))
        sigma_seed = max(d_std, p_std)
        out[key] = {
            "difference": diff,
            "relative": diff / p_mean,
            "sigma_diff": sigma_diff if measurable else None,
            "sigma_seed": sigma_seed if measurable else None,
            "z": diff / sigma_diff if measurable and sigma_diff > 0 else None,
            "beyond_2_sigma_diff": abs(diff) > 2 * sigma_diff if measurable else None,
            "beyond_2_sigma_seed": abs(diff) > 2 * sigma_seed if measurable else None,
        }
    pairs = {r["seed"]: r for r in plain["runs"]}
    out["paired_test_perplexity"] = {
        r["seed"]: pairs[r["seed"]]["test"]["perplexity"] - r["test"]["perplexity"]
        for r in dense["runs"]
        if r["seed"] in pairs
    }
    wins = sum(d > 0 for d in out["paired_test_perplexity"].values())
    out["dense_better_seeds"] = [wins, len(out["paired_test_perplexity"])]
    return out


def plot_curves(results: dict, path: Path) -> Path:
    """Validation loss against training tokens, one panel per family: the seed mean, and the seeds' range."""
    families = grid_families(results["plan"])
    fig = Figure(figsize=(5.5 * len(families), 4), layout="constrained")
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, family in zip(axes, families, strict=True):
        names = model_names(family)
        for name, color in zip(names, ("tab:red", "tab:blue"), strict=True):
            if name not in results["models"]:
                continue
            curves = [r["curve"]["validation"] for r in results["models"][name]["runs"]]
            length = min(len(c) for c in curves)
            x = [p[0] / 1e6 for p in curves[0][:length]]
            ys = [[c[i][1] for c in curves] for i in range(length)]
            ax.plot(
                x,
                [statistics.fmean(y) for y in ys],
                "o-",
                ms=3,
                color=color,
                label=f"{LABELS[name]} ({len(curves)} seeds)",
            )
            ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2)
        ax.set_title(f"{family.title} family")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        # The first evaluations are far above the rest: show the part where the models differ.
        finals = [
            c[-1][1]
            for n in names
            if n in results["models"]
            for c in (r["curve"]["validation"] for r in results["models"][n]["runs"])
        ]
        if finals:
            ax.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    fig.suptitle("Validation loss during training (line: mean over seeds; band: min to max)")
    fig.savefig(path, dpi=110, format="png")
    return path


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def _pm(value: tuple[float, float], digits: int = 2) -> str:
    return f"{value[0]:,.{digits}f} ± {value[1]:,.{digits}f}"


def render_markdown(results: dict, command: str, png_name: str) -> str:
    plan, scale = results["plan"], results["plan"]["scale"]
    machine = results["machine"]
    total_minutes = sum(r["train_seconds"] for m in results["models"].values() for r in m["runs"]) / 60
    pairs = ", ".join(f"{dense_label(f)} vs {f.title}" for f in grid_families(plan))
    lines = [
        f"# Does the dense hidden connection help? {pairs}",
        "",
        "A controlled re-run of the paper's central claim (He et al., 2024, arXiv 2403.00818) at CPU scale: each "
        "dense model against its plain twin (`m = 0`) widened to the same non-embedding parameter count, with "
        "the same tokenizer, tokens, schedule and data order; several seeds each. Numbers are from real runs "
        f"made on {results['date']}; nothing is copied from the paper.",
        "",
        "## Setup",
        "",
        f"- Corpus: `{plan['corpus']}` from `scripts/build_experiment_corpus.py` (registry packages only; sources "
        "and licences in [the data card](../data-card.md)), split by document.",
        f"- Tokenizer: byte-level BPE, {plan['tokenizer']['vocab_size']:,d} tokens, trained on the training split.",
        f"- Training: {scale['max_steps']:,d} steps of {scale['batch_size']} x {scale['block_size']} tokens = "
        f"**{plan['tokens_per_run']:,d} tokens per run**; AdamW (β2 {scale['adam_beta2']}, weight decay "
        f"{scale['weight_decay']}), peak learning rate {scale['learning_rate']}, cosine decay after "
        f"{scale['warmup_ratio']:.0%} warm-up, gradient clipping {scale['max_grad_norm']}, fp32. Seeds "
        f"{', '.join(map(str, results['seeds']))}: the seed sets the initial weights and the batch order, so "
        "seed k of every model sees the same batches.",
        f"- Dense models: m = {scale['dense_block_layers']} (each layer receives the hidden states of the "
        f"{scale['dense_block_layers']} layers "
        "below). Baselines: the same architecture with m = 0, widened to match (within 2%).",
        f"- Evaluation: perplexity with `densessm eval ppl --method carried` (every token of a document scored once, "
        f"the recurrent state carried across windows of {scale['block_size']}) on fixed random subsets of the "
        f"held-out splits: validation {plan['held_out']['validation']['documents']} documents / "
        f"{plan['held_out']['validation']['bytes']:,d} bytes, test {plan['held_out']['test']['documents']} "
        f"documents / {plan['held_out']['test']['bytes']:,d} bytes. The curves score "
        f"{scale['eval_blocks']} validation blocks every {scale['eval_steps']} steps.",
        f"- Machine: {machine['cpus']} CPU cores ({machine['processor']}), {machine['platform']}, torch "
        f"{machine['torch']}, transformers {machine['transformers']}. Runs went {results['jobs']} at a time with "
        f"{max(1, machine['cpus'] // results['jobs'])} intra-op thread(s) each, on a machine also used for other "
        "work: wall times and tokens/s are indicative only; the comparison rests on perplexity, which does not "
        f"depend on speed. Training time of all runs together: {total_minutes:.0f} minutes.",
    ]
    if plan.get("left_out"):
        lines.append(f"- Not in this grid: {'; '.join(plan['left_out'])}.")
    if results.get("throughput"):
        sizing = results["throughput"]
        rates = ", ".join(f"{LABELS[n]} {r:,.0f}" for n, r in sizing["tokens_per_second"].items())
        lines.append(
            f"- Sizing: measured first with `--plan` ({sizing['jobs']} runs at a time): {rates} training tokens/s, "
            f"an estimated {sizing['estimated_hours']:.1f} h of training for the grid; the shapes and the token "
            "budget were chosen from that."
        )
    lines += [
        "",
        "## Results",
        "",
        "| model | m | hidden x layers | non-embedding parameters | all parameters | test perplexity | "
        "test bits/byte | validation perplexity | final train loss | largest gradient norm | training min/run | "
        "tokens/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        lines.append(
            f"| {LABELS[name]} | {m['dense_block_layers']} | {m['hidden_size']} x {m['num_hidden_layers']} | "
            f"{m['non_embedding_parameters']:,d} | {m['parameters']:,d} | {_pm(m['test_perplexity'])} | "
            f"{_pm(m['test_bits_per_byte'], 4)} | {_pm(m['validation_perplexity'])} | "
            f"{_pm(m['final_train_loss'], 3)} | {_pm(m['max_grad_norm'], 0)} | {_pm(m['train_minutes'], 1)} | "
            f"{_pm(m['train_tokens_per_second'], 0)} |"
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds (sample standard deviation). The largest gradient norm is the largest "
        "logged before clipping (logged every few steps); spikes there mark unstable early training.",
        "",
    ]
    lines += ["## Is the difference beyond the noise?", ""]
    lines += [
        "| family | runs (dense, plain) | plain − dense test perplexity | relative | σ_diff | z = Δ/σ_diff | "
        "Δ > 2σ_diff | Δ > 2 x seed σ | per seed (plain − dense) |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for family, c in results["comparisons"].items():
        p = c["test_perplexity"]
        seeds = ", ".join(f"{s}: {d:+.2f}" for s, d in c["paired_test_perplexity"].items())
        lines.append(
            f"| {REGISTERED[family].title} | {c['runs'][0]}, {c['runs'][1]} | {p['difference']:+.2f} | "
            f"{p['relative']:+.1%} | "
            f"{_maybe(p['sigma_diff'], '.2f')} | {_maybe(p['z'], '+.1f')} | {_yes(p['beyond_2_sigma_diff'])} | "
            f"{_yes(p['beyond_2_sigma_seed'])} | {seeds} |"
        )
    lines += [
        "",
        "σ_diff is the standard error of the difference of the two means, sqrt(s_dense²/n + s_plain²/n); the "
        "stricter column compares the difference with twice the larger seed-to-seed standard deviation.",
        "",
    ]
    for family, c in results["comparisons"].items():
        dense, plain = model_names(REGISTERED[family])
        p = c["test_perplexity"]
        better = "lower" if p["difference"] > 0 else "higher"
        wins, pairs = c["dense_better_seeds"]
        head = (
            f"- **{LABELS[dense]} vs {LABELS[plain]}**: the dense model's mean test perplexity is "
            f"{abs(p['difference']):.2f} ({abs(p['relative']):.1%}) {better} than the baseline's (dense better on "
            f"{wins} of {pairs} seeds); "
        )
        if p["z"] is None:
            lines.append(head + "with fewer than 2 runs per model there is no measure of the noise yet.")
            continue
        lines.append(
            head + f"the difference {'exceeds' if p['beyond_2_sigma_diff'] else 'does not exceed'} 2 standard "
            f"errors (z = {p['z']:+.1f}), and {'exceeds' if p['beyond_2_sigma_seed'] else 'does not exceed'} twice "
            f"the seed-to-seed standard deviation ({p['sigma_seed']:.2f})."
        )
    lines += ["", f"![validation loss curves]({png_name})", ""]
    task_rows = [(n, t, row) for n, m in results["models"].items() for t, row in m["tasks"].items()]
    if task_rows:
        tasks = sorted({t for _, t, _ in task_rows})
        limit = results["plan"]["scale"]["tasks_limit"]
        lines += [
            "## Zero-shot tasks",
            "",
            f"`densessm eval tasks --limit {limit}` (lm-evaluation-harness, offline task data), accuracy averaged "
            "over seeds (acc_norm where the task reports it). **Models this small sit at or near chance level** "
            f"(last row); with at most {limit} examples per task the standard error of one accuracy is about "
            f"{math.sqrt(0.25 / limit):.0%}, so these rows cannot separate the models.",
            "",
            "| model | " + " | ".join(tasks) + " | average |",
            "|---|" + "---:|" * (len(tasks) + 1),
        ]
        for name, m in results["models"].items():
            if not m["tasks"]:
                continue
            values = [m["tasks"][t].get("acc_norm", m["tasks"][t].get("acc"))[0] for t in tasks]
            lines.append(
                f"| {LABELS[name]} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.fmean(values):.3f} |"
            )
        first = next(m for m in results["models"].values() if m["tasks"])
        guesses = [first["tasks"][t]["random_guess"] for t in tasks]
        lines.append(
            "| random guess | " + " | ".join(f"{g:.3f}" for g in guesses) + f" | {statistics.fmean(guesses):.3f} |"
        )
        lines.append("")
    lines += [
        "## Reproduce",
        "",
        "On a fresh clone (after `bash scripts/setup.sh`), one command builds the corpus from the registries and "
        "runs this grid:",
        "",
        "```bash",
        "bash scripts/dense_vs_plain.sh",
        "```",
        "",
        "which runs",
        "",
        "```bash",
        "python scripts/build_experiment_corpus.py --out outputs/corpus",
        command,
        "```",
        "",
        "`--scale gpu` runs the larger grid meant for one GPU; `--plan` measures the training speed of each model "
        "and estimates the grid's time before committing to it. The grid is restartable: finished runs are kept "
        "and an interrupted run resumes from its last checkpoint. Per-run metrics, TensorBoard logs and weights "
        "stay under the output directory; this page's numbers are also in the JSON file next to it.",
        "",
    ]
    return "\n".join(lines)


def write_report(results: dict, path: Path, command: str) -> tuple[Path, Path, Path]:
    """Write the markdown page, its JSON data and the curves PNG next to each other (each atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_name(path.stem + "-curves.png")
    with atomic_output_file(png, overwrite=True) as tmp:
        plot_curves(results, tmp)
    data = path.with_suffix(".json")
    slim = json.loads(json.dumps(results))
    for model in slim["models"].values():
        for run in model["runs"]:
            run.pop("tasks", None)
    atomic_write_text(data, json.dumps(slim | {"command": command}, indent=1) + "\n", overwrite=True)
    atomic_write_text(path, render_markdown(results, command, png.name), overwrite=True)
    return path, data, png
