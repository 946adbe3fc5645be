"""``densessm train``: causal-LM pretraining on the Hugging Face ``Trainer``.

The command line is ``HfArgumentParser`` over :class:`ModelArguments`, :class:`~densessm.data.DataArguments`
and :class:`DenseTrainingArguments` (``TrainingArguments`` plus the reference script's flags that
transformers 5 dropped), so every Trainer flag works and multi-process launchers (``torchrun``,
``accelerate launch``, FSDP/DeepSpeed configs) apply unchanged. With no arguments it trains the
``dense_retnet_tiny`` preset on the bundled corpus with the bundled tokenizer.

What the Trainer does not do by itself, and is added here: a model from a preset or a config directory
(a saved model is loaded strictly), the token-block pipeline of :mod:`densessm.data`, a stop with a clear
message on a NaN/inf loss, perplexity next to every loss, tokens/s, and at the end a validation score, a
loss-curve PNG and a generated sample. And what makes a run safe to kill, interrupt and resume
(:mod:`densessm.run_state`): one run per ``--output_dir`` (a lock), checkpoints marked complete after their last
file and resumed only when complete, the run's arguments stored and compared on resume, a final model that
is whole or absent, Ctrl-C as one line naming the checkpoint to resume from, and a refusal where a requested
engine (FSDP, DeepSpeed) would silently become another.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import os
import pickle
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import datasets
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations.integration_utils import (
    INTEGRATION_TO_CALLBACK,
    get_available_reporting_integrations,
    is_azureml_available,
    is_flytekit_available,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import get_current_accelerator, is_liger_kernel_available, is_torch_bf16_gpu_available

from densessm import run_state
from densessm.argtypes import MAX_COUNT
from densessm.data import DataArguments, collate_blocks, find_data_files, load_blocks, tokenizer_fingerprint
from densessm.errors import Interrupted, ModelLoadError, NonFiniteError, UsageError
from densessm.files import check_link, check_path
from densessm.loading import check_weights, first_nonfinite_parameter, load_causal_lm, read_config
from densessm.models.recurrent import trusted_values
from densessm.presets import list_presets, load_preset
from densessm.run_state import WEIGHT_FILES, last_complete_checkpoint
from densessm.tokenizer import has_tokenizer, load_tokenizer
from densessm.trainer_flags import (
    check_compile_flags,
    check_optim_args,
    check_optim_target_modules,
    check_scheduler_kwargs,
    parse_json_flags,
    parse_object_flags,
    parse_optim_args,
    parse_scheduler_kwargs,
)

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1024  # for models without a max_position_embeddings
# Configuration entries that say where a model came from or how it is used, not what it computes.
_CONFIG_BOOKKEEPING = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache")
_T = TypeVar("_T")
_FIXED_ON_RESUME = ("optim", "optim_args")  # a checkpoint's optimizer state loads only into the same optimizer
_SPECIAL_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _require(ok: bool, flag: str, wanted: str, value) -> None:
    if not ok:
        raise UsageError(f"--{flag} must be {wanted}, got {value}")


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


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

    def __post_init__(self):
        if self.model_max_length is not None:
            _require(
                self.model_max_length >= 1, "model_max_length", "a positive number of tokens", self.model_max_length
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
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast with fp32 master weights (default: on for a CUDA GPU that supports bf16, off "
            "elsewhere; --bf16 false trains in fp32 there).",
            "nargs": "?",
            "const": True,
        },
    )
    logging_nan_inf_filter: bool | None = field(
        default=None,
        metadata={
            "help": "Leave NaN/inf losses out of the logged loss (default: on, except on a CUDA GPU, where checking "
            "each loss on the host would stall the GPU once per step; a non-finite loss stops training anyway).",
            "nargs": "?",
            "const": True,
        },
    )
    do_train: bool | None = field(
        default=None,
        metadata={
            "help": "Reference-script flag: this command always trains (false is refused).",
            "nargs": "?",
            "const": True,
        },
    )
    do_eval: bool | None = field(
        default=None,
        metadata={
            "help": "Reference-script flag: the run is scored on its validation set whenever it holds one out (false "
            "is refused while one is held out: pass --validation_split_percentage 0 instead).",
            "nargs": "?",
            "const": True,
        },
    )
    do_predict: bool | None = field(
        default=None,
        metadata={
            "help": "Not supported: this command has no prediction step (true is refused).",
            "nargs": "?",
            "const": True,
        },
    )
    parallelism_config: str | None = field(
        default=None,
        metadata={"help": "accelerate's ParallelismConfig as a JSON object, e.g. '{\"dp_shard_size\": 2}'."},
    )
    liger_kernel_config: str | None = field(
        default=None,
        metadata={"help": "Which Liger kernels --use_liger_kernel applies, as a JSON object, e.g. '{\"rope\": true}'."},
    )
    allow_changed_args: bool = field(
        default=False,
        metadata={
            "help": "Resume even when arguments that change the result (model, data, batch sizes, optimizer, "
            "schedule, ...) differ from the ones the run was started with; the differences are listed."
        },
    )

    def _check_numbers(self) -> None:
        """Refuse flag values that cannot work, before anything is loaded (transformers accepts most of them)."""
        sizes = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
        for flag in sizes:
            _require(getattr(self, flag) >= 1, flag, "a positive integer", getattr(self, flag))
        for flag in (*sizes, "max_steps", "save_total_limit", "sample_max_new_tokens", "eval_accumulation_steps"):
            value = getattr(self, flag, None)  # larger counts overflow in torch or Python once training runs
            if value is not None:
                _require(value <= MAX_COUNT, flag, f"at most {MAX_COUNT} (2**31 - 1)", value)
        _require(
            self.max_steps == -1 or self.max_steps >= 1,
            "max_steps",
            "1 or more (-1: train --num_train_epochs)",
            self.max_steps,
        )
        _require(
            _finite(self.num_train_epochs) and self.num_train_epochs > 0,
            "num_train_epochs",
            "a positive number",
            self.num_train_epochs,
        )
        for flag in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, flag)
            _require(_finite(value) and value >= 0, flag, "a finite number, 0 or more", value)
        for flag in ("adam_beta1", "adam_beta2"):
            value = getattr(self, flag)
            _require(_finite(value) and 0 <= value < 1, flag, "in [0, 1)", value)
        _require(
            _finite(self.adam_epsilon) and self.adam_epsilon > 0, "adam_epsilon", "a positive number", self.adam_epsilon
        )
        smoothing = self.label_smoothing_factor  # above 1 it pushes the weight away from the true token
        _require(_finite(smoothing) and 0 <= smoothing < 1, "label_smoothing_factor", "in [0, 1)", smoothing)
        if self.neftune_noise_alpha is not None:  # torch's uniform_ fails on a negative one, after the model is built
            alpha = self.neftune_noise_alpha
            _require(_finite(alpha) and alpha > 0, "neftune_noise_alpha", "a positive number (unset: off)", alpha)
        for flag in ("save_steps", "logging_steps", "eval_steps"):
            value = getattr(self, flag)
            if value is not None:
                _require(
                    _finite(value) and value > 0, flag, "a positive number (below 1: a fraction of the run)", value
                )
        if self.save_total_limit is not None:
            _require(
                self.save_total_limit >= 1,
                "save_total_limit",
                "1 or more (unset: keep every checkpoint)",
                self.save_total_limit,
            )
        _require(0 <= self.seed < 2**32, "seed", "in [0, 2**32)", self.seed)
        if self.data_seed is not None:
            _require(0 <= self.data_seed < 2**32, "data_seed", "in [0, 2**32)", self.data_seed)
        _require(self.dataloader_num_workers >= 0, "dataloader_num_workers", "0 or more", self.dataloader_num_workers)
        if self.eval_accumulation_steps is not None:
            accumulation = self.eval_accumulation_steps
            _require(accumulation >= 1, "eval_accumulation_steps", "a positive integer (unset: off)", accumulation)
        _require(self.ddp_timeout > 0, "ddp_timeout", "a positive number of seconds", self.ddp_timeout)
        warmup = self.warmup_steps
        if _finite(warmup) and warmup >= 1:
            _require(warmup == int(warmup), "warmup_steps", "a whole number of steps (below 1: a fraction)", warmup)
        _require(self.sample_max_new_tokens >= 0, "sample_max_new_tokens", "0 or more", self.sample_max_new_tokens)

    def __post_init__(self):
        self._check_numbers()
        self._check_run_flags()
        self.lr_scheduler_kwargs = parse_scheduler_kwargs(self.lr_scheduler_kwargs)
        parse_json_flags(self)
        parse_object_flags(self)
        if self.optim_args:
            parse_optim_args(self.optim_args)
        if self.lr_scheduler_type == "polynominal":  # the reference README's spelling
            self.lr_scheduler_type = "polynomial"
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            _require(
                _finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
                "warmup_ratio",
                "in [0, 1)",
                self.warmup_ratio,
            )
            if self.warmup_steps:
                raise UsageError("pass --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        self._device_defaults()
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
        self._check_report_to()
        check_optim_args(self)
        check_optim_target_modules(self)
        check_compile_flags(self)
        check_scheduler_kwargs(self)

    def __getstate__(self) -> dict:
        """Pickled without secrets: the Trainer writes these arguments into every checkpoint and the final model
        (``training_args.bin``), where a ``--hub_token`` was kept in plain text (``to_dict`` masks it already)."""
        state = dict(self.__dict__)
        for name in state:
            if name.endswith("_token") and state[name] is not None:
                state[name] = f"<{name.upper()}>"
        return state

    def __copy__(self) -> DenseTrainingArguments:  # a copy in memory keeps the token (a push needs it)
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __deepcopy__(self, memo: dict) -> DenseTrainingArguments:
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin

    def _check_run_flags(self) -> None:
        """Flags this run would ignore without a word, or that the Trainer refuses only once the model is built.

        The reference script's ``--do_*`` switches: this command always trains and scores the validation set it
        holds out, so a switch that asks otherwise is refused (``do_eval`` is kept as asked in ``wants_eval``:
        the data arguments decide whether it conflicts)."""
        if self.do_train is False:
            raise UsageError("--do_train false: this command always trains; to score a model use `densessm eval ppl`")
        if self.do_predict:
            raise UsageError(
                "--do_predict: densessm train has no prediction step; use `densessm generate` or `densessm eval`"
            )
        self.wants_eval = self.do_eval
        if self.ddp_backend is not None and "LOCAL_RANK" not in os.environ:  # else torch's "not initialized"
            raise UsageError(
                f"--ddp_backend {self.ddp_backend} applies to a run of several processes (torchrun or accelerate "
                "launch); this is one process: drop --ddp_backend, or start the run with a launcher"
            )
        if self.label_names not in (None, ["labels"]):  # the Trainer then finds no loss: an internal error later
            raise UsageError(
                f"--label_names {' '.join(self.label_names)}: this command's batches carry their targets as 'labels'"
            )
        if self.metric_for_best_model is not None:
            metric = self.metric_for_best_model.removeprefix("eval_")
            if metric not in ("loss", "perplexity"):  # the Trainer fails at the first evaluation, mid-run
                raise UsageError(
                    f"--metric_for_best_model {self.metric_for_best_model}: the evaluation reports loss and "
                    "perplexity only"
                )
            if self.greater_is_better is None:  # transformers takes a metric not named *loss as higher-is-better
                self.greater_is_better = False
        if self.use_liger_kernel and not is_liger_kernel_available():  # else found after the model is built
            raise UsageError("--use_liger_kernel needs the liger-kernel package (pip install liger-kernel)")
        if self.logging_dir is not None:  # TensorBoard's writer failed on a file there only once the model was built
            logging_dir = check_path(self.logging_dir, "--logging_dir")
            check_link(logging_dir, "--logging_dir")
            if logging_dir.exists() and not logging_dir.is_dir():
                raise UsageError(f"--logging_dir {logging_dir} is a file, not a directory")
        self.do_train, self.do_predict = True, False
        self.do_eval = bool(self.do_eval)

    def _device_defaults(self) -> None:
        """Resolve the flags left unset to what is fastest on the device the run will use, without changing
        what is computed beyond the precision the user can turn back (``--bf16 false``).

        On a CUDA GPU: bf16 autocast (fp32 master weights: the model is built in fp32), batches copied from pinned
        memory without blocking the host, and no per-step read of the loss on the host, so the host queues step
        after step while the GPU works (:class:`DenseTrainer` keeps its non-finite-loss stop on the device). The
        optimizer is the Trainer's default, fused AdamW, on every device. Elsewhere nothing changes."""
        accelerator = get_current_accelerator()
        cuda = accelerator is not None and accelerator.type == "cuda" and not self.use_cpu
        if self.bf16 is None:
            self.bf16 = cuda and not self.fp16 and is_torch_bf16_gpu_available()
        if self.logging_nan_inf_filter is None:
            self.logging_nan_inf_filter = not cuda
        if cuda and self.accelerator_config is None:
            self.accelerator_config = {"non_blocking": True}

    def _check_report_to(self) -> None:
        """Refuse an integration that is unknown or not installed now: the Trainer finds out only after the data
        is tokenized and the model built, with an error that does not name the flag."""
        unknown = [name for name in self.report_to or () if name not in INTEGRATION_TO_CALLBACK]
        if unknown:
            raise UsageError(
                f"--report_to {', '.join(unknown)}: unknown integration; use none, all, or one or more of "
                f"{', '.join(INTEGRATION_TO_CALLBACK)}"
            )
        installed = [*get_available_reporting_integrations()]  # azure_ml only without mlflow; flyte never
        installed += [
            name
            for name, here in (("azure_ml", is_azureml_available), ("flyte", is_flytekit_available))
            if here() and name not in installed
        ]
        missing = next((name for name in self.report_to or () if name not in installed), None)
        if missing is not None:
            raise UsageError(
                f"--report_to {missing}: the {missing} integration is not installed (installed: "
                f"{', '.join(installed) or 'none'}); install its package, or pass --report_to none"
            )


class NonFiniteLossError(FloatingPointError):
    """A micro-batch gave a NaN or infinite loss; training stopped before the optimizer used it."""


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def fsdp_requested(args: TrainingArguments) -> bool:
    """Whether FSDP was asked for, by ``--fsdp``/``--fsdp_config`` or by an ``accelerate launch`` FSDP config."""
    return args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_hub_access(args: TrainingArguments) -> None:
    """``--push_to_hub`` needs the Hub and a token that it accepts; the Trainer finds out after the corpus is
    tokenized and the model built, with an internal error, or at the first save."""
    from huggingface_hub import HfApi

    try:
        HfApi(token=args.hub_token).whoami()
    except Exception as err:  # noqa: BLE001 - no network, no token, a refused token: all end the same way
        raise OSError(
            f"--push_to_hub: the Hugging Face Hub cannot be reached or does not accept the token "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); check the network "
            "and `hf auth login` (or --hub_token), or train without --push_to_hub"
        ) from None


def deepspeed_requested(args: TrainingArguments) -> bool:
    return bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_engine(args: TrainingArguments) -> None:
    """Refuse FSDP where accelerate cannot run it, before any work (``DenseTrainer`` checks the engine that
    accelerate actually set up later, whatever the reason).

    accelerate (1.x) turns a run into FSDP only for GPU-like process groups (CUDA, XPU, NPU, ...); for CPU
    processes (gloo) it ignores the FSDP plugin, and the run would train as plain DDP, every process holding the
    whole model. Forced on by hand, FSDP2 does train on CPU, but saving the gathered full state dict then fails
    in safetensors (docs/training.md).
    """
    if fsdp_requested(args) and get_current_accelerator() is None:
        raise UsageError(
            "FSDP was requested (--fsdp or an accelerate FSDP config), but accelerate runs FSDP only on GPUs: on "
            "CPU processes it would silently train as plain DDP without sharding. Use configs/accelerate/ddp.yaml "
            "(or torchrun) on CPUs, or run FSDP on GPUs"
        )


def _device_guard_wanted(args: TrainingArguments) -> bool:
    """Whether the non-finite-loss stop runs on the device (:class:`NonFiniteGuard`): on CUDA, where a host read
    of each loss would stall the GPU once per micro-batch; on a CPU the host read costs nothing."""
    return args.device.type == "cuda"


class NonFiniteGuard:
    """A non-finite loss caught on the device, without a host synchronisation in the training step.

    Each micro-batch's loss (summed over processes) updates a sticky flag on the device; the fused optimizer
    reads the flag as its ``found_inf`` (as it does a gradient scaler's) and skips its update once it is set, so
    no weight ever takes a non-finite step. The host learns of it a step or two later, from a copy made without
    blocking (:meth:`poll`), or at once where the Trainer synchronises anyway (logging, saving, the end)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device = device
        self.flag = torch.zeros((), device=device)  # 1.0 from the first non-finite loss on
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)  # the optimizer step it came in
        optimizer.found_inf = self.flag
        self._host = torch.empty((), dtype=torch.long, pin_memory=device.type == "cuda")
        self._copied: torch.cuda.Event | None = None  # marks the copy of first_step to _host in flight

    def record(self, loss_sum: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss_sum)
        self.first_step.copy_(torch.where(bad & (self.first_step < 0), step, self.first_step))
        self.flag.copy_(torch.maximum(self.flag, bad.to(self.flag.dtype)))

    def poll(self) -> int | None:
        """The step of the first non-finite loss if the host knows of one yet, without waiting for the device."""
        if self.device.type != "cuda":
            return self.check()
        if self._copied is None:
            self._host.copy_(self.first_step, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
            return None
        if not self._copied.query():
            return None
        self._copied = None
        return self._first(self._host)

    def check(self) -> int | None:
        """The step of the first non-finite loss, waiting for the device."""
        return self._first(self.first_step.cpu())

    @staticmethod
    def _first(value: torch.Tensor) -> int | None:
        step = int(value)
        return None if step < 0 else step


def _skips_on_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` skips its update on device when its ``found_inf`` is set (fused Adam/AdamW/SGD: the
    gradient scaler's path); the foreach and for-loop implementations refuse a ``found_inf``."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW | torch.optim.SGD) and bool(
        optimizer.defaults.get("fused")
    )


class DenseTrainer(Trainer):
    """``Trainer`` that stops on a non-finite loss, logs perplexity next to each loss, marks each checkpoint
    complete before older ones are rotated away, saves the final model whole or not at all, and refuses to run
    on another engine than the one requested.

    On CUDA its step reads nothing back to the host (see :class:`NonFiniteGuard` and
    :meth:`_track_num_input_tokens`), so the GPU is never left idle while the host waits on it."""

    guard: NonFiniteGuard | None = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        for engine, requested, enabled in (
            ("FSDP", fsdp_requested(self.args), self.is_fsdp_enabled),
            ("DeepSpeed", deepspeed_requested(self.args), self.is_deepspeed_enabled),
        ):
            if requested and not enabled:
                raise UsageError(
                    f"{engine} was requested, but accelerate set up the distributed type "
                    f"{self.accelerator.distributed_type.value} on {self.accelerator.device.type}: the run would "
                    f"not use {engine}. Check the launcher and its config"
                )

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        gradient_scaler = self.args.fp16  # a GradScaler sets and clears found_inf itself
        if (
            _device_guard_wanted(self.args)
            and not gradient_scaler
            and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and _skips_on_found_inf(optimizer)
        ):
            self.guard = NonFiniteGuard(optimizer, self.args.device)
        elif _device_guard_wanted(self.args):
            logger.info(
                f"the non-finite-loss check reads each loss on the host (a synchronisation per micro-batch): "
                f"--optim {self.args.optim}{' with --fp16' if gradient_scaler else ''} cannot skip a step on the "
                "device (fused AdamW without --fp16 can)"
            )
        return optimizer

    def compute_loss(self, model, inputs, *args, **kwargs):
        """The model's loss on a batch of the run's token blocks, whose ids the model's vocabulary covers (the
        tokenizer is checked against it when the run starts): no per-step range check reads them back
        (:func:`~densessm.models.recurrent.trusted_values`)."""
        if model.training:
            inputs = self._loss_alone(inputs)
        with trusted_values():
            return super().compute_loss(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, *args, **kwargs):
        if prediction_loss_only:
            inputs = self._loss_alone(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, *args, **kwargs)

    def _loss_alone(self, inputs: dict) -> dict:
        """``inputs`` asking the model for its loss without logits (``skip_logits``) where nothing else is used:
        the step never holds the ``[tokens, vocab]`` logits, their log-softmax and their gradients (the largest
        tensors of a long-input step). A label smoother or a custom loss reads the logits, so they keep them."""
        if inputs.get("labels") is None or self.label_smoother is not None or self.compute_loss_func is not None:
            return inputs
        if "skip_logits" not in inspect.signature(self.accelerator.unwrap_model(self.model).forward).parameters:
            return inputs  # a head without the switch (a classifier, a wrapper that hides the signature)
        return {**inputs, "skip_logits": True}

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Summed over processes: a bad loss on any rank stops every rank at the same step (no one hangs).
        total = self.accelerator.reduce(loss.detach().clone(), reduction="sum")
        if self.guard is None:
            if not torch.isfinite(total):
                raise NonFiniteLossError(self._nonfinite_loss(self.state.global_step + 1))
            return loss
        self.guard.record(total, self.state.global_step + 1)
        self._stop_if_nonfinite(self.guard.poll())
        return loss

    def _stop_if_nonfinite(self, step: int | None) -> None:
        if step is not None:
            raise NonFiniteLossError(self._nonfinite_loss(step))

    def _check_guard(self) -> None:
        """Wait for the device's verdict where the Trainer synchronises anyway (each log, the end of training is
        one, and each save): nothing is logged as a loss, or saved, after a non-finite one."""
        if self.guard is not None:
            self._stop_if_nonfinite(self.guard.check())

    def _track_num_input_tokens(self, inputs) -> None:
        """Every token counted on the host, where one process knows it: the Trainer's count is read back from the
        device, a synchronisation per micro-batch."""
        name = getattr(self.model, "main_input_name", "input_ids")
        if self.args.include_num_input_tokens_seen == "all" and self.args.world_size == 1 and name in inputs:
            self.state.num_input_tokens_seen += inputs[name].numel()
            return
        super()._track_num_input_tokens(inputs)

    def _nonfinite_loss(self, step: int) -> str:
        """Why the loss is not finite, and the newest checkpoint whose weights are finite to resume from. The
        weights were finite when this run started (:meth:`_load_from_checkpoint`, :func:`build_model`), so a
        non-finite one now comes from an update: the run diverged."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # each process holds shards: no verdict from one
            cause = ""
        elif (name := first_nonfinite_parameter(self.model)) is not None:
            cause = f": the model's parameter {name} holds NaN or inf values (an update made it so: the run diverged)"
        else:
            cause = ": every parameter is finite, so the forward pass overflowed"
        last, notes = run_state.last_good_checkpoint(self.args.output_dir)
        passed = f" ({'; '.join(notes)})" if notes else ""
        return (
            f"the training loss is not finite at step {step}; training stopped before the "
            f"optimizer used it{cause}. Last good checkpoint: {last or 'none saved yet'}{passed}. Resume from it "
            "with a lower --learning_rate, a longer warm-up, --max_grad_norm, or --bf16 instead of --fp16."
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The checkpoint's weights, refused if one holds NaN or inf: its files can have the sizes they were saved
        with (a diverged update saved as is, or a damaged disk), and training on would blame the learning rate."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        name = None if self.is_fsdp_enabled else first_nonfinite_parameter(self.model)
        if name is None:
            return
        checkpoint = Path(resume_from_checkpoint)
        earlier, notes = run_state.last_good_checkpoint(checkpoint.parent, run_state.checkpoint_global_step(checkpoint))
        advice = (
            f"the newest earlier one with finite weights is {earlier}: pass --resume_from_checkpoint {earlier} (and, "
            "if the run diverged, a lower --learning_rate with --allow_changed_args)"
            if earlier is not None
            else "no earlier checkpoint has finite weights: pass --overwrite_output_dir to start afresh"
        )
        raise NonFiniteError(
            f"cannot resume from {checkpoint}: its parameter {name} holds NaN or inf values (a diverged update "
            f"saved as is, or a damaged file); {advice}" + (f" ({'; '.join(notes)})" if notes else "")
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._check_guard()
        for key in ("loss", "eval_loss"):
            if key in logs:
                logs[key.replace("loss", "perplexity")] = perplexity(logs[key])
        super().log(logs, start_time)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The checkpoint's optimizer and scheduler state; under ``--allow_changed_args`` this run's hyperparameters
        (learning rate, betas, epsilon, weight decay) then replace the stored ones, which loading the state would
        otherwise silently keep, and the learning rate is the new schedule's at the checkpoint's step."""
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        base_lrs = list(getattr(self.lr_scheduler, "base_lrs", []))
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.args.allow_changed_args or self.is_deepspeed_enabled:
            return
        for group, settings in zip(self.optimizer.param_groups, fresh, strict=True):
            group.update(settings)
        lambdas = getattr(self.lr_scheduler, "lr_lambdas", None)  # the transformers schedules are LambdaLR
        if lambdas is not None:
            self.lr_scheduler.base_lrs = base_lrs
            for group, base, schedule in zip(self.optimizer.param_groups, base_lrs, lambdas, strict=True):
                group["lr"] = base * schedule(self.lr_scheduler.last_epoch)
            self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then its completeness marker, and only then the rotation of older ones
        (:func:`densessm.run_state.rotate_checkpoints`).

        A folder of the same step (a save cut short, or a later branch abandoned by an explicit resume) is
        removed first, so no stale file or marker mixes into the new checkpoint."""
        self._check_guard()
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            logger.info(f"replacing {folder}, left by an earlier attempt")
            run_state.discard_checkpoint(folder)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # no rotation inside: it comes below
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's files (its RNG state, engine shards) are written
        if self.args.should_save:
            stored = run_state.read_arguments(self.args.output_dir)
            if stored is not None:
                run_state.write_arguments(folder, stored)
            run_state.write_marker(folder, self.args.world_size)
            run_state.rotate_checkpoints(run_dir, limit, folder, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint's weights as the Trainer saves them; the final model through a staging folder
        (:func:`densessm.run_state.publish_model`), so a kill never leaves half of it beside a ``config.json``."""
        self._check_guard()
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        target = Path(output_dir or self.args.output_dir)
        staging = target / run_state.STAGING_NAME
        if self.args.should_save:
            target.mkdir(parents=True, exist_ok=True)
            staging = run_state.fresh_staging_dir(target)
        self.accelerator.wait_for_everyone()
        super().save_model(str(staging), _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            run_state.publish_model(staging, target)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


class RunFinished(Exception):  # noqa: N818 (a signal, not an error)
    """The checkpoint to resume from is the run's last step: nothing is left to train.

    The Trainer would train one step past ``--max_steps`` (it checks the limit only after a step), or nothing
    at all and report a loss of 0.0; instead :func:`finish_run` completes the final save if it was cut short."""


class _StickyInterrupt(TrainerCallback):
    """Ctrl-C that stops the run even where Python swallows it: a ``KeyboardInterrupt`` raised while a finalizer
    or a weakref callback runs is printed as "Exception ignored" and lost, and the run went on training. The
    handler still raises it at once, as Python's own does; it also keeps a flag that the end of the step reads."""

    def __init__(self):
        self.pressed = False
        self._previous = None

    def _handler(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def install(self) -> None:
        """In place of Python's own handler only: a process started with Ctrl-C ignored (a background job) or
        with a handler of its own keeps it. Only the main thread may set handlers."""
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.pressed:
            raise KeyboardInterrupt


class _ResumeState(TrainerCallback):
    """On resume: this run's logging, evaluation and saving frequencies (the Trainer keeps the checkpoint's,
    though they are harmless to change), and a stop at or past the run's last step, where that step is known
    only now (``--num_train_epochs``)."""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if self.checkpoint is None:
            return
        state.compute_steps(args, state.max_steps)
        if state.global_step > state.max_steps:
            raise UsageError(past_the_end(self.checkpoint, state.global_step, state.max_steps))
        if state.global_step == state.max_steps:
            raise RunFinished


class _TrainingStarted(TrainerCallback):
    """Marks the run's new folder as kept once the Trainer has built its optimizer and schedule and begins: a run
    that fails while setting them up leaves no folder behind, as one that fails before."""

    def __init__(self, new_dir: _NewOutputDir):
        self.new_dir = new_dir

    def on_train_begin(self, args, state, control, **kwargs):
        self.new_dir.training_started = True


def past_the_end(checkpoint: Path, step: int, last_step: int) -> str:
    return (
        f"{checkpoint} is at step {step}, past this run's last step {last_step}: raise --max_steps or "
        "--num_train_epochs to continue the run, or pass --overwrite_output_dir to start afresh"
    )


_TRAINING_STATE_FILES = (run_state.MARKER_NAME, run_state.ARGUMENTS_NAME, TRAINER_STATE_NAME)


def finish_run(checkpoint: Path, output_dir: Path, use_cache: bool) -> None:
    """A rerun of a run whose newest checkpoint is its last step: nothing is trained. If the final save was cut
    short (no ``config.json`` in ``output_dir``), the checkpoint's model (weights, configuration, tokenizer)
    becomes the final model; otherwise there is nothing to do, and the log says so."""
    step = run_state.checkpoint_global_step(checkpoint)
    if (output_dir / "config.json").is_file():
        logger.warning(
            f"nothing to do: the run in {output_dir} has already finished ({checkpoint} is its last step, {step}), "
            "and its final model is saved there. Raise --max_steps or --num_train_epochs (with "
            "--allow_changed_args) to train on, or pass --overwrite_output_dir to start afresh"
        )
        return
    model_files = [
        p
        for p in checkpoint.iterdir()
        if p.is_file()
        and p.name not in _TRAINING_STATE_FILES
        and not p.name.startswith(("rng_state", "scheduler", "scaler", "optimizer"))
    ]
    # the checkpoint is this run's (its final save was cut short), or another run's, named by --resume_from_checkpoint
    ours = checkpoint.resolve().parent == output_dir.resolve()
    why = "but its final save was cut short" if ours else f"and {output_dir} holds no model yet"
    if not any(p.name in WEIGHT_FILES for p in model_files):
        raise UsageError(
            f"the run of {checkpoint} had finished at step {step}, {why}, and {checkpoint} holds its weights only in "
            "the engine's format (FSDP/DeepSpeed): convert them from there"
        )
    staging = run_state.fresh_staging_dir(output_dir)
    for path in model_files:
        shutil.copy2(path, staging / path.name)
    config = read_config(checkpoint)
    config.use_cache = use_cache  # as the final save writes it (the Trainer turns it off for training)
    config.save_pretrained(staging)
    run_state.publish_model(staging, output_dir)
    logger.warning(
        f"the run of {checkpoint} had finished at step {step}, {why}: the model of {checkpoint} is now saved in "
        f"{output_dir}/ (nothing was trained)"
    )


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _picklable(err: Exception) -> Exception:
    try:
        pickle.dumps(err)
    except Exception:  # noqa: BLE001 (any pickling failure: send the message instead)
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def agree(fn: Callable[[], _T], here: bool = True) -> _T | None:
    """``fn()`` on the processes where ``here``; if it raised on any process, every process raises that error.

    Work that only the writing process does (take the lock, clean up) must fail on all processes alike, or the
    others would wait in the next collective until the timeout."""
    result, error = None, None
    if here:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 (shared with the other processes, then raised)
            error = err
    if _distributed():
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, None if error is None else _picklable(error))
        error = error or next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    return result


def prepare_output_dir(args: DenseTrainingArguments) -> None:
    """On the writing process, with the lock held: remove a crashed final save's staging folder and, for
    ``--overwrite_output_dir``, the old checkpoints (never the one an explicit --resume_from_checkpoint names)."""
    out = Path(args.output_dir)
    links = [p for p in out.iterdir() if p.is_symlink() and run_state.checkpoint_step(p) is None]
    if links:  # the Trainer writes its results and state with open(): through a link, into a file elsewhere
        shown = ", ".join(f"{p.name} -> {os.readlink(p)}" for p in sorted(links)[:5])
        raise UsageError(
            f"--output_dir {out} holds symlinks ({shown}{', ...' if len(links) > 5 else ''}): a run writes its "
            "results, state and model there and would write through them into files outside the run; remove "
            "them, or choose another --output_dir"
        )
    foreign = run_state.foreign_checkpoint_folders(out)
    if foreign:  # the run would resume past it, rotate it away or (--overwrite_output_dir) delete it
        held = ", ".join(sorted(p.name for p in foreign[0].iterdir())[:5])
        raise UsageError(
            f"--output_dir {out}: {foreign[0].name} is named like a checkpoint but holds none of a checkpoint's files "
            f"({held}); move it out of --output_dir (a run would delete it)"
        )
    shutil.rmtree(out / run_state.STAGING_NAME, ignore_errors=True)
    if not args.overwrite_output_dir:
        return
    explicit = Path(args.resume_from_checkpoint).resolve() if args.resume_from_checkpoint else None
    for checkpoint in run_state.list_checkpoints(out):
        if explicit is not None and checkpoint.resolve() == explicit:
            raise UsageError(
                f"--overwrite_output_dir would delete {checkpoint}, the checkpoint --resume_from_checkpoint names: "
                "pass one of the two"
            )
    old = run_state.list_checkpoints(out)
    if old or (out / "config.json").is_file():
        logger.warning(
            f"--overwrite_output_dir: starting afresh in {out}; removing its {len(old)} checkpoint(s), and its saved "
            "model is replaced when this run ends"
        )
    for checkpoint in old:
        run_state.discard_checkpoint(checkpoint)


def resolve_checkpoint(args: DenseTrainingArguments) -> Path | None:
    """The checkpoint to resume from: the one given (it must be complete), else the newest complete one in
    ``output_dir`` (unless overwriting); incomplete newer ones are skipped with the reason."""
    if args.resume_from_checkpoint:
        path = Path(args.resume_from_checkpoint)
        problems = run_state.checkpoint_problems(path)
        inside = run_state.list_checkpoints(path) if problems else []
        if inside:  # a run's folder, not one of its checkpoints
            last, _ = run_state.newest_complete_checkpoint(path)
            raise UsageError(
                f"--resume_from_checkpoint {path} is a run's folder, not a checkpoint: name one of its checkpoints"
                + (f" (the newest complete one is {last})" if last is not None else " (none of them is complete)")
            )
        if problems:
            raise UsageError(f"--resume_from_checkpoint {path} is not a complete checkpoint: {'; '.join(problems)}")
        return path
    out = Path(args.output_dir)
    if args.overwrite_output_dir or not run_state.holds_work(out):
        return None
    last, skipped = run_state.newest_complete_checkpoint(out)
    for path, problems in skipped:
        logger.warning(f"skipping {path}: incomplete ({'; '.join(problems)})")
    if last is None:
        if not skipped and (out / "config.json").is_file() and (out / run_state.ARGUMENTS_NAME).is_file():
            raise UsageError(
                f"output directory {out} holds the model of a finished run and no checkpoint to continue from "
                "(the run saved none): choose another --output_dir, or pass --overwrite_output_dir to train afresh "
                "there (its model is replaced when that run ends)"
            )
        held = f"only incomplete checkpoints ({', '.join(p.name for p, _ in skipped)})" if skipped else "no checkpoint"
        raise UsageError(
            f"output directory {out} exists and holds {held}: pass --overwrite_output_dir to train there afresh "
            "(its checkpoints are deleted), or choose another --output_dir"
        )
    logger.info(f"resuming from {last}, the last complete checkpoint in {out} (--overwrite_output_dir starts afresh)")
    newer = [
        p.name
        for p in run_state.list_checkpoints(out)
        if run_state.checkpoint_step(p) > run_state.checkpoint_step(last)
    ]
    if newer:
        logger.warning(f"{', '.join(newer)} will be replaced as training reaches their steps")
    return last


def build_tokenizer(args: ModelArguments) -> PreTrainedTokenizerBase:
    source = args.tokenizer_name
    if source is None and Path(args.model_name_or_path).is_dir() and has_tokenizer(args.model_name_or_path):
        source = args.model_name_or_path
    tokenizer = load_tokenizer(source)
    if args.model_max_length is not None:
        tokenizer.model_max_length = args.model_max_length
    return tokenizer


def model_source(args: ModelArguments) -> tuple[PretrainedConfig, Path | None]:
    """The configuration ``--model_name_or_path`` names (a preset, or a directory's ``config.json`` read strictly:
    a foreign ``model_type`` or invalid JSON is an error naming it) and the directory of its weights, if any."""
    name = args.model_name_or_path
    if name in list_presets():
        return load_preset(name), None
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model_name_or_path {name!r} is neither a preset ({', '.join(list_presets())}) nor a directory "
            "with a config.json"
        )
    return read_config(path), (path if any((path / f).is_file() for f in WEIGHT_FILES) else None)


def _override(config: PretrainedConfig, overrides: str) -> set[str]:
    """``config.update_from_string(overrides)``, each refusal a usage error naming the key: it converts a value
    to the type the key holds, and sets only int, float, bool and string keys. Returns the keys set."""
    keys = set()
    for pair in overrides.split(","):
        key, equals, value = pair.partition("=")
        if not key or not equals or "=" in value:
            raise UsageError(
                f"--config_overrides {overrides!r}: {pair!r} is not KEY=VALUE (pairs are separated by commas)"
            )
        if key == "model_type":  # the configuration's class decides it: an override would be dropped unseen
            raise UsageError(
                f"--config_overrides {overrides!r}: model_type cannot be overridden; choose the family with "
                "--model_name_or_path (a preset of it, see `densessm presets`, or a directory with its config.json)"
            )
        if key in keys:  # the last value would win without a word
            raise UsageError(f"--config_overrides {overrides!r}: {key} is given twice")
        keys.add(key)
        try:
            config.update_from_string(pair)
        except ValueError as err:
            takes = {bool: "true or false", int: "an integer", float: "a number"}.get(type(getattr(config, key, None)))
            reason = f"{key} takes {takes}, got {value!r}" if hasattr(config, key) and takes else err
            raise UsageError(f"--config_overrides {overrides!r}: {reason}") from None
        except TypeError:
            current = getattr(config, key)
            kind = "nothing (None)" if current is None else f"a {type(current).__name__} ({current!r})"
            raise UsageError(
                f"--config_overrides {overrides!r}: {key} holds {kind}, which --config_overrides cannot set (it "
                "sets int, float, bool and string keys): write the value in a config.json and pass its directory "
                "as --model_name_or_path"
            ) from None
    return keys


def _take_tokenizer_fields(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, overridden: set[str], overrides: str | None
) -> None:
    """Set the tokenizer's vocabulary size and special token ids on ``config``. An override of one of them that
    would be replaced is refused; a larger ``vocab_size`` is kept (a padded embedding, as a saved model with
    spare rows has: the extra ids are never fed in)."""
    if "vocab_size" not in overridden:
        config.vocab_size = len(tokenizer)
    elif config.vocab_size < len(tokenizer):
        raise UsageError(
            f"--config_overrides {overrides!r}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens: drop it (the tokenizer decides the vocabulary; a larger value pads the "
            "embedding), or pass a tokenizer of that size with --tokenizer_name"
        )
    for key in _SPECIAL_TOKEN_FIELDS:
        value = getattr(tokenizer, key)
        if value is None:  # the tokenizer has no such token: the configuration's (or the override's) stays
            continue
        if key in overridden and getattr(config, key) != value:
            raise UsageError(
                f"--config_overrides {overrides!r}: {key} is decided by the tokenizer ({value}), not "
                f"{getattr(config, key)}: drop it, or pass a tokenizer with that token as --tokenizer_name"
            )
        setattr(config, key, value)


def model_config(
    args: ModelArguments, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PretrainedConfig, Path | None]:
    """:func:`model_source`, with ``--config_overrides`` applied to a from-scratch configuration and, given the
    tokenizer, its vocabulary size and special token ids; the result validated. Called once without the tokenizer
    before the run takes its lock, so a value that cannot work is refused before anything is created."""
    config, weights = model_source(args)
    if weights is not None:
        if args.config_overrides:
            raise UsageError(
                f"--config_overrides only applies to a model trained from scratch; {weights} holds weights"
            )
        return config, weights
    overridden = _override(config, args.config_overrides) if args.config_overrides else set()
    if tokenizer is not None:
        _take_tokenizer_fields(config, tokenizer, overridden, args.config_overrides)
    try:
        config.validate()
    except (ValueError, StrictDataclassError) as err:
        reason = err.__cause__ or err  # a strict-dataclass error wraps the validator's one-line ValueError
        if args.config_overrides:
            raise UsageError(f"--config_overrides {args.config_overrides!r}: {reason}") from None
        with_tokenizer = " with this tokenizer" if tokenizer is not None else ""
        raise ModelLoadError(f"the configuration of {args.model_name_or_path}{with_tokenizer}: {reason}") from None
    return config, None


def build_model(args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A model in fp32 (the master weights under mixed precision): fresh from a preset or config, or loaded
    strictly (:func:`densessm.loading.load_causal_lm`: a missing, unexpected or mis-shaped tensor is an error)."""
    config, weights = model_config(args, tokenizer)
    if weights is None:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = load_causal_lm(weights, dtype=torch.float32, config=config)
    name = first_nonfinite_parameter(model)
    if name is not None:  # a training step would give a NaN loss and blame the learning rate
        raise NonFiniteError(
            f"{weights} holds NaN or inf values in its parameter {name}: training cannot start from it; "
            "use an intact copy of the model, or train from scratch"
        )
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but {weights} was trained with vocab_size "
            f"{model.config.vocab_size}: pass the tokenizer it was trained with (--tokenizer_name)"
        )
    return model


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


def choose_block_size(requested: int | None, config, model_max_length: int | None = None) -> int:
    """The training block length: ``--block_size``, else the model's position limit capped by
    ``--model_max_length`` (as the reference script does). A block longer than either is refused: the saved
    tokenizer would claim a shorter maximum than the model was trained on."""
    limit = getattr(config, "max_position_embeddings", None)
    if requested is None:
        default = limit or DEFAULT_BLOCK_SIZE
        return default if model_max_length is None else min(default, model_max_length)
    if limit is not None and requested > limit:
        raise UsageError(
            f"--block_size {requested} is larger than the model supports (max_position_embeddings = {limit}): "
            f"pass --block_size {limit} or less, or raise it with --config_overrides max_position_embeddings=..."
        )
    if model_max_length is not None and requested > model_max_length:
        raise UsageError(
            f"--block_size {requested} is longer than --model_max_length {model_max_length}, the maximum the saved "
            "tokenizer will state: lower --block_size or raise --model_max_length"
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
    if args.disable_tqdm:  # the Trainer's own bar; transformers' save_pretrained draws another ("Writing model shards")
        transformers.utils.logging.disable_progress_bar()


def run_arguments(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DenseTrainingArguments,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
) -> dict:
    """Everything that defines the run, as stored in ``run_arguments.json``: the flags, and what they resolve to
    (the block size, the world size, the model's configuration, the tokenizer, the corpus files with their sizes
    and modification times: a file edited in place keeps its size, and the token blocks are then rebuilt)."""
    arguments = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **training_args.to_dict()}
    config = {f"config.{k}": v for k, v in model.config.to_dict().items() if k not in _CONFIG_BOOKKEEPING}
    files = {}
    for paths in (data_args.dataset_dir, data_args.validation_files):  # one call each: a file in both is load_blocks'
        for group in find_data_files(paths).values() if paths else ():
            for name in group:
                info = Path(name).stat()
                files[name] = {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
    arguments.update(
        {
            "world_size": training_args.world_size,
            "resolved_block_size": block_size,
            **config,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "data_files": files,
        }
    )
    return run_state.normalized(arguments)


def check_resume(checkpoint: Path, arguments: dict, model: PreTrainedModel, allow_changed: bool) -> None:
    """Refuse a resume that cannot continue the run in ``checkpoint``: a step past ``max_steps``, arguments that
    change the result (unless ``allow_changed``), or a model the checkpoint's weights do not fit; raise
    :class:`RunFinished` if the checkpoint is the run's last step."""
    step, max_steps = run_state.checkpoint_global_step(checkpoint), arguments["max_steps"]
    if 0 < max_steps < step:
        raise UsageError(past_the_end(checkpoint, step, max_steps))
    _check_stored_arguments(checkpoint, arguments, allow_changed)
    saved_type = read_config(checkpoint).model_type
    if saved_type != model.config.model_type:
        raise UsageError(
            f"{checkpoint} holds a {saved_type} model, and this run builds a {model.config.model_type}: a resume "
            "continues the same model (--overwrite_output_dir starts afresh)"
        )
    try:
        check_weights(checkpoint, model.config)
    except ModelLoadError as err:
        raise UsageError(f"cannot resume: {err}") from None
    if step == max_steps:
        raise RunFinished


def _check_stored_arguments(checkpoint: Path, arguments: dict, allow_changed: bool) -> None:
    """Compare ``arguments`` with those stored in ``checkpoint`` (see :func:`check_resume`)."""
    try:
        stored = run_state.read_arguments(checkpoint, strict=True)
    except ValueError as err:  # there, but damaged: the arguments cannot be compared, which is no permission
        if not allow_changed:
            raise ValueError(
                f"cannot resume from {checkpoint}: {err}, so the arguments cannot be compared with the run's; pass "
                "--allow_changed_args to resume anyway, or --overwrite_output_dir to start afresh"
            ) from None
        logger.warning(f"{err}: resuming without comparing the arguments (--allow_changed_args)")
        return
    if stored is None:
        logger.warning(f"{checkpoint} has no stored arguments ({run_state.ARGUMENTS_NAME}): they cannot be compared")
        return
    changed, harmless = run_state.compare_arguments(stored, arguments)
    if harmless:
        logger.info(f"resuming with other values that do not change the result:\n{run_state.format_table(harmless)}")
    fixed = [row for row in changed if row[0] in _FIXED_ON_RESUME]
    if fixed:
        raise UsageError(
            f"cannot resume from {checkpoint} with another optimizer: its state loads only into the one that "
            f"saved it (stored -> now):\n{run_state.format_table(fixed)}"
        )
    if changed and not allow_changed:
        names = run_state.list_names(dict.fromkeys(name.split("[")[0] for name, _, _ in changed))
        raise UsageError(
            f"cannot resume from {checkpoint}: {len(changed)} argument(s) that change the result differ from "
            f"the run's ({names}); pass the same values, --allow_changed_args to resume anyway, or "
            f"--overwrite_output_dir to start afresh (stored -> now):\n{run_state.format_table(changed)}"
        )
    if changed:
        logger.warning(f"resuming with changed arguments (--allow_changed_args):\n{run_state.format_table(changed)}")


def _interrupted(output_dir: str) -> Interrupted:
    last = last_complete_checkpoint(output_dir)
    if last is None:
        return Interrupted(
            f"training stopped; no checkpoint saved yet in {output_dir}: the same command starts it again"
        )
    return Interrupted(f"training stopped; run the same command again to resume from {last}")


class _NewOutputDir:
    """The directories that creating ``--output_dir`` adds: a run that ends before training starts (a refused
    resume, bad data, Ctrl-C) removes them again with its own bookkeeping in them, so a refusal leaves nothing
    behind. A directory that existed before the run, or that holds anything else, is kept."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        path = Path(output_dir).absolute()
        self.path = path
        self.created: list[Path] = []  # innermost first
        for step in (path, *path.parents):
            if os.path.lexists(step):
                break
            self.created.append(step)
        self.training_started = False

    def discard(self) -> None:
        """Remove what this run created, with the run lock still held (so no other run has written there)."""
        if not self.created or self.training_started:
            return
        shutil.rmtree(self.path / run_state.STAGING_NAME, ignore_errors=True)
        for name in (run_state.ARGUMENTS_NAME, run_state.HOLDER_NAME, run_state.LOCK_NAME):
            (self.path / name).unlink(missing_ok=True)
        for directory in self.created:
            try:
                directory.rmdir()
            except OSError:  # something else is in it: not ours to remove
                return


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DenseTrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Run one training job; returns its metrics and the paths it wrote (on every process).

    The run holds the lock on ``--output_dir`` from before it looks at the directory until it returns; Ctrl-C
    ends it with :class:`~densessm.errors.Interrupted` naming the checkpoint to resume from."""
    _setup_logging(training_args)
    run_state.check_output_dir(training_args.output_dir)
    check_link(training_args.output_dir, "--output_dir")  # a run's folder cannot replace a link
    out = Path(training_args.output_dir).resolve()
    for corpus in [*(data_args.dataset_dir or []), *(data_args.validation_files or [])]:
        if not str(corpus).strip():  # Path("") is the current directory: it would be blamed on --output_dir
            raise UsageError("an empty path was given as a corpus file or directory (--dataset_dir/--validation_files)")
        if Path(corpus).is_dir() and Path(corpus).resolve() in (out, *out.parents):
            raise UsageError(
                f"--output_dir {training_args.output_dir} lies inside the corpus directory {corpus}: a later run "
                "would read its checkpoints and logs as training text; choose an --output_dir outside it"
            )
    source = Path(model_args.model_name_or_path)
    if source.is_dir():  # even with --overwrite_output_dir: the run's final save would replace the model it read
        source = source.resolve()
        if source == out or source in out.parents or out in source.parents:
            raise UsageError(
                f"--output_dir {training_args.output_dir} is, lies inside or holds the model directory "
                f"--model_name_or_path {model_args.model_name_or_path}: the run would write over the model it "
                "starts from; choose an --output_dir outside it"
            )
    check_engine(training_args)
    if training_args.push_to_hub:
        check_hub_access(training_args)
    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps: the length of a streamed corpus is not known in advance")
    no_validation = data_args.validation_split_percentage <= 0 and not data_args.validation_files
    if getattr(training_args, "wants_eval", None) is False and not no_validation:
        raise UsageError(
            "--do_eval false, but the run holds out a validation set and scores it (--validation_split_percentage "
            f"{data_args.validation_split_percentage:g}{', --validation_files' if data_args.validation_files else ''}"
            "): pass --validation_split_percentage 0 (and no --validation_files) to train on everything unscored"
        )
    if training_args.eval_on_start and no_validation:  # the Trainer fails at the first step, exit 1
        raise UsageError(
            "--eval_on_start needs a validation set, and --validation_split_percentage 0 holds none out: give "
            "--validation_files, a percentage above 0, or drop --eval_on_start"
        )
    if training_args.eval_strategy != "no" and no_validation:  # the Trainer says so after the corpus is tokenized
        raise UsageError(
            f"--eval_strategy {training_args.eval_strategy.value} needs a validation set, and "
            "--validation_split_percentage 0 holds none out: give --validation_files, a percentage above 0, "
            "or --eval_strategy no"
        )
    # A model, tokenizer or --config_overrides that cannot work is refused before the lock creates anything; the
    # config.json is checked before the tokenizer reads it, so it gets the blame.
    model_config(model_args)
    tokenizer = build_tokenizer(model_args)
    config, weights = model_config(model_args, tokenizer)
    if weights is not None:  # the strict loader's check of the weight files' headers, without loading them
        check_weights(weights, config)
    choose_block_size(data_args.block_size, config, model_args.model_max_length)
    new_dir = _NewOutputDir(training_args.output_dir)
    lock = run_state.RunLock(training_args.output_dir)
    try:
        agree(lock.acquire, here=training_args.should_save)
        try:
            return _train_locked(model_args, data_args, training_args, tokenizer, callbacks, new_dir)
        except BaseException:
            if training_args.should_save:
                new_dir.discard()
            raise
    except KeyboardInterrupt as err:
        if isinstance(err, Interrupted):
            raise
        raise _interrupted(training_args.output_dir) from None
    finally:
        lock.release()


def _train_locked(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DenseTrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    callbacks: Sequence[TrainerCallback],
    new_dir: _NewOutputDir,
) -> dict:
    out = Path(training_args.output_dir)
    agree(lambda: prepare_output_dir(training_args), here=training_args.should_save)
    checkpoint = agree(lambda: resolve_checkpoint(training_args))
    set_seed(training_args.seed)
    init_deepspeed_comm(training_args)
    model = build_model(model_args, tokenizer)
    block_size = choose_block_size(data_args.block_size, model.config, model_args.model_max_length)
    arguments = run_arguments(model_args, data_args, training_args, model, tokenizer, block_size)
    if checkpoint is not None:
        try:
            agree(lambda: check_resume(checkpoint, arguments, model, training_args.allow_changed_args))
        except RunFinished:
            agree(lambda: finish_run(checkpoint, out, model.config.use_cache), here=training_args.should_save)
            return {"output_dir": str(out), "finished_from": str(checkpoint)}
        if data_args.streaming:
            logger.warning(
                "resuming a --streaming run: the batches after a resume are not those an uninterrupted run reads, "
                "so the final weights differ from theirs (a cached corpus resumes exactly)"
            )
    agree(lambda: run_state.write_arguments(out, arguments), here=training_args.should_save)
    if training_args.local_process_index != 0:  # --overwrite_cache: the node's first process rebuilt them just now
        data_args = dataclasses.replace(data_args, overwrite_cache=False)
    with training_args.main_process_first(desc="tokenizing the corpus"):
        train_set, eval_set = load_blocks(data_args, tokenizer, block_size, training_args.seed)

    tokens_per_step = (
        block_size
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    rows = training_args.per_device_train_batch_size * training_args.world_size
    if training_args.dataloader_drop_last:  # a set smaller than one batch would be dropped whole
        eval_rows = training_args.per_device_eval_batch_size * training_args.world_size
        for name, blocks, batch, flag in (
            ("training", train_set, rows, "per_device_train_batch_size"),
            ("validation", eval_set, eval_rows, "per_device_eval_batch_size"),
        ):
            if isinstance(blocks, datasets.Dataset) and len(blocks) < batch:
                raise UsageError(
                    f"the {name} set holds {len(blocks)} blocks, fewer than one batch of {batch} (--{flag}), and "
                    "--dataloader_drop_last would drop them all: lower the batch size or drop --dataloader_drop_last"
                )
    batches = math.ceil(len(train_set) / rows) if isinstance(train_set, datasets.Dataset) else None
    if batches is not None and batches < training_args.gradient_accumulation_steps:
        logger.warning(
            f"--gradient_accumulation_steps {training_args.gradient_accumulation_steps} exceeds the {batches} "
            f"batch(es) of an epoch: each optimizer step accumulates only those {batches} (the Trainer ends an "
            "accumulation at the end of an epoch), so a step holds fewer tokens than the line below says"
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
        callbacks=[_TrainingStarted(new_dir), _ResumeState(checkpoint), interrupt := _StickyInterrupt(), *callbacks],
    )
    interrupt.install()
    try:
        result = trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    except RunFinished:
        agree(lambda: finish_run(checkpoint, out, use_cache), here=training_args.should_save)
        return {"output_dir": str(out), "finished_from": str(checkpoint)}
    finally:
        interrupt.restore()
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
        # An evaluation at the last step (--eval_strategy steps) already scored these weights, unless the Trainer
        # then loaded the best checkpoint's (--load_best_model_at_end).
        done = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
        if training_args.load_best_model_at_end:
            done = []
        eval_metrics = {k: v for k, v in done[-1].items() if k.startswith("eval_")} if done else trainer.evaluate()
        eval_metrics["eval_perplexity"] = perplexity(eval_metrics["eval_loss"])
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        summary["eval"] = eval_metrics

    if trainer.is_world_process_zero():
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
    """The three argument dataclasses; a value they refuse (theirs or transformers') is a :class:`UsageError`."""
    parser = HfArgumentParser((ModelArguments, DataArguments, DenseTrainingArguments), prog="densessm train")
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from None


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
    "last_complete_checkpoint",
    "main",
    "model_source",
    "parse_args",
    "train",
]
