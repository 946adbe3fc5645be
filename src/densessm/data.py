"""Raw text → fixed-length token blocks for causal-LM pretraining, on ``datasets``.

Inputs are files, or directories searched recursively for them:

- ``.txt``: one document per file, read line by line *with* the line breaks, so the token stream is the
  file's text (a file is never loaded whole: a line longer than ``TEXT_LINE_LIMIT`` characters is read in
  pieces);
- ``.jsonl`` / ``.json``: JSON lines, one document per record in its ``text`` field (a file holding one JSON
  array of such records is read too);
- ``.parquet``: one document per row in its ``text`` column;

text and JSON files may be compressed (``.gz``, ``.xz``, ``.bz2``). Every document ends with the tokenizer's
EOS token, so the model sees where documents end and never learns one file or record as the continuation of
the next. Files are read in parallel processes (a file per task) and tokenized in parallel processes; the
token rows are then concatenated in order and cut into ``block_size`` blocks in one pass that carries the
remainder from row to row, so only the corpus's last partial block is dropped and the blocks do not depend on
the number of processes.

The blocks are saved under ``data_cache_dir`` in a folder keyed by the input files (path, size, mtime), the
tokenizer and the block size: a second run with the same key loads them instead of tokenizing again. One
process builds a given folder at a time (a file lock; a second builder waits, then reuses the result), and the
folder is written under a temporary name and renamed into place with a completeness marker, so a killed build
never leaves a cache that loads as complete. The validation blocks are a fixed pseudo-random subset (seed
``SPLIT_SEED``, independent of the training seed, so runs with different seeds are scored on the same blocks).
``streaming=True`` reads the corpus lazily instead, for corpora larger than memory or disk: the same blocks,
nothing cached, the first blocks are the validation set and the training blocks are shuffled through a buffer.

Bad input stops with one line naming the file and the problem: :class:`CorpusError` for content, ``OSError``
subclasses for files that vanish or cannot be read, :class:`~densessm.errors.UsageError` for arguments.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import hashlib
import json
import logging
import lzma
import math
import os
import shutil
import stat
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets.exceptions import DatasetGenerationError
from filelock import FileLock, Timeout
from transformers import PreTrainedTokenizerBase

from densessm.errors import UsageError
from densessm.files import OutsideDirectoryError, atomic_output_dir, loads_json

logger = logging.getLogger(__name__)

BUNDLED_CORPUS = Path(__file__).parent / "resources" / "sotu"
"""State of the Union addresses 1790-2021 (public domain; see ``resources/sotu/README.md``)."""

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
COMPRESSION_NAMES = {".gz": "gzip", ".xz": "xz", ".bz2": "bzip2"}
SPLIT_SEED = 0
STREAMING_UTF8_CHECK = 1 << 20  # bytes of each file checked up front in streaming mode
TEXT_LINE_LIMIT = 1 << 20  # characters: a longer line of a .txt file is read in pieces of this size
CACHE_VERSION = 3  # bump when the cache layout changes, so old caches are not reused (3: with checksums)
COMPLETE_MARKER = "densessm_sources.json"  # written into a cache folder last, before it is renamed into place
RAW_FEATURES = datasets.Features({"text": datasets.Value("string"), "end": datasets.Value("bool")})
BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


class CorpusError(ValueError):
    """A corpus file whose content cannot become documents; the message names the file (and line or row)."""


@dataclass
class DataArguments:
    """Where the corpus is and how it becomes blocks (flag names follow the reference training script)."""

    dataset_dir: list[str] | None = field(
        default=None,
        metadata={
            "help": "Corpus: one or more directories (searched recursively) or files of .txt, .jsonl/.json "
            "(a `text` field) or .parquet (a `text` column); .gz/.xz/.bz2 compression is read. "
            "Default: the bundled State of the Union corpus."
        },
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the token blocks are cached for later runs. Default: ~/.cache/densessm/data."},
    )
    validation_split_percentage: float = field(
        default=1.0,
        metadata={"help": "Percent of the blocks held out for validation (at least one block when > 0; 0: none)."},
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence. Default: the model's max_position_embeddings."},
    )
    validation_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "A held-out corpus (files or directories, formats as --dataset_dir): the validation blocks come "
            "from it instead of from --validation_split_percentage of the training blocks."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenize. Default: all CPU cores (at most 8)."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Rebuild the cached token blocks."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the corpus lazily (needs --max_steps); validation = the first --max_eval_samples."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Streaming mode: blocks in the shuffle buffer."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training blocks."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many validation blocks (streaming: 64 when unset)."}
    )
    debug_mode: bool = field(default=False, metadata={"help": "Use only the first data file (a quick trial run)."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise UsageError(f"validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}")
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(f"block_size must be at least 2 (one prediction needs two tokens), got {self.block_size}")
        for name in ("dataset_dir", "validation_files"):
            value = getattr(self, name)
            if isinstance(value, str | os.PathLike):
                setattr(self, name, [value])  # one path given from Python: not a sequence of its characters
            elif value is not None and not value:
                raise UsageError(f"{name} is an empty list: name at least one file or directory, or leave it unset")
        positive = ("preprocessing_num_workers", "shuffle_buffer_size", "max_train_samples", "max_eval_samples")
        for name in positive:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _format(path: Path) -> str | None:
    """The reader for ``path`` (``text``, ``json``, ``parquet``), or None if unsupported."""
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
        if suffixes[-1:] == [".parquet"]:
            return None  # Parquet compresses internally; a compressed Parquet file cannot be read in pieces
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _unsupported(path: Path) -> str:
    if path.name.endswith(tuple(f".parquet{ext}" for ext in COMPRESSION)):
        return f"{path} is a compressed Parquet file: decompress it (Parquet compresses internally)"
    return f"{path} is not a .txt, .jsonl, .json or .parquet file (or .gz/.xz/.bz2 of one)"


def _files_in(given: Path) -> list[Path]:
    """The corpus files under the directory ``given``: hidden ones skipped, links that lead outside refused."""
    root = given.resolve()

    def inside(path: Path) -> None:
        target = path.resolve()
        if target != root and root not in target.parents:
            raise OutsideDirectoryError(
                f"{path} is a link to {target}, outside {given}: only files inside the directory are read; "
                f"give {target} itself to read it"
            )

    def unreadable(err: OSError):
        raise PermissionError(f"cannot list {err.filename}: {err.strerror}")

    files, hidden, skipped = [], [], []
    for folder, dirnames, filenames in os.walk(given, onerror=unreadable):
        folder = Path(folder)
        for name in sorted(dirnames):
            if name.startswith("."):
                hidden.append(folder / name)
                dirnames.remove(name)
            elif (folder / name).is_symlink():
                inside(folder / name)  # a link within the corpus: its files are read where they lie
                dirnames.remove(name)
        for name in filenames:
            path = folder / name
            if name.startswith("."):
                hidden.append(path)
                continue
            if path.is_symlink():
                if not path.exists():
                    raise FileNotFoundError(f"{path} is a broken link (to {os.readlink(path)})")
                inside(path)
            if _format(path) is None:
                skipped.append(path)
            elif not stat.S_ISREG(path.stat().st_mode):
                raise CorpusError(f"{path} is not a regular file (a pipe, socket or device): remove it from the corpus")
            else:
                files.append(path)
    if not files:

        def names(paths: list[Path]) -> str:
            shown = sorted(str(p.relative_to(given)) for p in paths)
            return ", ".join(shown[:5]) + (", ..." if len(shown) > 5 else "")

        if skipped:
            raise CorpusError(
                f"no readable files in {given}: expected .txt, .jsonl, .json or .parquet "
                f"(optionally .gz/.xz/.bz2), found {names(skipped)}"
            )
        if hidden:
            raise CorpusError(
                f"{given} holds only hidden files or folders ({names(hidden)}), which are skipped: "
                "rename them without the leading dot"
            )
        raise CorpusError(f"{given} is empty: put .txt, .jsonl, .json or .parquet files in it")
    if skipped:
        logger.info(
            f"skipping {len(skipped)} file(s) in {given} that are not .txt, .jsonl, .json or .parquet: "
            + ", ".join(sorted(str(p.relative_to(given)) for p in skipped)[:5])
            + (", ..." if len(skipped) > 5 else "")
        )
    return sorted(files)


def find_data_files(paths: Sequence[str | os.PathLike], debug_mode: bool = False) -> dict[str, list[str]]:
    """The corpus files under ``paths``, grouped by reader, in a stable order; raises on what cannot be read.

    A file reached twice (named twice, or once directly and once through its directory) is refused: its
    documents would silently count double."""
    found: list[Path] = []
    for given in paths:
        if not str(given):
            raise UsageError("an empty path was given as a corpus file or directory")
        given = Path(given)
        if given.is_symlink() and not given.exists():
            raise FileNotFoundError(f"{given} is a broken link (to {os.readlink(given)})")
        if not given.exists():
            raise FileNotFoundError(f"{given} does not exist")
        if given.is_dir():
            found.extend(_files_in(given))
        elif _format(given) is None:
            raise CorpusError(_unsupported(given))
        elif not given.is_file():
            raise CorpusError(f"{given} is not a regular file (a pipe, socket or device)")
        else:
            found.append(given)
    first: dict[tuple[int, int], Path] = {}
    for path in found:
        key = _file_identity(path)
        if key in first:
            also = f" (as {first[key]} and {path})" if first[key] != path else ""
            raise UsageError(f"{path.resolve()} is in the corpus twice{also}: its documents would count double")
        first[key] = path
    unreadable = [str(p) for p in found if not os.access(p, os.R_OK)]
    if unreadable:
        raise PermissionError(f"cannot read {', '.join(unreadable)}: permission denied")
    if debug_mode:
        found = found[:1]
    groups: dict[str, list[str]] = {}
    for path in found:
        groups.setdefault(_format(path), []).append(str(path))
    return groups


def check_utf8(path: str | os.PathLike, chunk_size: int = 1 << 20, max_bytes: int | None = None) -> None:
    """Raise a CorpusError naming ``path`` and the byte offset if it is not valid UTF-8 (after decompression).

    ``max_bytes`` checks only the start of the file (streaming mode: a wrongly encoded file shows itself in its
    first megabyte, and reading a whole large corpus up front is what streaming avoids)."""
    path = Path(path)
    opener = COMPRESSION.get(path.suffix, open)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _reading(path), opener(path, "rb") as f:
        while (max_bytes is None or offset < max_bytes) and (chunk := f.read(chunk_size)):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{path} is not UTF-8 text: {err.reason} at byte {offset + err.start}; convert it "
                    "(e.g. `iconv -f latin1 -t utf-8`) or remove it from the corpus"
                ) from None
            offset += len(chunk)
        if max_bytes is not None and offset >= max_bytes:
            return  # cut off at a chunk boundary, possibly inside a character: not an error
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"{path} is not UTF-8 text: it ends inside a multi-byte character ({err.reason})"
            ) from None


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what reading ``path`` can raise into one line naming the file: vanished, unreadable, corrupt."""
    kind = COMPRESSION_NAMES.get(path.suffix)
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} disappeared while the corpus was being read") from None
    except PermissionError as err:
        raise PermissionError(f"cannot read {path}: {err.strerror or err}") from None
    except EOFError:
        raise CorpusError(f"{path} is truncated: its {kind} stream ends early") from None
    except (lzma.LZMAError, zlib.error) as err:
        raise CorpusError(f"{path} is not a valid {kind} file ({err})") from None
    except OSError as err:
        if kind is not None and err.errno is None:  # the decompressor's complaint, not the file system's
            raise CorpusError(f"{path} is not a valid {kind} file ({err})") from None
        raise OSError(f"cannot read {path}: {err.strerror or err}") from None


def _open_text(path: Path) -> IO[str]:
    """``path`` as text, decompressed; universal newlines like ``open``, and a leading UTF-8 BOM dropped."""
    opener = COMPRESSION.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8-sig")


def _text_rows(path: Path) -> Iterator[dict]:
    """The lines of a text file (pieces of at most ``TEXT_LINE_LIMIT`` characters); the last one ends the
    document."""
    with _open_text(path) as f:
        previous = None
        for line in iter(lambda: f.readline(TEXT_LINE_LIMIT), ""):
            if previous is not None:
                yield {"text": previous, "end": False}
            previous = line
        if previous is not None:
            yield {"text": previous, "end": True}


def _record_text(path: Path, record, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(
            f"{path} {where} is {_JSON_TYPES.get(type(record), 'null')}, not an object with a 'text' field"
        )
    if "text" not in record:
        fields = ", ".join(list(record)[:8]) or "none"
        raise CorpusError(f"no 'text' field in {path} {where} (fields found: {fields})")
    text = record["text"]
    if not isinstance(text, str):
        raise CorpusError(f"{path} {where}: 'text' is {_JSON_TYPES.get(type(text), 'null')}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CorpusError(
            f"{path} {where}: 'text' holds an unpaired surrogate ({text[err.start]!r}), which is not text"
        ) from None
    return text


def _json_problem(err: json.JSONDecodeError) -> str:
    return f"{err.msg.removesuffix(' at')} at"


def _json_rows(path: Path) -> Iterator[dict]:
    """The records of a JSON-lines file (or of a file holding one JSON array of records)."""
    hint = "; expected JSON lines: one object with a 'text' field per line"
    with _open_text(path) as f:
        first = True
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("["):
                whole = line + f.read()
                try:
                    records = loads_json(whole)
                except json.JSONDecodeError as err:
                    where = f"line {number + err.lineno - 1} column {err.colno}"
                    raise CorpusError(f"{path} is not valid JSON ({_json_problem(err)} {where})" + hint) from None
                for index, record in enumerate(records, start=1):
                    text = _record_text(path, record, f"record {index}")
                    yield {"text": text, "end": bool(text)}
                return
            try:
                record = loads_json(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                if first and line.lstrip().startswith("{"):  # one object written over several lines
                    rest = f.read()
                    try:
                        record = loads_json(line + rest)
                    except json.JSONDecodeError:
                        pass
                    else:
                        text = _record_text(path, record, "its one object")
                        yield {"text": text, "end": bool(text)}
                        return
                raise CorpusError(
                    f"{path} line {number} is not valid JSON ({_json_problem(err)} column {err.colno})"
                    + (hint if first else "")
                ) from None
            first = False
            text = _record_text(path, record, f"line {number}")
            yield {"text": text, "end": bool(text)}


def _parquet_rows(path: Path) -> Iterator[dict]:
    """The ``text`` column of a Parquet file, batch by batch."""
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except pa.ArrowException as err:
        raise CorpusError(f"{path} is not a readable Parquet file ({err})") from None
    if "text" not in schema.names:
        raise CorpusError(f"no 'text' field in {path} (columns found: {', '.join(schema.names) or 'none'})")
    kind = schema.field("text").type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (
        pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind) or pa.types.is_string_view(value_kind)
    ):
        raise CorpusError(f"{path}: the 'text' column holds {kind}, not strings")
    row = 0
    try:
        for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
            column = batch.column(0)
            if column.null_count:
                first_null = pc.index(pc.is_null(column), True).as_py()
                raise CorpusError(f"{path} row {row + first_null + 1}: 'text' is null")
            for text in column.to_pylist():
                yield {"text": text, "end": bool(text)}
            row += len(batch)
    except pa.ArrowException as err:
        raise CorpusError(f"{path} is a damaged Parquet file ({err})") from None
    except UnicodeDecodeError:
        raise CorpusError(f"{path} holds text that is not valid UTF-8 (near row {row + 1})") from None


READERS = {"text": _text_rows, "json": _json_rows, "parquet": _parquet_rows}


def _file_documents(path: str) -> Iterator[dict]:
    """The rows of one corpus file as ``{"text", "end"}`` (``end``: an EOS follows the row's tokens).

    Raises CorpusError naming the file when it holds no text at all, or cannot be read as its format."""
    path = Path(path)
    rows = has_text = 0
    try:
        with _reading(path):
            for row in READERS[_format(path)](path):
                rows += 1
                has_text = has_text or (row["text"] and not row["text"].isspace())
                yield row
    except UnicodeDecodeError as err:
        check_utf8(path)  # names the byte offset
        raise CorpusError(f"{path} is not UTF-8 text ({err.reason})") from None
    if not has_text:
        if path.stat().st_size == 0:
            raise CorpusError(f"{path} is empty (0 bytes): remove it from the corpus or give it text")
        what = {"text": "lines", "json": "records", "parquet": "rows"}[_format(path)]
        if not rows:
            raise CorpusError(
                f"{path} holds no {what}" + (" after decompression" if path.suffix in COMPRESSION else "")
            )
        raise CorpusError(f"{path} holds no text: its {what} are all empty or whitespace")


def file_documents(path: str | os.PathLike) -> Iterator[str]:
    """The documents of one corpus file, whole and checked as for training (the same one-line errors): a ``.txt``
    file is one document, a JSON record or Parquet row one each (empty ones skipped). For evaluation, which scores
    each document by itself."""
    rows = _file_documents(str(path))
    if _format(Path(path)) == "text":
        yield "".join(row["text"] for row in rows)
    else:
        yield from (row["text"] for row in rows if row["text"])


def _documents(files: list[str]) -> Iterator[dict]:
    """``datasets`` generator over ``files`` in order; a list, so ``datasets`` can shard it over processes."""
    for name in files:
        yield from _file_documents(name)


def _check_start(path: str) -> None:
    """The up-front check of a file: it opens, its first megabyte is UTF-8 and it yields a document."""
    if _format(Path(path)) != "parquet":
        check_utf8(path, max_bytes=STREAMING_UTF8_CHECK)
    for row in _file_documents(path):
        if row["text"] and not row["text"].isspace():
            return


class Tokenize:
    """Batched ``map`` function: the token ids of each row, plus ``end_of_document`` after a row that ends one.

    A class rather than a closure so that ``datasets`` can pickle it into worker processes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_of_document: list[int]):
        self.tokenizer = tokenizer
        self.end_of_document = end_of_document

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        ids = self.tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {
            "input_ids": [
                row + self.end_of_document if end else row for row, end in zip(ids, batch["end"], strict=True)
            ]
        }


def _end_of_document(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if tokenizer.eos_token_id is None:
        logger.warning("the tokenizer has no EOS token: documents follow each other with nothing between them")
        return []
    return [tokenizer.eos_token_id]


def _describe(files: Sequence[str]) -> str:
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return f"{shown} ({len(files)} file{'s' if len(files) != 1 else ''})"


def pack(
    rows: Iterable[dict], block_size: int, skip: int = 0, corpus: str = "the corpus"
) -> Iterator[dict[str, list[int]]]:
    """Concatenate the rows' ``input_ids`` and cut them into ``block_size`` blocks, carrying the remainder on.

    The first ``skip`` blocks are left out (streaming: they are the validation set). Raises CorpusError when
    nothing is left: a training or validation set without a block would fail later with no word of why."""
    carry: list[int] = []
    n_blocks = n_tokens = 0
    for row in rows:
        carry.extend(row["input_ids"])
        n_tokens += len(row["input_ids"])
        full = len(carry) - len(carry) % block_size
        for start in range(0, full, block_size):
            n_blocks += 1
            if n_blocks > skip:
                yield {"input_ids": carry[start : start + block_size]}
        del carry[:full]
    if n_blocks == 0:
        raise CorpusError(
            f"{corpus} holds {n_tokens} tokens, fewer than one block of {block_size}: "
            "use a smaller --block_size or more text"
        )
    if n_blocks <= skip:
        raise CorpusError(
            f"{corpus} gives {n_blocks} block(s) of {block_size}, all held out for validation (the first {skip}): "
            "use more text, a smaller --block_size or a smaller --max_eval_samples"
        )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes when the token blocks made with the tokenizer can change: its backend, and the
    end-of-text token set between documents (:func:`_end_of_document`), which the backend does not hold (one
    tokenizer without it once reused the blocks of another, whose documents then ran into each other)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{state}\neos={tokenizer.eos_token_id}".encode()).hexdigest()


def _file_states(files: Iterable[str]) -> list[list]:
    """(resolved path, size, mtime) of each file, in the order given."""
    states = []
    for name in files:
        try:
            info = Path(name).stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{name} disappeared while the corpus was being read") from None
        states.append([str(Path(name).resolve()), info.st_size, info.st_mtime_ns])
    return states


def cache_key(groups: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, block_size: int) -> str:
    """Key of the cached blocks: the input files as they are on disk now, the tokenizer and the block size."""
    payload = {
        "version": CACHE_VERSION,
        "files": _file_states(sorted(f for group in groups.values() for f in group)),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _cache_root(data_cache_dir: str | os.PathLike) -> Path:
    root = Path(data_cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"--data_cache_dir {root} is a file, not a directory: choose a folder for the token blocks")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise type(err)(
            f"cannot create the token-block cache folder {root}: {err.strerror or err}; choose another --data_cache_dir"
        ) from None
    return root


def _checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of each file of a saved block cache (its marker aside): checked at each load, since the blocks
    are what a run trains on (hashing reads them once, at about a gigabyte per second)."""
    sums = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name != COMPLETE_MARKER:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            sums[file.name] = digest.hexdigest()
    return sums


def _load_cached(target: Path) -> datasets.Dataset | None:
    """The blocks cached at ``target`` if it holds a complete cache of this version, else None."""
    marker = target / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        if info.get("version") != CACHE_VERSION:
            return None
        if _checksums(target) != info["sha256"]:  # bytes changed in place, at the same size
            raise ValueError("its files do not match the checksums recorded when it was built")
        blocks = datasets.load_from_disk(str(target))
        if len(blocks) != info["blocks"]:
            raise ValueError(f"{len(blocks)} blocks instead of {info['blocks']}")
    except Exception as err:  # any damage: the cache is derived data, so rebuilding is always right
        logger.warning(f"the token blocks cached at {target} are damaged ({err}); rebuilding them")
        return None
    return blocks


def _stale_target(leftover: Path) -> str:
    """The cache folder a leftover work or temporary folder belongs to."""
    name = leftover.name
    return name.removeprefix(".building-") if name.startswith(".building-") else name[1:].rsplit(".tmp-", 1)[0]


def _remove_leftovers(root: Path, own: str) -> None:
    """Remove what killed builders left behind (work folders, half-written caches): those of ``own``, whose
    lock the caller holds, and those of other caches once no one holds their lock."""
    for leftover in sorted([*root.glob(".building-blocks-*"), *root.glob(".blocks-*.tmp-*")]):
        name = _stale_target(leftover)
        if name == own:
            shutil.rmtree(leftover, ignore_errors=True)
            continue
        lock = FileLock(root / f".{name}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # being built right now
        try:
            shutil.rmtree(leftover, ignore_errors=True)
        finally:
            lock.release()


@contextlib.contextmanager
def _build_lock(root: Path, target: Path) -> Iterator[bool]:
    """Hold the lock of ``target`` (released by the OS if this process dies); yields whether it had to wait."""
    path = root / f".{target.name}.lock"
    if path.is_symlink():  # filelock refuses to follow it ("too many levels of symbolic links"), naming nothing
        raise UsageError(
            f"{path} is a symlink where the token-block cache's lock file belongs: remove it, then run again"
        )
    lock = FileLock(path)
    waited = False
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waited = True
            logger.info(f"another process is building the token blocks at {target}: waiting for it to finish")
            lock.acquire()
    except OSError as err:
        raise type(err)(
            f"cannot lock the token-block cache in {root}: {err.strerror or err}; choose a writable --data_cache_dir"
        ) from None
    try:
        yield waited
    finally:
        lock.release()


def _interrupted_behind(err: BaseException) -> bool:
    """Whether a ``KeyboardInterrupt`` is in the cause or context chain of ``err``."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return False


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C as the ``KeyboardInterrupt`` it is, while ``datasets`` runs worker processes: their pool answers it
    with another error (a ``TimeoutError`` with an empty message, raised while the interrupt unwinds), which would
    end the run as an internal error instead of a stop that says where to resume."""
    try:
        yield
    except Exception as err:
        if _interrupted_behind(err):
            raise KeyboardInterrupt from None
        raise


def _generation_error(err: DatasetGenerationError, files: list[str]) -> Exception:
    """The one-line error behind a failed ``datasets`` generation.

    In one process ``datasets`` chains our error; from worker processes only a traceback's text comes back,
    so the files are read again here, in order, until the error shows itself with its message."""
    cause = err.__cause__
    if isinstance(cause, CorpusError | OSError):
        return cause
    for name in files:
        try:
            for _ in _file_documents(name):
                pass
        except (CorpusError, OSError) as found:
            return found
    last = str(cause or err).strip().splitlines()[-1:] or ["unknown error"]
    return OSError(f"reading the corpus {_describe(files)} failed: {last[0]}")


def _raw_rows(files: list[str], cache_dir: Path, num_proc: int | None) -> datasets.Dataset:
    """All rows of ``files`` in order, read by up to ``num_proc`` processes (a file is never split)."""
    workers = min(num_proc or 1, len(files))
    try:
        with _interruptible():  # before the files are read again for the error message
            return datasets.Dataset.from_generator(
                _documents,
                features=RAW_FEATURES,
                gen_kwargs={"files": files},
                cache_dir=str(cache_dir),
                num_proc=workers if workers > 1 else None,
                split="train",
            )
    except DatasetGenerationError as err:
        raise _generation_error(err, files) from None


def _build(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    root: Path,
    target: Path,
    num_proc: int | None,
) -> datasets.Dataset:
    """Tokenize ``files`` and write their blocks to ``target`` (the caller holds its lock)."""
    states = _file_states(files)
    for name in files:
        _check_start(name)  # most bad files show at their start: fail in seconds, not after reading the rest
    workdir = root / f".building-{target.name}"
    shutil.rmtree(workdir, ignore_errors=True)
    if num_proc and num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers parallelise; avoid fork warnings
    try:
        raw = _raw_rows(files, workdir / "raw", num_proc)
        changed = [name for name, old, new in zip(files, states, _file_states(files), strict=True) if old != new]
        if changed:
            raise CorpusError(f"{', '.join(changed)} changed while being read: run again once the corpus is complete")
        with _interruptible():
            rows = raw.map(
                Tokenize(tokenizer, _end_of_document(tokenizer)),
                batched=True,
                remove_columns=list(RAW_FEATURES),
                num_proc=num_proc if num_proc and num_proc > 1 and len(raw) > 1 else None,
                desc=f"Tokenizing {len(files)} file(s)",
            )
        n_tokens = pc.sum(pc.list_value_length(rows.data.column("input_ids"))).as_py() or 0
        if n_tokens < block_size:
            raise CorpusError(
                f"the corpus {_describe(files)} holds {n_tokens} tokens, fewer than one block of {block_size}: "
                "use a smaller --block_size or more text"
            )
        blocks = datasets.Dataset.from_generator(
            pack,
            features=BLOCK_FEATURES,
            gen_kwargs={"rows": rows, "block_size": block_size},
            cache_dir=str(workdir / "packed"),
            split="train",
        )
        info = {
            "version": CACHE_VERSION,
            "files": files,
            "block_size": block_size,
            "tokens": n_tokens,
            "blocks": len(blocks),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with atomic_output_dir(target, overwrite=True, what="token-block cache") as staging:
            blocks.save_to_disk(str(staging))
            info["sha256"] = _checksums(staging)
            (staging / COMPLETE_MARKER).write_text(json.dumps(info, indent=1))  # last: marks the folder complete
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info(f"{n_tokens:,d} tokens -> {len(blocks):,d} blocks of {block_size}, cached at {target}")
    return datasets.load_from_disk(str(target))


def build_blocks(
    groups: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data_cache_dir: str | os.PathLike,
    num_proc: int | None = None,
    overwrite_cache: bool = False,
) -> datasets.Dataset:
    """All token blocks of the corpus, from the cache when it holds them, else built and cached.

    One process builds a given cache at a time: another that wants the same blocks waits for it, then loads
    what it built (even with ``overwrite_cache``: those blocks are as fresh as a rebuild)."""
    files = [name for group in groups.values() for name in group]
    root = _cache_root(data_cache_dir)
    target = root / f"blocks-{block_size}-{cache_key(groups, tokenizer, block_size)}"
    rebuild = overwrite_cache
    if not overwrite_cache:
        if (blocks := _load_cached(target)) is not None:
            logger.info(
                f"reusing the token blocks cached at {target} ({len(blocks):,d} blocks of {block_size} tokens; "
                "--overwrite_cache rebuilds them)"
            )
            return blocks
        rebuild = (target / COMPLETE_MARKER).is_file()  # there, but damaged or of another version
    with _build_lock(root, target) as waited:
        _remove_leftovers(root, target.name)
        if (waited or not rebuild) and (blocks := _load_cached(target)) is not None:
            logger.info(
                f"reusing the token blocks another process built at {target} ({len(blocks):,d} blocks of "
                f"{block_size} tokens)"
            )
            return blocks
        return _build(files, tokenizer, block_size, root, target, num_proc)


def split_blocks(
    blocks: datasets.Dataset, validation_split_percentage: float
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out ``validation_split_percentage`` percent of the blocks (at least one), chosen with ``SPLIT_SEED``."""
    if validation_split_percentage <= 0:
        return blocks, None
    n_val = max(1, math.floor(len(blocks) * validation_split_percentage / 100))
    if n_val >= len(blocks):
        raise ValueError(
            f"the corpus gives {len(blocks)} block(s): too few to hold out {n_val} for validation; "
            "use more text, a smaller --block_size or --validation_split_percentage 0"
        )
    # Not train_test_split: on a dataset loaded from disk it writes index files even with keep_in_memory.
    order = np.random.default_rng(SPLIT_SEED).permutation(len(blocks))
    train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
    return blocks.select(train_idx, keep_in_memory=True), blocks.select(val_idx, keep_in_memory=True)


def stream_blocks(
    groups: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    n_val: int,
    seed: int,
    shuffle_buffer_size: int,
) -> tuple[datasets.IterableDataset, datasets.IterableDataset | None]:
    """Streaming mode: the first ``n_val`` blocks for validation, the rest shuffled through a buffer.

    Each file is checked up front (it opens, its first megabyte is UTF-8, it yields a document); a problem
    further in stops the run when reading reaches it, with the same one-line error as in cached mode."""
    files = [name for group in groups.values() for name in group]
    for name in files:
        _check_start(name)
    rows = datasets.IterableDataset.from_generator(_documents, features=RAW_FEATURES, gen_kwargs={"files": files})
    rows = rows.map(Tokenize(tokenizer, _end_of_document(tokenizer)), batched=True, remove_columns=list(RAW_FEATURES))
    corpus = f"the corpus {_describe(files)}"

    def blocks(skip: int) -> datasets.IterableDataset:
        kwargs = {"rows": rows, "block_size": block_size, "skip": skip, "corpus": corpus}
        return datasets.IterableDataset.from_generator(pack, features=BLOCK_FEATURES, gen_kwargs=kwargs)

    train = blocks(n_val).shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return train, (blocks(0).take(n_val) if n_val else None)


def _file_identity(path: str | os.PathLike) -> tuple[int, int]:
    """The file a path names, whatever the path (symlinks and hard links to one file are one file)."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _check_apart(train: dict[str, list[str]], held_out: dict[str, list[str]]) -> None:
    """Refuse validation files that are also training files: the validation loss would flatter the model."""
    training = {_file_identity(name) for group in train.values() for name in group}
    both = [name for group in held_out.values() for name in group if _file_identity(name) in training]
    if both:
        raise UsageError(
            f"{', '.join(both[:3])} {'is' if len(both) == 1 else 'are'} in both --dataset_dir and --validation_files: "
            "the validation loss would be measured on training text"
        )


def _check_cache_outside(cache_dir: Path, corpus: Iterable[str | os.PathLike]) -> None:
    """Refuse a cache folder inside a corpus directory: the next run would read its files as corpus files."""
    cache = cache_dir.expanduser().resolve()
    for given in map(Path, corpus):
        folder = given.resolve()
        inside = given.is_dir() and (cache == folder or folder in cache.parents)
        if inside and not any(part.startswith(".") for part in cache.relative_to(folder).parts):  # hidden: unread
            raise UsageError(
                f"--data_cache_dir {cache_dir} lies inside the corpus directory {given}: the cached blocks "
                "would be read as corpus files by the next run; choose a folder outside it"
            )


def load_blocks(
    args: DataArguments, tokenizer: PreTrainedTokenizerBase, block_size: int, seed: int
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | datasets.IterableDataset | None]:
    """Training and validation blocks as ``args`` describes them."""
    cache_dir = Path(args.data_cache_dir or "~/.cache/densessm/data").expanduser()
    if not args.streaming:
        _check_cache_outside(cache_dir, [*(args.dataset_dir or []), *(args.validation_files or [])])
    groups = find_data_files(args.dataset_dir or [BUNDLED_CORPUS], args.debug_mode)
    held_out = None
    if args.validation_files:
        held_out = find_data_files(args.validation_files)
        _check_apart(groups, held_out)
    if args.streaming:
        n_val = 0 if args.validation_split_percentage <= 0 else (args.max_eval_samples or 64)
        if held_out:
            train, _ = stream_blocks(groups, tokenizer, block_size, 0, seed, args.shuffle_buffer_size)
            _, val = stream_blocks(held_out, tokenizer, block_size, args.max_eval_samples or 64, seed, 1)
        else:
            train, val = stream_blocks(groups, tokenizer, block_size, n_val, seed, args.shuffle_buffer_size)
        if args.max_train_samples is not None:
            train = train.take(args.max_train_samples)
        return train, val
    num_proc = args.preprocessing_num_workers or min(os.cpu_count() or 1, 8)
    blocks = build_blocks(groups, tokenizer, block_size, cache_dir, num_proc, args.overwrite_cache)
    if held_out:
        train = blocks
        val = build_blocks(held_out, tokenizer, block_size, cache_dir, num_proc, args.overwrite_cache)
        if args.max_eval_samples is not None and args.max_eval_samples < len(val):
            # A fixed pseudo-random subset, so that it samples the whole held-out corpus, not its first files.
            order = np.random.default_rng(SPLIT_SEED).permutation(len(val))[: args.max_eval_samples]
            val = val.select(np.sort(order), keep_in_memory=True)
    else:
        train, val = split_blocks(blocks, args.validation_split_percentage)
        if val is not None and args.max_eval_samples is not None:
            val = val.select(range(min(args.max_eval_samples, len(val))))
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    return train, val


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; the labels are the inputs (the model shifts them)."""
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


__all__ = [
    "BUNDLED_CORPUS",
    "CorpusError",
    "DataArguments",
    "build_blocks",
    "check_utf8",
    "collate_blocks",
    "file_documents",
    "find_data_files",
    "load_blocks",
    "split_blocks",
    "stream_blocks",
]
