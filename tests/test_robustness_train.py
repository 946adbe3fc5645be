"""`densessm train` against bad input, faults and misuse.

Every refusal is one line (or a line and a table of differences) with exit code 2 for a usage error, 1 for a
failure, 130 for Ctrl-C, and leaves what is on disk byte for byte as it was. Killed at each phase of a
checkpoint write or of the final save, a run resumed with the same command ends with bitwise the weights of an
uninterrupted run; a second run on the same --output_dir fails at once naming the holder."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import datasets
import pytest
import torch
from multiprocess.context import TimeoutError as PoolTimeoutError
from safetensors.torch import load_file, save_file
from tiny_training import (
    PYTHON,
    SENTENCES,
    SUBPROCESS_ENV,
    TINY,
    ctrl_c_as_in_a_terminal,
    driver_command,
    losses,
    run_driver,
    snapshot,
    train_argv,
    weights,
    write_corpus,
)
from transformers import AutoModelForCausalLM, TrainerCallback

import densessm.train
import densessm.trainer_flags
from densessm.cli import main as cli_main
from densessm.errors import Interrupted, UsageError
from densessm.loading import load_causal_lm
from densessm.presets import load_preset
from densessm.run_state import (
    ARGUMENTS_NAME,
    MARKER_NAME,
    STAGING_NAME,
    RunLock,
    RunLockedError,
    checkpoint_problems,
    discard_checkpoint,
    last_complete_checkpoint,
    rotate_checkpoints,
    write_marker,
)
from densessm.train import (
    DenseTrainer,
    DenseTrainingArguments,
    ModelArguments,
    build_tokenizer,
    main,
    model_config,
)

ROOT = Path(__file__).resolve().parents[1]
# dropout > 0: a resume that restored the wrong RNG state would not end at the same weights
FLAGS = dict(
    max_steps=6,
    save_strategy="steps",
    save_steps=2,
    config_overrides=TINY + ",dropout=0.1",
    sample_max_new_tokens=0,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run (checkpoints 2, 4, 6 and the final model): where every interrupted run must end."""
    root = tmp_path_factory.mktemp("straight")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(train_argv(root, **FLAGS))
    finally:
        torch.set_num_threads(before)
    return root / "out"


def straight_argv(straight: Path, output_dir: Path, **flags) -> list[str]:
    """The straight run's flags (its corpus and cache) with another --output_dir."""
    return train_argv(straight.parent, **{**FLAGS, "output_dir": str(output_dir), **flags})


def resumable(straight: Path, dest: Path) -> Path:
    """The straight run as if killed after step 4: checkpoints 2 and 4 and the stored arguments."""
    dest.mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(straight / f"checkpoint-{step}", dest / f"checkpoint-{step}")
    shutil.copy2(straight / ARGUMENTS_NAME, dest / ARGUMENTS_NAME)
    return dest


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """``densessm train ARGV`` in this process: the exit code and the last line of stderr."""
    code = cli_main(["train", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, "\n".join(lines[-1:])


def cli_full(argv: list[str], capsys) -> tuple[int, str]:
    code = cli_main(["train", *argv])
    return code, capsys.readouterr().err


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---- flag values that cannot work: exit 2, one line, nothing created ------------------------------------------

BAD_FLAGS = [
    ("per_device_train_batch_size", "0", "--per_device_train_batch_size must be a positive integer, got 0"),
    ("per_device_train_batch_size", "-1", "--per_device_train_batch_size must be a positive integer, got -1"),
    ("per_device_eval_batch_size", "0", "--per_device_eval_batch_size must be a positive integer, got 0"),
    ("gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be a positive integer, got 0"),
    ("learning_rate", "-1", "--learning_rate must be a finite number, 0 or more, got -1.0"),
    ("learning_rate", "nan", "--learning_rate must be a finite number, 0 or more, got nan"),
    ("learning_rate", "inf", "--learning_rate must be a finite number, 0 or more, got inf"),
    ("weight_decay", "-0.1", "--weight_decay must be a finite number, 0 or more, got -0.1"),
    ("max_grad_norm", "-1", "--max_grad_norm must be a finite number, 0 or more, got -1.0"),
    ("adam_beta1", "1.5", "--adam_beta1 must be in [0, 1), got 1.5"),
    ("adam_beta2", "-0.1", "--adam_beta2 must be in [0, 1), got -0.1"),
    ("adam_epsilon", "0", "--adam_epsilon must be a positive number, got 0.0"),
    ("label_smoothing_factor", "2", "--label_smoothing_factor must be in [0, 1), got 2.0"),
    ("label_smoothing_factor", "-1", "--label_smoothing_factor must be in [0, 1), got -1.0"),
    ("neftune_noise_alpha", "-1", "--neftune_noise_alpha must be a positive number (unset: off), got -1.0"),
    ("max_steps", "0", "--max_steps must be 1 or more (-1: train --num_train_epochs), got 0"),
    ("max_steps", "-5", "--max_steps must be 1 or more (-1: train --num_train_epochs), got -5"),
    ("num_train_epochs", "0", "--num_train_epochs must be a positive number, got 0.0"),
    ("num_train_epochs", "nan", "--num_train_epochs must be a positive number, got nan"),
    ("save_steps", "0", "--save_steps must be a positive number (below 1: a fraction of the run), got 0.0"),
    ("save_steps", "-2", "--save_steps must be a positive number (below 1: a fraction of the run), got -2.0"),
    ("logging_steps", "-1", "--logging_steps must be a positive number (below 1: a fraction of the run), got -1.0"),
    ("eval_steps", "0", "--eval_steps must be a positive number (below 1: a fraction of the run), got 0.0"),
    ("save_total_limit", "0", "--save_total_limit must be 1 or more (unset: keep every checkpoint), got 0"),
    ("save_total_limit", "-1", "--save_total_limit must be 1 or more (unset: keep every checkpoint), got -1"),
    ("seed", "-1", "--seed must be in [0, 2**32), got -1"),
    ("seed", str(2**32), f"--seed must be in [0, 2**32), got {2**32}"),
    ("sample_max_new_tokens", "-1", "--sample_max_new_tokens must be 0 or more, got -1"),
    ("model_max_length", "0", "--model_max_length must be a positive number of tokens, got 0"),
    ("model_max_length", "8", "--block_size 16 is longer than --model_max_length 8, the maximum the saved tokenizer"),
    ("block_size", "4096", "--block_size 4096 is larger than the model supports (max_position_embeddings = 512)"),
    ("do_train", "false", "--do_train false: this command always trains; to score a model use `densessm eval ppl`"),
    ("do_predict", "true", "--do_predict: densessm train has no prediction step; use `densessm generate` or"),
    ("do_eval", "false", "--do_eval false, but the run holds out a validation set and scores it (--validation_split_"),
    ("torch_compile_backend", "nosuch", "--torch_compile_backend nosuch: not a backend of this PyTorch (aot_eager"),
    ("torch_compile_mode", "nosuch", "--torch_compile_mode nosuch: use one of default, reduce-overhead, max-autotune"),
    ("dataloader_num_workers", "-1", "--dataloader_num_workers must be 0 or more, got -1"),
    ("data_seed", "-1", "--data_seed must be in [0, 2**32), got -1"),
    ("warmup_steps", "1.5", "--warmup_steps must be a whole number of steps (below 1: a fraction), got 1.5"),
    ("eval_accumulation_steps", "0", "--eval_accumulation_steps must be a positive integer (unset: off), got 0"),
    ("ddp_timeout", "-5", "--ddp_timeout must be a positive number of seconds, got -5"),
    ("label_names", "foo", "--label_names foo: this command's batches carry their targets as 'labels'"),
    ("metric_for_best_model", "accuracy", "--metric_for_best_model accuracy: the evaluation reports loss and perp"),
    ("optim_args", "beta1=0.5", "--optim_args beta1: --optim adamw_torch_fused does not read it (AdamW takes --adam"),
    ("optim_args", "garbage", "--optim_args must be comma-separated key=value pairs (e.g. momentum=0.9,nesterov=tr"),
    ("lr_scheduler_kwargs", '{"foo": 1}', "--lr_scheduler_kwargs foo: not an argument of the linear schedule (it"),
    (
        "lr_scheduler_kwargs",
        "[1]",
        "--lr_scheduler_kwargs must be a JSON object, such as '{\"num_cycles\": 2}', got list",
    ),
    ("lr_scheduler_kwargs", "{bad", "--lr_scheduler_kwargs is not valid JSON (Expecting property name enclosed in"),
    ("warmup_ratio", "1.5", "--warmup_ratio must be in [0, 1), got 1.5"),
    ("warmup_steps", "-1", "warmup_steps >= 0"),
    ("block_size", "1", "block_size must be at least 2"),
    ("validation_split_percentage", "100", "validation_split_percentage must be in [0, 100)"),
    ("per_device_train_batch_size", "9" * 20, f"must be at most 2147483647 (2**31 - 1), got {'9' * 20}"),
    ("max_steps", str(2**31), f"--max_steps must be at most 2147483647 (2**31 - 1), got {2**31}"),
]


@pytest.mark.parametrize(("flag", "value", "message"), BAD_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_a_usage_error_before_anything_is_written(tmp_path, capsys, flag, value, message):
    unset = {"warmup_ratio": None} if flag == "warmup_steps" else {}  # train_argv passes --warmup_ratio 0
    code, err = cli(train_argv(tmp_path, **{flag: value, **unset}), capsys)
    assert code == 2
    assert err.startswith("densessm train: error: ") and message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


BAD_OPTIMIZER_FLAGS = [
    ({"optim_target_modules": "attn"}, "--optim_target_modules: --optim adamw_torch_fused does not read it (only the"),
    ({"optim": "sgd", "optim_target_modules": "attn"}, "--optim_target_modules: --optim sgd does not read it"),
    (
        {"lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": '{"num_cycles": 2, "num_cycles": 3}'},
        "--lr_scheduler_kwargs is not valid JSON (the key 'num_cycles' appears twice in one object)",
    ),
    ({"parallelism_config": '{"foo": 1}'}, '--parallelism_config {"foo": 1}: ParallelismConfig.__init__() got an'),
    (
        {"liger_kernel_config": '{"rope": true}'},
        "--liger_kernel_config applies with --use_liger_kernel: add it, or drop",
    ),
    (
        {"gradient_checkpointing": "true", "gradient_checkpointing_kwargs": '{"foo": 1}'},
        "--gradient_checkpointing_kwargs foo: not an argument of torch.utils.checkpoint (it takes use_reentrant",
    ),
    ({"deepspeed": "{}"}, "--deepspeed {}: an empty configuration; give DeepSpeed's settings (or its JSON file)"),
    (
        {"gradient_checkpointing": "true", "gradient_checkpointing_kwargs": "notjson"},
        "--gradient_checkpointing_kwargs is not valid JSON (Expecting value): give an object such as",
    ),
    (
        {"gradient_checkpointing_kwargs": '{"use_reentrant": false}'},
        "--gradient_checkpointing_kwargs applies with --gradient_checkpointing: add it, or drop",
    ),
    ({"ddp_backend": "gloo"}, "--ddp_backend gloo applies to a run of several processes (torchrun or accelerate"),
    ({"accelerator_config": '{"foo": 1}'}, "--accelerator_config foo: not a field of accelerate's configuration (it"),
    ({"accelerator_config": '{"split_batches": '}, "--accelerator_config is not valid JSON (Expecting value): give"),
    ({"accelerator_config": "nosuch.json"}, "--accelerator_config nosuch.json: not a readable JSON file ([Errno 2]"),
    ({"optim": "sgd", "optim_args": "momentum=0.9,foo=1"}, "--optim_args foo: --optim sgd does not read it"),
    ({"optim": "sgd", "optim_args": "momentum=abc"}, "--optim_args momentum=abc: --optim sgd cannot use it (could not"),
    ({"optim": "sgd", "optim_args": "momentum=1,momentum=2"}, "--optim_args gives momentum twice"),
    (
        {"lr_scheduler_type": "constant", "lr_scheduler_kwargs": '{"num_cycles": 2}'},
        "--lr_scheduler_kwargs: the constant schedule takes no arguments, got ['num_cycles']",
    ),
    (
        {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": '{"num_cycles": "x"}'},
        """--lr_scheduler_kwargs {"num_cycles": "x"}: the cosine schedule fails (could not convert string to float""",
    ),
    (
        {"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": '{"power": -3}'},
        """--lr_scheduler_kwargs {"power": -3}: the polynomial schedule fails (0.0 cannot be raised to a negative""",
    ),
]


@pytest.mark.parametrize(("flags", "message"), BAD_OPTIMIZER_FLAGS)
def test_optimizer_and_schedule_arguments_that_would_be_ignored_or_fail_are_refused_before_any_work(
    tmp_path, capsys, flags, message
):
    """The Trainer reads them only when it builds the optimizer and schedule, after the model, and ignores what
    the chosen optimizer or schedule does not read."""
    code, err = cli(train_argv(tmp_path, **flags), capsys)
    assert code == 2
    assert err.startswith("densessm train: error: ") and message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_optimizer_and_schedule_arguments_reach_what_the_trainer_builds(tmp_path):
    seen = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            seen["group"] = dict(optimizer.param_groups[0])
            seen["lambda"] = lr_scheduler.lr_lambdas[0]

    flags = dict(optim="sgd", optim_args="momentum=0.5,nesterov=true", max_steps=2, sample_max_new_tokens=0)
    flags.update(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs='{"num_cycles": 2}')
    main(train_argv(tmp_path, **flags), callbacks=[Record()])
    assert (seen["group"]["momentum"], seen["group"]["nesterov"]) == (0.5, True)
    assert seen["lambda"].keywords["num_cycles"] == 2


def test_a_run_that_fails_while_the_trainer_sets_up_leaves_no_new_folder(tmp_path, monkeypatch):
    """The run's new --output_dir (with its lock and stored arguments) is removed when it fails before the first
    step, also while the Trainer builds its optimizer."""

    def fail(self, *args, **kwargs):
        raise RuntimeError("set-up failed")

    monkeypatch.setattr(densessm.train.DenseTrainer, "create_optimizer", fail)
    with pytest.raises(RuntimeError, match="set-up failed"):
        main(train_argv(tmp_path, output="new/out"))
    assert not (tmp_path / "new").exists()


def test_the_reference_scripts_switches_that_are_honoured_pass(tmp_path):
    """``--do_train --do_eval`` (the reference README's command) train and score; ``--do_eval false`` without a
    validation set trains unscored."""
    summary = main(train_argv(tmp_path, do_train="true", do_eval="true", max_steps=1, sample_max_new_tokens=0))
    assert "eval" in summary
    argv = train_argv(tmp_path, output="unscored", do_eval="false", validation_split_percentage=0, max_steps=1)
    assert "eval" not in main(argv)


def test_the_parallelism_config_can_be_given_on_the_command_line():
    """transformers' parser called every value of --parallelism_config invalid."""
    from accelerate.parallelism_config import ParallelismConfig

    (_, _, args) = densessm.train.parse_args(
        ["--output_dir", "unused", "--parallelism_config", '{"dp_replicate_size": 1}', "--report_to", "none"]
    )
    assert isinstance(args.parallelism_config, ParallelismConfig) and args.parallelism_config.dp_replicate_size == 1


def test_use_liger_kernel_without_the_package_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(densessm.train, "is_liger_kernel_available", lambda: False)
    code, err = cli(train_argv(tmp_path, use_liger_kernel="true"), capsys)
    assert (code, err) == (
        2,
        "densessm train: error: --use_liger_kernel needs the liger-kernel package (pip install liger-kernel)",
    )


def test_deepspeed_without_the_package_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """transformers' own error was a garbled sentence ("No package metadata was found for The 'deepspeed>=0.9.3'
    distribution was not found ..."), exit 1."""
    find_spec = densessm.trainer_flags.importlib.util.find_spec
    monkeypatch.setattr(
        densessm.trainer_flags.importlib.util,
        "find_spec",
        lambda name: None if name == "deepspeed" else find_spec(name),
    )
    code, err = cli(train_argv(tmp_path, deepspeed=str(ROOT / "configs" / "deepspeed" / "zero2.json")), capsys)
    assert (code, err) == (2, "densessm train: error: --deepspeed needs the deepspeed package (pip install deepspeed)")
    assert not (tmp_path / "out").exists()


def test_a_logging_dir_that_cannot_be_a_directory_is_refused_before_any_work(tmp_path, capsys):
    """A file as --logging_dir failed with a raw "[Errno 17] File exists" once the model was built (TensorBoard's
    writer), exit 1."""
    (tmp_path / "afile").write_text("mine\n")
    for logging_dir, message in (
        (tmp_path / "afile", f"--logging_dir {tmp_path / 'afile'} is a file, not a directory"),
        (tmp_path / "afile" / "tb", f"cannot be created: {tmp_path / 'afile'} is a file, not a directory"),
    ):
        code, err = cli(train_argv(tmp_path, report_to="tensorboard", logging_dir=logging_dir), capsys)
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize("metric", ["perplexity", "eval_perplexity", "loss"])
def test_the_best_model_is_the_one_of_lowest_loss_or_perplexity(metric):
    """transformers takes any metric not named *loss as higher-is-better: the "best" checkpoint by perplexity was
    the worst one."""
    args = DenseTrainingArguments(output_dir="unused", report_to="none", metric_for_best_model=metric)
    assert args.greater_is_better is False
    asked = DenseTrainingArguments(output_dir="unused", metric_for_best_model=metric, greater_is_better=True)
    assert asked.greater_is_better is True  # said explicitly: kept


def test_the_final_score_is_of_the_best_weights_when_they_are_loaded_at_the_end(tmp_path):
    """With --load_best_model_at_end the summary reported the last step's evaluation while the model saved held
    the best checkpoint's weights."""
    real = {}

    class FirstLooksBest(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            real.setdefault(state.global_step, []).append(metrics["eval_loss"])
            if state.global_step == 2:
                metrics["eval_loss"] = -1.0

    flags = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    flags.update(load_best_model_at_end="true", sample_max_new_tokens=0)
    summary = main(train_argv(tmp_path, **flags), callbacks=[FirstLooksBest()])
    assert real[4][0] != real[2][0]  # the weights moved between the two evaluations
    assert summary["eval"]["eval_loss"] == pytest.approx(real[2][0], rel=1e-6)


def test_push_to_hub_without_a_reachable_hub_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """The Trainer failed only after the corpus was tokenized and the model built, with an internal error."""
    import huggingface_hub

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", unreachable)
    code, err = cli(train_argv(tmp_path, push_to_hub="true"), capsys)
    assert (code, err) == (
        1,
        "densessm train: error: --push_to_hub: the Hugging Face Hub cannot be reached or does not accept the token "
        "(ConnectionError: Name or service not known); check the network and `hf auth login` (or --hub_token), or "
        "train without --push_to_hub",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_an_empty_corpus_path_is_named_not_blamed_on_the_output_dir(tmp_path, capsys, monkeypatch):
    """An empty --dataset_dir was read as the current directory: "--output_dir ... lies inside the corpus"."""
    monkeypatch.chdir(tmp_path)
    code, err = cli(train_argv(tmp_path, dataset_dir=""), capsys)
    assert (code, err) == (
        2,
        "densessm train: error: an empty path was given as a corpus file or directory (--dataset_dir/"
        "--validation_files)",
    )


def test_eval_on_start_without_a_validation_set_is_refused_before_the_corpus_is_read(tmp_path, capsys):
    """The Trainer failed at the first step (exit 1), after the corpus was tokenized and the model built."""
    code, err = cli(train_argv(tmp_path, eval_on_start="true", validation_split_percentage=0), capsys)
    assert (code, err) == (
        2,
        "densessm train: error: --eval_on_start needs a validation set, and --validation_split_percentage 0 holds "
        "none out: give --validation_files, a percentage above 0, or drop --eval_on_start",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_warmup_ratio_and_steps_together_are_refused(tmp_path, capsys):
    code, err = cli(train_argv(tmp_path, warmup_ratio=0.1, warmup_steps=5), capsys)
    assert (code, err) == (2, "densessm train: error: pass --warmup_ratio or --warmup_steps, not both")


def test_evaluating_without_a_validation_set_is_a_usage_error_before_the_corpus_is_read(tmp_path, capsys):
    """The Trainer said so only after the corpus was tokenized and the model built (exit 1)."""
    argv = train_argv(tmp_path, validation_split_percentage=0, eval_strategy="steps", eval_steps=1)
    code, err = cli(argv, capsys)
    assert (code, err) == (
        2,
        "densessm train: error: --eval_strategy steps needs a validation set, and --validation_split_percentage 0 "
        "holds none out: give --validation_files, a percentage above 0, or --eval_strategy no",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_accumulating_more_batches_than_an_epoch_holds_is_said(tmp_path, caplog):
    """The Trainer ends an accumulation at the end of an epoch: a larger --gradient_accumulation_steps was capped
    without a word, and the start-up line stated more tokens per step than a step held."""
    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        main(train_argv(tmp_path, max_steps=1, gradient_accumulation_steps=10_000, sample_max_new_tokens=0))
    assert "--gradient_accumulation_steps 10000 exceeds the " in caplog.text
    assert "batch(es) of an epoch: each optimizer step accumulates only those" in caplog.text


def test_a_flag_of_the_wrong_type_is_argparses_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *train_argv(tmp_path, max_steps="ten")])
    assert exit_info.value.code == 2
    assert "argument --max_steps/--max-steps: invalid int value: 'ten'" in capsys.readouterr().err


def test_bad_config_overrides_name_the_flag(tmp_path, capsys):
    code, err = cli(train_argv(tmp_path, config_overrides="hidden_size=16,no_such_key=3"), capsys)
    assert code == 2 and "--config_overrides 'hidden_size=16,no_such_key=3'" in err and "no_such_key" in err


UNPARSABLE_OVERRIDES = [
    (
        "dense_mamba2_tiny",
        "time_step_limit=0.0",
        "time_step_limit holds a tuple ((0.0, inf)), which --config_overrides cannot set (it sets int, float, bool and "
        "string keys): write the value in a config.json and pass its directory as --model_name_or_path",
    ),
    ("dense_retnet_tiny", "hidden_size=abc", "hidden_size takes an integer, got 'abc'"),
    ("dense_retnet_tiny", "num_hidden_layers=5,num_hidden_layers=3", "num_hidden_layers is given twice"),
    ("dense_retnet_tiny", "rms_norm_eps=small", "rms_norm_eps takes a number, got 'small'"),
    ("dense_retnet_tiny", "use_cache=maybe", "use_cache takes true or false, got 'maybe'"),
    ("dense_retnet_tiny", "hidden_size=16,layers", "'layers' is not KEY=VALUE (pairs are separated by commas)"),
    ("dense_retnet_tiny", "hidden_size=16=32", "'hidden_size=16=32' is not KEY=VALUE (pairs are separated by commas)"),
    (
        "dense_mamba2_tiny",
        "model_type=dense_retnet",
        "model_type cannot be overridden; choose the family with --model_name_or_path (a preset of it, see "
        "`densessm presets`, or a directory with its config.json)",
    ),
]


@pytest.mark.parametrize(("model", "overrides", "reason"), UNPARSABLE_OVERRIDES)
def test_config_overrides_that_cannot_be_parsed_name_the_key_and_what_it_takes(
    tmp_path, capsys, model, overrides, reason
):
    code, err = cli(train_argv(tmp_path, model_name_or_path=model, config_overrides=overrides), capsys)
    assert code == 2
    assert err == f"densessm train: error: --config_overrides {overrides!r}: {reason}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


INVALID_OVERRIDES = [
    ("hidden_size=-32", "hidden_size must be a positive integer, got -32"),
    (
        "num_hidden_layers=2,dense_block_layers=2",
        "dense_block_layers=2 exceeds the 1 layer(s) below the top of a 2-layer model: use at most 1 (0 for a plain "
        "model)",
    ),
]


@pytest.mark.parametrize(("overrides", "reason"), INVALID_OVERRIDES, ids=["negative size", "m above the layers"])
def test_config_overrides_the_configuration_refuses_are_a_usage_error_naming_flag_and_field(
    tmp_path, capsys, overrides, reason
):
    code, err = cli_full(train_argv(tmp_path, config_overrides=overrides), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"densessm train: error: --config_overrides {overrides!r}: {reason}"
    assert "Class validation error" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            "vocab_size=10",
            "vocab_size 10 is smaller than the tokenizer's 4096 tokens: drop it (the tokenizer decides the vocabulary; "
            "a larger value pads the embedding), or pass a tokenizer of that size with --tokenizer_name",
        ),
        (
            "eos_token_id=7",
            "eos_token_id is decided by the tokenizer (2), not 7: drop it, or pass a tokenizer with that token as "
            "--tokenizer_name",
        ),
    ],
    ids=["vocab_size", "eos_token_id"],
)
def test_config_overrides_the_tokenizer_would_replace_are_refused_before_any_work(tmp_path, capsys, overrides, reason):
    overrides = f"{TINY},{overrides}"
    code, err = cli(train_argv(tmp_path, config_overrides=overrides), capsys)
    assert (code, err) == (2, f"densessm train: error: --config_overrides {overrides!r}: {reason}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_vocab_size_above_the_tokenizers_is_kept_and_one_equal_to_its_ids_is_accepted():
    """A larger vocabulary pads the embedding (spare rows, as a saved model may have); the tokenizer's own ids
    restated change nothing."""
    tokenizer = build_tokenizer(ModelArguments())
    padded = f"{TINY},vocab_size={len(tokenizer) + 64},eos_token_id={tokenizer.eos_token_id}"
    config, _ = model_config(ModelArguments(config_overrides=padded), tokenizer)
    assert (config.vocab_size, config.eos_token_id) == (len(tokenizer) + 64, tokenizer.eos_token_id)
    config, _ = model_config(ModelArguments(config_overrides=TINY), tokenizer)
    assert config.vocab_size == len(tokenizer)


def test_report_to_an_integration_that_is_not_installed_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(densessm.train, "get_available_reporting_integrations", lambda: ["tensorboard"])
    monkeypatch.setattr(densessm.train, "is_azureml_available", lambda: False)
    monkeypatch.setattr(densessm.train, "is_flytekit_available", lambda: False)
    code, err = cli(train_argv(tmp_path, report_to="wandb"), capsys)
    assert (code, err) == (
        2,
        "densessm train: error: --report_to wandb: the wandb integration is not installed (installed: "
        "tensorboard); install its package, or pass --report_to none",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_report_to_an_unknown_integration_is_refused_before_any_work(tmp_path, capsys):
    code, err = cli(train_argv(tmp_path, report_to="bogus"), capsys)
    assert code == 2
    assert err.startswith("densessm train: error: --report_to bogus: unknown integration; use none, all, or one ")
    assert "wandb" in err and "tensorboard" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ---- the output directory: never overwritten unasked ------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_refused_before_the_data_is_read(tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_bytes(b"my notes\n")
    code, err = cli(train_argv(tmp_path, output_dir=str(taken)), capsys)
    assert code == 2
    assert f"--output_dir {taken} is a file, not a directory" in err
    assert taken.read_bytes() == b"my notes\n"
    assert not (tmp_path / "cache").exists()  # refused before any data loading


def test_an_empty_output_dir_is_refused_and_nothing_is_written_in_the_current_directory(tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, err = cli(train_argv(tmp_path, output_dir=""), capsys)
    assert (code, err) == (
        2,
        "densessm train: error: --output_dir is empty: name the directory of the run (it is created)",
    )
    assert list(cwd.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_an_output_dir_under_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_bytes(b"my notes\n")
    code, err = cli(train_argv(tmp_path, output_dir=str(taken / "run")), capsys)
    assert (code, err) == (
        2,
        f"densessm train: error: --output_dir {taken / 'run'} cannot be created: {taken} is a file, not a directory",
    )
    assert taken.read_bytes() == b"my notes\n" and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["loop", "dangling", "dangling parent"])
def test_an_output_dir_through_a_broken_symlink_is_a_usage_error_naming_it(tmp_path, capsys, kind):
    link = tmp_path / "link"
    if kind == "loop":
        (tmp_path / "other").symlink_to(link)
        link.symlink_to(tmp_path / "other")
    else:
        link.symlink_to(tmp_path / "nowhere" / "deeper")
    out = link / "run" if kind == "dangling parent" else link
    code, err = cli(train_argv(tmp_path, output_dir=str(out)), capsys)
    reason = (
        "is a symlink loop"
        if kind == "loop"
        else f"is a symlink to a missing target ({tmp_path / 'nowhere' / 'deeper'})"
    )
    where = f"{out} cannot be created: {link}" if kind == "dangling parent" else f"{out}"
    assert (code, err) == (2, f"densessm train: error: --output_dir {where} {reason}; name another path")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists() and not (tmp_path / "cache").exists()


def test_an_output_dir_inside_the_corpus_directory_is_refused(tmp_path, capsys):
    corpus = Path(train_argv(tmp_path)[1])
    before = snapshot(corpus)
    code, err = cli(train_argv(tmp_path, output_dir=str(corpus / "run")), capsys)
    assert code == 2 and "lies inside the corpus directory" in err
    assert snapshot(corpus) == before


@pytest.mark.parametrize("where", ["itself", "inside", "holding"])
def test_an_output_dir_overlapping_the_model_it_starts_from_is_refused(tmp_path, capsys, where):
    """--output_dir equal to --model_name_or_path with --overwrite_output_dir once replaced the model it trained
    from with the fine-tuned weights (convert refuses such a destination even with --overwrite)."""
    home = tmp_path / "models"
    source = home / "base"
    AutoModelForCausalLM.from_config(load_preset("dense_retnet_tiny")).save_pretrained(source)
    out = {"itself": source, "inside": source / "run", "holding": home}[where]
    before = snapshot(home)
    argv = train_argv(tmp_path, output_dir=str(out), model_name_or_path=str(source), config_overrides=None)
    code, err = cli([*argv, "--overwrite_output_dir"], capsys)
    assert code == 2 and "is, lies inside or holds the model directory --model_name_or_path" in err, err
    assert snapshot(home) == before


def test_a_directory_with_other_files_is_left_byte_identical(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "model.safetensors").write_bytes(b"not yours")
    before = snapshot(out)
    code, err = cli(train_argv(tmp_path, output="mine"), capsys)
    assert code == 2 and "exists and holds no checkpoint: pass --overwrite_output_dir" in err
    assert snapshot(out) == before


def test_a_directory_with_only_incomplete_checkpoints_is_refused_with_the_reasons(straight, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-2" / MARKER_NAME).unlink()
    before = snapshot(out)
    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        code, err = cli(straight_argv(straight, out), capsys)
    assert code == 2 and "holds only incomplete checkpoints (checkpoint-2): pass --overwrite_output_dir" in err
    assert f"skipping {out / 'checkpoint-2'}: incomplete (it has no {MARKER_NAME}" in caplog.text
    assert snapshot(out) == before


def test_overwrite_refuses_to_delete_the_checkpoint_it_is_told_to_resume_from(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    argv = straight_argv(straight, out, resume_from_checkpoint=str(out / "checkpoint-4"), overwrite_output_dir=True)
    code, err = cli(argv, capsys)
    assert code == 2 and f"--overwrite_output_dir would delete {out / 'checkpoint-2'}" not in err
    assert f"--overwrite_output_dir would delete {out / 'checkpoint-4'}, the checkpoint --resume_from_checkpoint" in err
    assert snapshot(out) == before


def test_overwrite_starts_afresh_and_removes_only_the_checkpoints(straight, tmp_path):
    out = resumable(straight, tmp_path / "out")
    (out / "notes.txt").write_text("keep me")
    main(straight_argv(straight, out, overwrite_output_dir=True, max_steps=2, save_strategy="no"))
    assert not list(out.glob("checkpoint-*")) and (out / "notes.txt").read_text() == "keep me"
    assert sorted(losses(out)) == [1, 2]


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_users_folder_named_like_a_checkpoint_is_never_deleted(straight, tmp_path, capsys, overwrite):
    """--overwrite_output_dir deleted a checkpoint-3 folder holding only the user's photo; a resume would have
    rotated it away."""
    out = resumable(straight, tmp_path / "out")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "photo.jpg").write_text("mine")
    before = snapshot(out)
    code, err = cli(straight_argv(straight, out, overwrite_output_dir=overwrite, save_strategy="no"), capsys)
    assert (code, err) == (
        2,
        f"densessm train: error: --output_dir {out}: checkpoint-3 is named like a checkpoint but holds none of a "
        "checkpoint's files (photo.jpg); move it out of --output_dir (a run would delete it)",
    )
    assert snapshot(out) == before


# ---- checkpoints: complete or ignored -----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path: Path) -> None:
    """Bytes damaged in place: the size the marker recorded, none of the content."""
    path.write_bytes(bytes(path.stat().st_size))


def _save_only_model(checkpoint: Path) -> None:
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).unlink()
    write_marker(checkpoint, world_size=1)


DAMAGE = {
    "optimizer.pt missing": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "scheduler.pt missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "rng state missing": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "marker missing": (lambda c: (c / MARKER_NAME).unlink(), f"it has no {MARKER_NAME} (its save was cut short"),
    "marker damaged": (lambda c: (c / MARKER_NAME).write_text('{"files": '), f"its {MARKER_NAME} is damaged"),
    "weights truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated or changed ("),
    "trainer state truncated": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is truncated"),
    "saved with --save_only_model": (_save_only_model, "optimizer.pt (saved with --save_only_model?"),
    "optimizer.pt zeroed": (lambda c: _zero(c / "optimizer.pt"), "optimizer.pt is damaged (not the archive"),
    "scheduler.pt zeroed": (lambda c: _zero(c / "scheduler.pt"), "scheduler.pt is damaged (not the archive"),
    "rng state zeroed": (lambda c: _zero(c / "rng_state.pth"), "rng_state.pth is damaged (not the archive"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_explicit_incomplete_checkpoint_is_an_error_naming_what_is_missing(straight, tmp_path, capsys, damage):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(straight / "checkpoint-4", checkpoint)
    harm, message = DAMAGE[damage]
    harm(checkpoint)
    assert any(message in problem for problem in checkpoint_problems(checkpoint))
    before = snapshot(checkpoint)
    code, err = cli(straight_argv(straight, tmp_path / "new", resume_from_checkpoint=str(checkpoint)), capsys)
    assert code == 2
    assert f"--resume_from_checkpoint {checkpoint} is not a complete checkpoint: " in err and message in err
    assert snapshot(checkpoint) == before


def test_an_explicit_checkpoint_that_does_not_exist_is_an_error_that_leaves_nothing_created(straight, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, err = cli(straight_argv(straight, out, resume_from_checkpoint=str(tmp_path / "nope")), capsys)
    assert code == 2 and f"{tmp_path / 'nope'} is not a directory" in err
    assert not (tmp_path / "new").exists()


def test_a_refused_resume_into_a_new_directory_leaves_nothing_created(straight, tmp_path, capsys):
    """Refused after the model is built (the arguments differ): the new --output_dir goes again."""
    argv = straight_argv(straight, tmp_path / "new", resume_from_checkpoint=str(straight / "checkpoint-4"))
    code, err = cli_full([*argv, "--learning_rate", "0.5"], capsys)
    assert code == 2 and "cannot resume from" in err
    assert not (tmp_path / "new").exists()


def test_a_refusal_keeps_an_output_dir_that_existed_and_what_it_holds(straight, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _ = cli(straight_argv(straight, out / "run", resume_from_checkpoint=str(tmp_path / "nope")), capsys)
    assert code == 2 and not (out / "run").exists()
    code, _ = cli(straight_argv(straight, out, resume_from_checkpoint=str(tmp_path / "nope")), capsys)
    assert code == 2 and snapshot(out) == {"notes.txt": b"keep me"}


def test_a_run_folder_given_as_the_checkpoint_names_its_newest_complete_checkpoint(straight, tmp_path, capsys):
    """It was told the folder had no marker, "its save was cut short, or it was not written by densessm train"."""
    code, err = cli(straight_argv(straight, tmp_path / "out", resume_from_checkpoint=str(straight)), capsys)
    assert (code, err) == (
        2,
        f"densessm train: error: --resume_from_checkpoint {straight} is a run's folder, not a checkpoint: name one "
        f"of its checkpoints (the newest complete one is {straight / 'checkpoint-6'})",
    )


def test_an_explicit_checkpoint_of_another_directory_is_resumed_exactly(straight, tmp_path):
    main(straight_argv(straight, tmp_path / "new", resume_from_checkpoint=str(straight / "checkpoint-4")))
    assert_same_weights(straight, tmp_path / "new")


def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, caplog):
    out = resumable(straight, tmp_path / "out")
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    with caplog.at_level(logging.INFO, logger="densessm.train"):
        main(straight_argv(straight, out))
    assert f"skipping {out / 'checkpoint-4'}: incomplete (optimizer.pt is truncated or changed" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert_same_weights(straight, out)
    assert [losses(out)[s] for s in range(3, 7)] == [losses(straight)[s] for s in range(3, 7)]


def _rename_key(path: Path, old: str, new: str) -> None:
    """Damage a JSON file without changing its size (the completeness marker still matches)."""
    text = path.read_text()
    assert len(old) == len(new) and f'"{old}"' in text
    path.write_text(text.replace(f'"{old}"', f'"{new}"', 1))


TRAINER_STATE_DAMAGE = {
    "global_step renamed": (
        lambda p: _rename_key(p, "global_step", "global_stex"),
        "trainer_state.json is damaged: its global_step is null, not a step number",
    ),
    "another field renamed": (
        lambda p: _rename_key(p, "log_history", "log_histoyr"),
        "trainer_state.json is damaged: TrainerState.__init__() got an unexpected keyword argument 'log_histoyr'",
    ),
    "another step": (
        lambda p: p.write_text(p.read_text().replace('"global_step": 4', '"global_step": 5')),
        "trainer_state.json is damaged: it gives step 5 in checkpoint-4",
    ),
}


@pytest.mark.parametrize("damage", list(TRAINER_STATE_DAMAGE))
def test_a_damaged_trainer_state_of_the_saved_size_makes_a_checkpoint_unusable(straight, tmp_path, capsys, damage):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(straight / "checkpoint-4", checkpoint)
    size = (checkpoint / "trainer_state.json").stat().st_size
    harm, reason = TRAINER_STATE_DAMAGE[damage]
    harm(checkpoint / "trainer_state.json")
    assert (checkpoint / "trainer_state.json").stat().st_size == size
    assert checkpoint_problems(checkpoint) == [reason]
    before = snapshot(checkpoint)
    code, err = cli(straight_argv(straight, tmp_path / "new", resume_from_checkpoint=str(checkpoint)), capsys)
    assert (code, err) == (
        2,
        f"densessm train: error: --resume_from_checkpoint {checkpoint} is not a complete checkpoint: {reason}",
    )
    assert snapshot(checkpoint) == before


def test_a_damaged_trainer_state_in_the_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, caplog):
    out = resumable(straight, tmp_path / "out")
    _rename_key(out / "checkpoint-4" / "trainer_state.json", "global_step", "global_stex")
    with caplog.at_level(logging.INFO, logger="densessm.train"):
        main(straight_argv(straight, out))
    assert f"skipping {out / 'checkpoint-4'}: incomplete (trainer_state.json is damaged: its global_step" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert_same_weights(straight, out)


def _nan_weight(path: Path, name: str = "model.norm.weight") -> None:
    """One NaN in a weights file, which keeps its size (the completeness marker still matches)."""
    size = path.stat().st_size
    tensors = load_file(path)
    tensors[name][0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    assert path.stat().st_size == size


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_parameter_and_the_earlier_good_one(
    straight, tmp_path, capsys
):
    out = resumable(straight, tmp_path / "out")
    _nan_weight(out / "checkpoint-4" / "model.safetensors")
    assert checkpoint_problems(out / "checkpoint-4") == []
    before = snapshot(out)
    code, err = cli(straight_argv(straight, out), capsys)
    assert (code, err) == (
        1,
        f"densessm train: error: cannot resume from {out / 'checkpoint-4'}: its parameter model.norm.weight holds "
        "NaN or inf values (a diverged update saved as is, or a damaged file); the newest earlier one with finite "
        f"weights is {out / 'checkpoint-2'}: pass --resume_from_checkpoint {out / 'checkpoint-2'} (and, if the run "
        "diverged, a lower --learning_rate with --allow_changed_args)",
    )
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != ARGUMENTS_NAME} == {
        k: v for k, v in before.items() if k != ARGUMENTS_NAME
    }
    # the advice works: the run resumed from the checkpoint named ends where the uninterrupted run ends
    main(straight_argv(straight, out, resume_from_checkpoint=str(out / "checkpoint-2")))
    assert_same_weights(straight, out)


def test_a_checkpoint_with_nan_weights_and_no_earlier_good_one_says_to_start_afresh(straight, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(straight / "checkpoint-2", out / "checkpoint-2")
    shutil.copy2(straight / ARGUMENTS_NAME, out / ARGUMENTS_NAME)
    _nan_weight(out / "checkpoint-2" / "model.safetensors", "lm_head.weight")
    code, err = cli(straight_argv(straight, out), capsys)
    assert code == 1
    assert err.endswith(
        "its parameter lm_head.weight holds NaN or inf values (a diverged update saved as is, or a damaged file); "
        "no earlier checkpoint has finite weights: pass --overwrite_output_dir to start afresh"
    )


class _CheckpointsAfterSave(TrainerCallback):
    def __init__(self):
        self.seen = {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = sorted(p.name for p in Path(args.output_dir).glob("checkpoint-*"))


def test_rotation_keeps_the_checkpoint_just_written_over_a_cut_short_later_one(straight, tmp_path):
    # checkpoint-4 cut short, so the run resumes from 2 and saves 3 while 4 is still there: rotating by step
    # number (transformers' fallback when checkpoints are less than a second apart) would keep the useless 4
    # and delete the 3 just written
    out = resumable(straight, tmp_path / "out")
    (out / "checkpoint-4" / MARKER_NAME).unlink()
    seen = _CheckpointsAfterSave()
    main(straight_argv(straight, out, save_steps=1, save_total_limit=1), callbacks=[seen])
    assert seen.seen.get(3) == ["checkpoint-3"] and seen.seen.get(4) == ["checkpoint-4"], seen.seen
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"] and checkpoint_problems(
        out / "checkpoint-6"
    ) == []
    assert_same_weights(straight, out)


def test_rotation_protects_the_best_checkpoint_and_drops_cut_short_ones_first(straight, tmp_path):
    for step in (2, 4, 6):
        shutil.copytree(straight / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-8").mkdir()  # cut short: no marker
    rotate_checkpoints(tmp_path, 2, tmp_path / "checkpoint-6", best=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]


def test_a_checkpoint_that_is_a_link_to_another_run_is_never_deleted_or_written_through(straight, tmp_path):
    """Rotation (and replacing a folder of the step being saved) removed the marker of the checkpoint a
    ``checkpoint-N`` link pointed to, in another run's folder."""
    other = tmp_path / "other"
    shutil.copytree(straight / "checkpoint-2", other / "checkpoint-2")
    before = snapshot(other)
    run = tmp_path / "run"
    shutil.copytree(straight / "checkpoint-4", run / "checkpoint-4")
    (run / "checkpoint-2").symlink_to(other / "checkpoint-2", target_is_directory=True)
    rotate_checkpoints(run, 1, run / "checkpoint-4", best=None)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4"] and snapshot(other) == before
    (run / "checkpoint-6").symlink_to(other / "checkpoint-2", target_is_directory=True)
    discard_checkpoint(run / "checkpoint-6")  # as a save of step 6 clears the way
    assert not (run / "checkpoint-6").exists() and snapshot(other) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_links_in_the_output_dir_are_refused_before_anything_is_written_through_them(
    straight, tmp_path, capsys, overwrite
):
    """The Trainer writes train_results.json, trainer_state.json and the rest with open(), the loss curve with
    savefig: a link of that name in the run's folder replaced the user's file it pointed to."""
    corpus, out = resumable_on_a_copy(straight, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.json").write_text("my notes")
    (out / "train_results.json").symlink_to(mine / "notes.json")
    before = snapshot(out)
    flags = {**FLAGS, "overwrite_output_dir": True} if overwrite else FLAGS
    code, err = cli(train_argv(tmp_path, **flags), capsys)
    assert code == 2 and f"--output_dir {out} holds symlinks (train_results.json -> {mine / 'notes.json'})" in err
    assert (mine / "notes.json").read_text() == "my notes" and snapshot(out) == before


# ---- resume checks its arguments ------------------------------------------------------------------------------------

CHANGED = {
    "learning_rate": ({"learning_rate": 0.02}, "learning_rate", "0.01", "0.02"),
    "block_size": ({"block_size": 8}, "resolved_block_size", "16", "8"),
    "batch size": ({"per_device_train_batch_size": 2}, "per_device_train_batch_size", "4", "2"),
    "accumulation": ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "1", "2"),
    "seed": ({"seed": 8}, "seed", "7", "8"),
    "schedule": ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type", '"linear"', '"cosine"'),
    "warm-up": ({"warmup_ratio": 0.25}, "warmup_ratio", "0.0", "0.25"),
    "weight decay": ({"weight_decay": 0.1}, "weight_decay", "0.0", "0.1"),
    "precision": ({"bf16": "true"}, "bf16", "false", "true"),
    "max_steps": ({"max_steps": 8}, "max_steps", "6", "8"),
    "model size": (
        {"config_overrides": TINY.replace("hidden_size=16", "hidden_size=32") + ",dropout=0.1"},
        "config.hidden_size",
        "16",
        "32",
    ),
    "model": (
        {"model_name_or_path": "dense_mamba_tiny", "config_overrides": None},
        "model_name_or_path",
        '"dense_retnet_tiny"',
        '"dense_mamba_tiny"',
    ),
    "tokenizer length": ({"model_max_length": 64}, "model_max_length", "null", "64"),
}


@pytest.mark.parametrize("change", list(CHANGED))
def test_a_resume_with_result_changing_arguments_is_refused_with_a_table(straight, tmp_path, capsys, change):
    flags, name, old, new = CHANGED[change]
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    code, err = cli_full(straight_argv(straight, out, **flags), capsys)
    assert code == 2
    first = next(line for line in err.splitlines() if line.startswith("densessm train: error:"))
    assert f"cannot resume from {out / 'checkpoint-4'}: " in first and name in first
    assert "--allow_changed_args" in first
    row = next(line for line in err.splitlines() if line.strip().startswith(name + " "))
    assert f"{old}" in row and f"-> {new}" in row
    assert snapshot(out) == before


@pytest.mark.parametrize("allow", [[], ["--allow_changed_args"]])
def test_a_resume_with_another_optimizer_is_refused_even_when_changes_are_allowed(straight, tmp_path, capsys, allow):
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    code, err = cli_full([*straight_argv(straight, out, optim="sgd"), *allow], capsys)
    assert code == 2 and f"cannot resume from {out / 'checkpoint-4'} with another optimizer" in err
    assert '  optim  "adamw_torch_fused" -> "sgd"' in err
    assert snapshot(out) == before


def test_a_resume_on_other_data_files_is_refused(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    other = write_corpus(tmp_path, copies=31)
    code, err = cli_full(straight_argv(straight, out, dataset_dir=str(other)), capsys)
    assert code == 2 and "data_files" in err and "dataset_dir" in err
    assert snapshot(out) == before


def resumable_on_a_copy(straight: Path, tmp_path: Path) -> tuple[Path, Path]:
    """:func:`resumable` on a copy of the straight run's corpus (sizes and modification times kept), which a test
    may edit: the corpus folder and the output directory. Its flags are ``train_argv(tmp_path, **FLAGS)``."""
    corpus = tmp_path / "corpus"
    shutil.copytree(straight.parent / "corpus", corpus)  # copy2: times to the nanosecond
    out = resumable(straight, tmp_path / "out")
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        stored = folder / ARGUMENTS_NAME
        stored.write_text(stored.read_text().replace(str(straight.parent / "corpus"), str(corpus)))
    for step in (2, 4):
        write_marker(out / f"checkpoint-{step}", world_size=1)
    return corpus, out


def test_a_corpus_file_edited_in_place_is_a_changed_argument(straight, tmp_path, capsys, caplog):
    corpus, out = resumable_on_a_copy(straight, tmp_path)
    edited = corpus / "docs.jsonl"
    text, info = edited.read_bytes(), edited.stat()
    edited.write_bytes(text.replace(b"strong", b"STRONG"))  # the same size
    os.utime(edited, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # later, also on a coarse clock
    assert edited.stat().st_size == len(text)
    before = snapshot(out)
    code, err = cli_full(train_argv(tmp_path, **FLAGS), capsys)
    assert code == 2
    first = next(line for line in err.splitlines() if line.startswith("densessm train: error:"))
    assert f"cannot resume from {out / 'checkpoint-4'}: 1 argument(s) that change the result differ" in first
    assert "(data_files)" in first
    row = next(line for line in err.splitlines() if line.strip().startswith(f"data_files[{edited}]"))
    assert f'{{"bytes": {len(text)}, "mtime_ns": {info.st_mtime_ns}}}' in row
    assert f'-> {{"bytes": {len(text)}, "mtime_ns": {info.st_mtime_ns + 10**9}}}' in row
    assert snapshot(out) == before

    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        main([*train_argv(tmp_path, **FLAGS), "--allow_changed_args"])
    assert f"resuming with changed arguments (--allow_changed_args):\n  data_files[{edited}]" in caplog.text
    assert 6 in losses(out)


def test_a_copy_of_the_corpus_with_its_times_resumes_exactly(straight, tmp_path):
    _, out = resumable_on_a_copy(straight, tmp_path)
    main(train_argv(tmp_path, **FLAGS))
    assert_same_weights(straight, out)


def test_harmless_changes_resume_with_a_note_and_end_where_the_run_ends(straight, tmp_path, caplog):
    out = resumable(straight, tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="densessm.train"):
        main(straight_argv(straight, out, logging_steps=2, save_steps=3, per_device_eval_batch_size=2))
    assert "resuming with other values that do not change the result:" in caplog.text
    for name in ("logging_steps", "save_steps", "per_device_eval_batch_size"):
        assert name in caplog.text
    assert 5 not in losses(out) and 6 in losses(out)  # the new logging frequency applies (not the checkpoint's)
    assert_same_weights(straight, out)


def test_allow_changed_args_resumes_with_the_differences_listed(straight, tmp_path, caplog):
    out = resumable(straight, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        main(straight_argv(straight, out, learning_rate=0.02, allow_changed_args=True))
    assert "resuming with changed arguments (--allow_changed_args):" in caplog.text
    assert "learning_rate" in caplog.text and "0.01" in caplog.text and "-> 0.02" in caplog.text
    assert json.loads((out / ARGUMENTS_NAME).read_text())["learning_rate"] == 0.02
    # The new rate applies from step 5 on (loading the optimizer state would otherwise keep 0.01): the linear
    # schedule of 6 steps gives 0.02 * 2/6 at step 5, as logged before that step's update.
    logged = {
        e["step"]: e["learning_rate"]
        for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "learning_rate" in e
    }
    assert logged[4] == pytest.approx(0.01 * 3 / 6) and logged[5] == pytest.approx(0.02 * 2 / 6)
    assert not torch.equal(weights(out)["lm_head.weight"], weights(straight)["lm_head.weight"])


def test_damaged_stored_arguments_are_no_permission_to_change_them(straight, tmp_path, capsys, caplog):
    """A run_arguments.json overwritten with garbage was read as absent: the resume passed with a note and a
    changed learning rate trained on. Refused instead, unless changes are allowed."""
    out = resumable(straight, tmp_path / "out")
    for path in (out / ARGUMENTS_NAME, out / "checkpoint-4" / ARGUMENTS_NAME):
        path.write_bytes(b"x" * path.stat().st_size)  # same size: the completeness marker cannot tell
    before = snapshot(out)
    code, err = cli(straight_argv(straight, out, learning_rate=0.1), capsys)
    assert (
        code == 1 and f"cannot resume from {out / 'checkpoint-4'}: {out / 'checkpoint-4' / ARGUMENTS_NAME} is " in err
    )
    assert "--allow_changed_args to resume anyway" in err
    assert snapshot(out) == before
    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        main(straight_argv(straight, out, allow_changed_args=True))
    assert "resuming without comparing the arguments (--allow_changed_args)" in caplog.text
    assert_same_weights(straight, out)


def test_another_model_type_is_refused_clearly_even_when_changes_are_allowed(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    argv = straight_argv(
        straight, out, model_name_or_path="dense_mamba_tiny", config_overrides=None, allow_changed_args=True
    )
    code, err = cli(argv, capsys)
    assert code == 2
    assert f"{out / 'checkpoint-4'} holds a dense_retnet model, and this run builds a dense_mamba" in err
    assert snapshot(out) == before


def test_a_model_of_another_shape_is_refused_naming_the_tensors(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    argv = straight_argv(
        straight,
        out,
        config_overrides=TINY.replace("hidden_size=16", "hidden_size=32") + ",dropout=0.1",
        allow_changed_args=True,
    )
    code, err = cli(argv, capsys)
    assert code == 2 and "cannot resume: " in err and "tensors of another shape: " in err
    assert "model.embed_tokens.weight (4096, 16) (config.json gives (4096, 32))" in err
    assert snapshot(out) == before


def test_max_steps_below_the_checkpoint_is_refused_even_when_changes_are_allowed(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    code, err = cli(straight_argv(straight, out, max_steps=3, allow_changed_args=True), capsys)
    assert code == 2
    assert f"{out / 'checkpoint-4'} is at step 4, past this run's last step 3: raise --max_steps" in err
    assert snapshot(out) == before


def test_fewer_epochs_than_the_checkpoint_are_refused_once_the_step_count_is_known(straight, tmp_path, capsys):
    out = resumable(straight, tmp_path / "out")
    before = snapshot(out)
    argv = straight_argv(straight, out, max_steps=-1, num_train_epochs=0.1, allow_changed_args=True)
    code, err = cli(argv, capsys)
    assert code == 2 and f"{out / 'checkpoint-4'} is at step 4, past this run's last step 3" in err
    assert {k: v for k, v in snapshot(out).items() if k != ARGUMENTS_NAME} == {
        k: v for k, v in before.items() if k != ARGUMENTS_NAME
    }


def test_rerunning_a_finished_run_trains_nothing_says_so_and_changes_nothing(straight, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    before = snapshot(out)
    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        summary = main(straight_argv(straight, out))
    assert summary == {"output_dir": str(out), "finished_from": str(out / "checkpoint-6")}
    assert (
        f"nothing to do: the run in {out} has already finished ({out / 'checkpoint-6'} is its last step" in caplog.text
    )
    assert snapshot(out) == before


def test_dropping_the_last_batch_of_a_set_smaller_than_a_batch_is_refused_before_training(tmp_path, capsys):
    """The validation set was dropped whole, and the run ended after training with an internal error."""
    argv = train_argv(tmp_path, dataloader_drop_last="true", per_device_eval_batch_size=100_000)
    code, err = cli(argv, capsys)
    assert code == 2
    assert "fewer than one batch of 100000 (--per_device_eval_batch_size), and --dataloader_drop_last would drop" in err
    assert not (tmp_path / "out").exists()


def test_resuming_another_runs_last_checkpoint_saves_its_model_and_says_why(straight, tmp_path, caplog):
    """It said the finished run's final save "was cut short", though that run had saved its model."""
    out = tmp_path / "new"
    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        main(straight_argv(straight, out, resume_from_checkpoint=str(straight / "checkpoint-6")))
    assert (
        f"the run of {straight / 'checkpoint-6'} had finished at step 6, and {out} holds no model yet: the model of "
        in caplog.text
    )
    assert "cut short" not in caplog.text and (out / "config.json").is_file()


def test_rerunning_a_finished_run_that_saved_no_checkpoint_says_what_the_folder_holds(tmp_path, capsys):
    """It was told the folder "holds no checkpoint: pass --overwrite_output_dir", the flag that replaces the
    finished model, without a word that one is there."""
    argv = train_argv(tmp_path, max_steps=1, sample_max_new_tokens=0)
    main(argv)
    out = tmp_path / "out"
    before = snapshot(out)
    code, err = cli(argv, capsys)
    assert (code, err) == (
        2,
        f"densessm train: error: output directory {out} holds the model of a finished run and no checkpoint to "
        "continue from (the run saved none): choose another --output_dir, or pass --overwrite_output_dir to train "
        "afresh there (its model is replaced when that run ends)",
    )
    assert snapshot(out) == before


# ---- one writer per run ---------------------------------------------------------------------------------------------


def test_a_second_lock_on_the_same_directory_names_the_holder(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            second.acquire()
    finally:
        first.release()
    second.acquire()  # free again
    second.release()


def test_a_directory_where_the_lock_file_belongs_is_named(tmp_path):
    """It was a raw "[Errno 21] Is a directory"."""
    (tmp_path / ".densessm-train.lock").mkdir()
    with pytest.raises(UsageError, match=r"\.densessm-train\.lock is a directory where the run's lock file belongs"):
        RunLock(tmp_path).acquire()


def test_a_symlink_where_a_lock_file_belongs_is_named(tmp_path):
    """It was "[Errno 40] Too many levels of symbolic links" (filelock does not follow the link, which stays)."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("mine")
    (tmp_path / ".densessm-train.lock").symlink_to(target)
    with pytest.raises(UsageError, match=r"\.densessm-train\.lock is a symlink where the run's lock file belongs"):
        RunLock(tmp_path).acquire()
    assert target.read_text() == "mine"


def test_a_holder_without_its_details_is_still_refused(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    try:
        (tmp_path / ".densessm-train.lock.json").unlink()
        with pytest.raises(RunLockedError, match="its pid and command are not recorded yet"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()


def test_two_concurrent_runs_on_one_directory_the_second_fails_at_once(tmp_path, capsys):
    argv = train_argv(tmp_path, **FLAGS)
    hold = tmp_path / "hold"
    hold.mkdir()
    with open(tmp_path / "first.err", "w") as err_file:
        first = subprocess.Popen(
            driver_command(tmp_path, argv),
            env={**SUBPROCESS_ENV, "HOLD_AT": f"3@{hold}"},
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    try:
        deadline = time.monotonic() + 240
        while not (hold / "ready").exists():
            assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        out = tmp_path / "out"
        before = snapshot(out)
        assert "checkpoint-2/model.safetensors" in before
        for extra in ([], ["--overwrite_output_dir"]):  # the lock comes before any deletion
            code, err = cli([*argv, *extra, "--data_cache_dir", str(tmp_path / "cache2")], capsys)
            assert code == 1
            assert f"{out} is in use by another training run (pid {first.pid} on {socket.gethostname()}, " in err
            assert "driver.py" in err and "nothing was changed" in err
            assert snapshot(out) == before
            assert not (tmp_path / "cache2").exists()  # refused before the data was read
    finally:
        (hold / "release").touch()
        assert first.wait(timeout=240) == 0, (tmp_path / "first.err").read_text()[-3000:]
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")


# ---- kill at each phase of a checkpoint write, resume, compare bit for bit ----------------------------------------

PHASES = [
    pytest.param("config.json", 2),  # the first file of a save: the folder once passed for a user's folder
    pytest.param("model.safetensors", 2, marks=pytest.mark.slow),
    pytest.param("optimizer.pt", 2),
    pytest.param("scheduler.pt", 2, marks=pytest.mark.slow),
    pytest.param("rng_state.pth", 2, marks=pytest.mark.slow),
    pytest.param("trainer_state.json", 2, marks=pytest.mark.slow),
    pytest.param(MARKER_NAME, 4),
]


@pytest.mark.parametrize(("written", "resumed_from"), PHASES)
def test_killed_right_after_a_file_of_a_checkpoint_resumes_to_the_same_weights(
    straight, tmp_path, caplog, written, resumed_from
):
    argv = train_argv(tmp_path, **FLAGS, save_total_limit=1)
    killed = run_driver(tmp_path, argv, CRASH_AFTER=f"{written}@checkpoint-4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-4" / written).is_file()
    assert last_complete_checkpoint(out) == str(out / f"checkpoint-{resumed_from}")
    assert (out / "checkpoint-2").is_dir()  # the rotation comes after the marker

    with caplog.at_level(logging.INFO, logger="densessm.train"):
        main(argv)  # the same command again
    assert f"resuming from {out / f'checkpoint-{resumed_from}'}" in caplog.text
    if resumed_from == 2:
        assert f"skipping {out / 'checkpoint-4'}: incomplete" in caplog.text
    assert_same_weights(straight, out)
    assert [losses(out)[s] for s in range(5, 7)] == [losses(straight)[s] for s in range(5, 7)]


FINAL_PHASES = [
    # the weights written into the staging folder, nothing moved yet
    pytest.param(f"model.safetensors@{STAGING_NAME}", marks=pytest.mark.slow),
    # the old config.json removed and the new weights moved into place, the new config.json not yet
    pytest.param("model.safetensors@out"),
]


@pytest.mark.parametrize("crash", FINAL_PHASES)
def test_killed_during_the_final_save_leaves_no_half_model_and_a_rerun_finishes_it(straight, tmp_path, crash):
    argv = train_argv(tmp_path, **FLAGS)
    killed = run_driver(tmp_path, argv, CRASH_AFTER=crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "out"
    assert not (out / "config.json").exists()  # not loadable as a model, rather than half of one
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_causal_lm(out)

    main(argv)  # the same command again: the run had finished; its last checkpoint becomes the final model
    assert not (out / STAGING_NAME).exists()
    assert_same_weights(straight, out)
    assert (out / "config.json").read_bytes() == (straight / "config.json").read_bytes()


# ---- Ctrl-C ---------------------------------------------------------------------------------------------------------


def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_to_resume_from(tmp_path):
    argv = train_argv(tmp_path, **{**FLAGS, "max_steps": 100_000, "save_total_limit": 2, "logging_steps": 50})
    out = tmp_path / "out"
    with open(tmp_path / "err", "w") as err_file:
        run = subprocess.Popen(
            [PYTHON, "-m", "densessm.cli", "train", *argv],
            env=SUBPROCESS_ENV,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            preexec_fn=ctrl_c_as_in_a_terminal,
        )
    deadline = time.monotonic() + 240
    while not list(out.glob(f"checkpoint-*/{MARKER_NAME}")):  # any: with save_total_limit 2 each lives briefly
        assert run.poll() is None, (tmp_path / "err").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=120) == 130
    last = (tmp_path / "err").read_text().strip().splitlines()[-1]
    prefix = "densessm train: interrupted: training stopped; run the same command again to resume from "
    assert last.startswith(prefix), last
    named = Path(last[len(prefix) :])
    assert named.parent == out and checkpoint_problems(named) == []
    lock = RunLock(out)  # released
    lock.acquire()
    lock.release()


def _pool_masks_the_interrupt(*args, **kwargs):
    """What a ``datasets`` worker pool makes of Ctrl-C: its ``finally`` asks the workers for their results, which
    raises a ``TimeoutError`` (empty message) with the ``KeyboardInterrupt`` as its context."""
    try:
        raise KeyboardInterrupt
    finally:
        raise PoolTimeoutError()


def test_ctrl_c_while_worker_processes_tokenize_stops_as_interrupted(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets.Dataset, "map", _pool_masks_the_interrupt)
    code, err = cli(train_argv(tmp_path, **FLAGS, preprocessing_num_workers=2), capsys)
    assert (code, err) == (
        130,
        f"densessm train: interrupted: training stopped; no checkpoint saved yet in {tmp_path / 'out'}: the same "
        "command starts it again",
    )
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_a_real_ctrl_c_to_the_process_group_while_worker_processes_tokenize(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "docs.jsonl", "w") as f:  # long enough to take a few seconds with two processes
        for i in range(4000):
            f.write(json.dumps({"text": f"{i} " + " ".join(SENTENCES * 20)}) + "\n")
    argv = train_argv(tmp_path, **FLAGS, preprocessing_num_workers=2)
    with open(tmp_path / "err", "w") as err_file:
        run = subprocess.Popen(
            [PYTHON, "-m", "densessm.cli", "train", *argv],
            env=SUBPROCESS_ENV,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,  # a process group, as a terminal's Ctrl-C reaches it
            preexec_fn=ctrl_c_as_in_a_terminal,
        )
    deadline = time.monotonic() + 240
    while "Tokenizing" not in (tmp_path / "err").read_text():
        assert run.poll() is None, (tmp_path / "err").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=120) == 130, (tmp_path / "err").read_text()[-3000:]
    last = (tmp_path / "err").read_text().strip().splitlines()[-1]
    assert last == (
        f"densessm train: interrupted: training stopped; no checkpoint saved yet in {tmp_path / 'out'}: the same "
        "command starts it again"
    )


class _CtrlCAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_before_the_first_checkpoint_says_so(tmp_path):
    with pytest.raises(Interrupted, match="training stopped; no checkpoint saved yet"):
        main(train_argv(tmp_path, **FLAGS), callbacks=[_CtrlCAt(1)])
    lock = RunLock(tmp_path / "out")  # released
    lock.acquire()
    lock.release()


class _SwallowedCtrlCAt(TrainerCallback):
    """Ctrl-C that lands where Python swallows it (a finalizer or weakref callback: "Exception ignored")."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                pass


def test_ctrl_c_that_python_swallows_still_stops_the_run_at_the_end_of_its_step(tmp_path):
    """Such a Ctrl-C was lost and the run went on training (once for minutes, until a test's timeout)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts (not a background job)
    try:
        with pytest.raises(Interrupted, match="training stopped; run the same command again to resume from"):
            main(train_argv(tmp_path, **FLAGS), callbacks=[_SwallowedCtrlCAt(3)])
    finally:
        restored = signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2"]
    assert restored is signal.default_int_handler  # Python's own handler was back after the run


# ---- strict loading of --model_name_or_path DIR ---------------------------------------------------------------------


def _drop(model_dir: Path, name: str) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    del tensors[name]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def _add(model_dir: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    tensors[name] = torch.zeros(shape, dtype=dtype)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def _retype(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(config))


BROKEN_MODELS = {
    "missing tensor": (
        lambda d: _drop(d, "model.layers.0.retention.q_proj.weight"),
        "missing tensors: model.layers.0.retention.q_proj.weight",
    ),
    "unexpected tensor": (lambda d: _add(d, "model.extra.weight", (2, 2)), "unexpected tensors: model.extra.weight"),
    "mis-shaped tensor": (
        lambda d: _add(d, "model.norm.weight", (17,)),
        "tensors of another shape: model.norm.weight (17,) (config.json gives (16,))",
    ),
    "foreign model_type": (_retype, "describes model_type 'llama', not a densessm model"),
    "integer tensor": (
        lambda d: _add(d, "model.norm.weight", (16,), torch.int8),
        "tensors of another kind: model.norm.weight stored as I8 (the model holds floating-point values there)",
    ),
    "config not JSON": (lambda d: (d / "config.json").write_text("{nope"), "config.json is not valid JSON"),
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "corrupt or truncated weights file"),
    "a NaN weight": (
        lambda d: _nan_weight(d / "model.safetensors"),
        "holds NaN or inf values in its parameter model.norm.weight: training cannot start from it",
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN_MODELS))
def test_a_damaged_model_directory_is_an_error_naming_the_problem(straight, tmp_path, capsys, broken):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(straight / name, model_dir / name)
    harm, message = BROKEN_MODELS[broken]
    harm(model_dir)
    before = snapshot(model_dir)
    code, err = cli(train_argv(tmp_path, model_name_or_path=str(model_dir), config_overrides=None), capsys)
    assert code == 1 and message in err
    assert snapshot(model_dir) == before
    if broken != "a NaN weight":  # the files' headers tell: refused before the run creates anything
        assert not (tmp_path / "out").exists()


def _tokenizer_copy(straight: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(straight / name, folder / name)
    return folder


def test_a_truncated_tokenizer_json_is_named(straight, tmp_path, capsys):
    tokenizer = _tokenizer_copy(straight, tmp_path / "tok")
    _truncate(tokenizer / "tokenizer.json")
    before = snapshot(tokenizer)
    code, err = cli(train_argv(tmp_path, tokenizer_name=str(tokenizer)), capsys)
    assert code == 1
    assert err.startswith(f"densessm train: error: {tokenizer / 'tokenizer.json'} is not valid JSON (")
    assert err.endswith("): the tokenizer is damaged")
    assert snapshot(tokenizer) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_tokenizer_with_its_own_code_is_refused_without_asking(straight, tmp_path, capsys, monkeypatch):
    tokenizer = _tokenizer_copy(straight, tmp_path / "tok")
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["custom.Tokenizer", None]}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("the user was asked"))
    code, err = cli(train_argv(tmp_path, tokenizer_name=str(tokenizer)), capsys)
    assert code == 1
    assert err == (
        f"densessm train: error: the tokenizer in {tokenizer} needs its own Python code (tokenizer_config.json has "
        "an auto_map); densessm never runs code from a model or tokenizer directory: use a tokenizer without custom "
        "code"
    )
    assert not (tmp_path / "out").exists()


def test_a_saved_model_directory_continues_from_its_weights(straight, tmp_path):
    seen = {}

    class _FirstWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["lm_head"] = model.lm_head.weight.detach().clone()

    main(train_argv(tmp_path, model_name_or_path=str(straight), config_overrides=None, max_steps=1), [_FirstWeights()])
    assert torch.equal(seen["lm_head"], weights(straight)["lm_head.weight"])


# ---- a requested engine never silently becomes another ------------------------------------------------------------


def test_fsdp_flag_on_cpu_is_refused_with_the_reason(tmp_path, capsys):
    code, err = cli([*train_argv(tmp_path), "--fsdp", "full_shard"], capsys)
    assert code == 2
    assert "FSDP was requested (--fsdp or an accelerate FSDP config), but accelerate runs FSDP only on GPUs" in err
    assert not (tmp_path / "out").exists()


def test_an_accelerate_fsdp_environment_on_cpu_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    code, err = cli(train_argv(tmp_path), capsys)
    assert code == 2 and "silently train as plain DDP without sharding" in err


def test_the_trainer_refuses_an_engine_accelerate_did_not_set_up(tmp_path, monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):  # accelerate sets them: restored after
        monkeypatch.setenv(name, "false")
    args = DenseTrainingArguments(output_dir=str(tmp_path), fsdp="full_shard", report_to="none")
    model = AutoModelForCausalLM.from_config(load_preset("dense_retnet_tiny"))
    with pytest.raises(UsageError, match="FSDP was requested, but accelerate set up the distributed type NO on cpu"):
        DenseTrainer(model=model, args=args)


@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_on_cpu_is_refused_by_every_process(tmp_path):
    launched = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml")]
        + ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
        + ["-m", "densessm.cli", "train", *train_argv(tmp_path, max_steps=2)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode != 0
    assert launched.stderr.count("accelerate runs FSDP only on GPUs") == 2, launched.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_run_files_nested_too_deep_are_damage_not_an_internal_error(tmp_path):
    """A checkpoint's marker, trainer state or stored arguments whose JSON nests deeper than Python's parser
    follows ended a resume in an internal error (RecursionError): they are damaged files like any other."""
    from densessm import run_state

    deep = "[" * 100_000 + "]" * 100_000
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / run_state.MARKER_NAME).write_text(deep)
    assert run_state.checkpoint_problems(checkpoint) == [f"its {run_state.MARKER_NAME} is damaged"]
    (checkpoint / run_state.TRAINER_STATE_NAME).write_text(deep)
    step, damage = run_state._trainer_state_step(checkpoint)
    assert step is None and "nests deeper than Python's parser can follow" in damage
    (tmp_path / run_state.ARGUMENTS_NAME).write_text(deep)
    assert run_state.read_arguments(tmp_path) is None
    with pytest.raises(ValueError, match="is unreadable .*nests deeper than Python's parser can follow"):
        run_state.read_arguments(tmp_path, strict=True)


def test_the_hub_token_is_not_written_into_the_pickled_arguments():
    """transformers' training_args.bin, saved in every checkpoint, held --hub_token in plain text."""
    import pickle

    args = DenseTrainingArguments(output_dir="unused", report_to="none", hub_token="hf_secret")
    assert args.hub_token == "hf_secret"  # the run itself still has it
    assert b"hf_secret" not in pickle.dumps(args)
    assert pickle.loads(pickle.dumps(args)).hub_token == "<HUB_TOKEN>"
    assert copy.copy(args).hub_token == copy.deepcopy(args).hub_token == "hf_secret"  # copies in memory keep it
