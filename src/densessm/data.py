"""Raw text → fixed-length token blocks for causal-LM pretraining, on ``datasets``.

Inputs are files, or directories searched recursively for them:

- ``.txt``: plain text, read line by line *with* the line breaks, so the token stream is the file's text;
- ``.jsonl`` / ``.json``: JSON lines, one document per record in its ``text`` field;
- ``.parquet``: one document per row in its ``text`` column;

text and JSON files may be compressed (``.gz``, ``.xz``, ``.bz2``). Each JSON/Parquet document ends with the
tokenizer's EOS token, so the model sees where documents end. Tokenizing runs in parallel processes; the
token rows are then concatenated in order and cut into ``block_size`` blocks in one pass that carries the
remainder from row to row, so only the corpus's last partial block is dropped and the blocks do not depend on
the number of processes.

The blocks are saved under ``data_cache_dir`` in a folder keyed by the input files (path, size, mtime), the
tokenizer and the block size: a second run with the same key loads them instead of tokenizing again. The
validation blocks are a fixed pseudo-random subset (seed ``SPLIT_SEED``, independent of the training seed, so
runs with different seeds are scored on the same blocks). ``streaming=True`` reads the corpus lazily instead,
for corpora larger than memory or disk: the same blocks, nothing cached, the first blocks are the validation
set and the training blocks are shuffled through a buffer.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import json
import logging
import lzma
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUNDLED_CORPUS = Path(__file__).parent / "resources" / "sotu"
"""State of the Union addresses 1790-2021 (public domain; see ``resources/sotu/README.md``)."""

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
SPLIT_SEED = 0
STREAMING_UTF8_CHECK = 1 << 20  # bytes of each file checked up front in streaming mode
CACHE_VERSION = 1  # bump when the block layout changes, so old caches are not reused
BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


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
            raise ValueError(f"validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 (one prediction needs two tokens), got {self.block_size}")


def _format(path: Path) -> str | None:
    """The ``datasets`` builder for ``path`` (``text``, ``json``, ``parquet``), or None if unsupported."""
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
        if suffixes[-1:] == [".parquet"]:
            return None  # Parquet compresses internally; datasets cannot stream a compressed Parquet file
    return FORMATS.get(suffixes[-1]) if suffixes else None


def find_data_files(paths: Sequence[str | os.PathLike], debug_mode: bool = False) -> dict[str, list[str]]:
    """The corpus files under ``paths``, grouped by builder, in a stable order; raises on what cannot be read."""
    found: list[Path] = []
    for given in map(Path, paths):
        if not given.exists():
            raise FileNotFoundError(f"{given} does not exist")
        if given.is_file():
            if _format(given) is None:
                raise ValueError(f"{given} is not a .txt, .jsonl, .json or .parquet file (or .gz/.xz/.bz2 of one)")
            found.append(given)
            continue
        files = sorted(
            p
            for p in given.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(given).parts)
        )
        if not files:
            raise ValueError(f"{given} is empty: put .txt, .jsonl, .json or .parquet files in it")
        usable = [p for p in files if _format(p)]
        if not usable:
            shown = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
            raise ValueError(
                f"no readable files in {given}: expected .txt, .jsonl, .json or .parquet "
                f"(optionally .gz/.xz/.bz2), found {shown}"
            )
        found.extend(usable)
    unreadable = [str(p) for p in found if not os.access(p, os.R_OK)]
    if unreadable:
        raise PermissionError(f"cannot read {', '.join(unreadable)}")
    if debug_mode:
        found = found[:1]
    groups: dict[str, list[str]] = {}
    for path in found:
        groups.setdefault(_format(path), []).append(str(path))
    return groups


def check_utf8(path: str | os.PathLike, chunk_size: int = 1 << 20, max_bytes: int | None = None) -> None:
    """Raise a ValueError naming ``path`` and the byte offset if it is not valid UTF-8 (after decompression).

    ``max_bytes`` checks only the start of the file (streaming mode: a wrongly encoded file shows itself in its
    first megabyte, and reading a whole large corpus up front is what streaming avoids)."""
    path = Path(path)
    opener = COMPRESSION.get(path.suffix, open)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with opener(path, "rb") as f:
        while (max_bytes is None or offset < max_bytes) and (chunk := f.read(chunk_size)):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} is not UTF-8 text: {err.reason} at byte {offset + err.start}; convert it "
                    "(e.g. `iconv -f latin1 -t utf-8`) or remove it from the corpus"
                ) from None
            offset += len(chunk)
        if max_bytes is not None and offset >= max_bytes:
            return  # cut off at a chunk boundary, possibly inside a character: not an error
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path} is not UTF-8 text: it ends inside a multi-byte character ({err.reason})"
            ) from None


class Tokenize:
    """Batched ``map`` function: the token ids of each record, plus ``end_of_document`` after a non-empty one.

    A class rather than a closure so that ``datasets`` can pickle it into worker processes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_of_document: list[int]):
        self.tokenizer = tokenizer
        self.end_of_document = end_of_document

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        ids = self.tokenizer([t or "" for t in batch["text"]], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + self.end_of_document if row else row for row in ids]}


def pack(rows: Iterable[dict], block_size: int) -> Iterator[dict[str, list[int]]]:
    """Concatenate the rows' ``input_ids`` and cut them into ``block_size`` blocks, carrying the remainder on."""
    carry: list[int] = []
    for row in rows:
        carry.extend(row["input_ids"])
        full = len(carry) - len(carry) % block_size
        for start in range(0, full, block_size):
            yield {"input_ids": carry[start : start + block_size]}
        del carry[:full]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes when the tokenizer's output can change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{state}".encode()).hexdigest()


def cache_key(groups: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, block_size: int) -> str:
    """Key of the cached blocks: the input files as they are on disk now, the tokenizer and the block size."""
    files = []
    for name in sorted(f for group in groups.values() for f in group):
        stat = Path(name).stat()
        files.append([str(Path(name).resolve()), stat.st_size, stat.st_mtime_ns])
    payload = {
        "version": CACHE_VERSION,
        "files": files,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _load_group(builder: str, files: list[str], cache_dir: str | None, streaming: bool):
    """One ``load_dataset`` call for all files of one format; returns a dataset with only the ``text`` column."""
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    raw = datasets.load_dataset(
        builder, data_files=files, split="train", cache_dir=cache_dir, streaming=streaming, **kwargs
    )
    columns = raw.column_names if raw.column_names is not None else list(raw.features or [])
    if columns and "text" not in columns:
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        raise ValueError(f"no 'text' field in {shown} (columns found: {', '.join(columns)})")
    return raw.select_columns(["text"])


def _tokenized(groups: dict[str, list[str]], tokenizer, cache_dir: str | None, num_proc: int | None, streaming: bool):
    """The token rows of all files, one group (format) after another."""
    parts = []
    for builder, files in groups.items():
        raw = _load_group(builder, files, cache_dir, streaming)
        eos = [] if builder == "text" or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        kwargs = {} if streaming else {"num_proc": num_proc, "desc": f"Tokenizing {len(files)} {builder} file(s)"}
        parts.append(raw.map(Tokenize(tokenizer, eos), batched=True, remove_columns=["text"], **kwargs))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def build_blocks(
    groups: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data_cache_dir: str | os.PathLike,
    num_proc: int | None = None,
    overwrite_cache: bool = False,
) -> datasets.Dataset:
    """All token blocks of the corpus, from the cache when it holds them, else built and cached."""
    root = Path(data_cache_dir).expanduser()
    target = root / f"blocks-{block_size}-{cache_key(groups, tokenizer, block_size)}"
    if target.is_dir() and not overwrite_cache:
        blocks = datasets.load_from_disk(str(target))
        logger.info(
            f"reusing the token blocks cached at {target} ({len(blocks):,d} blocks of {block_size} tokens; "
            "--overwrite_cache rebuilds them)"
        )
        return blocks
    for builder, files in groups.items():
        if builder != "parquet":
            for name in files:
                check_utf8(name)
    workdir = root / f".building-{target.name}"
    shutil.rmtree(workdir, ignore_errors=True)
    if num_proc and num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers parallelise; avoid fork warnings
    rows = _tokenized(groups, tokenizer, str(workdir / "raw"), num_proc, streaming=False)
    n_tokens = pc.sum(pc.list_value_length(rows.data.column("input_ids"))).as_py() or 0
    if n_tokens < block_size:
        raise ValueError(
            f"the corpus ({sum(map(len, groups.values()))} file(s)) holds {n_tokens} tokens, fewer than one block "
            f"of {block_size}: use a smaller --block_size or more text"
        )
    blocks = datasets.Dataset.from_generator(
        pack,
        features=BLOCK_FEATURES,
        gen_kwargs={"rows": rows, "block_size": block_size},
        cache_dir=str(workdir / "packed"),
        split="train",
    )
    staging = root / f".staging-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    blocks.save_to_disk(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # a run killed while saving leaves no half-written cache behind
    (target / "densessm_sources.json").write_text(
        json.dumps({"files": sorted(f for g in groups.values() for f in g), "block_size": block_size}, indent=1)
    )
    shutil.rmtree(workdir, ignore_errors=True)
    logger.info(f"{n_tokens:,d} tokens -> {len(blocks):,d} blocks of {block_size}, cached at {target}")
    return datasets.load_from_disk(str(target))


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
    """Streaming mode: the first ``n_val`` blocks for validation, the rest shuffled through a buffer."""
    for builder, files in groups.items():
        if builder != "parquet":
            for name in files:
                check_utf8(name, max_bytes=STREAMING_UTF8_CHECK)
    rows = _tokenized(groups, tokenizer, None, None, streaming=True)
    blocks = datasets.IterableDataset.from_generator(
        pack, features=BLOCK_FEATURES, gen_kwargs={"rows": rows, "block_size": block_size}
    )
    train = blocks.skip(n_val).shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return train, (blocks.take(n_val) if n_val else None)


def load_blocks(
    args: DataArguments, tokenizer: PreTrainedTokenizerBase, block_size: int, seed: int
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | datasets.IterableDataset | None]:
    """Training and validation blocks as ``args`` describes them."""
    groups = find_data_files(args.dataset_dir or [BUNDLED_CORPUS], args.debug_mode)
    if args.streaming:
        n_val = 0 if args.validation_split_percentage <= 0 else (args.max_eval_samples or 64)
        if args.validation_files:
            train, _ = stream_blocks(groups, tokenizer, block_size, 0, seed, args.shuffle_buffer_size)
            held_out = find_data_files(args.validation_files)
            _, val = stream_blocks(held_out, tokenizer, block_size, args.max_eval_samples or 64, seed, 1)
        else:
            train, val = stream_blocks(groups, tokenizer, block_size, n_val, seed, args.shuffle_buffer_size)
        if args.max_train_samples is not None:
            train = train.take(args.max_train_samples)
        return train, val
    cache_dir = args.data_cache_dir or Path("~/.cache/densessm/data").expanduser()
    num_proc = args.preprocessing_num_workers or min(os.cpu_count() or 1, 8)
    blocks = build_blocks(groups, tokenizer, block_size, cache_dir, num_proc, args.overwrite_cache)
    if args.validation_files:
        held_out = find_data_files(args.validation_files)
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
    "DataArguments",
    "build_blocks",
    "check_utf8",
    "collate_blocks",
    "find_data_files",
    "load_blocks",
    "split_blocks",
    "stream_blocks",
]
