"""``densessm train``: causal-LM pretraining on the Hugging Face ``Trainer``.

The command line is ``HfArgumentParser`` over :class:`ModelArguments`, :class:`~densessm.data.DataArguments`
and :class:`DenseTrainingArguments` (``TrainingArguments`` plus the reference script's flags that
transformers 5 dropped), so every Trainer flag works and multi-process launchers (``torchrun``,
``accelerate launch``, FSDP/DeepSpeed configs) apply unchanged. With no arguments it trains the
``dense_retnet_tiny`` preset on the bundled corpus with the bundled tokenizer.

What the Trainer does not do by itself, and is added here: a model from a preset or a config directory,
the token-block pipeline of :mod:`densessm.data`, a stop with a clear message on a NaN/inf loss, perplexity
next to every loss, tokens/s, and at the end a validation score, a loss-curve PNG and a generated sample.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import get_current_accelerator

from densessm.data import DataArguments, collate_blocks, load_blocks
from densessm.presets import list_presets, load_preset
from densessm.tokenizer import has_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DEFAULT_BLOCK_SIZE = 1024  # for models without a max_position_embeddings


@dataclass
class ModelArguments:
    """Which model to train and with which tokenizer."""

    model_name_or_path: str = field(
        default="dense_retnet_tiny",
        metadata={
            "help": "A preset (`densessm presets`), a directory with a config.json (trained from scratch) or a "
            "saved model directory (training continues from its weights)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Change a from-scratch configuration, e.g. `hidden_size=128,num_hidden_layers=6`."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer directory, e.g. the reference's LLaMA tokenizer (needs `sentencepiece`). Default: "
            "the model directory's tokenizer if it has one, else the bundled byte-level BPE."
        },
    )
    model_max_length: int | None = field(
        default=None, metadata={"help": "Reference-script flag: sets the tokenizer's model_max_length."}
    )


@dataclass
class DenseTrainingArguments(TrainingArguments):
    """``TrainingArguments``, plus the reference script's flags that transformers 5 removed, and the final report."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in --output_dir (its checkpoint-* folders are deleted) instead of resuming."},
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warm-up as a fraction of the total steps (same as --warmup_steps < 1)."}
    )
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    logging_dir: str | None = field(
        default=None, metadata={"help": "TensorBoard log directory (default: <output_dir>/runs/<time>_<host>)."}
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "linear, cosine, polynomial, constant, constant_with_warmup, ... (transformers SchedulerType)."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Let DDP look for parameters without gradient (our models have none)."}
    )
    include_num_input_tokens_seen: str | bool = field(
        default=True, metadata={"help": "Count the tokens trained on (true / false); logs tokens/s."}
    )
    sample_prompt: str = field(
        default="The state of the Union", metadata={"help": "Prompt of the sample generated after training."}
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Length of that sample (0: no sample)."})

    def __post_init__(self):
        if self.lr_scheduler_type == "polynominal":  # the reference README's spelling
            self.lr_scheduler_type = "polynomial"
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise ValueError("pass --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        if get_current_accelerator() is None:
            # Say so explicitly: transformers then uses gloo for torchrun on CPUs (else each process trains alone),
            # accepts --bf16 (CPU autocast) and does not pin memory.
            self.use_cpu = True
            if self.fp16:
                logger.warning(
                    "--fp16 has no effect without a GPU (accelerate autocasts fp16 only there): training in fp32; "
                    "--bf16 autocasts on CPUs"
                )
        super().__post_init__()


class NonFiniteLossError(FloatingPointError):
    """A micro-batch gave a NaN or infinite loss; training stopped before the optimizer used it."""


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class DenseTrainer(Trainer):
    """``Trainer`` that stops on a non-finite loss and logs perplexity next to each loss."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Summed over processes: a bad loss on any rank stops every rank at the same step (no one hangs).
        if not torch.isfinite(self.accelerator.reduce(loss.detach().clone(), reduction="sum")):
            last = last_complete_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"the training loss is not finite at step {self.state.global_step + 1}; training stopped before the "
                f"optimizer used it. Last good checkpoint: {last or 'none saved yet'}. Resume from it with a lower "
                "--learning_rate, a longer warm-up, --max_grad_norm, or --bf16 instead of --fp16."
            )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key in ("loss", "eval_loss"):
            if key in logs:
                logs[key.replace("loss", "perplexity")] = perplexity(logs[key])
        super().log(logs, start_time)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (written last) is complete, skipping one cut short."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if path.is_dir() and path.name.split("-")[-1].isdigit():
            found.append((int(path.name.split("-")[-1]), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            logger.warning(f"skipping {path}: it was not saved completely")
            continue
        return str(path)
    return None


def resolve_checkpoint(args: DenseTrainingArguments) -> str | None:
    """The checkpoint to resume from: the one given, else the last in ``output_dir`` (unless overwriting)."""
    if args.resume_from_checkpoint:
        path = Path(args.resume_from_checkpoint)
        if not (path / TRAINER_STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint: it has no {TRAINER_STATE_NAME}")
        return str(path)
    out = Path(args.output_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if args.overwrite_output_dir:
        if args.should_save:
            for stale in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(stale)
        return None
    last = last_complete_checkpoint(out)
    if last is None:
        raise ValueError(
            f"output directory {out} exists and holds no checkpoint: pass --overwrite_output_dir to train there, "
            "or another --output_dir"
        )
    logger.info(f"resuming from {last}, the last checkpoint in {out} (--overwrite_output_dir starts afresh)")
    return last


def build_tokenizer(args: ModelArguments) -> PreTrainedTokenizerBase:
    source = args.tokenizer_name
    if source is None and Path(args.model_name_or_path).is_dir() and has_tokenizer(args.model_name_or_path):
        source = args.model_name_or_path
    tokenizer = load_tokenizer(source)
    if args.model_max_length is not None:
        tokenizer.model_max_length = args.model_max_length
    return tokenizer


def build_model(args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A model in fp32 (the master weights under mixed precision): fresh from a preset or config, or loaded."""
    name = args.model_name_or_path
    if name in list_presets():
        config, weights = load_preset(name), None
    else:
        path = Path(name)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{name!r} is neither a preset ({', '.join(list_presets())}) nor a directory with a config.json"
            )
        config = AutoConfig.from_pretrained(path)
        weights = path if any((path / f).is_file() for f in WEIGHT_FILES) else None
    if weights is not None:
        if args.config_overrides:
            raise ValueError(
                f"--config_overrides only applies to a model trained from scratch; {weights} holds weights"
            )
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but {weights} was trained with vocab_size "
                f"{model.config.vocab_size}: pass the tokenizer it was trained with (--tokenizer_name)"
            )
        return model
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    config.vocab_size = len(tokenizer)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, key) is not None:
            setattr(config, key, getattr(tokenizer, key))
    config.validate()
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def init_deepspeed_comm(args: TrainingArguments) -> None:
    """Join DeepSpeed's communication layer to the process group before a ZeRO-3 model is built.

    Under a ZeRO-3 config, ``from_config``/``from_pretrained`` build the model inside ``deepspeed.zero.Init``,
    which checks ``train_batch_size == micro batch x accumulation x world size`` with the world size of
    ``deepspeed.comm``. On GPUs accelerate initializes ``deepspeed.comm`` with the process group; on CPUs
    (``use_cpu``, gloo) it sets up only ``torch.distributed``, so ``zero.Init`` saw a world of 1 and any run
    of 2+ processes stopped with "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
    world_size 4 != 2 * 1 * 1". ``deepspeed.initialize`` makes this same call later; here it comes first.
    """
    if not args.deepspeed or not torch.distributed.is_initialized():
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), timeout=args.ddp_timeout_delta)


def count_parameters(model: PreTrainedModel) -> int:
    """The model's parameter count, also when ZeRO-3 has partitioned them (``numel()`` is then 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def choose_block_size(requested: int | None, config) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if requested is None:
        return limit or DEFAULT_BLOCK_SIZE
    if limit is not None and requested > limit:
        raise ValueError(
            f"--block_size {requested} is larger than the model supports (max_position_embeddings = {limit}): "
            f"pass --block_size {limit} or less, or raise it with --config_overrides max_position_embeddings=..."
        )
    return requested


def plot_curves(log_history: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Training and validation loss and perplexity against the optimizer step, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    loss_ax, ppl_ax = fig.subplots(1, 2)
    for ax, transform, label in ((loss_ax, float, "loss (nats / token)"), (ppl_ax, perplexity, "perplexity")):
        for points, name, style in ((train, "train", "-"), (val, "validation", "o-")):
            if points:
                ax.plot([s for s, _ in points], [transform(v) for _, v in points], style, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ppl_ax.set_yscale("log")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


@torch.no_grad()
def generate_sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, new_tokens: int) -> str:
    """Sampled continuation of ``prompt``, placed at the start of a document (after an EOS) as in training."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id] + ids
    was_training = model.training
    model.eval()
    out = model.generate(
        torch.tensor([ids], device=model.device),
        max_new_tokens=new_tokens,
        do_sample=True,
        top_k=40,
        temperature=0.8,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _setup_logging(args: TrainingArguments) -> None:
    level = args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    logger.setLevel(logging.INFO if args.should_log else logging.WARNING)
    logging.getLogger("densessm.data").setLevel(logging.INFO if args.should_log else logging.WARNING)
    if not args.should_log:
        datasets.disable_progress_bars()


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DenseTrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Run one training job; returns its metrics and the paths it wrote (on every process)."""
    _setup_logging(training_args)
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps: the length of a streamed corpus is not known in advance")
    with training_args.main_process_first(desc="looking for checkpoints"):
        checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)
    tokenizer = build_tokenizer(model_args)
    init_deepspeed_comm(training_args)
    model = build_model(model_args, tokenizer)
    block_size = choose_block_size(data_args.block_size, model.config)
    with training_args.main_process_first(desc="tokenizing the corpus"):
        train_set, eval_set = load_blocks(data_args, tokenizer, block_size, training_args.seed)

    tokens_per_step = (
        block_size
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    n_params = count_parameters(model)
    logger.info(
        f"{model.config.model_type}: {n_params:,d} parameters; {tokens_per_step:,d} tokens per optimizer step "
        f"({block_size} x {training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps} "
        f"accumulated x {training_args.world_size} processes)"
    )
    if training_args.logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = training_args.logging_dir
    use_cache = model.config.use_cache  # the Trainer turns it off for training
    trainer = DenseTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=collate_blocks,
        callbacks=list(callbacks),
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.model.config.use_cache = use_cache
    trainer.save_model()
    metrics = dict(result.metrics)
    metrics["train_tokens_per_second"] = metrics["train_samples_per_second"] * block_size
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    summary = {"train": metrics, "output_dir": training_args.output_dir, "parameters": n_params}
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary["last_loss"] = logged[-1] if logged else metrics["train_loss"]

    if eval_set is not None:
        # An evaluation at the last step (--eval_strategy steps) already scored these weights.
        done = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
        eval_metrics = {k: v for k, v in done[-1].items() if k.startswith("eval_")} if done else trainer.evaluate()
        eval_metrics["eval_perplexity"] = perplexity(eval_metrics["eval_loss"])
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        summary["eval"] = eval_metrics

    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        title = f"{model_args.model_name_or_path} ({model.config.model_type}, {n_params:,d} parameters)"
        summary["plot"] = str(plot_curves(trainer.state.log_history, out / "loss_curve.png", title))
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        if training_args.sample_max_new_tokens > 0 and not sharded:  # sharded weights: every rank would have to join
            set_seed(training_args.seed)
            # Without the autocast wrapper that --bf16/--fp16 put on forward: sample from the fp32 weights.
            model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            summary["sample"] = generate_sample(
                model, tokenizer, training_args.sample_prompt, training_args.sample_max_new_tokens
            )
        _print_summary(summary, block_size, len(eval_set) if isinstance(eval_set, datasets.Dataset) else None)
    return summary


def _print_summary(summary: dict, block_size: int, eval_blocks: int | None) -> None:
    train_metrics = summary["train"]
    print(
        f"\ntrained {summary['parameters']:,d} parameters for {train_metrics['train_runtime']:.0f} s "
        f"({train_metrics['train_tokens_per_second']:,.0f} tokens/s); "
        f"training loss at the end {summary['last_loss']:.4f}"
    )
    if "eval" in summary:
        blocks = f" ({eval_blocks:,d} blocks of {block_size} tokens)" if eval_blocks else ""
        print(
            f"validation: loss {summary['eval']['eval_loss']:.4f}, perplexity {summary['eval']['eval_perplexity']:.2f}"
            + blocks
        )
    print(f"model saved to {summary['output_dir']}/ (AutoModelForCausalLM.from_pretrained, with its tokenizer)")
    print(f"loss curve: {summary['plot']}")
    if "sample" in summary:
        print(f"sample: {summary['sample']!r}")


def _finish_distributed(settle_seconds: float = 1.0) -> None:
    """End a multi-process run so that no process dies at exit after training and saving.

    A gloo worker thread frees a collective's work object (with its tensors) only after the collective is marked
    done, so it can still be doing that when the main thread has returned and Python is finalizing; if one of
    those tensors has a Python object (DeepSpeed ZeRO's parameter all-gathers do), the worker cannot take the GIL
    and the process aborts ("terminate called without an active exception", SIGABRT: torch gloo + CPython 3.11,
    not our code). torchrun then reports a failed run: about 1 DeepSpeed CPU launch in 10 here. The barrier lines
    the ranks up, so none exits while a collective it took part in is still running; the short sleep (GIL released)
    lets the gloo workers drop what they hold (gloo offers no way to wait for that: a mitigation, 0 failures in
    85 launches against 1 in 30 with the barrier alone). Only the command line's :func:`main` does this;
    :func:`train` leaves the process group to its caller.
    """
    torch.distributed.barrier()
    gloo = torch.distributed.get_backend() == "gloo"
    torch.distributed.destroy_process_group()
    if gloo:
        time.sleep(settle_seconds)


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, DenseTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, DenseTrainingArguments), prog="densessm train")
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """``densessm train ARGS``: parse the flags and train."""
    summary = train(*parse_args(argv), callbacks=callbacks)
    if torch.distributed.is_initialized():
        _finish_distributed()
    return summary


__all__ = [
    "DenseTrainer",
    "DenseTrainingArguments",
    "ModelArguments",
    "NonFiniteLossError",
    "build_model",
    "main",
    "parse_args",
    "train",
]
