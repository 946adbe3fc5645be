"""Text generation from a saved model directory: the ``densessm generate`` command.

Everything a person types is checked before any model work starts (a missing directory, a damaged
checkpoint, a missing tokenizer, a device this machine lacks, a sampling value out of range, a prompt
longer than the model's context), so mistakes come back as one clear sentence, not a stack trace halfway
through a batch. While decoding, logits that turn NaN or infinite stop the command with the parameter to
blame, instead of printing nothing (greedy decoding of NaN logits picks token 0 forever).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList, TextStreamer

from densessm.argtypes import (
    OncePromptFile,
    nonnegative_int,
    path_name,
    positive_float,
    positive_int,
    seed,
    temperature,
)
from densessm.errors import UsageError
from densessm.inference import QUANTIZE_CHOICES, int8_problem, prepare_for_decoding
from densessm.loading import (
    check_weights,
    load_causal_lm,
    load_tokenizer_dir,
    raise_nonfinite,
    read_config,
    special_token_beyond,
)
from densessm.runtime import DTYPES, resolve_device


class FiniteLogitsGuard(LogitsProcessor):
    """Stop generation when the model's logits are NaN, +inf, or -inf everywhere in a row.

    It runs after the sampling processors, which only ever lower logits to -inf (top-k, top-p, ...), so a
    NaN or +inf here came from the model, and so did a row where no token is left."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.step += 1
        broken = torch.isnan(scores).any() | torch.isposinf(scores).any() | torch.isneginf(scores).all(-1).any()
        if bool(broken):
            raise_nonfinite(self.model, f"the logits of generation step {self.step}")
        return scores


def _prompt_text(text: str) -> str:
    """A ``--prompt`` that is Unicode text. Bytes of the command line that are not UTF-8 reach Python as lone
    surrogates (``\\udcff`` for byte 0xff), which no tokenizer reads and no UTF-8 encodes: refused here, with
    their place, rather than failing deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate \\u{code:04x}"
        raise argparse.ArgumentTypeError(
            f"not UTF-8 text: {what} at character {err.start} (pass UTF-8 text, e.g. a UTF-8 file with --prompt-file)"
        ) from None
    return text


def add_generate_parser(sub) -> None:
    """Register ``densessm generate``."""
    parser = sub.add_parser("generate", help="generate text from a saved DenseRetNet / DenseMamba directory")
    parser.add_argument("model_dir", type=path_name, help="directory written by save_pretrained (with tokenizer files)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", type=_prompt_text, help="a prompt; repeat for a batch")
    prompts.add_argument(
        "--prompt-file", type=Path, action=OncePromptFile, help="a UTF-8 text file with one prompt per line"
    )
    parser.add_argument("--tokenizer", type=path_name, help="tokenizer directory (default: MODEL_DIR)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=temperature, help="with --do-sample (default 1.0)")
    parser.add_argument("--top-k", type=nonnegative_int, help="with --do-sample (default 50; 0: no limit)")
    parser.add_argument("--top-p", type=positive_float, help="with --do-sample, in (0, 1] (default 1.0)")
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    parser.add_argument("--num-beams", type=positive_int, default=1)
    parser.add_argument("--seed", type=seed, default=0)
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
    parser.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, help="int8 weights (CPU, float32 activations): faster decoding"
    )
    parser.set_defaults(func=run_generate)


def check_quantize(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse ``--quantize`` where it cannot apply, before the model is loaded."""
    if args.quantize is None:
        return
    problem = int8_problem(device, dtype)
    if problem is not None:
        raise UsageError(
            f"--quantize {args.quantize}: {problem} (use --device cpu --dtype float32, or drop --quantize)"
        )
    if args.compile:
        raise UsageError(f"--quantize {args.quantize} cannot be compiled: drop --compile or --quantize")


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def check_sampling(args: argparse.Namespace) -> None:
    """What the flag types cannot say alone: ``--top-p`` is a probability mass, at most 1, and the sampling flags
    mean nothing to greedy or beam decoding (transformers would drop them with a notice; a user who typed one
    expects it to act). Fills in the defaults of those not given."""
    given = [name for name in SAMPLING_DEFAULTS if getattr(args, name) is not None]
    if given and not args.do_sample:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        verb = "acts" if len(given) == 1 else "act"
        raise UsageError(f"{flags} {verb} only when sampling: add --do-sample, or drop {flags}")
    for name, default in SAMPLING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.top_p > 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file is not None:
        if not args.prompt_file.exists():
            raise FileNotFoundError(f"prompt file {args.prompt_file} does not exist")
        if not args.prompt_file.is_file():
            raise UsageError(f"prompt file {args.prompt_file} is not a regular file (a directory, device or pipe)")
        try:
            text = args.prompt_file.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no text
        except UnicodeDecodeError as err:
            where = f"{err.reason} at byte {err.start}"
            raise ValueError(f"prompt file {args.prompt_file} is not UTF-8 text: {where}") from None
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = args.prompt
    if not prompts or not all(p.strip() for p in prompts):
        raise UsageError("empty prompt: give at least one non-empty prompt")
    return prompts


def _load_tokenizer(directory: Path, vocab_size: int):
    tokenizer = load_tokenizer_dir(directory, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer in {directory} has neither a pad nor an end-of-text token to pad prompts with")
    special = special_token_beyond(tokenizer, vocab_size)
    if special is not None:
        raise ValueError(
            f"the tokenizer in {directory}: {special} (a special token its tokenizer_config.json names that the "
            "vocabulary lacks?): pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    return tokenizer


def run_generate(args: argparse.Namespace) -> None:
    check_sampling(args)
    device = resolve_device(args.device)
    check_quantize(args, device, DTYPES[args.dtype])
    prompts = _read_prompts(args)
    config = read_config(args.model_dir)  # before the tokenizer, which would blame itself for a bad config.json
    check_weights(args.model_dir, config)  # a config.json at odds with its weights is not the tokenizer's fault
    tokenizer = _load_tokenizer(Path(args.tokenizer or args.model_dir), config.vocab_size)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    real = batch["input_ids"][batch["attention_mask"].bool()]
    if real.numel() and int(real.max()) >= config.vocab_size:
        raise ValueError(
            f"the tokenizer gives token id {int(real.max())}, beyond the model's vocab_size {config.vocab_size}: "
            "pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    limit = getattr(config, "max_position_embeddings", None)
    longest = int(batch["attention_mask"].sum(-1).max())
    if limit is not None and longest > limit:
        raise UsageError(f"a prompt has {longest} tokens; the model allows at most {limit} (max_position_embeddings)")
    model = load_causal_lm(args.model_dir, dtype=DTYPES[args.dtype], device=device, config=config)
    prepare_for_decoding(model, args.quantize, prepack=not args.no_prepack, compiled=args.compile)
    batch = batch.to(device)

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
            logits_processor=LogitsProcessorList([FiniteLogitsGuard(model)]),
            compile_config=CompileConfig(fullgraph=True, dynamic=False) if args.compile else None,
        )
    generated = output[:, batch["input_ids"].shape[1] :]
    if generated.numel() and int(generated.max()) >= len(tokenizer):  # decode would drop it without a word
        raise ValueError(
            f"the model generated token id {int(generated.max())}, which the tokenizer in "
            f"{args.tokenizer or args.model_dir} does not have ({len(tokenizer)} tokens; the model's vocab_size "
            f"{config.vocab_size}): pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    if stream:
        return
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    for prompt, text in zip(prompts, texts, strict=True):
        sys.stdout.write(f"{prompt}{text}\n" if len(prompts) == 1 else f"--- {prompt}\n{text}\n")
