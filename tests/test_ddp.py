"""Data-parallel training: two processes on CPU (torchrun, gloo) train to what one process trains with the
same global batch, step for step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from tiny_training import PYTHON, SUBPROCESS_ENV, losses, train_argv, weights

from densessm.train import main

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "torchrun": [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # the shipped config (MULTI_GPU) runs gloo processes on a machine without GPUs
    "accelerate": [
        PYTHON,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/accelerate/ddp.yaml"),
    ]
    + ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"],
}


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_ddp_processes_equal_one_process_with_the_same_global_batch(tmp_path, launcher):
    common = dict(max_steps=4, validation_split_percentage=0, sample_max_new_tokens=0)
    launched = subprocess.run(
        LAUNCHERS[launcher]
        + ["-m", "densessm.cli", "train", *train_argv(tmp_path, output="ddp", per_device_train_batch_size=2, **common)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "(16 x 2 x 1 accumulated x 2 processes)" in launched.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(train_argv(tmp_path, output="single", per_device_train_batch_size=4, **common))
    finally:
        torch.set_num_threads(threads)

    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert list(ddp) == list(single) == [1, 2, 3, 4]
    assert [ddp[s] for s in ddp] == pytest.approx([single[s] for s in single], rel=1e-5)
    # Gradients agree to ~1e-8 (all-reduce vs one batch sum in another order); Adam turns a rare near-zero
    # gradient of the LM head (a token the batch lacks) into a +-lr step, which moves a handful of weights by ~5e-6.
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


FSDP2_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoModelForCausalLM
from densessm.presets import load_preset

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = load_preset("dense_retnet_tiny")  # m = 2: dense k/v cross the shard boundaries
model = AutoModelForCausalLM.from_config(config)
reference = AutoModelForCausalLM.from_config(config)
reference.load_state_dict(model.state_dict())
for module in list(model.modules()):  # one FSDP unit per class the model names in _no_split_modules
    if type(module).__name__ in model._no_split_modules:
        fully_shard(module)
fully_shard(model)
assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
tokens = torch.randint(3, config.vocab_size, (2 * world, 24))
mine = tokens[2 * rank : 2 * rank + 2]
model(input_ids=mine, labels=mine).loss.backward()
reference(input_ids=tokens, labels=tokens).loss.backward()
worst = max(
    (p.grad.full_tensor() - q.grad).abs().max().item()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True)
)
assert worst < 1e-6, worst
print("max |grad diff|", worst)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_shards_per_decoder_layer_and_gives_the_gradients_of_one_process(tmp_path):
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    launched = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("max |grad diff|") == 2
