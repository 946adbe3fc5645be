"""Text generation from a saved model directory: the ``densessm generate`` command.

Everything a person types is checked before any model work starts (a missing directory, a missing
tokenizer, a sampling value out of range, a prompt longer than the model's context), so mistakes come back
as one clear sentence, not a stack trace halfway through a batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_generate_parser(sub) -> None:
    """Register ``densessm generate``."""
    parser = sub.add_parser("generate", help="generate text from a saved DenseRetNet / DenseMamba directory")
    parser.add_argument("model_dir", help="directory written by save_pretrained (with tokenizer files)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    prompts.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL_DIR)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-stream", action="store_true", help="print only when done (single prompt)")
    parser.add_argument(
        "--no-prepack", action="store_true", help="on CPU, keep PyTorch's linear layers (default: oneDNN-prepacked)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step (CUDA graphs on a GPU; the first steps spend tens of seconds compiling)",
    )
    parser.set_defaults(func=run_generate)


def check_sampling(args: argparse.Namespace) -> None:
    """Reject out-of-range generation settings with a message that names the flag."""
    checks = [
        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (args.top_k >= 0, f"--top-k must be >= 0, got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {args.repetition_penalty}"),
        (args.num_beams >= 1, f"--num-beams must be >= 1, got {args.num_beams}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"prompt file {args.prompt_file} does not exist")
        prompts = [line for line in args.prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = args.prompt
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("empty prompt: give at least one non-empty prompt")
    return prompts


def run_generate(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, TextStreamer

    from densessm.inference import prepack_for_cpu

    check_sampling(args)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    prompts = _read_prompts(args)
    tokenizer_dir = Path(args.tokenizer or model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    except (OSError, ValueError) as err:
        raise ValueError(f"no usable tokenizer in {tokenizer_dir} (pass --tokenizer DIR): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype]).to(args.device).eval()
    if model.device.type == "cpu" and not args.no_prepack and not args.compile:
        prepack_for_cpu(model)  # several times faster decoding on CPU; inductor packs weights itself
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
    limit = model.config.max_position_embeddings
    longest = int(batch["attention_mask"].sum(-1).max())
    if longest > limit:
        raise ValueError(f"a prompt has {longest} tokens; the model allows at most {limit} (max_position_embeddings)")

    torch.manual_seed(args.seed)
    stream = len(prompts) == 1 and args.num_beams == 1 and not args.no_stream
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(
            **batch,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            num_beams=args.num_beams,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            compile_config=CompileConfig(fullgraph=True, dynamic=False) if args.compile else None,
        )
    if stream:
        return
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    for prompt, text in zip(prompts, texts, strict=True):
        sys.stdout.write(f"{prompt}{text}\n" if len(prompts) == 1 else f"--- {prompt}\n{text}\n")
