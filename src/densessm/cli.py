"""``densessm`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM

from densessm import __version__
from densessm.argtypes import path_name, positive_int, seed
from densessm.convert import convert_reference_checkpoint
from densessm.errors import EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from densessm.evaluation.cli import add_eval_parser
from densessm.files import atomic_output_dir, check_destination
from densessm.generation import add_generate_parser
from densessm.loading import load_causal_lm
from densessm.presets import list_presets, load_preset
from densessm.runtime import DTYPES
from densessm.serving.cli import add_serve_parser
from densessm.train import main as train_main
from densessm_lab.bench.cli import add_bench_parser
from densessm_lab.experiments.cli import add_experiment_parser


def _convert(args: argparse.Namespace) -> None:
    dst = convert_reference_checkpoint(args.src, args.dst, dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)
    print(f"converted {args.src} -> {dst}")


def _presets(args: argparse.Namespace) -> None:
    for name in list_presets():
        config = load_preset(name)
        with torch.device("meta"):
            count = AutoModelForCausalLM.from_config(config).num_parameters()
        print(f"{name:24s} {count:>15,d} parameters  (m = {config.dense_block_layers})")


def _demo(args: argparse.Namespace) -> None:
    """Build a small model, save and reload it, check its modes agree, and generate from it."""
    if args.preset not in list_presets():
        raise UsageError(f"unknown preset {args.preset!r}: use one of {', '.join(list_presets())}")
    out = Path(args.output_dir)
    check_destination(out, args.overwrite, "output directory")
    torch.manual_seed(args.seed)
    config = load_preset(args.preset)
    model = AutoModelForCausalLM.from_config(config).eval()
    with atomic_output_dir(out, overwrite=args.overwrite, what="output directory") as staging:
        model.save_pretrained(staging)
    model = load_causal_lm(out)
    print(f"{args.preset}: {model.num_parameters():,d} parameters (untrained), saved to {out}/")

    tokens = torch.randint(3, config.vocab_size, (2, 64))
    with torch.no_grad():
        parallel = model(tokens, mode="parallel").logits
        recurrent = model(tokens, mode="recurrent").logits
    print(f"parallel vs recurrent logits: max |diff| = {(parallel - recurrent).abs().max():.2e}")

    prompt = tokens[:, :8]
    start = time.perf_counter()
    generated = model.generate(
        prompt, max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    seconds = time.perf_counter() - start
    state = generated.cache
    state_bytes = sum(t.numel() * t.element_size() for layer in state.layers for t in layer.values())
    new = generated.sequences[:, prompt.shape[1] :]
    print(f"generated {new.numel()} tokens in {seconds:.2f} s ({new.numel() / seconds:.1f} tokens/s)")
    print(f"recurrent state after {state.get_seq_length()} tokens: {state_bytes / 1024:.1f} KiB (constant in length)")
    for row in new.tolist():
        print("  ", row)


def _train(args: argparse.Namespace) -> None:
    train_main(args.train_argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densessm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"densessm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="import a public-reference DenseRetNet checkpoint")
    convert.add_argument(
        "src", type=path_name, help="reference directory (config.json + model.safetensors or pytorch_model.bin)"
    )
    convert.add_argument("dst", type=path_name, help="output directory for AutoModelForCausalLM.from_pretrained")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="convert weights to this dtype (default: keep)")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it already holds files")
    convert.set_defaults(func=_convert)

    presets = sub.add_parser("presets", help="list the bundled model presets with their parameter counts")
    presets.set_defaults(func=_presets)

    demo = sub.add_parser("demo", help="build a tiny model, check its modes agree, generate from it")
    demo.add_argument("--preset", default="dense_retnet_tiny")
    demo.add_argument(
        "--output-dir", type=path_name, default="outputs/untrained-demo", help="where the untrained model is saved"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace --output-dir if it already holds files")
    demo.add_argument("--new-tokens", type=positive_int, default=32)
    demo.add_argument("--seed", type=seed, default=0)
    demo.set_defaults(func=_demo)
    add_generate_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_experiment_parser(sub)

    # Its flags are HfArgumentParser's (TrainingArguments and ours): `densessm train --help` lists them.
    train = sub.add_parser("train", add_help=False, help="pretrain a model on a text corpus (HF Trainer)")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; errors come back as one line and an exit code (see :mod:`densessm.errors`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    try:  # argparse reports a usage error (and --help) by exiting: return its code like every other outcome
        args, rest = parser.parse_known_args(argv)
        if args.command == "train":
            args.train_argv = rest
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    name = f"densessm {args.command}"
    try:
        args.func(args)
    except KeyboardInterrupt as err:
        print(f"{name}: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output left (`densessm presets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except UsageError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError, StrictDataclassError, FloatingPointError, ImportError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:
        if os.environ.get("DENSESSM_TRACEBACK"):
            raise
        print(
            f"{name}: internal error ({type(err).__name__}): {err}\n"
            "(this is a bug: rerun with DENSESSM_TRACEBACK=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
