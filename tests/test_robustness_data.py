"""Bad corpora, bad paths and faults against the corpus -> token-block pipeline: each stops with one line of
the right error type naming the file and the problem (in cached and in streaming mode), and the cache stays
sound when builders run at once, are killed, or find a damaged cache."""

from __future__ import annotations

import bz2
import copy
import gzip
import json
import logging
import lzma
import multiprocessing
import os
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.exceptions import DatasetGenerationError
from filelock import FileLock
from multiprocess.context import TimeoutError as PoolTimeoutError

import densessm.data as data
from densessm.data import (
    CorpusError,
    DataArguments,
    build_blocks,
    cache_key,
    find_data_files,
    load_blocks,
    stream_blocks,
)
from densessm.errors import UsageError
from densessm.files import OutsideDirectoryError
from densessm.tokenizer import load_tokenizer

TEXT = "The state of the Union is strong, and the revenue of the year exceeded the estimates.\n"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


GOOD_GZ = gzip.compress(TEXT.encode() * 200)
GOOD_XZ = lzma.compress(TEXT.encode() * 200)
GOOD_PARQUET = parquet_bytes(pa.table({"text": [TEXT] * 50}))

# name: (file name, content, error type, message pattern)
BAD_FILES = {
    "empty txt": ("a.txt", b"", CorpusError, r"a\.txt is empty \(0 bytes\)"),
    "whitespace-only txt": ("a.txt", b"  \n\n\t \n", CorpusError, r"a\.txt holds no text: its lines are all empty"),
    "empty jsonl": ("a.jsonl", b"", CorpusError, r"a\.jsonl is empty \(0 bytes\)"),
    "jsonl of blank lines": ("a.jsonl", b"\n  \n\n", CorpusError, r"a\.jsonl holds no records"),
    "jsonl of empty texts": (
        "a.jsonl",
        jsonl({"text": ""}, {"text": "  "}),
        CorpusError,
        r"a\.jsonl holds no text: its records are all empty or whitespace",
    ),
    "invalid json on line 3": (
        "a.jsonl",
        jsonl({"text": TEXT}, {"text": TEXT}) + b'{"text": "unterminated}\n',
        CorpusError,
        r"a\.jsonl line 3 is not valid JSON \(Unterminated string",
    ),
    "jsonl line nested too deep": (
        "a.jsonl",
        jsonl({"text": TEXT}) + b'{"text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        CorpusError,
        r"a\.jsonl line 2 is not valid JSON \(nesting deeper than Python's JSON parser can follow",
    ),
    "jsonl record giving its text twice": (
        "a.jsonl",
        jsonl({"text": TEXT}) + b'{"text": "first", "text": "second"}\n',
        CorpusError,
        r"a\.jsonl line 2 is not valid JSON \(the key 'text' appears twice in one object",
    ),
    "json document nested too deep": (
        "a.json",
        b"[" * 100_000 + b"]" * 100_000,
        CorpusError,
        r"a\.json is not valid JSON \(nesting deeper than Python's JSON parser can follow",
    ),
    "record without text": (
        "a.jsonl",
        jsonl({"text": TEXT}, {"body": "x", "id": 2}),
        CorpusError,
        r"no 'text' field in .*a\.jsonl line 2 \(fields found: body, id\)",
    ),
    "number text": ("a.jsonl", jsonl({"text": 5}), CorpusError, r"a\.jsonl line 1: 'text' is a number, not a string"),
    "null text": ("a.jsonl", jsonl({"text": TEXT}, {"text": None}), CorpusError, r"line 2: 'text' is null"),
    "array text": ("a.jsonl", jsonl({"text": ["a", "b"]}), CorpusError, r"line 1: 'text' is an array"),
    "record that is a string": (
        "a.jsonl",
        jsonl("just a string"),
        CorpusError,
        r"a\.jsonl line 1 is a string, not an object with a 'text' field",
    ),
    ".json holding one pretty-printed object": (
        "a.json",
        json.dumps({"data": [{"text": TEXT}]}, indent=2).encode(),
        CorpusError,
        r"no 'text' field in .*a\.json its one object \(fields found: data\)",
    ),
    ".json array with a bad record": (
        "a.json",
        json.dumps([{"text": TEXT}, {"txt": TEXT}]).encode(),
        CorpusError,
        r"no 'text' field in .*a\.json record 2 \(fields found: txt\)",
    ),
    ".json array cut short": (
        "a.json",
        b'[{"text": "a"},\n {"text": "b"',
        CorpusError,
        r"a\.json is not valid JSON \(.* at line 2 column",
    ),
    "unpaired surrogate": ("a.jsonl", b'{"text": "ab \\ud800 cd"}\n', CorpusError, r"line 1: 'text' holds an unpaired"),
    "latin-1 txt": ("a.txt", "caf\u00e9\n".encode("latin-1"), CorpusError, r"a\.txt is not UTF-8 text: .* at byte 3"),
    "latin-1 inside gzip jsonl": (
        "a.jsonl.gz",
        gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
        CorpusError,
        r"a\.jsonl\.gz is not UTF-8 text: .* at byte 28",
    ),
    "not gzip": ("a.txt.gz", b"plain text, not gzip", CorpusError, r"a\.txt\.gz is not a valid gzip file"),
    "truncated gzip": ("a.txt.gz", GOOD_GZ[: len(GOOD_GZ) // 2], CorpusError, r"a\.txt\.gz is truncated: its gzip"),
    "corrupt gzip body": (
        "a.txt.gz",
        GOOD_GZ[:20] + bytes(b ^ 0xFF for b in GOOD_GZ[20:60]) + GOOD_GZ[60:],
        CorpusError,
        r"a\.txt\.gz is not a valid gzip file",
    ),
    "gzip of nothing": ("a.txt.gz", gzip.compress(b""), CorpusError, r"a\.txt\.gz holds no lines after decompression"),
    "not xz": ("a.jsonl.xz", b"garbage", CorpusError, r"a\.jsonl\.xz is not a valid xz file"),
    "truncated xz": ("a.txt.xz", GOOD_XZ[:-30], CorpusError, r"a\.txt\.xz is (truncated|not a valid xz file)"),
    "not bzip2": ("a.txt.bz2", b"garbage", CorpusError, r"a\.txt\.bz2 is not a valid bzip2 file"),
    "truncated bzip2": (
        "a.txt.bz2",
        bz2.compress(TEXT.encode() * 200)[:-20],
        CorpusError,
        r"a\.txt\.bz2 is truncated: its bzip2 stream ends early",
    ),
    "not parquet": ("a.parquet", b"PAR1 but not really", CorpusError, r"a\.parquet is not a readable Parquet file"),
    "truncated parquet": (
        "a.parquet",
        GOOD_PARQUET[: len(GOOD_PARQUET) // 2],
        CorpusError,
        r"a\.parquet is not a readable Parquet file",
    ),
    "parquet without text": (
        "a.parquet",
        parquet_bytes(pa.table({"body": ["x"]})),
        CorpusError,
        r"no 'text' field in .*a\.parquet \(columns found: body\)",
    ),
    "parquet of numbers": (
        "a.parquet",
        parquet_bytes(pa.table({"text": [1, 2]})),
        CorpusError,
        r"a\.parquet: the 'text' column holds int64, not strings",
    ),
    "parquet with a null text": (
        "a.parquet",
        parquet_bytes(pa.table({"text": [TEXT, None]})),
        CorpusError,
        r"a\.parquet row 2: 'text' is null",
    ),
    "parquet without rows": (
        "a.parquet",
        parquet_bytes(pa.table({"text": pa.array([], pa.string())})),
        CorpusError,
        r"a\.parquet holds no rows",
    ),
    "corpus below one block": (
        "a.txt",
        b"Hi.",
        CorpusError,
        r"the corpus .*a\.txt \(1 file\) holds 4 tokens, fewer than one block of 8",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_clear_error_in_cached_mode(case, tmp_path, tokenizer):
    name, content, kind, pattern = BAD_FILES[case]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if "below one block" not in case:
        (corpus / "0-good.txt").write_text(TEXT * 3)  # the bad file is one of several: the error must name it
    (corpus / name).write_bytes(content)
    with pytest.raises(kind, match=pattern) as err:
        build_blocks(find_data_files([corpus]), tokenizer, 8, tmp_path / "cache", num_proc=1)
    assert "\n" not in str(err.value)
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [], "a failed build left a cache or a work folder behind"


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_the_same_error_in_streaming_mode(case, tmp_path, tokenizer):
    name, content, kind, pattern = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(kind, match=pattern):  # at the up-front check, or where reading reaches the problem
        train, _ = stream_blocks(find_data_files([path]), tokenizer, 8, n_val=0, seed=0, shuffle_buffer_size=4)
        list(train)


def test_a_problem_deep_in_a_streamed_file_stops_the_stream_with_its_line(tmp_path, tokenizer):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl(*[{"text": TEXT}] * 3000) + b"{oops}\n")  # far past the first megabyte checked up front
    train, _ = stream_blocks(find_data_files([path]), tokenizer, 8, n_val=0, seed=0, shuffle_buffer_size=4)
    with pytest.raises(CorpusError, match=r"a\.jsonl line 3001 is not valid JSON"):
        list(train)


def test_worker_processes_report_the_file_and_line(tmp_path, tokenizer):
    """With several reading processes ``datasets`` passes back only a traceback's text: the error is still ours."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.jsonl").write_bytes(jsonl(*[{"text": TEXT}] * 5))
    with (corpus / "3.jsonl").open("ab") as f:
        f.write(b'{"text": 7}\n')
    with pytest.raises(CorpusError, match=r"3\.jsonl line 6: 'text' is a number, not a string"):
        build_blocks(find_data_files([corpus]), tokenizer, 8, tmp_path / "cache", num_proc=2)


# --- paths and arguments ---------------------------------------------------------------------------------------


def test_directory_of_hidden_files_says_so(tmp_path):
    (tmp_path / ".a.txt").write_text(TEXT)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "b.txt").write_text(TEXT)
    with pytest.raises(CorpusError, match=r"holds only hidden files or folders \(\.a\.txt, \.git\), which are skipped"):
        find_data_files([tmp_path])


def test_empty_and_missing_and_unsupported_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"empty is empty: put \.txt"):
        find_data_files([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        find_data_files([tmp_path / "missing.txt"])
    (tmp_path / "a.parquet.gz").write_bytes(b"x")
    with pytest.raises(CorpusError, match=r"a\.parquet\.gz is a compressed Parquet file: decompress it"):
        find_data_files([tmp_path / "a.parquet.gz"])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"notes\.csv is not a \.txt, \.jsonl, \.json or \.parquet file"):
        find_data_files([tmp_path / "notes.csv"])
    with pytest.raises(UsageError, match="an empty path was given"):
        find_data_files([""])


def test_broken_links_and_links_out_of_the_directory_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(TEXT)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "link.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(OutsideDirectoryError, match=r"link\.txt is a link to .*secret\.txt, outside .*corpus"):
        find_data_files([corpus])
    (corpus / "link.txt").unlink()
    (corpus / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideDirectoryError, match=r"sub is a link to .*outside, outside"):
        find_data_files([corpus])
    (corpus / "sub").unlink()
    (corpus / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError, match=r"gone\.txt is a broken link \(to .*nowhere\.txt\)"):
        find_data_files([corpus])
    with pytest.raises(FileNotFoundError, match=r"gone\.txt is a broken link"):
        find_data_files([corpus / "gone.txt"])
    (corpus / "gone.txt").unlink()
    (corpus / "inner.txt").symlink_to(corpus / "a.txt")  # a link within the directory: the same file twice
    with pytest.raises(UsageError, match=r"a\.txt is in the corpus twice .*its documents would count double"):
        find_data_files([corpus])


def test_a_pipe_is_refused_not_read_forever(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(CorpusError, match=r"pipe\.txt is not a regular file"):
        find_data_files([fifo])
    with pytest.raises(CorpusError, match=r"pipe\.txt is not a regular file"):
        find_data_files([tmp_path])


def test_a_file_named_twice_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(UsageError, match=r"a\.txt is in the corpus twice: its documents would count double"):
        find_data_files([tmp_path, tmp_path / "a.txt"])


def test_hard_links_to_one_file_are_one_file(tmp_path, tokenizer):
    """Two hard links have different paths: a corpus holding both counted its documents twice, and a hard link as
    --validation_files measured the loss on training text, without a word."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 5)
    os.link(corpus / "a.txt", corpus / "b.txt")
    with pytest.raises(UsageError, match=r"b\.txt is in the corpus twice \(as .*a\.txt and .*b\.txt\)"):
        find_data_files([corpus])
    (corpus / "b.txt").unlink()
    os.link(corpus / "a.txt", tmp_path / "val.txt")
    args = DataArguments(dataset_dir=[str(corpus)], validation_files=[str(tmp_path / "val.txt")])
    with pytest.raises(UsageError, match=r"val\.txt is in both --dataset_dir and --validation_files"):
        load_blocks(args, tokenizer, 8, seed=0)


def test_validation_files_that_are_training_files_are_refused(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(TEXT * 5)
    args = DataArguments(dataset_dir=[str(tmp_path)], validation_files=[str(tmp_path / "a.txt")])
    with pytest.raises(UsageError, match=r"a\.txt is in both --dataset_dir and --validation_files"):
        load_blocks(args, tokenizer, 8, seed=0)


def test_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).name == "a.txt" else real_access(p, mode))
    with pytest.raises(PermissionError, match=r"cannot read .*a\.txt: permission denied"):
        find_data_files([tmp_path])


def test_a_read_error_names_the_file(tmp_path, tokenizer, monkeypatch):
    """A file that cannot be opened when reading starts (permission taken away, a failing disk)."""
    path = tmp_path / "a.txt"
    path.write_text(TEXT * 5)
    groups = find_data_files([path])

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "_open_text", refuse)
    with pytest.raises(PermissionError, match=r"cannot read .*a\.txt: Permission denied"):
        build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)


def test_a_file_that_disappears_before_reading(tmp_path, tokenizer):
    path = tmp_path / "a.txt"
    path.write_text(TEXT * 5)
    groups = find_data_files([path])
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.txt disappeared while the corpus was being read"):
        build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)


def test_a_file_that_changes_while_read_is_not_cached(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text(TEXT * 5)
    groups = find_data_files([path])
    real = data._raw_rows

    def append_while_reading(*args, **kwargs):
        rows = real(*args, **kwargs)
        with path.open("a") as f:
            f.write("more text\n")
        return rows

    monkeypatch.setattr(data, "_raw_rows", append_while_reading)
    with pytest.raises(CorpusError, match=r"a\.txt changed while being read: run again"):
        build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)
    assert not list((tmp_path / "cache").glob("blocks-*"))


def _interrupt_masked_by(error: type[Exception]):
    """A stand-in for a ``datasets`` call over worker processes hit by Ctrl-C: the pool raises ``error`` while the
    ``KeyboardInterrupt`` unwinds (a ``TimeoutError`` from ``map``; ``datasets`` wraps it for ``from_generator``)."""

    def masked(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        finally:
            raise error()

    return masked


@pytest.mark.parametrize(
    ("call", "error"),
    [("map", PoolTimeoutError), ("from_generator", DatasetGenerationError)],
    ids=["tokenizing", "reading"],
)
def test_ctrl_c_in_worker_processes_is_a_keyboard_interrupt_and_leaves_no_cache(
    tmp_path, tokenizer, monkeypatch, call, error
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"{i}.txt").write_text(TEXT * 5)
    monkeypatch.setattr(datasets.Dataset, call, _interrupt_masked_by(error))
    reread = []
    monkeypatch.setattr(data, "_generation_error", lambda *args: reread.append(args))  # not read again for a message
    with pytest.raises(KeyboardInterrupt) as err:
        build_blocks(find_data_files([corpus]), tokenizer, 8, tmp_path / "cache", num_proc=2)
    assert type(err.value) is KeyboardInterrupt and reread == []
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_other_errors_of_worker_processes_are_not_taken_for_ctrl_c(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT * 5)

    def fails(*args, **kwargs):
        raise PoolTimeoutError("a worker took too long")

    monkeypatch.setattr(datasets.Dataset, "map", fails)
    with pytest.raises(PoolTimeoutError, match="a worker took too long"):
        build_blocks(find_data_files([tmp_path]), tokenizer, 8, tmp_path / "cache", num_proc=2)


def test_cache_dir_that_is_a_file_or_under_one(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(TEXT * 5)
    groups = find_data_files([tmp_path / "a.txt"])
    (tmp_path / "cachefile").write_text("not a folder")
    with pytest.raises(UsageError, match=r"--data_cache_dir .*cachefile is a file, not a directory"):
        build_blocks(groups, tokenizer, 8, tmp_path / "cachefile", num_proc=1)
    with pytest.raises(
        OSError, match=r"cannot create the token-block cache folder .*cachefile/sub: .*--data_cache_dir"
    ):
        build_blocks(groups, tokenizer, 8, tmp_path / "cachefile" / "sub", num_proc=1)
    assert (tmp_path / "cachefile").read_text() == "not a folder"


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("block_size", 1, "block_size must be at least 2"),
        ("validation_split_percentage", 100, r"validation_split_percentage must be in \[0, 100\)"),
        ("validation_split_percentage", float("nan"), "validation_split_percentage must be in"),
        ("shuffle_buffer_size", 0, "shuffle_buffer_size must be a positive integer, got 0"),
        ("max_train_samples", 0, "max_train_samples must be a positive integer"),
        ("max_eval_samples", -1, "max_eval_samples must be a positive integer"),
        ("preprocessing_num_workers", 0, "preprocessing_num_workers must be a positive integer"),
        ("dataset_dir", [], "dataset_dir is an empty list"),
        ("validation_files", [], "validation_files is an empty list"),
    ],
)
def test_data_arguments_refuse_values_that_cannot_work(field, value, pattern):
    with pytest.raises(UsageError, match=pattern):
        DataArguments(**{field: value})


def test_one_path_given_from_python_is_one_path(tmp_path):
    assert DataArguments(dataset_dir=str(tmp_path)).dataset_dir == [str(tmp_path)]


# --- streaming: nothing to train on -----------------------------------------------------------------------------


def test_streaming_corpus_below_one_block_or_all_held_out(tmp_path, tokenizer):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)  # 21 tokens + EOS: two blocks of 8
    train, val = stream_blocks(find_data_files([path]), tokenizer, 8, n_val=4, seed=0, shuffle_buffer_size=4)
    assert len(list(val)) == 2
    with pytest.raises(CorpusError, match=r"gives 2 block\(s\) of 8, all held out for validation \(the first 4\)"):
        list(train)
    train, _ = stream_blocks(find_data_files([path]), tokenizer, 64, n_val=0, seed=0, shuffle_buffer_size=4)
    with pytest.raises(CorpusError, match=r"holds 22 tokens, fewer than one block of 64"):
        list(train)


# --- the cache: builders at once, killed builders, damage -------------------------------------------------------


def _target(cache: Path, groups, tokenizer, block_size: int) -> Path:
    return cache / f"blocks-{block_size}-{cache_key(groups, tokenizer, block_size)}"


def _build_in_child(corpus: str, cache: str, queue) -> None:
    class Forward(logging.Handler):
        def emit(self, record):
            queue.put(("log", record.getMessage()))

    log = logging.getLogger("densessm.data")
    log.addHandler(Forward())
    log.setLevel(logging.INFO)
    try:
        blocks = build_blocks(find_data_files([corpus]), load_tokenizer(), 8, cache, num_proc=1)
        queue.put(("blocks", list(blocks["input_ids"])))
    except BaseException as err:
        queue.put(("error", repr(err)))
        raise


def test_concurrent_builders_build_once_and_agree(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    corpus, cache = tmp_path / "a.txt", tmp_path / "cache"
    corpus.write_text(TEXT * 20)
    target = _target(cache, find_data_files([corpus]), tokenizer, 8)
    cache.mkdir()
    held = FileLock(cache / f".{target.name}.lock")
    held.acquire()  # both builders start while the cache is locked, so both must wait for it
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(corpus), str(cache), queue)) for _ in range(2)]
    for child in children:
        child.start()
    messages: list[tuple[str, object]] = []
    deadline = time.monotonic() + 120
    while sum("waiting for it" in str(m) for _, m in messages) < 2 and time.monotonic() < deadline:
        messages.append(queue.get(timeout=120))
    held.release()
    while sum(kind in ("blocks", "error") for kind, _ in messages) < 2 and time.monotonic() < deadline:
        messages.append(queue.get(timeout=120))
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0], messages
    logs = [m for kind, m in messages if kind == "log"]
    results = [m for kind, m in messages if kind == "blocks"]
    assert sum("another process is building" in m and "waiting for it" in m for m in logs) == 2
    assert sum(f"cached at {target}" in m for m in logs) == 1, logs  # built once ...
    assert sum(f"reusing the token blocks another process built at {target}" in m for m in logs) == 1, logs
    expected = list(build_blocks(find_data_files([corpus]), tokenizer, 8, cache, num_proc=1)["input_ids"])
    assert results[0] == results[1] == expected  # ... and both got the same blocks
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.name]


def _killed_while_saving(corpus: str, cache: str) -> None:
    real = datasets.Dataset.save_to_disk

    def save_then_die(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        os._exit(9)  # as a SIGKILL would: no cleanup, the lock released by the OS

    datasets.Dataset.save_to_disk = save_then_die
    build_blocks(find_data_files([corpus]), load_tokenizer(), 8, cache, num_proc=1)


def test_a_killed_builder_leaves_no_cache_that_loads_and_the_next_run_builds(tmp_path, tokenizer, monkeypatch, caplog):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    corpus, cache = tmp_path / "a.txt", tmp_path / "cache"
    corpus.write_text(TEXT * 20)
    groups = find_data_files([corpus])
    target = _target(cache, groups, tokenizer, 8)
    child = multiprocessing.get_context("fork").Process(target=_killed_while_saving, args=(str(corpus), str(cache)))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 9
    assert not target.exists()  # the saved blocks never became the cache
    assert list(cache.glob(f".{target.name}.tmp-*")) and list(cache.glob(f".building-{target.name}"))
    with caplog.at_level(logging.INFO, logger="densessm.data"):
        blocks = build_blocks(groups, tokenizer, 8, cache, num_proc=1)
    assert f"cached at {target}" in caplog.text
    assert blocks["input_ids"] == build_blocks(groups, tokenizer, 8, tmp_path / "fresh", num_proc=1)["input_ids"]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_leftovers_of_killed_builders_are_cleared_and_a_folder_without_marker_is_rebuilt(tmp_path, tokenizer):
    corpus, cache = tmp_path / "a.txt", tmp_path / "cache"
    corpus.write_text(TEXT * 20)
    groups = find_data_files([corpus])
    target = _target(cache, groups, tokenizer, 8)
    target.mkdir(parents=True)
    (target / "state.json").write_text("{}")  # a folder without the completeness marker
    for leftover in (f".building-{target.name}", f".{target.name}.tmp-x1", ".building-blocks-8-0123456789abcdef"):
        (cache / leftover).mkdir()
        (cache / leftover / "junk.arrow").write_bytes(b"x" * 100)
    blocks = build_blocks(groups, tokenizer, 8, cache, num_proc=1)
    expected = build_blocks(groups, tokenizer, 8, tmp_path / "fresh", num_proc=1)
    assert blocks["input_ids"] == expected["input_ids"]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_a_tokenizer_with_another_end_of_text_token_builds_its_own_blocks(tmp_path, tokenizer):
    """Two tokenizers of one vocabulary, one without an EOS: the blocks of the first, without EOS between the
    documents, were reused for the second (one cache key), so its documents ran into each other."""
    (tmp_path / "a.txt").write_text(TEXT * 4)
    (tmp_path / "b.txt").write_text(TEXT * 4)
    groups, cache = find_data_files([tmp_path / "a.txt", tmp_path / "b.txt"]), tmp_path / "cache"
    bare = copy.deepcopy(tokenizer)
    bare.eos_token = None
    assert bare.eos_token_id is None and tokenizer.eos_token_id is not None
    build_blocks(groups, bare, 8, cache, num_proc=1)
    blocks = build_blocks(groups, tokenizer, 8, cache, num_proc=1)["input_ids"]
    fresh = build_blocks(groups, tokenizer, 8, tmp_path / "fresh", num_proc=1)["input_ids"]
    assert list(blocks) == list(fresh) and any(tokenizer.eos_token_id in block for block in blocks)


def test_a_symlink_where_the_cache_lock_belongs_is_named(tmp_path, tokenizer):
    """It was "Too many levels of symbolic links; choose a writable --data_cache_dir" (the folder was writable)."""
    (tmp_path / "a.txt").write_text(TEXT * 5)
    groups, cache = find_data_files([tmp_path / "a.txt"]), tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "mine.txt").write_text("mine")
    target = _target(cache, groups, tokenizer, 8)
    (cache / f".{target.name}.lock").symlink_to(tmp_path / "mine.txt")
    with pytest.raises(UsageError, match=r"\.lock is a symlink where the token-block cache's lock file belongs"):
        build_blocks(groups, tokenizer, 8, cache, num_proc=1)
    assert (tmp_path / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncated", "zeroed in place"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, tokenizer, caplog, damage):
    """A cache damaged at its saved size (bytes zeroed in place) was reused: a run trained on zero ids."""
    corpus, cache = tmp_path / "a.txt", tmp_path / "cache"
    corpus.write_text(TEXT * 20)
    groups = find_data_files([corpus])
    first = list(build_blocks(groups, tokenizer, 8, cache, num_proc=1)["input_ids"])
    target = _target(cache, groups, tokenizer, 8)
    (arrow,) = target.glob("*.arrow")
    data = arrow.read_bytes()  # in place: the blocks loaded above are now damaged too
    if damage == "truncated":
        arrow.write_bytes(data[:100])
    else:
        middle = len(data) // 2
        arrow.write_bytes(data[:middle] + bytes(64) + data[middle + 64 :])
    with caplog.at_level(logging.INFO, logger="densessm.data"):
        again = build_blocks(groups, tokenizer, 8, cache, num_proc=1)["input_ids"]
    assert caplog.text.count(f"the token blocks cached at {target} are damaged") == 1
    assert f"blocks of 8, cached at {target}" in caplog.text
    assert list(again) == first


def test_a_cache_folder_inside_the_corpus_is_refused(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 5)
    args = DataArguments(dataset_dir=[str(corpus)], data_cache_dir=str(corpus / "cache"))
    with pytest.raises(UsageError, match=r"--data_cache_dir .*cache lies inside the corpus directory .*corpus"):
        load_blocks(args, tokenizer, 8, seed=0)
    assert not (corpus / "cache").exists()
    hidden = DataArguments(
        dataset_dir=[str(corpus)], data_cache_dir=str(corpus / ".cache"), preprocessing_num_workers=1
    )
    train, _ = load_blocks(hidden, tokenizer, 8, seed=0)  # a hidden folder is never read as corpus: allowed
    assert len(train) > 0


def test_a_json_file_holding_one_object_over_several_lines_is_one_document(tmp_path, tokenizer):
    """It was refused as "line 1 is not valid JSON": the file is valid JSON, written over several lines."""
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps({"text": TEXT * 3}, indent=2))
    one_line = tmp_path / "one" / "line.jsonl"
    one_line.parent.mkdir()
    one_line.write_text(json.dumps({"text": TEXT * 3}) + "\n")
    blocks = [
        build_blocks(find_data_files([path]), tokenizer, 8, tmp_path / f"cache-{path.stem}", num_proc=1)
        for path in (pretty, one_line)
    ]
    assert blocks[0]["input_ids"] == blocks[1]["input_ids"]
