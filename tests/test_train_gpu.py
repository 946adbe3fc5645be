"""`densessm train`'s settings on a CUDA GPU: bf16 autocast with fp32 master weights, fused AdamW, batches copied
without blocking, no host read of the loss in the step (the non-finite-loss stop kept on the device), and nothing
changed on a CPU. The device is faked where a GPU would be needed; the `gpu` tests run the real thing."""

from __future__ import annotations

import collections
import math
import os
import traceback
import warnings

import pytest
import torch
import transformers.training_args
from tiny_training import train_argv, weights
from transformers import Trainer, TrainerCallback

import densessm.train
from densessm.train import NonFiniteGuard, NonFiniteLossError, main, parse_args

CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_cuda(monkeypatch):
    """What `densessm train` sees of a CUDA GPU with bf16 (``bf16=False`` fakes one without, e.g. a V100)."""

    def fake(bf16: bool = True) -> None:
        monkeypatch.setattr(densessm.train, "get_current_accelerator", lambda: torch.device("cuda"))
        for module in (densessm.train, transformers.training_args):
            monkeypatch.setattr(module, "is_torch_bf16_gpu_available", lambda: bf16)

    return fake


def _args(*flags: str):
    return parse_args(["--output_dir", "unused", *flags])[2]


def _fused_adamw(args) -> bool:
    optimizer, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return optimizer is torch.optim.AdamW and kwargs.get("fused") is True


@pytest.mark.skipif(CUDA, reason="about machines without a GPU")
def test_on_a_cpu_nothing_changes():
    args = _args()
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert args.logging_nan_inf_filter and not args.accelerator_config.non_blocking
    assert _fused_adamw(args)  # the Trainer's own default on every device
    assert _args("--bf16").bf16  # CPU autocast, as before


def test_on_cuda_bf16_fused_adamw_and_non_blocking_copies_are_the_defaults(fake_cuda):
    fake_cuda()
    args = _args()
    assert not args.use_cpu and args.bf16 and not args.fp16 and args.mixed_precision == "bf16"
    assert not args.logging_nan_inf_filter  # no host read of each loss
    assert args.accelerator_config.non_blocking and args.dataloader_pin_memory
    assert _fused_adamw(args)


@pytest.mark.parametrize(
    ("flags", "bf16", "fp16"),
    [(["--bf16", "false"], False, False), (["--fp16"], False, True), (["--use_cpu"], False, False)],
)
def test_on_cuda_an_explicit_choice_wins(fake_cuda, flags, bf16, fp16):
    fake_cuda()
    args = _args(*flags)
    assert (args.bf16, args.fp16) == (bf16, fp16)
    if "--use_cpu" in flags:  # a CPU run on a GPU machine: the CPU's settings
        assert args.logging_nan_inf_filter and not args.accelerator_config.non_blocking


def test_a_gpu_without_bf16_trains_in_fp32(fake_cuda):
    fake_cuda(bf16=False)
    args = _args()
    assert not args.bf16 and not args.fp16 and args.mixed_precision == "no"


def test_the_guard_makes_the_fused_optimizer_skip_a_non_finite_step():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    guard = NonFiniteGuard(optimizer, torch.device("cpu"))
    for step, loss in enumerate((1.0, math.nan, 2.0), start=1):  # sticky: nothing moves after the first NaN
        guard.record(torch.tensor(loss), step)
        weight.grad = torch.full((3,), loss)
        before = weight.detach().clone()
        optimizer.step()
        assert torch.equal(weight, before) == (step > 1), step
    assert optimizer.state[weight]["step"].item() == 1
    assert guard.check() == 2 and guard.poll() == 2


class _NanFromStep(TrainerCallback):
    """Makes every loss from optimizer step ``step`` on NaN (the weights stay finite), and notes the ``found_inf``
    the optimizer steps with."""

    def __init__(self, step: int):
        self.step, self.found_inf = step, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def poison(module, inputs, output):  # the backbone's output: the training step scores it without logits
            if state.global_step + 1 >= self.step:
                output.last_hidden_state = output.last_hidden_state * math.nan
            return output

        model.base_model.register_forward_hook(poison)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.found_inf = getattr(getattr(optimizer, "optimizer", optimizer), "found_inf", None)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_non_finite_loss_stops_training_with_the_guard_on_the_device(tmp_path, monkeypatch, optim):
    """With the guard (forced on here, as on CUDA) a NaN loss stops the run naming its step, as the host check
    does; an optimizer that cannot skip on the device falls back to that check."""
    monkeypatch.setattr(densessm.train, "_device_guard_wanted", lambda args: True)
    spy = _NanFromStep(step=3)
    with pytest.raises(NonFiniteLossError, match="^the training loss is not finite at step 3; training stopped "):
        main(
            train_argv(tmp_path, max_steps=6, save_strategy="steps", save_steps=1, optim=optim),
            callbacks=[spy],
        )
    assert (spy.found_inf is not None) == (optim == "adamw_torch_fused")
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = weights(tmp_path / "out" / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run with -m gpu on one)")
def test_on_cuda_the_training_step_never_waits_on_the_gpu(tmp_path):
    """Between two logging steps the host never reads a device value: CUDA's sync debug mode reports every
    synchronisation the step makes (model, Trainer and guard together)."""

    class SyncWatch(TrainerCallback):
        def __init__(self):
            self.caught = []  # the innermost line outside torch of each synchronising call

        def _show(self, message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                frames = [
                    f
                    for f in traceback.extract_stack()[:-1]  # not this hook
                    if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != warnings.__file__
                ]
                self.caught.append(f"{frames[-1].filename}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}")

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= 2:  # after the first steps' allocations and autotuning
                torch.cuda.set_sync_debug_mode("warn")
                self._catch = warnings.catch_warnings()
                self._catch.__enter__()
                warnings.simplefilter("always")
                warnings.showwarning = self._show

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 3:
                torch.cuda.set_sync_debug_mode(0)
                self._catch.__exit__(None, None, None)

    watch = SyncWatch()
    summary = main(
        train_argv(tmp_path, max_steps=6, logging_steps=100, validation_split_percentage=0, sample_max_new_tokens=0),
        callbacks=[watch],
    )
    places = collections.Counter(watch.caught)
    assert not places, "the training step synchronised with the host at: " + ", ".join(
        f"{place} (x{count})" for place, count in places.most_common()
    )
    assert math.isfinite(summary["last_loss"])
    assert weights(tmp_path / "out")["lm_head.weight"].dtype == torch.float32  # bf16 autocast, fp32 master weights
