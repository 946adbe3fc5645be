"""The corpus -> token-block pipeline on tiny fixture corpora: formats, exact block contents, the cache and
its reuse, the deterministic split, streaming, and the errors a user meets with bad inputs."""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from itertools import chain
from pathlib import Path

import datasets
import pytest

from densessm.data import (
    BUNDLED_CORPUS,
    DataArguments,
    _file_documents,
    build_blocks,
    check_utf8,
    find_data_files,
    load_blocks,
    split_blocks,
    stream_blocks,
)
from densessm.tokenizer import BUNDLED_TOKENIZER, load_tokenizer

DOCS = [
    "Fellow-Citizens of the Senate and House of Representatives: the state of the Union is strong.",
    "We meet again in a time of peace and of plenty, and we give thanks for it.",
    "The revenue of the year exceeded the estimates, and the public debt was reduced.",
    "Our commerce with foreign nations has grown, and our ships are seen in every port.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def stream_of(tokenizer, docs, eos=True):
    tail = [tokenizer.eos_token_id] if eos else []
    return list(chain.from_iterable(tokenizer(d, add_special_tokens=False)["input_ids"] + tail for d in docs))


def cut(stream, size):
    return [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]


def test_bundled_tokenizer_and_corpus(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 4096 and (BUNDLED_TOKENIZER / "tokenizer.json").is_file()
    text = "Fellow-Citizens: the Union is strong.\nThank you."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    assert find_data_files([BUNDLED_CORPUS]) == {"json": [str(BUNDLED_CORPUS / "sotu.jsonl.xz")]}


def test_jsonl_blocks_are_the_documents_with_eos_cut_in_blocks(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    blocks = build_blocks(find_data_files([tmp_path / "a.jsonl"]), tokenizer, 8, tmp_path / "cache", num_proc=1)
    assert blocks["input_ids"] == cut(stream_of(tokenizer, DOCS), 8)


def test_txt_keeps_line_breaks_ends_with_eos_and_formats_mix(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(DOCS[0] + "\n" + DOCS[1] + "\n")
    with gzip.open(corpus / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": DOCS[2]}) + "\n")
    datasets.Dataset.from_dict({"text": [DOCS[3]]}).to_parquet(str(corpus / "c.parquet"))
    (corpus / ".hidden.txt").write_text("not part of the corpus")
    groups = find_data_files([corpus])
    assert {k: [os.path.basename(f) for f in v] for k, v in groups.items()} == {
        "text": ["a.txt"],
        "json": ["b.jsonl.gz"],
        "parquet": ["c.parquet"],
    }
    blocks = build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)
    lines = stream_of(tokenizer, [DOCS[0] + "\n", DOCS[1] + "\n"], eos=False) + [tokenizer.eos_token_id]
    # one group per format, in the order their first files come (a.txt, c.parquet, sub/b.jsonl.gz)
    expected = cut(lines + stream_of(tokenizer, DOCS[3:]) + stream_of(tokenizer, DOCS[2:3]), 8)
    assert blocks["input_ids"] == expected
    assert "\n" in tokenizer.decode(list(chain.from_iterable(expected[:3])))


def test_each_txt_file_is_one_document_ending_in_one_eos(tmp_path, tokenizer):
    """Files never run into each other: exactly one EOS between two .txt files (plain and compressed), none
    between the lines of a file, in cached and in streaming mode alike."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCS[0] + "\n" + DOCS[1] + "\n")
    with gzip.open(corpus / "b.txt.gz", "wt") as f:
        f.write(DOCS[2] + "\n" + DOCS[3])  # no final line break: the document still ends
    groups = find_data_files([corpus])
    eos = tokenizer.eos_token_id
    a = stream_of(tokenizer, [DOCS[0] + "\n", DOCS[1] + "\n"], eos=False) + [eos]
    b = stream_of(tokenizer, [DOCS[2] + "\n", DOCS[3]], eos=False) + [eos]
    cached = build_blocks(groups, tokenizer, 4, tmp_path / "cache", num_proc=1)["input_ids"]
    train, _ = stream_blocks(groups, tokenizer, 4, n_val=0, seed=0, shuffle_buffer_size=1)
    streamed = [block["input_ids"] for block in train]
    for blocks in (list(cached), streamed):
        tokens = list(chain.from_iterable(blocks))
        assert tokens == (a + b)[: len(tokens)] and len(a + b) - len(tokens) < 4
        assert tokens.count(eos) == 1 + (len(tokens) == len(a + b))  # one EOS between the files
        assert tokens.index(eos) == len(a) - 1


def test_long_lines_are_read_in_pieces_and_a_json_array_is_read(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("densessm.data.TEXT_LINE_LIMIT", 16)
    long = tmp_path / "long.txt"
    long.write_text(DOCS[0] + DOCS[1])  # one line, longer than the limit: never held whole
    rows = list(_file_documents(str(long)))
    assert "".join(r["text"] for r in rows) == DOCS[0] + DOCS[1] and max(len(r["text"]) for r in rows) == 16
    assert [r["end"] for r in rows] == [False] * (len(rows) - 1) + [True]
    (tmp_path / "records.json").write_text(json.dumps([{"text": DOCS[2]}, {"text": DOCS[3]}], indent=1))
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps({"text": DOCS[0]}) + "\n", encoding="utf-8")
    blocks = build_blocks(find_data_files([tmp_path]), tokenizer, 2, tmp_path / "cache", num_proc=1)["input_ids"]
    eos = tokenizer.eos_token
    expected = DOCS[0] + eos + DOCS[2] + eos + DOCS[3] + eos + DOCS[0] + DOCS[1]  # JSON files, then the text file
    assert tokenizer.decode(list(chain.from_iterable(blocks))).startswith(expected)


def test_multiprocess_reading_and_tokenizing_give_the_same_blocks(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", DOCS * 50)
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text("\n".join(DOCS[i:] * 5))
    groups = find_data_files([tmp_path])
    one = build_blocks(groups, tokenizer, 16, tmp_path / "one", num_proc=1)
    two = build_blocks(groups, tokenizer, 16, tmp_path / "two", num_proc=2)
    assert one["input_ids"] == two["input_ids"]
    assert list(chain.from_iterable(one["input_ids"])).count(tokenizer.eos_token_id) >= 3 + 200 - 1


def test_cache_is_reused_and_says_so_and_rebuilt_when_inputs_change(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    groups = find_data_files([path])
    first = build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)
    assert len(list((tmp_path / "cache").glob("blocks-8-*"))) == 1
    with caplog.at_level(logging.INFO, logger="densessm.data"):
        again = build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)
    assert "reusing the token blocks cached at" in caplog.text
    assert again["input_ids"] == first["input_ids"]

    caplog.clear()
    write_jsonl(path, DOCS[:2])
    future = time.time() + 10
    os.utime(path, (future, future))  # a new mtime even on coarse-grained file systems
    with caplog.at_level(logging.INFO, logger="densessm.data"):
        changed = build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)
    assert "reusing" not in caplog.text
    assert changed["input_ids"] == cut(stream_of(tokenizer, DOCS[:2]), 8)


def test_split_is_deterministic_disjoint_and_at_least_one_block(tmp_path, tokenizer):
    blocks = datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(200)]})
    train, val = split_blocks(blocks, 5.0)
    train2, val2 = split_blocks(blocks, 5.0)
    assert len(val) == 10 and len(train) == 190
    assert val["input_ids"] == val2["input_ids"] and train["input_ids"] == train2["input_ids"]
    assert not {b[0] for b in val["input_ids"]} & {b[0] for b in train["input_ids"]}
    assert len(split_blocks(blocks, 0.001)[1]) == 1  # the reference script's 0.001 still holds out a block
    assert split_blocks(blocks, 0)[1] is None
    with pytest.raises(ValueError, match="too few to hold out"):
        split_blocks(blocks.select([0]), 50)


def test_load_blocks_applies_limits(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", DOCS * 20)
    args = DataArguments(
        dataset_dir=[str(tmp_path / "a.jsonl")],
        data_cache_dir=str(tmp_path / "cache"),
        validation_split_percentage=10,
        preprocessing_num_workers=1,
        max_train_samples=5,
        max_eval_samples=2,
    )
    train, val = load_blocks(args, tokenizer, 16, seed=0)
    assert (len(train), len(val)) == (5, 2)


def test_validation_files_replace_the_split(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", DOCS * 3)
    held_path = write_jsonl(tmp_path / "held.jsonl", [d.upper() for d in DOCS] * 3)
    held_blocks = cut(stream_of(tokenizer, [d.upper() for d in DOCS] * 3), 8)
    common = {
        "dataset_dir": [str(train_path)],
        "data_cache_dir": str(tmp_path / "cache"),
        "preprocessing_num_workers": 1,
    }
    args = DataArguments(validation_files=[str(held_path)], **common)
    train, val = load_blocks(args, tokenizer, 8, seed=0)
    assert train["input_ids"] == cut(stream_of(tokenizer, DOCS * 3), 8)  # every training block, none held out
    assert val["input_ids"] == held_blocks
    subset = load_blocks(
        DataArguments(validation_files=[str(held_path)], max_eval_samples=3, **common), tokenizer, 8, 0
    )
    again = load_blocks(DataArguments(validation_files=[str(held_path)], max_eval_samples=3, **common), tokenizer, 8, 1)
    assert subset[1]["input_ids"] == again[1]["input_ids"]  # a fixed subset: the training seed does not move it
    assert len(subset[1]) == 3 and all(b in held_blocks for b in subset[1]["input_ids"])
    assert subset[1]["input_ids"] != held_blocks[:3] or len(held_blocks) == 3  # sampled across the file
    streamed = DataArguments(validation_files=[str(held_path)], streaming=True, max_eval_samples=2, **common)
    train, val = load_blocks(streamed, tokenizer, 8, seed=0)
    assert [b["input_ids"] for b in val] == held_blocks[:2]
    assert sorted(b["input_ids"] for b in train) == sorted(cut(stream_of(tokenizer, DOCS * 3), 8))


def test_streaming_gives_the_same_blocks_lazily(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS * 5)
    groups = find_data_files([path])
    cached = build_blocks(groups, tokenizer, 8, tmp_path / "cache", num_proc=1)["input_ids"]
    train, val = stream_blocks(groups, tokenizer, 8, n_val=3, seed=0, shuffle_buffer_size=1000)
    assert isinstance(train, datasets.IterableDataset)
    assert [b["input_ids"] for b in val] == cached[:3]
    streamed = sorted(b["input_ids"] for b in train)
    assert streamed == sorted(cached[3:])


def test_errors_name_the_problem(tmp_path, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty"):
        find_data_files([empty])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"no readable files in .*other.*found notes\.csv"):
        find_data_files([other])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_data_files([tmp_path / "missing"])

    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "good.txt").write_text("plain ascii\n")
    (latin / "bad.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad\.txt is not UTF-8 text: .* at byte 3"):
        build_blocks(find_data_files([latin]), tokenizer, 4, tmp_path / "cache", num_proc=1)
    with pytest.raises(ValueError, match=r"bad\.txt is not UTF-8 text"):  # streaming checks each file's start
        stream_blocks(find_data_files([latin]), tokenizer, 4, n_val=0, seed=0, shuffle_buffer_size=10)
    late = tmp_path / "late.txt"
    late.write_bytes(b"a" * 5000 + "\u00e9 and more".encode("latin-1"))
    check_utf8(late, chunk_size=1024, max_bytes=2048)  # only the start is read
    with pytest.raises(ValueError, match=r"late\.txt is not UTF-8 text: .* at byte 5000"):
        check_utf8(late, chunk_size=1024)

    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'text' field in .*no_text\.jsonl line 1 \(fields found: body\)"):
        build_blocks(find_data_files([no_text]), tokenizer, 4, tmp_path / "cache", num_proc=1)

    short = write_jsonl(tmp_path / "short.jsonl", ["too short"])
    with pytest.raises(ValueError, match="holds 4 tokens, fewer than one block of 512"):
        build_blocks(find_data_files([short]), tokenizer, 512, tmp_path / "cache", num_proc=1)


def test_reference_llama_tokenizer_can_be_used(tmp_path):
    pytest.importorskip("sentencepiece")
    reference = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "dense_gau_retnet_350m"
    if not (reference / "tokenizer.model").is_file():
        pytest.skip(f"reference tokenizer not found at {reference}")
    llama = load_tokenizer(reference)
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    blocks = build_blocks(find_data_files([path]), llama, 8, tmp_path / "cache", num_proc=1)
    assert blocks["input_ids"] == cut(stream_of(llama, DOCS), 8)
