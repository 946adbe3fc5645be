"""``densessm bench generate``: the parser and handler the main command line mounts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from densessm.argtypes import nonnegative_int, positive_int
from densessm.errors import Interrupted, UsageError
from densessm.files import check_link, check_path
from densessm.inference import QUANTIZE_CHOICES, int8_problem
from densessm.presets import list_presets
from densessm.runtime import resolve_device
from densessm_lab.bench import measure, report
from densessm_lab.bench.models import DTYPES, LLAMAS, STOCK
from densessm_lab.bench.results import SUFFIXES, output_stem, suffixed


def compile_backend(name: str) -> str:
    """A ``torch.compile`` backend this PyTorch has, checked when the flags are read: an unknown one would fail
    only at the first compiled model, after the eager measurements before it."""
    if name not in torch._dynamo.list_backends(exclude_tags=()):  # debugging backends (eager, aot_eager) too
        raise argparse.ArgumentTypeError(
            f"unknown torch.compile backend {name!r}: this PyTorch has {', '.join(torch._dynamo.list_backends())} "
            "(and, for debugging, eager and aot_eager)"
        )
    return name


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Mount ``bench generate`` on the main parser's subcommands."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    gen = bench.add_parser("generate", help="generation speed vs a LLaMA with a KV cache")
    default_models = [
        m for m in ("dense_retnet_350m", "retnet_350m", "dense_mamba_360m", "mamba_360m") if m in list_presets()
    ] + ["llama_350m", "llama_350m" + STOCK]
    gen.add_argument("--models", nargs="+", default=default_models)
    gen.add_argument(
        "--batch",
        type=positive_int,
        nargs="+",
        default=[1, 6],
        help="batch sizes (1: interactive use; 6, 64: serving); with several, one report each, OUT_batchN",
    )
    gen.add_argument("--new-tokens", type=positive_int, nargs="+", default=[128, 512, 1024], help="GPU: 2048 ... 10240")
    gen.add_argument("--contexts", type=positive_int, nargs="+", default=[128, 1024, 4096, 8192])
    gen.add_argument("--steps", type=positive_int, default=6, help="decode steps timed per context")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--no-prepack", action="store_true", help="keep PyTorch's default linear layers")
    gen.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, help="int8 weights (CPU, float32) for all but the stock LLaMA"
    )
    gen.add_argument("--device", default="cpu", help="cpu or cuda[:N]; prepacking is CPU-only")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="recurrent models decode through the compiled step (CUDA graphs on a GPU); the LLaMAs stay eager",
    )
    gen.add_argument(
        "--compile-backend", type=compile_backend, help="torch.compile backend of --compile (default: inductor)"
    )
    gen.add_argument(
        "--overhead-steps", type=nonnegative_int, default=40, help="alternating rounds per dense/plain pair (0: skip)"
    )
    gen.add_argument(
        "--overhead-context", type=positive_int, default=1024, help="context of the dense-overhead measurement"
    )
    gen.add_argument(
        "--out", type=output_stem, default=Path("docs/benchmarks/generation"), help="stem of OUT.json/.md/.png"
    )
    gen.add_argument("--overwrite", action="store_true", help="replace OUT.json/.md/.png if they exist")
    gen.set_defaults(func=bench_generate)


def bench_generate(args: argparse.Namespace) -> None:
    """Check the flags (the device, the model names, the outputs not yet there), measure, write the report."""
    args.argv = sys.argv[3:]
    device = resolve_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.quantize is not None:
        problem = int8_problem(device, DTYPES[args.dtype])
        if problem is not None:
            raise UsageError(f"--quantize {args.quantize}: {problem} (use --device cpu --dtype float32)")
        if args.compile:
            raise UsageError(f"--quantize {args.quantize} cannot be compiled: drop --compile or --quantize")
    if args.compile_backend is not None and not args.compile:  # it would change nothing
        raise UsageError(
            f"--compile-backend {args.compile_backend} applies with --compile: add it, or drop the backend"
        )
    args.compile_backend = args.compile_backend or "inductor"
    batches = list(dict.fromkeys(args.batch))
    check_path(args.out, "--out")  # a parent that is a file: refused now, not after the measurements
    if args.out.is_dir():  # the files would land beside it, not in it
        raise UsageError(f"--out {args.out} is a directory; --out names a stem for STEM.json, STEM.md and STEM.png")
    stems = {b: args.out if len(batches) == 1 else args.out.with_name(f"{args.out.name}_batch{b}") for b in batches}
    outputs = [suffixed(stem, s) for stem in stems.values() for s in SUFFIXES]
    for out in outputs:
        check_path(out, "--out")  # STEM.json may be too long a name where STEM is not
        check_link(out, "--out", args.overwrite)  # a symlink to nowhere: refused now, not after the measurements
        if out.is_dir():
            raise UsageError(f"--out {args.out}: {out} is a directory, not a file")
    existing = [out for out in outputs if out.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist(s); nothing was measured (pass --overwrite to replace)"
        )
    for name in args.models:
        if name not in LLAMAS and name not in list_presets():
            raise UsageError(f"unknown model {name!r}: use a preset name or one of {', '.join(LLAMAS)}")
    done: list[Path] = []
    partial: list[Path] = []
    try:
        for batch, stem in stems.items():
            run = argparse.Namespace(**{**vars(args), "batch": batch})

            def checkpoint(results: dict, stem: Path = stem) -> None:
                report.write_json(results, stem)
                partial[:] = [suffixed(stem, ".json")]

            results = measure.run(run, checkpoint=checkpoint)
            report.write_report(results, stem)
            partial.clear()
            done.append(stem)
            print(suffixed(stem, ".md").read_text())
    except KeyboardInterrupt:
        raise Interrupted(_what_is_left(done, partial)) from None


def _what_is_left(done: list[Path], partial: list[Path]) -> str:
    """What an interrupted run leaves on disk: the reports of the batch sizes it finished, and the JSON of the
    one it was measuring (``meta.complete`` false), each file whole."""
    parts = [f"{stem}.json/.md/.png complete" for stem in done]
    parts += [f"{path} holds what was measured so far (meta.complete false)" for path in partial]
    if not parts:
        return "nothing was written"
    return "; ".join(parts) + " (pass --overwrite to measure again into the same files)"
