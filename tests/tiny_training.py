"""Shared by the training tests: a learnable fixture corpus, the flags of a tiny, fast training job, and a
driver process that a test can crash at a chosen file of a checkpoint write or hold at a chosen step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from densessm.run_state import LOCK_NAME

# ~135k parameters, nearly all in the 4096-token embedding and head of the bundled tokenizer.
TINY = (
    "hidden_size=16,query_key_dim=8,num_attention_heads=2,num_hidden_layers=2,dense_block_layers=1,"
    "k_gate_reduction=4,v_gate_reduction=4"
)

SENTENCES = [
    "The state of the Union is strong, and the people of this nation are free.",
    "We give thanks for peace, for plenty, and for the blessings of liberty.",
    "The revenue of the year exceeded the estimates, and the public debt was reduced.",
]

# One thread each: the test processes share two cores with the rest of the suite, and oversubscribed
# OpenMP threads slow these tiny steps down a hundredfold without changing a single number.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def ctrl_c_as_in_a_terminal() -> None:
    """``preexec_fn`` of a child that a test interrupts: Ctrl-C at its default, as a terminal's foreground job has
    it. A test run started as a background job ignores it, its children inherit that, and Python then keeps it
    ignored: the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_corpus(root: Path, copies: int = 30) -> Path:
    corpus = root / "corpus"
    if corpus.is_dir():
        return corpus  # unchanged, so its cached blocks are reused
    corpus.mkdir(parents=True)
    with open(corpus / "docs.jsonl", "w") as f:
        for i in range(copies):
            f.write(json.dumps({"text": " ".join(SENTENCES[i % 3 :] + SENTENCES[: i % 3])}) + "\n")
    return corpus


def train_argv(root: Path, output: str = "out", **flags) -> list[str]:
    """Flags of a tiny job on the fixture corpus; ``flags`` override or add (``None`` drops a flag)."""
    options = {
        "dataset_dir": str(write_corpus(root)),
        "data_cache_dir": str(root / "cache"),
        "output_dir": str(root / output),
        "config_overrides": TINY,
        "block_size": 16,
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
        "preprocessing_num_workers": 1,
        "validation_split_percentage": 10,
        "sample_max_new_tokens": 4,
        "seed": 7,
    }
    options.update(flags)
    argv = []
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def losses(output_dir: Path) -> dict[int, float]:
    """Training loss per optimizer step, from the saved trainer state."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "model.safetensors")


PYTHON = sys.executable


# `densessm train ARGS` (through densessm.cli.main, so exit codes and messages are the command's) with two test
# hooks from the environment, applied by wrapping library functions, so that the product has no test hook:
#   CRASH_AFTER=NAME@FOLDER  SIGKILL the process right after FOLDER/NAME is written (torch.save, the
#                            safetensors writer, the trainer state, a model's config, densessm's atomic writes,
#                            os.replace)
#   HOLD_AT=STEP@DIR         at the end of step STEP, write DIR/ready and wait until DIR/release exists
#   KILL_AT=STEP             SIGKILL the process at the end of step STEP (mid-run, between checkpoints)
DRIVER = """
import os, signal, sys, time
from pathlib import Path

import torch
import transformers
import transformers.modeling_utils
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerState

import densessm.run_state
import densessm.train
from densessm.cli import main

hooks = []
if os.environ.get("CRASH_AFTER"):
    name, folder = os.environ["CRASH_AFTER"].split("@")

    def crash_after(write, path_of):
        def wrapped(*args, **kwargs):
            result = write(*args, **kwargs)
            path = Path(path_of(*args, **kwargs))
            if path.name == name and path.parent.name == folder:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped

    torch.save = crash_after(torch.save, lambda obj, f, *a, **k: f)
    transformers.modeling_utils.safe_save_file = crash_after(
        transformers.modeling_utils.safe_save_file, lambda tensors, filename, *a, **k: filename
    )
    TrainerState.save_to_json = crash_after(TrainerState.save_to_json, lambda self, json_path: json_path)
    transformers.PretrainedConfig.to_json_file = crash_after(
        transformers.PretrainedConfig.to_json_file, lambda self, json_file_path, *a, **k: json_file_path
    )
    densessm.run_state.atomic_write_text = crash_after(densessm.run_state.atomic_write_text, lambda p, *a, **k: p)
    os.replace = crash_after(os.replace, lambda src, dst, *a, **k: dst)

if os.environ.get("HOLD_AT"):
    hold_step, hold_dir = os.environ["HOLD_AT"].split("@")

    class Hold(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(hold_step):
                Path(hold_dir, "ready").write_text(str(os.getpid()))
                while not Path(hold_dir, "release").exists():
                    time.sleep(0.05)

    hooks.append(Hold())

if os.environ.get("KILL_AT"):

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

    hooks.append(Kill())

original = densessm.train.train


def train_with_hooks(*args, callbacks=(), **kwargs):
    return original(*args, callbacks=[*callbacks, *hooks], **kwargs)


densessm.train.train = train_with_hooks
torch.set_num_threads(1)
sys.exit(main(["train", *sys.argv[1:]]))
"""


def driver_command(root: Path, argv: list[str]) -> list[str]:
    script = Path(root) / "driver.py"
    script.write_text(DRIVER)
    return [PYTHON, str(script), *argv]


def run_driver(root: Path, argv: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run the driver to its end; ``env`` sets CRASH_AFTER / HOLD_AT / KILL_AT."""
    return subprocess.run(
        driver_command(root, argv),
        env={**SUBPROCESS_ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes): equal snapshots mean nothing was changed. The
    empty lock file a run leaves (a lock file stays in place: removing it would race with the next run) is
    not content."""
    root = Path(directory)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }
