"""`densessm train` on a tiny model and corpus: it learns, writes what it promises, accepts the reference
script's flags, checkpoints activations without changing gradients, keeps fp32 master weights under
autocast, stops on a NaN loss, and resumes after a SIGKILL to exactly where an uninterrupted run gets."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from tiny_training import TINY, losses, run_driver, train_argv, weights
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
from transformers.trainer_utils import SchedulerType
from transformers.utils import get_current_accelerator

from densessm.cli import main as cli_main
from densessm.presets import load_preset
from densessm.run_state import last_complete_checkpoint
from densessm.train import NonFiniteLossError, main, parse_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_lowers_the_loss_and_writes_model_metrics_sample_and_plot(tmp_path, capsys):
    summary = main(train_argv(tmp_path, max_steps=12, report_to="tensorboard"))
    out = tmp_path / "out"
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    steps = losses(out)
    assert steps[12] < steps[1] - 1.0, steps
    assert summary["eval"]["eval_loss"] < math.log(4096) - 1.0
    assert summary["eval"]["eval_perplexity"] == pytest.approx(math.exp(summary["eval"]["eval_loss"]))
    assert summary["train"]["train_tokens_per_second"] > 0
    printed = capsys.readouterr().out
    for line in ("validation: loss", "model saved to", "loss curve:", "sample: 'The state of the Union"):
        assert line in printed

    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "eval_results.json").read_text())["eval_perplexity"] > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == 4096 and model.config.use_cache
    assert model.dtype == torch.float32


# The training command of the reference README (DenseSSM), flag for flag.
REFERENCE_README_FLAGS = """
--model_name_or_path dense_retnet_tiny --dataset_dir data --data_cache_dir cache --validation_split_percentage 0.001
--per_device_train_batch_size 2 --per_device_eval_batch_size 1 --do_train --seed 1995 --lr_scheduler_type polynominal
--learning_rate 6e-4 --warmup_ratio 0.015 --weight_decay 0.01 --logging_strategy steps --save_strategy steps
--save_steps 1000 --save_total_limit 10 --gradient_accumulation_steps 16 --preprocessing_num_workers 4 --block_size 2048
--output_dir out --overwrite_output_dir --evaluation_strategy no --report_to tensorboard --logging_dir tb
--logging_steps 1 --model_max_length 2048 --debug_mode False --fp16 True --ddp_find_unused_parameters True
--adam_beta2 0.98 --prediction_loss_only True
"""


def test_reference_readme_flags_are_accepted():
    model_args, data_args, args = parse_args(REFERENCE_README_FLAGS.split())
    assert model_args.model_max_length == 2048 and data_args.dataset_dir == ["data"]
    assert data_args.validation_split_percentage == 0.001 and data_args.block_size == 2048
    assert args.lr_scheduler_type == SchedulerType.POLYNOMIAL and args.warmup_steps == 0.015
    assert args.eval_strategy == "no" and args.overwrite_output_dir and args.fp16 and args.report_to == ["tensorboard"]
    assert args.gradient_accumulation_steps == 16 and args.adam_beta2 == 0.98 and args.ddp_find_unused_parameters


def test_help_lists_our_flags_and_the_trainers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset_dir", "--block_size", "--config_overrides", "--warmup_ratio", "--gradient_checkpointing"):
        assert flag in out


def test_bad_model_inputs_are_clear_errors(tmp_path, capsys):
    assert cli_main(["train", *train_argv(tmp_path, config_overrides=None, block_size=1024)]) == 2
    assert (
        "--block_size 1024 is larger than the model supports (max_position_embeddings = 512)" in capsys.readouterr().err
    )
    assert cli_main(["train", *train_argv(tmp_path, model_name_or_path="nope")]) == 2
    assert "'nope' is neither a preset" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert cli_main(["train", *train_argv(tmp_path, output="taken")]) == 2
    assert "exists and holds no checkpoint: pass --overwrite_output_dir" in capsys.readouterr().err


def test_gradient_checkpointing_recomputes_every_layer_with_identical_gradients():
    config = load_preset("dense_retnet_tiny")  # m = 2: the dense k/v inputs cross the checkpoints
    model = AutoModelForCausalLM.from_config(config).train()
    tokens = torch.randint(3, config.vocab_size, (2, 24))
    dense_calls = []
    for layer in model.model.layers[1:]:
        layer.retention.dense.register_forward_hook(lambda *_: dense_calls.append(1))

    def gradients():
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    plain, plain_saved = gradients()
    model.activation_checkpointing_enable()
    dense_calls.clear()
    checkpointed, checkpointed_saved = gradients()
    assert len(dense_calls) == 2 * (config.num_hidden_layers - 1)  # forward, then again in backward
    assert checkpointed_saved < plain_saved / 3
    for name, grad in plain.items():
        assert torch.equal(grad, checkpointed[name]), name


class _CheckpointedLayers(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.flags = [layer.gradient_checkpointing for layer in model.model.layers]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")  # the reference script's flag name
def test_gradient_checkpointing_flag_trains_to_the_same_weights(tmp_path):
    main(train_argv(tmp_path, output="plain", max_steps=3, validation_split_percentage=0, sample_max_new_tokens=0))
    seen = _CheckpointedLayers()
    main(
        [
            *train_argv(tmp_path, output="ckpt", max_steps=3, validation_split_percentage=0, sample_max_new_tokens=0),
            "--gradient_checkpointing",
        ],
        callbacks=[seen],
    )
    assert seen.flags == [True, True]
    plain, ckpt = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


class _CheckPrecision(TrainerCallback):
    """Records the master weights' dtypes after each step and the dtype the layers' linear projections compute in
    when training (the LM head's loss runs in autocast's dtype too: tests/test_linear_cross_entropy.py)."""

    def __init__(self):
        self.weight_dtypes, self.compute_dtypes = set(), set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.base_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if module.training:
            self.compute_dtypes.add(output.dtype)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weight_dtypes |= {p.dtype for p in model.parameters()}


def test_bf16_autocasts_and_keeps_fp32_master_weights(tmp_path):
    check = _CheckPrecision()
    summary = main([*train_argv(tmp_path, max_steps=2, sample_max_new_tokens=2), "--bf16"], callbacks=[check])
    assert check.weight_dtypes == {torch.float32}
    assert check.compute_dtypes == {torch.bfloat16}
    assert math.isfinite(summary["eval"]["eval_loss"])
    assert weights(tmp_path / "out")["lm_head.weight"].dtype == torch.float32


@pytest.mark.skipif(get_current_accelerator() is not None, reason="about machines without an accelerator")
def test_fp16_without_a_gpu_says_it_trains_in_fp32(caplog):
    with caplog.at_level(logging.WARNING, logger="densessm.train"):
        parse_args(["--fp16", "--output_dir", "unused"])
    assert "--fp16 has no effect without a GPU" in caplog.text


class _PoisonAfterSave(TrainerCallback):
    """Turns the weights to NaN right after checkpoint ``step`` is written: the next loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))


class _PoisonBeforeSave(_PoisonAfterSave):
    """Turns the weights to NaN at the end of step ``step``, before its checkpoint is written (as a diverged update
    does): that checkpoint is complete, and holds NaN weights."""

    def on_save(self, args, state, control, model=None, **kwargs):
        pass

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_save(args, state, control, model=model)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    argv = train_argv(tmp_path, max_steps=6, save_strategy="steps", save_steps=1, save_total_limit=1)
    with pytest.raises(NonFiniteLossError) as err:
        main(argv, callbacks=[_PoisonAfterSave(step=2)])
    out = tmp_path / "out"
    assert str(err.value) == (
        "the training loss is not finite at step 3; training stopped before the optimizer used it: the model's "
        "parameter lm_head.weight holds NaN or inf values (an update made it so: the run diverged). Last good "
        f"checkpoint: {out / 'checkpoint-2'}. Resume from it with a lower --learning_rate, a longer warm-up, "
        "--max_grad_norm, or --bf16 instead of --fp16."
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in weights(out / "checkpoint-2").values())
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")


def test_a_checkpoint_holding_nan_weights_is_not_called_the_last_good_one(tmp_path):
    argv = train_argv(tmp_path, max_steps=6, save_strategy="steps", save_steps=1)
    with pytest.raises(NonFiniteLossError) as err:
        main(argv, callbacks=[_PoisonBeforeSave(step=2)])
    out = tmp_path / "out"
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")  # complete, but its weights are NaN
    assert f"Last good checkpoint: {out / 'checkpoint-1'} (checkpoint-2 holds NaN or inf values in " in str(err.value)
    assert "lm_head.weight" in str(err.value)


def test_a_non_finite_loss_with_finite_weights_is_named_as_an_overflow(tmp_path, monkeypatch):
    def overflowing_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return torch.tensor(float("inf"), requires_grad=True)

    monkeypatch.setattr(Trainer, "compute_loss", overflowing_loss)
    with pytest.raises(NonFiniteLossError) as err:
        main(train_argv(tmp_path, max_steps=2))
    assert "optimizer used it: every parameter is finite, so the forward pass overflowed. Last good checkpoint: " in (
        str(err.value)
    )
    assert "none saved yet." in str(err.value)


def test_sigkill_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    # dropout > 0 so that the restored RNG state matters, too
    flags = dict(max_steps=8, save_strategy="steps", save_steps=2, config_overrides=TINY + ",dropout=0.1")
    main(train_argv(tmp_path, output="straight", **flags))

    # killed mid-run, one step after checkpoint-4
    killed = run_driver(tmp_path, train_argv(tmp_path, output="killed", **flags), KILL_AT="5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert last_complete_checkpoint(tmp_path / "killed") == str(tmp_path / "killed" / "checkpoint-4")

    main(train_argv(tmp_path, output="killed", **flags))  # the same command again: resumes from checkpoint-4
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert set(straight) == set(resumed) == set(range(1, 9))
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    for name in a:
        assert torch.equal(a[name], b[name]), name


HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
"""The Tensor methods that hand a value to Python: on a GPU, each waits for the device."""


@pytest.mark.parametrize("preset", [None, "dense_mamba_tiny", "dense_mamba2_tiny"])
def test_the_model_reads_no_value_back_while_training(tmp_path, monkeypatch, preset):
    """The forward pass of a training step reads nothing back to the host: its token ids and labels are the run's
    own blocks, checked against the vocabulary when the run starts. (Per step on a GPU, the range checks were
    synchronisations that left the device idle while the host waited.) Outside training they still run."""
    reads = []
    inside = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside:
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(lambda *_: inside.append(True))
            model.register_forward_hook(lambda *_: inside.clear())

    family = {} if preset is None else {"model_name_or_path": preset, "config_overrides": None}
    argv = train_argv(tmp_path, max_steps=3, logging_steps=100, validation_split_percentage=0, **family)
    main([*argv, "--sample_max_new_tokens", "0"], callbacks=[Watch()])
    assert reads == []
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    model.register_forward_pre_hook(lambda *_: inside.append(True))
    model.register_forward_hook(lambda *_: inside.clear())
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 2, model.config.vocab_size]]))
    assert reads  # a call of its own: the ids are checked, reading them
