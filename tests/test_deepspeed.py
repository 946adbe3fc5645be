"""DeepSpeed ZeRO with the shipped configs (configs/deepspeed/zero2.json, zero3.json): two CPU processes
(torchrun, gloo) train to what one plain process trains with the same global batch, from the same weights.

Slow set, and skipped where ``deepspeed`` is not installed (it is not in requirements-dev.txt)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_training import PYTHON, SUBPROCESS_ENV, TINY, losses, train_argv, weights

from densessm.train import ModelArguments, build_model, build_tokenizer, main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)"
    ),
]

COMMON = dict(max_steps=3, validation_split_percentage=0, sample_max_new_tokens=0, config_overrides=None)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A saved initial model (ZeRO-3 builds a fresh one under ``zero.Init``, which draws other random weights)
    and the plain one-process run from it with a global batch of 4."""
    root = tmp_path_factory.mktemp("deepspeed")
    model_args = ModelArguments(config_overrides=TINY)
    tokenizer = build_tokenizer(model_args)
    torch.manual_seed(0)
    model = build_model(model_args, tokenizer)
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(
            train_argv(root, output="plain", model_name_or_path=root / "init", per_device_train_batch_size=4, **COMMON)
        )
    finally:
        torch.set_num_threads(threads)
    return root, model.num_parameters()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_deepspeed_processes_equal_one_plain_process_with_the_same_global_batch(start, stage):
    root, n_params = start
    argv = train_argv(
        root,
        output=stage,
        model_name_or_path=root / "init",
        per_device_train_batch_size=2,
        deepspeed=ROOT / f"configs/deepspeed/{stage}.json",
        **COMMON,
    )
    launched = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "densessm.cli", "train", *argv],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    # ZeRO-3 partitions the parameters as they are created: the count must still be the whole model's.
    assert f"dense_retnet: {n_params:,d} parameters" in launched.stderr
    assert "(16 x 2 x 1 accumulated x 2 processes)" in launched.stderr

    ds, plain = losses(root / stage), losses(root / "plain")
    assert list(ds) == list(plain) == [1, 2, 3]
    assert all(math.isfinite(v) for v in ds.values())
    assert [ds[s] for s in ds] == pytest.approx([plain[s] for s in plain], rel=1e-5)
    # The saved model is whole (ZeRO-3 gathers it on save) and equals the plain run's to Adam's ~lr-step noise
    # on near-zero gradients (see test_ddp).
    a, b = weights(root / stage), weights(root / "plain")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-4, msg=name)
