"""Flags of ``densessm train`` that the Trainer reads only late, checked before any work the way it will use them:
the optimizer and schedule flags (``--optim_args``, ``--optim_target_modules``, ``--lr_scheduler_kwargs``) and
the flags that hold a JSON object (``--accelerator_config`` and the like).

The Trainer reads them only when it builds the optimizer and the schedule, after the corpus is tokenized and the
model built, and it ignores what the chosen optimizer or schedule does not read: ``--optim_args`` with the
default fused AdamW, or ``--lr_scheduler_kwargs`` with a constant schedule, change nothing without a word. Here
each key is tried on what the Trainer builds from it, so a key without effect, a value that fails and text that
is not the flag's format are named at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math

import torch
import torch._dynamo
import torch.utils.checkpoint
from accelerate.parallelism_config import ParallelismConfig
from transformers import Trainer, TrainingArguments
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, get_scheduler
from transformers.trainer_pt_utils import AcceleratorConfig
from transformers.trainer_utils import SchedulerType

from densessm.errors import UsageError
from densessm.files import loads_json, read_json

# Arguments the Trainer itself passes to a schedule: a key of the same name would clash with them.
_SCHEDULE_OWN = ("optimizer", "num_warmup_steps", "num_training_steps")
# Schedules that the Trainer builds without the extra arguments (transformers.optimization.get_scheduler).
_SCHEDULES_WITHOUT_KWARGS = (SchedulerType.CONSTANT, SchedulerType.CONSTANT_WITH_WARMUP)
_PROBE_VALUE = "0.123456789"  # a second value for a key: a key read by the optimizer changes what it builds


def _refuse_unknown(flag: str, given: dict, accepted: list[str], what: str) -> None:
    """Refuse the keys of a flag's object that ``what`` does not take, listing those it does."""
    unknown = [str(key) for key in given if key not in accepted]
    if unknown:
        raise UsageError(f"--{flag} {', '.join(unknown)}: not {what} (it takes {', '.join(accepted) or 'none'})")


def parse_optim_args(text: str) -> dict[str, str]:
    """``--optim_args`` as the Trainer splits it (``key=value`` pairs, commas between), or a usage error."""
    pairs = {}
    for item in text.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise UsageError(
                f"--optim_args must be comma-separated key=value pairs (e.g. momentum=0.9,nesterov=true), got {text!r}"
            )
        if key in pairs:
            raise UsageError(f"--optim_args gives {key} twice")
        pairs[key] = value
    return pairs


def _optimizer_for(args: TrainingArguments, optim_args: str | None) -> tuple[object, dict]:
    saved = args.optim_args
    args.optim_args = optim_args
    try:
        return Trainer.get_optimizer_cls_and_kwargs(args)
    finally:
        args.optim_args = saved


def check_optim_args(args: TrainingArguments) -> None:
    """Refuse ``--optim_args`` that the chosen ``--optim`` does not read, or reads and fails on.

    A key counts as read when its value, or a second value in its place, changes the optimizer the Trainer
    builds. Optimizers that cannot be built before the model (they need it, or a package that is absent) are
    left to the Trainer."""
    if not args.optim_args:
        return
    pairs = parse_optim_args(args.optim_args)
    optim = getattr(args.optim, "value", args.optim)
    try:
        baseline = _optimizer_for(args, None)
    except Exception:  # noqa: BLE001 - needs the model or a missing package: the Trainer will say so
        return
    ignored = []
    for key, value in pairs.items():
        results = []
        for tried in (value, _PROBE_VALUE):
            try:
                results.append(_optimizer_for(args, f"{key}={tried}"))
            except Exception as err:  # noqa: BLE001 - the optimizer's own parsing of the value
                if tried == value:
                    raise UsageError(f"--optim_args {key}={value}: --optim {optim} cannot use it ({err})") from None
                results.append(None)  # the probe value fails: the key is read
        if all(result == baseline for result in results):
            ignored.append(key)
    if ignored:
        hint = (
            " (AdamW takes --adam_beta1, --adam_beta2, --adam_epsilon and --weight_decay)" if "adamw" in optim else ""
        )
        raise UsageError(
            f"--optim_args {', '.join(ignored)}: --optim {optim} does not read "
            f"{'it' if len(ignored) == 1 else 'them'}{hint}"
        )


def json_object(flag: str, text: str, example: str) -> dict:
    """The JSON object a flag holds, or a usage error naming the flag (the Trainer's own parse names none, and
    keeps the last value of a key given twice)."""
    try:
        value = loads_json(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--{flag} is not valid JSON ({err.msg}): give an object such as '{example}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"--{flag} must be a JSON object, such as '{example}', got {type(value).__name__}")
    return value


def parse_scheduler_kwargs(value: object) -> dict | None:
    """``--lr_scheduler_kwargs`` as a dict: a JSON object on the command line, or a dict from Python."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        return json_object("lr_scheduler_kwargs", value, '{"num_cycles": 2}')
    raise UsageError(
        f"--lr_scheduler_kwargs must be a JSON object of the schedule's arguments, got {type(value).__name__}"
    )


# The other flags that hold a JSON object; a string not starting with "{" names a JSON file (the Trainer reads it).
_JSON_FLAGS = (
    "accelerator_config",
    "fsdp_config",
    "deepspeed",
    "activation_checkpointing_kwargs",
    "gradient_checkpointing_kwargs",
)


def parse_json_flags(args: TrainingArguments) -> None:
    """Parse the JSON objects given inline to the flags that take one, naming the flag on an error, and check
    ``--accelerator_config``'s keys (an unknown one was an internal error once the model was built)."""
    for flag in _JSON_FLAGS:
        value = getattr(args, flag, None)
        # the checkpointing keywords are never a file: any text is their JSON (transformers' dict() of it said
        # only "dictionary update sequence element #0 has length 1")
        if isinstance(value, str) and (value.lstrip().startswith("{") or flag.endswith("checkpointing_kwargs")):
            setattr(
                args, flag, json_object(flag, value, '{"use_reentrant": false}' if "checkpointing" in flag else "{}")
            )
    if args.deepspeed == {}:  # transformers takes an empty configuration for no DeepSpeed at all
        raise UsageError("--deepspeed {}: an empty configuration; give DeepSpeed's settings (or its JSON file)")
    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:  # transformers' own message is garbled
        raise UsageError("--deepspeed needs the deepspeed package (pip install deepspeed)")
    _check_checkpointing_kwargs(args)
    config = args.accelerator_config
    if isinstance(config, str):  # the path of a JSON file
        try:
            config = read_json(config)
        except (OSError, ValueError) as err:
            raise UsageError(
                f"--accelerator_config {config}: not a readable JSON file ({err}); give a JSON object or its file"
            ) from None
        if not isinstance(config, dict):
            raise UsageError(f"--accelerator_config {args.accelerator_config}: the file holds no JSON object")
        args.accelerator_config = config
    if isinstance(config, dict):
        known = [f.name for f in dataclasses.fields(AcceleratorConfig)]
        _refuse_unknown("accelerator_config", config, known, "a field of accelerate's configuration")


def parse_object_flags(args: TrainingArguments) -> None:
    """``--parallelism_config`` and ``--liger_kernel_config`` as the objects the Trainer takes: transformers'
    parser has no way to read either from a command line (it called any value invalid)."""
    if isinstance(args.parallelism_config, str):
        fields = json_object("parallelism_config", args.parallelism_config, '{"dp_shard_size": 2}')
        try:
            args.parallelism_config = ParallelismConfig(**fields)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--parallelism_config {args.parallelism_config}: {err}") from None
    if isinstance(args.liger_kernel_config, str):
        args.liger_kernel_config = json_object("liger_kernel_config", args.liger_kernel_config, '{"rope": true}')
    if args.liger_kernel_config is not None and not args.use_liger_kernel:
        raise UsageError("--liger_kernel_config applies with --use_liger_kernel: add it, or drop the configuration")


_CHECKPOINT_OWN = ("function", "args", "kwargs")  # torch.utils.checkpoint.checkpoint's own parameters
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_checkpointing_kwargs(args: TrainingArguments) -> None:
    for flag in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        given = getattr(args, flag, None)
        if not isinstance(given, dict):
            continue
        if not (getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing):
            switch = flag.removesuffix("_kwargs")
            raise UsageError(f"--{flag} applies with --{switch}: add it, or drop --{flag}")
        accepted = [
            p for p in inspect.signature(torch.utils.checkpoint.checkpoint).parameters if p not in _CHECKPOINT_OWN
        ]
        _refuse_unknown(flag, given, accepted, "an argument of torch.utils.checkpoint")


def check_compile_flags(args: TrainingArguments) -> None:
    """Refuse a ``--torch_compile_backend`` this PyTorch lacks and a ``--torch_compile_mode`` it does not know:
    the Trainer fails on them once the model is built (one of them with an internal error)."""
    backend = args.torch_compile_backend
    if backend is not None:
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend.lower() not in known:
            raise UsageError(f"--torch_compile_backend {backend}: not a backend of this PyTorch ({', '.join(known)})")
    if args.torch_compile_mode is not None and args.torch_compile_mode not in _COMPILE_MODES:
        raise UsageError(f"--torch_compile_mode {args.torch_compile_mode}: use one of {', '.join(_COMPILE_MODES)}")


# Optimizers that read --optim_target_modules (GaLore and APOLLO, in transformers.trainer_optimizer)
_TARGETED_OPTIMIZERS = ("galore", "apollo")


def check_optim_target_modules(args: TrainingArguments) -> None:
    """Refuse ``--optim_target_modules`` with an optimizer that does not read it (it changed nothing)."""
    optim = getattr(args.optim, "value", args.optim)
    if args.optim_target_modules is not None and not optim.startswith(_TARGETED_OPTIMIZERS):
        raise UsageError(
            f"--optim_target_modules: --optim {optim} does not read it (only the GaLore and APOLLO optimizers do)"
        )


def check_scheduler_kwargs(args: TrainingArguments) -> None:
    """Refuse ``--lr_scheduler_kwargs`` that the chosen schedule does not take, or that fail when it runs (tried
    on a stand-in optimizer over the run's length, or 100 steps where the length is known only later)."""
    kwargs = args.lr_scheduler_kwargs
    if not kwargs:
        return
    name = SchedulerType(args.lr_scheduler_type)
    if name in _SCHEDULES_WITHOUT_KWARGS:
        raise UsageError(f"--lr_scheduler_kwargs: the {name.value} schedule takes no arguments, got {sorted(kwargs)}")
    accepted = [p for p in inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[name]).parameters if p not in _SCHEDULE_OWN]
    _refuse_unknown("lr_scheduler_kwargs", kwargs, accepted, f"an argument of the {name.value} schedule")
    total = args.max_steps if args.max_steps > 0 else 100
    warmup = args.get_warmup_steps(total)
    steps = sorted({0, warmup, warmup + 1, total, *range(0, total + 1, max(1, total // 200))} - {total + 1})
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max(args.learning_rate, 1e-3))
    shown = json.dumps(kwargs)
    try:
        schedule = get_scheduler(name, stand_in, warmup, total, scheduler_specific_kwargs=kwargs)
        lambdas = schedule.lr_lambdas if isinstance(schedule, torch.optim.lr_scheduler.LambdaLR) else []
        rates = [float(rate(step)) for rate in lambdas for step in steps]
    except Exception as err:  # noqa: BLE001 - the schedule's own checks and arithmetic
        raise UsageError(f"--lr_scheduler_kwargs {shown}: the {name.value} schedule fails ({err})") from None
    bad = next((value for value in rates if not (math.isfinite(value) and value >= 0)), None)
    if bad is not None:
        raise UsageError(
            f"--lr_scheduler_kwargs {shown}: the {name.value} schedule gives a learning-rate factor of "
            f"{bad} (it must be finite and not negative)"
        )
